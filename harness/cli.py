"""The `kt` command line: short click functions that parse and call each command's package
(`harness.verify.cli`, `harness.bench.cli`, `harness.serving.cli`).

What a command needs (torch, the specs, its package) is imported inside it: `kt --help` and
`kt serve-bench` start without torch, and `kt microbench --device cpu` must choose Triton's
interpreter (`devices.prepare_bench_device`) before `pykernels` imports triton."""

from __future__ import annotations

import sys

import click
from rich.console import Console

from harness.children import interrupt_on_sigterm
from harness.serving.cli import make_model, serve_bench, serve_compile

out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)


MAX_EXAMPLES = 100_000


class KtError(click.ClickException):
    """A user-facing failure: printed as one line, exit code 2 (bad input or environment) or
    130 (interrupted, after saving what finished)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _saved_run(ctx, param, value):
    """A saved run's path must name a file: itself, or its .xz beside it (`io.result_path`)."""
    from harness.io import result_path

    if value is not None and not result_path(value).is_file():
        nor = "" if str(value).endswith(".xz") else f" (nor {value}.xz)"
        raise click.BadParameter(f"File {value!r} does not exist{nor}.", ctx, param)
    return value


def case_timeout_option(what: str):
    return click.option(
        "--case-timeout", type=click.FloatRange(0.1, 86400), default=None, metavar="SECONDS",
        help=f"Time limit of {what}; past it the child running it is stopped and the verdict "
             "is HANG [derived from the case's size].")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """kt: write a Mojo kernel, prove it right, measure it, see it serve."""


@cli.command("list")
@click.option("--names", is_flag=True, help="Only the kernel names, one per line (for scripts).")
def list_kernels(names) -> None:
    """The kernels kt ships (found by scanning pykernels/)."""
    import pykernels
    from rich.table import Table

    specs = list(pykernels.discover().values())
    if names:
        click.echo("\n".join(s.name for s in specs))
        return
    table = Table(header_style="bold")
    for col in ("kernel", "op", "dtypes", "axes", "params", "summary"):
        table.add_column(col)
    for spec in specs:
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
@click.option("--examples", type=click.IntRange(1, MAX_EXAMPLES), default=None,
              help="Hypothesis examples per kernel and device, at most 100000 [profile default].")
@click.option("--seed", type=int, default=None, help="Hypothesis seed (replays a run).")
@click.option("--kernels", "package", type=click.Path(), default=None,
              help="Verify your own Mojo package registering the same op names.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write every result, with provenance, to this file.")
@click.option("--profile", type=click.Choice(["ci", "local"]), default=None,
              help="Hypothesis profile [ci when $CI is set, else local].")
@click.option("--replay", default=None, help="Run one case, as printed by a failing run.")
@click.option("--no-triton", is_flag=True, help="Skip the Triton twin column.")
@case_timeout_option("one case (every implementation on it)")
def verify(kernels, device, dtypes, examples, seed, package, json_path, profile, replay, no_triton,
           case_timeout):
    """Check Mojo kernels against PyTorch and Triton on Hypothesis-drawn shapes.

    Exit code 0 when every verdict is PASS, 1 for any other verdict, 2 on bad input, 130 on
    Ctrl-C or SIGTERM (after saving the results so far)."""
    from harness.verify.cli import VerifyError, verify_command

    try:
        return verify_command(kernels, device, dtypes, examples, seed, package, json_path,
                              profile, replay, no_triton, out, err, case_timeout)
    except VerifyError as e:
        raise KtError(str(e), e.exit_code) from None


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
@click.option("--compare", "compare_path", type=click.Path(dir_okay=False), callback=_saved_run,
              default=None, help="Compare with a saved run (FILE.json, or FILE.json.xz as "
                                 "committed); exit code 1 if any row regressed beyond noise "
                                 "(max(2 x combined (p90-p10)/p50, 5%)).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="PNG: TFLOP/s (GB/s for memory-bound families) vs sequence length.")
@click.option("--kernels", "package", type=click.Path(), default=None,
              help="Benchmark your own Mojo package registering the same op names.")
@click.option("--seed", type=int, default=0, show_default=True, help="Input data seed.")
@click.option("--budget", type=click.FloatRange(0.01), default=None,
              help="Seconds of interleaved rounds per provider of a case [0.3 GPU, "
                   "0.25 CPU].")
@click.option("--list", "list_only", is_flag=True, help="List families and providers; run nothing.")
@case_timeout_option("one step of a provider (its check and timing; compiling is not limited)")
def microbench(kernel, device, families, providers, baseline, save, compare_path, plot_path,
               package, seed, budget, list_only, case_timeout):
    """Check, then time, every provider of KERNEL's op on named shape families.

    Exit code 0; 1 when --compare finds a regression or a provider hung or crashed; 2 on bad
    input (or when --compare matched no row); 130 on Ctrl-C or SIGTERM, after saving the rows
    finished."""
    from harness import devices

    device = devices.prepare_bench_device(device)
    from harness.bench import MicrobenchError
    from harness.bench.cli import microbench_command

    try:
        return microbench_command(kernel, device, list(families), providers, baseline, save,
                                  compare_path, plot_path, package, seed, budget, list_only,
                                  out, err, case_timeout)
    except MicrobenchError as e:
        raise KtError(str(e), e.exit_code) from None


cli.add_command(make_model)
cli.add_command(serve_bench)
cli.add_command(serve_compile)


def main() -> None:
    """Entry point: bad input is one line on stderr and a non-zero exit, never a traceback;
    SIGTERM is Ctrl-C (serve-bench installs its own handlers), exit code 130."""
    try:
        with interrupt_on_sigterm():
            rv = cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        err.print("kt: interrupted")
        sys.exit(130)
    except click.ClickException as e:
        print(f"kt: error: {e.format_message()}", file=sys.stderr)
        sys.exit(e.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)
