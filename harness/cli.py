"""The `kt` command line: short click functions that parse and call `harness`."""

from __future__ import annotations

import json
import os
import sys

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from harness.serving.cli import make_model, serve_bench

out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)


class KtError(click.ClickException):
    """A user-facing failure: printed as one line, exit code 2."""

    exit_code = 2


def _specs(names: tuple[str, ...]):
    import pykernels

    try:
        return [pykernels.get(n) for n in names] if names else list(pykernels.discover().values())
    except KeyError as e:
        raise KtError(e.args[0]) from None


def _dtypes(spec, requested: tuple[str, ...]) -> list[str]:
    from harness.spec import canonical_dtype

    try:
        wanted = [canonical_dtype(d) for d in requested] if requested else list(spec.dtypes)
    except ValueError as e:
        raise KtError(str(e)) from None
    unsupported = [d for d in wanted if d not in spec.dtypes]
    if unsupported:
        raise KtError(f"{spec.name} does not support dtype {', '.join(unsupported)} "
                      f"(supported: {', '.join(spec.dtypes)})")
    return wanted


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """kt: write a Mojo kernel, prove it right, measure it, see it serve."""


@cli.command("list")
def list_kernels() -> None:
    """The kernels kt ships (found by scanning pykernels/)."""
    from rich.table import Table

    table = Table(header_style="bold")
    for col in ("kernel", "op", "dtypes", "axes", "params", "summary"):
        table.add_column(col)
    for spec in _specs(()):
        axes = ", ".join(a.name for a in spec.axes) + (
            f" (derived {', '.join(spec.derived)})" if spec.derived else "")
        table.add_row(spec.name, spec.op, ", ".join(spec.dtypes), axes,
                      ", ".join(p.name for p in spec.params), spec.summary)
    out.print(table)


@cli.command()
@click.argument("kernels", nargs=-1)
@click.option("--device", type=click.Choice(["cpu", "gpu", "all"]), default="all", show_default=True,
              help="Where to run: the CPU, the GPU, or every device present.")
@click.option("--dtype", "dtypes", multiple=True, help="float32 / bfloat16 / float16 (repeatable).")
@click.option("--examples", type=click.IntRange(1), default=None,
              help="Hypothesis examples per kernel and device [profile default].")
@click.option("--seed", type=int, default=None, help="Hypothesis seed (replays a run).")
@click.option("--kernels", "package", type=click.Path(), default=None,
              help="Verify your own Mojo package registering the same op names.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write every result, with provenance, to this file.")
@click.option("--profile", type=click.Choice(["ci", "local"]), default=None,
              help="Hypothesis profile [ci when $CI is set, else local].")
@click.option("--replay", default=None, help="Run one case, as printed by a failing run.")
@click.option("--no-triton", is_flag=True, help="Skip the Triton twin column.")
def verify(kernels, device, dtypes, examples, seed, package, json_path, profile, replay, no_triton):
    """Check Mojo kernels against PyTorch and Triton on Hypothesis-drawn shapes."""
    from harness.build import resolve_run
    from harness.io import provenance, write_json_atomic
    from harness.report import all_passed, render
    from harness.runner import run_job
    from harness.verify import PROFILES

    specs = _specs(kernels)
    try:
        targets, package = resolve_run(device, package)
    except ValueError as e:
        raise KtError(str(e)) from None
    case = None
    if replay is not None:
        if len(specs) != 1:
            raise KtError("--replay takes exactly one kernel")
        try:
            case = json.loads(replay)
            problem = specs[0].validate(case["shape"], case["params"])
            dtypes = (case["dtype"],)
        except (ValueError, KeyError, TypeError) as e:
            raise KtError(f"--replay is not a case printed by kt verify ({e})") from None
        if problem:
            raise KtError(f"--replay: {problem}")
    prof = PROFILES[profile or ("ci" if os.environ.get("CI") else "local")]
    jobs = [
        {"kernel": s.name, "dtypes": _dtypes(s, dtypes), "device": d.kind, "package": package,
         "examples": examples or prof.examples, "seed": seed, "profile": prof.name,
         "replay": case, "triton": not no_triton}
        for s in specs for d in targets
    ]
    results: list[dict] = []
    record = {"command": "kt " + " ".join(sys.argv[1:]), "provenance": provenance(targets),
              "profile": prof.name, "results": results}
    interrupted = False
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
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

                results.append(run_job(job, on_event))
                progress.update(task, completed=progress.tasks[task].total)
        except KeyboardInterrupt:
            interrupted = True
    errors = {r["message"] for r in results if r["status"] == "error"}
    if results and len(errors) == 1 and all(r["status"] == "error" for r in results):
        if json_path:
            write_json_atomic(json_path, record)
        raise KtError(errors.pop())
    render(results, out, package)
    if json_path:
        record["interrupted"] = interrupted
        write_json_atomic(json_path, record)
        out.print(f"results written to {json_path}")
    if interrupted:
        raise KtError("interrupted: the results so far are above" + (f" and in {json_path}" if json_path else ""))
    return 0 if all_passed(results) else 1


@cli.command()
@click.argument("kernel")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default=None,
              help="Where to run [gpu when one is visible, else cpu].")
@click.option("--shapes", "families", multiple=True,
              help="Shape family of benchmarks/KERNEL.toml (repeatable or comma-separated) "
                   "[cpu families on the CPU, every other family on a GPU].")
@click.option("--providers", default=None, help="Comma-separated providers [all; see --list].")
@click.option("--baseline", default=None,
              help="Provider speedups are relative to [the file's baseline on a GPU, else the "
                   "fastest non-kt provider].")
@click.option("--save", "--json", "save", type=click.Path(dir_okay=False), default=None,
              help="Write every row, with provenance, to this JSON file (also after Ctrl-C).")
@click.option("--compare", "compare_path", type=click.Path(exists=True, dir_okay=False),
              default=None, help="Compare with a saved run; exit code 1 if any row regressed "
                                 "beyond noise (max(2 x combined (p90-p10)/p50, 5%)).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="PNG: TFLOP/s (GB/s for memory-bound families) vs sequence length.")
@click.option("--kernels", "package", type=click.Path(), default=None,
              help="Benchmark your own Mojo package registering the same op names.")
@click.option("--seed", type=int, default=0, show_default=True, help="Input data seed.")
@click.option("--budget", type=click.FloatRange(0.01), default=None,
              help="Seconds of timed calls per measurement [0.4 GPU, 0.25 CPU].")
@click.option("--list", "list_only", is_flag=True, help="List families and providers; run nothing.")
def microbench(kernel, device, families, providers, baseline, save, compare_path, plot_path,
               package, seed, budget, list_only):
    """Check, then time, every provider of KERNEL's op on named shape families.

    Exit code 0, 1 when --compare finds a regression, 2 on bad input or Ctrl-C."""
    from harness import microbench as mb

    try:
        return mb.cli_main(kernel, device, list(families), providers, baseline, save,
                           compare_path, plot_path, package, seed, budget, list_only, out, err)
    except mb.MicrobenchError as e:
        raise KtError(str(e)) from None


cli.add_command(make_model)
cli.add_command(serve_bench)


def main() -> None:
    """Entry point: bad input is one line on stderr and a non-zero exit, never a traceback."""
    try:
        rv = cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        err.print("kt: interrupted")
        sys.exit(130)
    except click.ClickException as e:
        print(f"kt: error: {e.format_message()}", file=sys.stderr)
        sys.exit(e.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)
