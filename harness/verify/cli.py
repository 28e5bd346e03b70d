"""`kt verify`'s body, after click parsed the flags: one child process per (kernel, device),
a progress bar (plain lines in a log), the verdict table and the `--json` record."""

from __future__ import annotations

import json
import os

from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

import pykernels
from harness.build import resolve_run
from harness.children import INTERRUPT_EXIT, interrupt_on_sigterm
from harness.io import command_line, provenance, unwritable, write_json_atomic
from harness.spec import KernelSpec, canonical_dtype
from harness.verify.engine import PROFILES, case_problem
from harness.verify.jobs import JobInterrupted, run_job_in_child
from harness.verify.report import all_passed, render


class VerifyError(Exception):
    """A user-facing problem (unknown kernel or dtype, bad --replay, ...); one line, exit
    code `exit_code`: 2 for bad input, 130 for Ctrl-C / SIGTERM after saving."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def specs_named(names: tuple[str, ...] | list[str]) -> list[KernelSpec]:
    """The specs called `names`, or every discovered one; VerifyError on an unknown name."""
    try:
        return [pykernels.get(n) for n in names] if names else list(pykernels.discover().values())
    except KeyError as e:
        raise VerifyError(e.args[0]) from None


def dtypes_for(spec: KernelSpec, requested: tuple[str, ...]) -> list[str]:
    """`requested` dtypes as canonical names (all of the spec's when empty), each supported."""
    try:
        wanted = [canonical_dtype(d) for d in requested] if requested else list(spec.dtypes)
    except ValueError as e:
        raise VerifyError(str(e)) from None
    unsupported = [d for d in wanted if d not in spec.dtypes]
    if unsupported:
        raise VerifyError(f"{spec.name} does not support dtype {', '.join(unsupported)} "
                          f"(supported: {', '.join(spec.dtypes)})")
    return wanted


def parse_replay(specs: list[KernelSpec], replay: str) -> dict:
    """The case of `--replay`, checked in full against the one kernel's spec before any kernel
    runs (`case_problem`); a dtype alias (bf16) is accepted and named canonically."""
    if len(specs) != 1:
        raise VerifyError("--replay takes exactly one kernel")
    try:
        case = json.loads(replay)
    except ValueError as e:
        raise VerifyError(f"--replay is not JSON ({e})") from None
    if isinstance(case, dict) and isinstance(case.get("dtype"), str):
        try:
            case["dtype"] = canonical_dtype(case["dtype"])
        except ValueError:
            pass  # case_problem names the dtypes the kernel runs
    problem = case_problem(specs[0], case)
    if problem:
        raise VerifyError(f"--replay is not a case of {specs[0].name}: {problem}")
    return case


def verify_command(kernels, device, dtypes, examples, seed, package, json_path, profile, replay,
                   no_triton, out, err, case_timeout: float | None = None) -> int:
    """`kt verify`: returns the exit code (0: every verdict PASS, 1: any other verdict);
    VerifyError on bad input (before any work), on Ctrl-C or SIGTERM (after the results so
    far, with the examples passed by the job it stopped, are shown and saved) and when every
    job failed with the same build error."""
    specs = specs_named(kernels)
    if json_path and (problem := unwritable(json_path, "--json")):
        raise VerifyError(problem)
    try:
        targets, package = resolve_run(device, package)
    except ValueError as e:
        raise VerifyError(str(e)) from None
    case = None
    if replay is not None:
        case = parse_replay(specs, replay)
        dtypes = (case["dtype"],)
    prof = PROFILES[profile or ("ci" if os.environ.get("CI") else "local")]
    jobs = [
        {"kernel": s.name, "dtypes": dtypes_for(s, dtypes), "device": d.kind, "package": package,
         "examples": examples or prof.examples, "seed": seed, "profile": prof.name,
         "replay": case, "triton": not no_triton, "case_timeout": case_timeout}
        for s in specs for d in targets
    ]
    results: list[dict] = []
    record = {"command": command_line(), "provenance": provenance(targets),
              "profile": prof.name, "results": results}
    interrupted = False
    with interrupt_on_sigterm(), Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
            TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
            console=err, transient=True) as progress:
        try:
            for job in jobs:
                label = f"{job['kernel']} on {job['device']}"
                task = progress.add_task(label, total=job["examples"] + 1)

                def on_event(ev, task=task, label=label):
                    if ev["event"] == "compiling":
                        progress.update(task, description=f"{label}: compiling {ev['dtype']}")
                    elif ev["event"] == "example":
                        progress.update(task, description=f"{label}: examples", completed=ev["n"],
                                        total=max(ev["n"], progress.tasks[task].total or 0))
                    if not err.is_terminal:  # plain lines for CI logs, where bars don't draw
                        if ev["event"] == "compiled":
                            err.print(f"{label}: compiled {ev['dtype']} in {ev['seconds']:.1f} s")
                        elif ev["event"] == "example" and ev["n"] % 50 == 0:
                            err.print(f"{label}: {ev['n']} examples")

                results.append(run_job_in_child(job, on_event))
                progress.update(task, completed=progress.tasks[task].total)
        except JobInterrupted as e:
            results.append(e.result)
            interrupted = True
        except KeyboardInterrupt:
            interrupted = True
    errors = {r["message"] for r in results if r["status"] == "error"}
    if results and len(errors) == 1 and all(r["status"] == "error" for r in results):
        if json_path:
            write_json_atomic(json_path, record)
        raise VerifyError(errors.pop())
    render(results, out, package)
    if json_path:
        record["interrupted"] = interrupted
        write_json_atomic(json_path, record)
        out.print(f"results written to {json_path}")
    if interrupted:
        raise VerifyError("interrupted: the results so far are above"
                          + (f" and in {json_path}" if json_path else ""), INTERRUPT_EXIT)
    return 0 if all_passed(results) else 1
