"""Reports: one table comparing engines at each load point, one JSON per engine and load point,
and PNG plots against concurrency."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from harness import stats

COLUMNS = [
    ("engine", "engine", "{}"),
    ("dataset", "dataset_name", "{}"),
    ("load", "load", "{}"),
    ("ok/fail", None, "{}"),
    ("req/s", "request_throughput", "{:.2f}"),
    ("out tok/s", "output_throughput", "{:.1f}"),
    ("tot tok/s", "total_token_throughput", "{:.1f}"),
    ("TTFT p50 ms", "median_ttft_ms", "{:.1f}"),
    ("TTFT p99 ms", "p99_ttft_ms", "{:.1f}"),
    ("TPOT p50 ms", "median_tpot_ms", "{:.2f}"),
    ("ITL p50 ms", "median_itl_ms", "{:.2f}"),
    ("ITL p99 ms", "p99_itl_ms", "{:.2f}"),
    ("E2EL p50 ms", "median_e2el_ms", "{:.1f}"),
    ("$/1M out", "cost_per_1m_output_tokens_usd", "{:.3f}"),
]
MISSING = "-"  # a metric with no data


def cell(row: dict, key: str | None, fmt: str) -> str:
    if key is None:
        return f"{row['completed']}/{row['failed']}"
    v = row.get(key)
    return MISSING if v is None else fmt.format(v)


def _order(r: dict) -> tuple:
    return (r.get("dataset_order", 0), r["load_order"], r["engine_order"])


def table(rows: list[dict], title: str = "kt serve-bench") -> Table:
    t = Table(title=title)
    for head, _, _ in COLUMNS:
        t.add_column(head, justify="left" if head in ("engine", "dataset", "load") else "right")
    for r in sorted(rows, key=_order):
        t.add_row(*(cell(r, key, fmt) for _, key, fmt in COLUMNS))
    return t


def markdown(rows: list[dict]) -> str:
    """The table, one line per engine and load point."""
    heads = [h for h, _, _ in COLUMNS]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in sorted(rows, key=_order):
        lines.append("| " + " | ".join(cell(r, key, fmt) for _, key, fmt in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


RATIO_METRICS = [("output_throughput", "out tok/s"), ("median_ttft_ms", "TTFT p50"), ("median_tpot_ms", "TPOT p50")]


def per_request(row: dict, key: str) -> list[float]:
    """The per-request samples behind a row's median: "ttft" (the row's `ttfts`) or "tpot"
    (each request's inter-token gaps summed over its output tokens after the first), seconds."""
    if key == "ttft":
        return [t for t in row.get("ttfts") or [] if t is not None and t > 0]
    out = []
    for gaps, n in zip(row.get("itls") or [], row.get("output_lens") or []):
        if gaps and n and n > 1:
            out.append(sum(gaps) / (n - 1))
    return out


def _ratio_cell(e: dict, b: dict, metric: str) -> str:
    """e / b for one metric: latencies with the 95 % bootstrap interval of the ratio of medians
    over the point's requests, marked ~ when it holds 1 (inside the noise)."""
    ev, bv = e.get(metric), b.get(metric)
    if ev is None or not bv:
        return MISSING
    key = metric.removeprefix("median_").removesuffix("_ms")
    if key in ("ttft", "tpot"):
        # The ratio and its interval come from the same per-request samples (a row's TPOT p50
        # counts tokens from usage, the samples the streamed gaps: they can differ by a few %).
        r, lo, hi = stats.median_ratio_interval(per_request(e, key), per_request(b, key))
        if math.isfinite(lo) and math.isfinite(hi):
            return f"{r:.2f} [{lo:.2f}, {hi:.2f}]" + (" ~" if lo <= 1.0 <= hi else "")
    return f"{ev / bv:.2f}"


def ratios(rows: list[dict], baseline: str | None = None) -> str:
    """Engines side by side per load point, each metric as a ratio to `baseline` (vllm when it
    ran, else stock max when it ran, else the first engine): >1 is more throughput, or a longer
    latency, than the baseline. TTFT and TPOT ratios carry the bootstrap interval over the
    point's requests (requests of one point share batches, so it is a floor on the noise);
    throughput is one number per point."""
    engines = sorted({r["engine"] for r in rows}, key=lambda e: min(r["engine_order"] for r in rows if r["engine"] == e))
    if len(engines) < 2:
        return ""
    base = baseline if baseline in engines else next((e for e in ("vllm", "max") if e in engines), engines[0])
    others = [e for e in engines if e != base]
    by = {(r["dataset_name"], r["load"], r["engine"]): r for r in rows}
    points = sorted({(r["dataset_name"], r["load"]): _order(r)[:2] for r in rows}.items(), key=lambda kv: kv[1])
    heads = ["dataset", "load"]
    for key, name in RATIO_METRICS:
        heads += [f"{name} {base}"] + [f"{name} {e}/{base}" for e in others]
    lines = [f"Ratios to {base} (same load point, same run; [95 % interval over the point's requests], "
             "~ inside the noise):", "",
             "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for (ds, load), _ in points:
        b = by.get((ds, load, base)) or {}
        cells = [ds, load]
        for key, _ in RATIO_METRICS:
            bv = b.get(key)
            cells.append(MISSING if bv is None else f"{bv:.1f}")
            for e in others:
                cells.append(_ratio_cell(by.get((ds, load, e), {}), b, key))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v, fmt="{:.1f}") -> str:
    return MISSING if v is None else fmt.format(v)


def run_markdown(run: dict, rows: list[dict]) -> str:
    """report.md: how the run was made (settings, start-up mode, each engine's cold start and
    memory), the table, the ratios, the agreement, and what went wrong."""
    lines = ["# kt serve-bench", ""]
    if run.get("interrupted"):
        lines += [f"**Interrupted**: only the {run['load_points_finished']} load point(s) below finished.", ""]
    gpus = run.get("gpus")
    lines += [
        f"- command: `{run['command']}`",
        f"- kt git sha: {run['kt_git_sha']}; date (UTC): {run['date']}",
        f"- model: {run['model'].get('path')} ({(run['model'].get('kt_model') or {}).get('preset', 'not kt-made')})",
        "- devices: " + ("; ".join(f"{g['name']} (driver {g['driver']}, {g['memory_total_mib']} MiB)" for g in gpus)
                          if gpus else "no GPU seen by nvidia-smi"),
        f"- datasets: {', '.join(run['datasets'])}; input {run['input_len']} / output {run['output_len']} tokens "
        "(output forced: EOS ignored, every request's length checked from the server's usage)",
        "- prompts per load point: " + ", ".join(f"{k} {v}" for k, v in run["prompts_per_point"].items()),
        f"- start-up: **{run['startup_mode']}**"
        + (" — every engine's server started at once; each cold start below was measured while the others "
           "were starting too, and each engine was measured while the not-yet-measured others sat idle "
           "(holding their GPU memory)" if run["startup_mode"] == "concurrent" else
           " — one engine at a time, alone from its start to its stop"),
    ]
    if run.get("cost_per_hour_usd") is not None:
        lines.append(f"- cost: ${run['cost_per_hour_usd']:g}/hour of the machine")
    lines += ["", "## Engines", "",
              "| engine | version | settings (engine flags) | cold start s | health s | compile / load s (log) "
              "| started with | measured beside (idle) | peak GPU MiB | error |", "|" + "---|" * 10]
    for e in run["engines"]:
        st = e.get("startup") or {}
        ph = st.get("phases_from_log") or {}
        mem = e.get("gpu_memory") or {}
        peak = mem.get("peak_mib")
        peak_s = _fmt(peak, "{:.0f}") if peak is not None else (
            f"{_fmt(mem.get('device_peak_used_mib'), '{:.0f}')} (device total)" if mem.get("device_peak_used_mib") else MISSING)
        flags = "; ".join(f"{k}: `{v}`" for k, v in (e.get("engine_flags") or {}).items())
        lines.append(
            f"| {e['label']} | {e.get('engine_version') or MISSING} | {flags} | {_fmt(st.get('cold_start_s'))} "
            f"| {_fmt(st.get('health_ready_s'))} | {_fmt(ph.get('compile_s'))} / {_fmt(ph.get('load_s'))} "
            f"| {', '.join(st.get('started_with') or []) or '-'} ({st.get('mode', '-')}) "
            f"| {', '.join(e.get('idle_engines_during_load') or []) or '-'} | {peak_s} "
            f"| {(e.get('error') or '').splitlines()[0] if e.get('error') else ''} |")
    lines += ["", "## Load points", "", markdown(rows) if rows else "No load point finished.", ""]
    r = ratios(rows) if rows else ""
    if r:
        lines += [r, ""]
    ref = run.get("reference")
    if run.get("agreement") or ref:
        lines += ["## Agreement", ""]
        if ref:
            lines.append(f"- reference: none, its probe failed ({ref['error']})" if "error" in ref else
                         f"- reference: fp32, transformers {ref['transformers']} on {ref['device']}")
        waived = [name.split(" vs ")[0] for name, c in run.get("agreement", {}).items() if c.get("waived")]
        if waived:
            lines.append(f"- **stock MAX disagreed with the fp32 reference**; {', '.join(waived)} agree(s) with it, "
                         "so disagreeing with stock MAX does not fail the run")
        for name, c in run.get("agreement", {}).items():
            lines.append(f"- {name}: {c['summary']}")
        lines.append("")
    if run.get("problems"):
        lines += ["## Problems", ""] + [f"- {p.splitlines()[0]}" for p in run["problems"]] + [""]
    return "\n".join(lines)


def print_table(rows: list[dict], console: Console | None = None) -> None:
    (console or Console()).print(table(rows))


def plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """Throughput, TTFT p50/p99 and ITL p50/p99 against max concurrency, one line per engine, one
    set per dataset (`throughput.png`, or `throughput_<dataset>.png` when there are several).
    Only closed-loop points are plotted; a missing value is a gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    closed = [r for r in rows if r.get("max_concurrency") and r.get("request_rate") == "inf"]
    datasets = sorted({r["dataset_name"] for r in closed}, key=lambda d: min(_order(r) for r in closed
                                                                              if r["dataset_name"] == d))
    specs = [
        ("throughput", "output tokens/s", [("output_throughput", "-")]),
        ("ttft", "TTFT (ms)", [("median_ttft_ms", "-"), ("p99_ttft_ms", "--")]),
        ("itl", "ITL (ms)", [("median_itl_ms", "-"), ("p99_itl_ms", "--")]),
    ]
    written = []
    for ds in datasets:
        pts = [r for r in closed if r["dataset_name"] == ds]
        engines = sorted({r["engine"] for r in pts},
                         key=lambda e: min(r["engine_order"] for r in pts if r["engine"] == e))
        for stem, ylabel, series in specs:
            fname = f"{stem}.png" if len(datasets) == 1 else f"{stem}_{ds}.png"
            fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
            for i, eng in enumerate(engines):
                er = sorted((r for r in pts if r["engine"] == eng), key=lambda r: r["max_concurrency"])
                xs = [r["max_concurrency"] for r in er]
                for key, style in series:
                    label = eng if len(series) == 1 else f"{eng} {key.split('_')[0].replace('median', 'p50')}"
                    ys = [float("nan") if r.get(key) is None else r[key] for r in er]
                    ax.plot(xs, ys, style, marker="o", color=f"C{i}", label=label)
            ax.set_xscale("log", base=2)
            ticks = sorted({r["max_concurrency"] for r in pts})
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.set_xlabel("max concurrency")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{ylabel} vs concurrency ({ds})")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = out_dir / fname
            fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{fname}.", suffix=".png")
            os.close(fd)
            fig.savefig(tmp)
            plt.close(fig)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
            written.append(path)
    return written


def write_text_atomic(path: Path, text: str) -> None:
    """Write text atomically, readable by the group and others (0644) whatever the umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.fchmod(fd, 0o644)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
