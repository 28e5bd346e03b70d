"""Runs verify jobs in child processes (`harness.verify.worker`) and turns their deaths into
reports. A child reports events on stdout as lines starting with `PREFIX`; anything else a
kernel or MAX prints is kept for the crash report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import deque
from typing import Callable

PREFIX = "@@kt "


def run_job_in_child(job: dict, on_event: Callable[[dict], None]) -> dict:
    """Run one (kernel, device) job; returns {'status': ok|error|crash, ...}."""
    env = dict(os.environ)
    if job["device"] == "cpu":
        # The Triton twin runs in Triton's interpreter (set before triton is imported);
        # numpy's BLAS threads fighting torch's on a small CPU make it several times slower.
        env["TRITON_INTERPRET"] = "1"
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.verify.worker", json.dumps(job)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        text=True, env=env,
    )
    tail: deque[str] = deque(maxlen=30)
    last_case, result, error = None, None, None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not line.startswith(PREFIX):
                tail.append(line.rstrip())
                continue
            event = json.loads(line[len(PREFIX):])
            kind = event["event"]
            if kind == "case":
                last_case = event["case"]
            elif kind == "result":
                result = event["result"]
            elif kind == "error":
                error = event["message"]
            on_event(event)
        proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if result is not None:
        return {"status": "ok", **result}
    if error is not None:
        return {"status": "error", "kernel": job["kernel"], "device": job["device"], "message": error}
    rc = proc.returncode
    how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
    return {"status": "crash", "kernel": job["kernel"], "device": job["device"], "how": how,
            "last_case": last_case, "log_tail": list(tail)}
