"""Reports: one table comparing engines at each load point, one JSON per engine and load point,
and PNG plots against concurrency."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from harness.io import write_json_atomic  # noqa: F401 (runner writes through report)

COLUMNS = [
    ("engine", "engine", "{}"),
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
]


def table(rows: list[dict], title: str = "kt serve-bench") -> Table:
    t = Table(title=title)
    for head, _, _ in COLUMNS:
        t.add_column(head, justify="left" if head in ("engine", "load") else "right")
    for r in sorted(rows, key=lambda r: (r["load_order"], r["engine_order"])):
        cells = []
        for head, key, fmt in COLUMNS:
            if key is None:
                cells.append(f"{r['completed']}/{r['failed']}")
            elif key == "goodput":
                cells.append("-" if r.get("request_goodput") is None else f"{r['request_goodput']:.2f}")
            else:
                cells.append(fmt.format(r[key]))
        t.add_row(*cells)
    return t


def markdown(rows: list[dict]) -> str:
    heads = [h for h, _, _ in COLUMNS]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in sorted(rows, key=lambda r: (r["load_order"], r["engine_order"])):
        cells = []
        for _, key, fmt in COLUMNS:
            cells.append(f"{r['completed']}/{r['failed']}" if key is None else fmt.format(r[key]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict], console: Console | None = None) -> None:
    (console or Console()).print(table(rows))


def plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """Throughput, TTFT p50/p99 and ITL p50/p99 against max concurrency, one line per engine.
    Only closed-loop points (with a max concurrency) are plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.get("max_concurrency")]
    if not pts:
        return []
    engines = sorted({r["engine"] for r in pts}, key=lambda e: min(r["engine_order"] for r in pts if r["engine"] == e))
    specs = [
        ("throughput.png", "output tokens/s", [("output_throughput", "-")]),
        ("ttft.png", "TTFT (ms)", [("median_ttft_ms", "-"), ("p99_ttft_ms", "--")]),
        ("itl.png", "ITL (ms)", [("median_itl_ms", "-"), ("p99_itl_ms", "--")]),
    ]
    written = []
    for fname, ylabel, series in specs:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for i, eng in enumerate(engines):
            er = sorted((r for r in pts if r["engine"] == eng), key=lambda r: r["max_concurrency"])
            xs = [r["max_concurrency"] for r in er]
            for key, style in series:
                label = eng if len(series) == 1 else f"{eng} {key.split('_')[0].replace('median', 'p50')}"
                ax.plot(xs, [r[key] for r in er], style, marker="o", color=f"C{i}", label=label)
        ax.set_xscale("log", base=2)
        ticks = sorted({r["max_concurrency"] for r in pts})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("max concurrency")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} vs concurrency")
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
