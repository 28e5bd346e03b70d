"""The short summary of saved `kt microbench` runs (what `benchmarks/gpu_run.sh` ends with):
per kernel the row counts by status, per family its largest shapes with every provider's p50,
and the speed targets of the kernel's spec (`KernelSpec.targets`) stated from the run's rows."""

from __future__ import annotations

import pykernels
from harness.io import read_result_json
from harness.spec import KernelSpec, RatioTarget, ThroughputTarget


# A file saved before rows were interleaved: a ratio of p50s, and no verdict without an interval.
NO_INTERVAL = "p50s, no interval: no verdict"


def target_ratio(target_provider: str, by: dict[str, dict]) -> tuple[dict | None, str]:
    """kt_graph's ratio to `target_provider` in one case: ({"ratio", "lo", "hi"}, "") from the
    interleaved rounds; from the p50s, with lo = hi = ratio and `NO_INTERVAL`, for a file
    saved before rows were interleaved; (None, why) when a side is kept out of ratios."""
    kt, other = by.get("kt_graph"), by.get(target_provider)
    if kt is None or other is None:
        return None, ""
    for r in (kt, other):
        if r.get("ratio_excluded"):
            return None, f"{r['provider']} kept out: {r['ratio_excluded']}"
    entry = (kt.get("ratios") or {}).get(target_provider)
    if entry is not None:
        return entry, ""
    ratio = kt["p50"] / other["p50"]
    return {"ratio": ratio, "lo": ratio, "hi": ratio}, NO_INTERVAL


def ratio_text(entry: dict) -> str:
    """'0.965 [0.958, 0.971]', or the ratio alone without an interval."""
    if entry["lo"] == entry["hi"] == entry["ratio"]:
        return f"{entry['ratio']:.3f}"
    return f"{entry['ratio']:.3f} [{entry['lo']:.3f}, {entry['hi']:.3f}]"


def _ratio_parts(target: RatioTarget, by: dict[str, dict]) -> list[str]:
    entry, why = target_ratio(target.provider, by)
    text = f"{target.name + ' ' if target.name else ''}kt/{target.provider}"
    if entry is None:
        return [f"{text}: {why}"] if why else []
    verdict = target.verdict(entry["lo"], entry["hi"]) if target.levels and not why else ""
    detail = "; ".join(x for x in (verdict, why) if x)
    return [f"{text} {ratio_text(entry)}" + (f" ({detail})" if detail else "")]


def _target_cells(target: RatioTarget, by: dict[str, dict]) -> str:
    entry, why = target_ratio(target.provider, by)
    if entry is None:
        return why or "-"
    verdict = target.verdict(entry["lo"], entry["hi"]) if target.levels and not why else ""
    return f"{ratio_text(entry)}" + "".join(f"; {x}" for x in (verdict, why) if x)


def target_changes(spec: KernelSpec, new_rows: list[dict], old_rows: list[dict]) -> list[dict]:
    """Per case and ratio target of `spec` in either run: {"case", "target", "old", "new"},
    each side its ratio, interval and verdict (an old file without intervals: its p50s)."""
    ratios = [t for t in spec.targets if isinstance(t, RatioTarget)]
    sides = []
    for rows in (old_rows, new_rows):
        cases: dict[tuple[str, str], dict[str, dict]] = {}
        for r in rows:
            if r.get("status") == "ok" and "p50" in r and any(r.get("family") in t.families
                                                              for t in ratios):
                cases.setdefault((r["family"], r.get("label", "")), {})[r["provider"]] = r
        sides.append(cases)
    out = []
    for fam, label in dict.fromkeys(list(sides[1]) + list(sides[0])):
        for t in (t for t in ratios if fam in t.families):
            old, new = (_target_cells(t, s.get((fam, label), {})) for s in sides)
            if old != "-" or new != "-":
                out.append({"case": f"{fam} {label}", "target": f"{t.name or 'kt'}/{t.provider}",
                            "old": old, "new": new})
    return out


def _throughput_line(target: ThroughputTarget, r: dict, rulers: list[dict]) -> str:
    """kt_graph's rate against the target, then each yardstick of the same case at the same
    byte count (a plain copy: the rate this GPU reaches at all; attention without RoPE)."""
    if target.min_pct_peak is not None:
        line = (f"kt_graph {r['gb_s']:.0f} GB/s = {r.get('pct_peak', float('nan')):.1f}% of HBM "
                f"(target >= {target.min_pct_peak:g}%)")
        beside = [f"{y['provider']} [yardstick] {y['pct_peak']:.1f}%" for y in rulers
                  if "pct_peak" in y]
    else:
        line = f"kt_graph {r['gb_s'] / 1e3:.2f} TB/s (target >= {target.min_tb_s:g})"
        beside = [f"{y['provider']} [yardstick] {y['gb_s'] / 1e3:.2f} TB/s" for y in rulers]
    return line + (f"; beside it {', '.join(beside)}" if beside else "")


