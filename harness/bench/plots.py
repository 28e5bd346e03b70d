"""`kt microbench --plot`: throughput against the family's x axis, one panel per family, and
kt_graph's ratio to each speed target's provider with its 95 % interval, the target's levels
drawn, each point coloured by its verdict (met / missed / within noise)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from harness.bench import MicrobenchError
from harness.bench.summary import spec_or_none, target_ratio
from harness.spec import RatioTarget, interval_verdict

VERDICT_COLOURS = {"met": "tab:green", "missed": "tab:red", "within noise": "tab:gray"}


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
    ratio_panels = _ratio_panels(record)
    n = len(panels) + len(ratio_panels)
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
    for ax, ((target, family), series) in zip(list(axes.flat)[len(panels):],
                                              ratio_panels.items()):
        for sub, pts in series.items():
            pts.sort(key=lambda p: p[0])
            xs = [p[0] for p in pts]
            ys = [p[1]["ratio"] for p in pts]
            err = [[max(0.0, p[1]["ratio"] - p[1]["lo"]) for p in pts],
                   [max(0.0, p[1]["hi"] - p[1]["ratio"]) for p in pts]]
            ax.errorbar(xs, ys, yerr=err, capsize=3, label=" ".join(sub) or None)
            level = target.levels[0][0] if target.levels else None
            for x, e in pts:
                verdict = (interval_verdict(level, e["lo"], e["hi"])
                           if level and not e["no_interval"] else "within noise")
                ax.plot([x], [e["ratio"]], "o", color=VERDICT_COLOURS[verdict])
        for at_most, name in target.levels:
            ax.axhline(at_most, linestyle=":", color="black", linewidth=0.8)
            ax.annotate(name, (0.01, at_most), xycoords=("axes fraction", "data"), fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(fams[family]["x"])
        ax.set_ylabel(f"kt_graph / {target.provider}")
        ax.set_title(f"{family}: {target.name or 'kt'} vs {target.provider} (95% CI; green met, "
                     "red missed, grey within noise or no interval)", fontsize=8)
        ax.grid(True, alpha=0.3)
        if any(series):
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(f"{record['kernel']} on {record['device']} ({record['timer']})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ratio_panels(record: dict) -> dict:
    """(target, family) -> {params varying in the family: [(x, ratio entry)]} for the ratio
    targets of the record's kernel (nothing for a kernel kt does not know)."""
    spec = spec_or_none(record.get("kernel"))
    if spec is None:
        return {}
    fams = record["families"]
    out: dict = {}
    for t in (t for t in spec.targets if isinstance(t, RatioTarget)):
        for family in (f for f in t.families if f in fams):
            rows = [r for r in record["rows"] if r["family"] == family and r["status"] == "ok"
                    and "p50" in r]
            varying = sorted(k for k in (rows[0]["params"] if rows else {})
                             if len({json.dumps(r["params"][k]) for r in rows}) > 1)
            cases: dict = {}
            for r in rows:
                cases.setdefault(r["label"], {})[r["provider"]] = r
            series: dict = {}
            for by in cases.values():
                entry, why = target_ratio(t.provider, by)
                if entry is not None:
                    entry = dict(entry, no_interval=bool(why))
                    any_row = next(iter(by.values()))
                    sub = tuple(f"{k}={any_row['params'][k]}" for k in varying)
                    series.setdefault(sub, []).append((any_row["shape"][fams[family]["x"]], entry))
            if series:
                out[(t, family)] = series
    return out
