"""Comparing two `kt microbench` runs: rows are matched by (kernel, provider, shape, params,
dtype, device name), and a row regressed when new p50 > old p50 x (1 + max(2 x combined
relative noise, 5%)), relative noise being (p90 - p10) / p50 and the two runs' noises
combined in quadrature."""

from __future__ import annotations

import math
from pathlib import Path

from harness.bench import MicrobenchError
from harness.bench.engine import shape_key
from harness.io import read_result_json

REGRESSION_FLOOR = 0.05


def row_key(r: dict) -> tuple:
    return (r["kernel"], r["provider"], shape_key(r["shape"], r["params"]), r["dtype"], r["device"])


def noise(r: dict) -> float:
    """Relative spread (p90 - p10) / p50 of one measurement."""
    return (r["p90"] - r["p10"]) / r["p50"] if r["p50"] > 0 else math.inf


def regression_threshold(old: dict, new: dict) -> float:
    """The relative slow-down beyond which `new` is a regression of `old`."""
    combined = math.hypot(noise(old), noise(new))
    return max(2.0 * combined, REGRESSION_FLOOR)


def compare_records(new_rows: list[dict], old_rows: list[dict]) -> dict:
    """Match rows and flag regressions; rows on one side only are listed, not failures."""
    old = {row_key(r): r for r in old_rows}
    new = {row_key(r): r for r in new_rows}
    matched, not_comparable = [], []
    for key, n in new.items():
        o = old.get(key)
        if o is None:
            continue
        if n.get("status") != "ok" or o.get("status") != "ok":
            not_comparable.append({"key": key, "old": o.get("status"), "new": n.get("status"),
                                   "label": n.get("label", "")})
            continue
        change = n["p50"] / o["p50"] - 1.0
        thr = regression_threshold(o, n)
        matched.append({"provider": n["provider"], "family": n.get("family"),
                        "label": n.get("label", ""), "old_p50": o["p50"], "new_p50": n["p50"],
                        "change": change, "threshold": thr, "regression": change > thr,
                        "improvement": change < -thr})
    return {
        "matched": matched,
        "regressions": [m for m in matched if m["regression"]],
        "only_new": [{"provider": n["provider"], "label": n.get("label", "")}
                     for k, n in new.items() if k not in old],
        "only_old": [{"provider": o["provider"], "label": o.get("label", "")}
                     for k, o in old.items() if k not in new],
        "not_comparable": not_comparable,
    }


def load_rows(path: Path) -> list[dict]:
    try:
        doc = read_result_json(path)  # FILE.json, FILE.json.xz, or FILE.json.xz for an absent FILE.json
    except (OSError, ValueError) as e:
        raise MicrobenchError(f"cannot read {path}: {e}") from None
    rows = doc.get("rows") if isinstance(doc, dict) else None
    if not isinstance(rows, list):
        raise MicrobenchError(f"{path} is not a file written by kt microbench --save")
    return rows


