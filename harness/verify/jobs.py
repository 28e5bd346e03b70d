"""Runs verify jobs in child processes (`harness.verify.worker`, through `harness.children`)
and turns their deaths into reports: a child that dies is a CRASH, one that sends nothing
within its case's time limit is stopped and is a HANG, one stopped by Ctrl-C or SIGTERM keeps
the examples it passed (status `interrupted`). Each names the case it was running."""

from __future__ import annotations

import os
from typing import Callable

from harness.children import Child, TimedOut


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM during a job: the child is stopped; `result` is what it had passed."""

    def __init__(self, result: dict) -> None:
        super().__init__("interrupted")
        self.result = result


def run_job_in_child(job: dict, on_event: Callable[[dict], None]) -> dict:
    """Run one (kernel, device) job; returns {'status': ok|error|crash|hang, ...}, raises
    JobInterrupted on Ctrl-C or SIGTERM."""
    env = dict(os.environ)
    if job["device"] == "cpu":
        # The Triton twin runs in Triton's interpreter (set before triton is imported);
        # numpy's BLAS threads fighting torch's on a small CPU make it several times slower.
        env["TRITON_INTERPRET"] = "1"
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
    child = Child("harness.verify.worker", job, env)
    last_case, result, error = None, None, None
    passed: dict[str, int] = {}

    def partial(status: str, **extra) -> dict:
        return {"status": status, "kernel": job["kernel"], "device": job["device"],
                "dtypes": job["dtypes"], "last_case": last_case, "passed": dict(passed),
                "examples": sum(passed.values()), "log_tail": list(child.tail), **extra}

    try:
        for event in child.events():
            kind = event["event"]
            if kind in ("case", "integrity"):
                last_case = event["case"]
            elif kind == "example" and event["passed"]:
                passed[event["dtype"]] = passed.get(event["dtype"], 0) + 1
            elif kind == "result":
                result = event["result"]
            elif kind == "error":
                error = event["message"]
            on_event(event)
    except TimedOut as e:
        child.stop()
        return partial("hang", limit_s=e.limit_s)
    except KeyboardInterrupt:
        child.stop()
        raise JobInterrupted(partial("interrupted")) from None
    except BaseException:
        child.stop()
        raise
    how = child.how_it_ended()
    if result is not None:
        return {"status": "ok", **result}
    if error is not None:
        return {"status": "error", "kernel": job["kernel"], "device": job["device"], "message": error}
    return partial("crash", how=how or "exit code 0 without a result")