def target_lines(spec: KernelSpec, rows: list[dict]) -> list[str]:
    """One line per case a target of `spec` applies to, from one run: the ratio targets of a
    case together (kt_graph against each provider, median and 95 % interval over the
    interleaved rounds, each level met / missed / within noise), then each throughput target
    of kt_graph (GPU rows only), with the case's yardsticks' rates beside it."""
    ratios = [t for t in spec.targets if isinstance(t, RatioTarget)]
    timed = [r for r in rows if r.get("kernel", spec.name) == spec.name
             and r["status"] == "ok" and "p50" in r]
    cases: dict[tuple[str, str], dict[str, dict]] = {}
    for r in timed:
        if any(r["family"] in t.families for t in ratios):
            cases.setdefault((r["family"], r["label"]), {})[r["provider"]] = r
    out = []
    for (fam, label), by in cases.items():
        parts = [p for t in ratios if fam in t.families for p in _ratio_parts(t, by)]
        if parts:
            out.append(f"targets {fam} {label}: " + ", ".join(parts))
    for t in spec.targets:
        if not isinstance(t, ThroughputTarget):
            continue
        for r in timed:
            if (r["provider"] == "kt_graph" and "gb_s" in r and r.get("backend") != "cpu"
                    and (not t.families or r["family"] in t.families)):
                rulers = [y for y in timed if y.get("yardstick") and "gb_s" in y
                          and (y["family"], y["label"]) == (r["family"], r["label"])]
                out.append(f"targets {r['family']} {r['label']}: {_throughput_line(t, r, rulers)}")
    return out


def spec_or_none(name: str | None) -> KernelSpec | None:
    try:
        return pykernels.get(name or "")
    except KeyError:
        return None


def summary(paths: list[str], console) -> None:
    """Compact lines per saved run: row counts by status; per family its largest shapes with
    every provider's p50 (fastest first) and speedup; the spec's targets (`target_lines`)."""
    for p in paths:
        try:
            doc = read_result_json(p)  # plain or .xz (harness.io.result_path)
        except (OSError, ValueError) as e:
            console.print(f"{p}: unreadable ({e})", markup=False, highlight=False)
            continue
        rows = doc.get("rows", [])
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        console.print(f"== {doc.get('kernel')} on {doc.get('device')} ({doc.get('timer')}): "
                      f"{len(rows)} rows, " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
                      + (" — INTERRUPTED" if doc.get("interrupted") else
                         " — INCOMPLETE (the run was killed)" if not doc.get("complete", True)
                         else ""),
                      markup=False, highlight=False)
        for fam, info in doc.get("families", {}).items():
            frows = [r for r in rows if r["family"] == fam]
            if not frows:
                continue
            top = max(r["shape"][info["x"]] for r in frows)
            for label in dict.fromkeys(r["label"] for r in frows if r["shape"][info["x"]] == top):
                case = [r for r in frows if r["label"] == label]
                timed = sorted((r for r in case if "p50" in r), key=lambda r: r["p50"])
                parts = [f"{r['provider']}{' [yardstick]' if r.get('yardstick') else ''} "
                         f"{r['p50']:.3f}" + (f" ({r['speedup']:.2f}x)" if "speedup" in r else "")
                         for r in timed]
                for status in ("WRONG", "error", "n/a"):
                    bad = [r["provider"] for r in case if r["status"] == status]
                    if bad:
                        parts.append(f"{status}: {','.join(bad)}")
                console.print(f"  {fam} {label} [ms]: " + " | ".join(parts),
                              markup=False, highlight=False)
        spec = spec_or_none(doc.get("kernel"))
        for line in (target_lines(spec, rows) if spec else []) + flag_lines(rows):
            console.print("  " + line, markup=False, highlight=False)


def flag_lines(rows: list[dict]) -> list[str]:
    """Rows whose two timings disagree (harness/timing.py item 9), and rows kept out of
    ratios, with why."""
    out = [f"timings disagree: {r['family']} {r['label']} {r['provider']}: "
           f"{r.get('timings_note', '')}" for r in rows if r.get("timings_agree") is False]
    out += [f"kept out of ratios: {r['family']} {r['label']} {r['provider']}: "
            f"{r['ratio_excluded']}" for r in rows if r.get("ratio_excluded")]
    return out
