"""`kt microbench --plot`: throughput against the family's x axis, one panel per family."""

from __future__ import annotations

import json
import math
from pathlib import Path

from harness.bench import MicrobenchError


def plot(record: dict, path: Path) -> None:
    """TFLOP/s (compute-bound families) or GB/s (memory-bound) against the family's x axis,
    one line per provider, one panel per (family, value of the params varying in it)."""
    import matplotlib  # heavy, and only needed here: imported on use, for start-up time

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple, list[dict]] = {}
    fams = record["families"]
    for r in record["rows"]:
        if "tflops" not in r:  # not timed (or interrupted before its case was complete)
            continue
        fam_rows = [x for x in record["rows"] if x["family"] == r["family"]]
        varying = sorted(k for k in r["params"]
                         if len({json.dumps(x["params"][k]) for x in fam_rows}) > 1)
        sub = tuple(f"{k}={r['params'][k]}" for k in varying)
        # shapes that share x but differ elsewhere (batch) stay in one panel, by x
        panels.setdefault((r["family"], sub), []).append(r)
    if not panels:
        raise MicrobenchError("nothing to plot: no provider was timed")
    n = len(panels)
    cols = min(3, n)
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 3.8 * rows_n), squeeze=False)
    for ax, ((family, sub), rows) in zip(axes.flat, panels.items()):
        f = fams[family]
        metric, unit = ("gb_s", "GB/s") if f["bound"] == "memory" else ("tflops", "TFLOP/s")
        for prov in dict.fromkeys(r["provider"] for r in rows):
            mine = [r for r in rows if r["provider"] == prov]
            pts = sorted((r["shape"][f["x"]], r[metric]) for r in mine)
            ruler = any(r.get("yardstick") for r in mine)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    linestyle="--" if ruler else "-",
                    label=f"{prov} (yardstick, not the op)" if ruler else prov)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f["x"])
        ax.set_ylabel(unit)
        ax.set_title(" ".join((family,) + sub), fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(f"{record['kernel']} on {record['device']} ({record['timer']})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


