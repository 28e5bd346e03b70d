"""The child process that compiles and runs kernels, so a crashing kernel takes down this
process and not kt (the way Modular's kbench keeps its driver apart from the kernels).

    python -m harness.verify.worker '<job json>'

Events go to stdout as lines starting with `jobs.PREFIX`; anything else a kernel or MAX
prints is kept by the parent for the crash report.
"""

from __future__ import annotations

import json
import sys

import pykernels
from harness.build import BuildError
from harness.verify.engine import PROFILES, verify_kernel
from harness.verify.jobs import PREFIX


def emit(event: dict) -> None:
    sys.stdout.write(PREFIX + json.dumps(event) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    job = json.loads(argv[1])
    try:
        result = verify_kernel(
            pykernels.get(job["kernel"]), job["dtypes"], job["device"], job.get("package"),
            job["examples"], job.get("seed"), PROFILES[job["profile"]], job.get("replay"),
            job.get("triton", True), emit,
        )
    except BuildError as e:
        emit({"event": "error", "message": str(e)})
        return 2
    emit({"event": "result", "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
