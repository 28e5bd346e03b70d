"""The child process that compiles and runs kernels, so a crashing or hanging kernel takes
down this process and not kt (the way Modular's kbench keeps its driver apart from the kernels).

    python -m harness.verify.worker '<job json>'

Events go to stdout as `harness.children` lines; anything else a kernel or MAX prints is kept
by the parent for the crash report. SIGTERM is KeyboardInterrupt here (cleanups run), and the
process dies with kt.
"""

from __future__ import annotations

import json
import sys

from harness.children import die_with_parent, emit


def main(argv: list[str]) -> int:
    die_with_parent()  # first: a kt killed during the imports below must not leave this behind
    import pykernels
    from harness.build import BuildError
    from harness.verify.engine import PROFILES, verify_kernel

    job = json.loads(argv[1])
    try:
        result = verify_kernel(
            pykernels.get(job["kernel"]), job["dtypes"], job["device"], job.get("package"),
            job["examples"], job.get("seed"), PROFILES[job["profile"]], job.get("replay"),
            job.get("triton", True), emit, job.get("case_timeout"),
        )
    except BuildError as e:
        emit({"event": "error", "message": str(e)})
        return 2
    emit({"event": "result", "result": result})
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except KeyboardInterrupt:
        sys.exit(130)
