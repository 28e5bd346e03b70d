"""`kt microbench`'s body, after click parsed the flags: pick families and providers, run
them with a progress bar (time-stamped lines in a log), save after every case, then the
table, `--compare` and `--plot`."""

from __future__ import annotations

import os
import time
from pathlib import Path

from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

import pykernels
from harness.bench import MicrobenchError
from harness.bench.child import run_in_child
from harness.bench.compare import compare_records, load_rows
from harness.bench.engine import CPU_TIMER_LABEL, Settings, cpu_settings
from harness.bench.families import load_bench_file, select_families, with_providers
from harness.bench.plots import plot
from harness.bench.providers import providers_of, select_providers
from harness.bench.report import render, render_comparison, row_seconds
from harness.bench.summary import target_changes
from harness.build import resolve_run
from harness.children import INTERRUPT_EXIT, interrupt_on_sigterm
from harness.io import command_line, unwritable, write_json_atomic


def process_age_s() -> float:
    """Seconds since this process started (Linux's /proc), else 0."""
    try:
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - int(stat[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def microbench_command(kernel: str, device: str, families: list[str], providers: str | None,
                       baseline: str | None, save, compare_path, plot_path, package, seed: int,
                       budget: float | None, list_only: bool, out, err,
                       case_timeout: float | None = None) -> int:
    """`kt microbench` on `device` ("cpu" or "gpu", from `devices.prepare_bench_device`, called
    before this module was imported); returns the exit code (0; 1 for a regression, or a
    provider that hung or crashed), raises MicrobenchError (bad input, found before any work;
    nothing matched by --compare; Ctrl-C or SIGTERM, after saving the rows finished)."""
    t_start = time.perf_counter() - process_age_s()
    try:
        spec = pykernels.get(kernel)
    except KeyError as e:
        raise MicrobenchError(e.args[0]) from None
    bench_file = load_bench_file(spec)
    all_families = bench_file.families
    if list_only:
        for f in all_families.values():
            out.print(f"family {f.name} ({f.device}, {f.dtype}, {f.bound}-bound, "
                      f"{len(f.cases)} shapes): {f.doc}", highlight=False)
        out.print(f"providers: {', '.join(providers_of(spec))}", highlight=False)
        return 0
    chosen = select_families(spec, all_families, families, device)
    names = select_providers(spec, providers)
    if baseline is not None and baseline not in providers_of(spec):
        raise MicrobenchError(f"unknown baseline provider {baseline!r} "
                              f"(providers: {', '.join(providers_of(spec))})")
    if baseline is None and device == "gpu":
        baseline = bench_file.baseline
    try:
        _, package = resolve_run(device, package)
    except ValueError as e:
        raise MicrobenchError(str(e)) from None
    for flag, path in (("--save", save), ("--plot", plot_path)):
        if path and (problem := unwritable(path, flag)):
            raise MicrobenchError(problem)
    old_rows = load_rows(compare_path) if compare_path else None
    if old_rows is not None and not any(r.get("kernel") == spec.name for r in old_rows):
        kernels = sorted({str(r.get("kernel")) for r in old_rows})
        raise MicrobenchError(f"--compare {compare_path}: no row of kernel {spec.name} to compare "
                              f"with (its rows: {', '.join(kernels) or 'none'})")
    settings = cpu_settings() if device == "cpu" else Settings()
    settings.seed = seed
    if budget is not None:
        settings.budget_s = budget
    if device == "cpu":
        err.print(f"[bold yellow]{CPU_TIMER_LABEL}[/]")

    chosen = with_providers(chosen, names)
    if not chosen:
        raise MicrobenchError(f"none of the providers {', '.join(names)} runs on the families "
                              "chosen (a family's `providers` in its benchmark file)")
    total = sum(len(f.cases) * len(f.runs(names)) for f in chosen)

    def log(line: str) -> None:  # a log (not a terminal) gets a line per step, time-stamped
        if not err.is_terminal:
            err.print(f"[{time.perf_counter() - t_start:.0f} s] {line}", highlight=False,
                      markup=False, soft_wrap=True)

    log(f"{spec.name}: {sum(len(f.cases) for f in chosen)} shapes x {len(names)} providers, "
        f"{total} runs (seconds since the process started)")
    with interrupt_on_sigterm(), Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
            TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
            console=err, transient=True) as progress:
        task = progress.add_task(f"{spec.name}", total=total)

        def on_event(ev: dict) -> None:
            if ev["event"] == "reference":
                progress.update(task, description=f"{ev['family']} {ev['shape']}: reference")
            elif ev["event"] == "reference_done":
                log(f"{ev['family']} {ev['shape']}: inputs and reference, {ev['seconds']:.1f} s")
            elif ev["event"] == "provider":
                progress.update(task, description=f"{ev['family']} {ev['shape']}: {ev['provider']}")
            elif ev["event"] == "case" and save:  # a killed run keeps what it measured
                write_json_atomic(save, ev["record"])
            elif ev["event"] == "row":
                progress.advance(task)
                r = ev["row"]
                p50 = (f"{r['p50']:.4f} ms (host {r['host_ms']:.3f} ms)" if "p50" in r
                       else r.get("note", ""))
                log(f"{r['family']} {r['label']} {r['provider']}: {r['status']} {p50} "
                    f"[{row_seconds(r)}]")

        record = run_in_child(spec, device, chosen, names, package, settings, baseline,
                              command_line(), on_event, case_timeout)
    if "timer" in record:  # else stopped before the child said what it measures with
        render(record, out)
    if save:
        write_json_atomic(save, record)
        out.print(f"results written to {save}")
    dead = [r for r in record["rows"] if r["status"] in ("hang", "crash")]
    code = 1 if dead else 0
    nothing_compared = False
    if old_rows is not None and not record["interrupted"]:
        cmp = compare_records(record["rows"], old_rows)
        render_comparison(cmp, out, compare_path, target_changes(spec, record["rows"], old_rows))
        code = 1 if cmp["regressions"] else code
        nothing_compared = not cmp["matched"]
    if plot_path:
        try:
            plot(record, Path(plot_path))
            out.print(f"plot written to {plot_path}")
        except MicrobenchError as e:
            err.print(f"no plot: {e}")
    if record["interrupted"]:
        raise MicrobenchError("interrupted: the rows measured so far are above"
                              + (f" and in {save}" if save else ""), INTERRUPT_EXIT)
    if nothing_compared:
        raise MicrobenchError(f"--compare {compare_path}: no timed row of this run matches one "
                              "of it (kernel, provider, shape, params, dtype, device): nothing "
                              "was compared")
    return code


