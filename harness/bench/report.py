"""`kt microbench`'s tables: one row per (case, provider), and the comparison with a saved run."""

from __future__ import annotations

from rich.table import Table

from harness.bench.compare import REGRESSION_FLOOR
from harness.bench.engine import CPU_TIMER_LABEL, UNTESTED_BACKENDS, join_notes


def _fmt(v, spec=".3g") -> str:
    return "-" if v is None else format(v, spec)


def render(record: dict, console) -> None:
    """The run's rows as a table, one section per case, with the notes that explain them."""
    rows = record["rows"]
    title = f"kt microbench {record['kernel']} on {record['device']} — {record['timer']}"
    table = Table(title=title, header_style="bold", title_justify="left")
    for col in ("family", "shape", "provider", "status", "p50 ms", "p10–p90 ms", "host ms",
                "TFLOP/s", "GB/s", "% peak", "speedup", "note"):
        table.add_column(col, justify="right" if col in ("p50 ms", "host ms", "TFLOP/s", "GB/s",
                                                         "% peak", "speedup") else "left",
                         overflow="fold")
    style = {"ok": "", "WRONG": "red", "error": "red", "n/a": "yellow", "hang": "red", "crash": "red"}
    last = None
    for r in rows:
        case = (r["family"], r["label"])
        if last is not None and case != last:
            table.add_section()
        first = case != last
        last = case
        status = r["status"]
        note = r.get("note", "")
        if "bridge_overhead_ms" in r:
            host = (f", host {r['bridge_host_overhead_ms'] * 1e3:+.1f} us"
                    if r.get("launch_hidden") else "")
            note = join_notes(f"bridge overhead {r['bridge_overhead_ms'] * 1e3:+.1f} us{host}", note)
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        if "speedup_ci" in r:  # the median per-round ratio's, as the interval is
            sp = (f"{1.0 / r['vs_baseline']['ratio']:.2f}x [{r['speedup_ci'][0]:.2f}–"
                  f"{r['speedup_ci'][1]:.2f}]")
        if "speedup" in r and r["provider"] == r.get("baseline"):
            sp = "1.00x (base)"
        elif r.get("ratio_excluded"):
            sp = "kept out"
        table.add_row(
            r["family"] if first else "", r["label"] if first else "", r["provider"],
            f"[{style[status]}]{status}" if style[status] else status,
            _fmt(r.get("p50"), ".4f"),
            f"{r['p10']:.4f}–{r['p90']:.4f}" if "p10" in r else "-",
            _fmt(r.get("host_ms"), ".3f"), _fmt(r.get("tflops"), ".3g"), _fmt(r.get("gb_s"), ".4g"),
            _fmt(r.get("pct_peak"), ".1f"), sp, note)
    console.print(table)
    rounds = [r["rounds"] for r in rows if r.get("interleaved")]
    if rounds:
        console.print(f"The providers of each case were timed in interleaved rounds "
                      f"({min(rounds)}–{max(rounds)} per case, the order rotated each round); "
                      "speedup [95% interval]: the baseline's time over the row's, median of the "
                      "per-round ratios and its bootstrap interval.", highlight=False)
    flagged = sum(r.get("timings_agree") is False for r in rows)
    if flagged:
        console.print(f"[yellow]{flagged} row(s) whose back-to-back timing disagrees with the "
                      "events beyond their noise (see the note).[/]", highlight=False)
    peaks = {r["peak"] for r in rows if "peak" in r}
    if peaks:
        console.print(f"% peak: of the datasheet peak ({'; '.join(sorted(peaks))}) for "
                      f"{record['device']}; compute-bound families use TFLOP/s, memory-bound GB/s.",
                      highlight=False)
    if record["backend"] in ("cuda", "rocm"):
        console.print("p50 ms: GPU time, launches hidden behind a GPU spin (harness/timing.py; "
                      "a row noting 'launch not hidden' includes its host time); host ms: the "
                      "host's time to enqueue one call, paid in full when the GPU is not ahead "
                      "of the host.", highlight=False)
    if record["backend"] == "cpu":
        console.print(f"[bold yellow]{CPU_TIMER_LABEL}.[/] TFLOP/s and GB/s are for "
                      "exercising the pipeline; % of peak is not computed on the CPU.")
    elif record["backend"] in UNTESTED_BACKENDS:
        console.print(f"[bold yellow]{record['timer']}[/]")
    if record.get("interrupted"):
        console.print("[red]interrupted[/]: the table holds what was measured before Ctrl-C")


def render_comparison(cmp: dict, console, path, targets: list[dict] = ()) -> None:
    """`compare_records`' verdicts against the saved run at `path`, then the speed targets
    of both runs side by side (`summary.target_changes`)."""
    table = Table(title=f"against {path}", header_style="bold", title_justify="left")
    for col in ("provider", "shape", "old p50 ms", "new p50 ms", "change", "noise limit",
                "verdict"):
        table.add_column(col, justify="right" if "ms" in col or col in ("change", "noise limit")
                         else "left")
    for m in cmp["matched"]:
        verdict = ("[red]REGRESSION" if m["regression"] else
                   "[green]faster" if m["improvement"] else "same (within noise)")
        table.add_row(m["provider"], m["label"], f"{m['old_p50']:.4f}", f"{m['new_p50']:.4f}",
                      f"{100 * m['change']:+.1f}%", f"±{100 * m['threshold']:.1f}%", verdict)
    console.print(table)
    for what, items in (("only in this run", cmp["only_new"]), ("only in the old file",
                                                                cmp["only_old"])):
        if items:
            console.print(f"{len(items)} rows {what} (not compared): " + ", ".join(
                f"{i['provider']} [{i['label']}]" for i in items[:6]) +
                (" ..." if len(items) > 6 else ""), highlight=False, markup=False)
    for n in cmp["not_comparable"]:
        console.print(f"not comparable: {n['key'][1]} [{n['label']}]: old {n['old']}, new {n['new']}",
                      highlight=False, markup=False)
    if targets:
        t = Table(title="speed targets: kt_graph's ratio [95% interval], old run -> this run",
                  header_style="bold", title_justify="left")
        for col in ("case", "target", "old", "new"):
            t.add_column(col)
        for c in targets:
            t.add_row(c["case"], c["target"], c["old"], c["new"])
        console.print(t)
    verdict = (f"[red]{len(cmp['regressions'])} regression(s)[/]" if cmp["regressions"]
               else "[green]no regressions[/]")
    console.print(f"{verdict} in {len(cmp['matched'])} matched rows "
                  f"(limit: max(2 x combined (p90-p10)/p50, {REGRESSION_FLOOR:.0%}))")


def row_seconds(r: dict) -> str:
    """Where one row's wall time went: preparing the provider (compiles and loads, once per
    dtype), binding it to the inputs, its first call with the check, then timing."""
    first = r.get("first_call_s", 0.0)
    parts = [("prepare", r.get("prepare_s", 0.0)), ("bind", r.get("bind_s", 0.0)),
             ("first call + check", first),
             ("timing", max(0.0, r["bench_s"] - first) if "bench_s" in r else 0.0),
             ("the case's interleaved rounds", r.get("rounds_s", 0.0))]
    return ", ".join(f"{name} {sec:.1f} s" for name, sec in parts if sec >= 0.05) or "< 0.1 s"


