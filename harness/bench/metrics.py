"""What `kt microbench` derives from the timed rows of one case: TFLOP/s, GB/s, % of the
datasheet peak, speedups against a baseline, the bridge's overhead, and the ratios between
providers timed in the same interleaved rounds, each the median of the per-round ratios with
its 95 % bootstrap interval (`harness.stats.ratio_interval`).

A row timed unlike the others (`ratio_excluded`: on a GPU, events that include the host's time
because the call waits for the device, or a host-synchronized fallback) is kept out of every
ratio, speedup and target, and never the baseline; its row says why."""

from __future__ import annotations

import math

import torch

from harness import devices
from harness.bench.providers import KT_PROVIDERS
from harness.stats import halfwidth, ratio_interval


def join_notes(a: str, b: str) -> str:
    return "; ".join(x for x in (a, b) if x)


def datasheet_peak(device_name: str, dtype: torch.dtype, bound: str) -> tuple[float | None, str]:
    """The peak "% of peak" refers to: HBM GB/s for memory-bound families, else tensor (or
    fp32) TFLOP/s; (None, "") for a device kt has no datasheet numbers for."""
    peak = devices.peak_for(device_name)
    if peak is None:
        return None, ""
    if bound == "memory":
        return peak.tb_per_s * 1e3, "GB/s (HBM)"
    if dtype == torch.float32:
        return peak.tflops_fp32, "TFLOP/s (fp32)"
    return peak.tflops_bf16, "TFLOP/s (dense tensor, bf16)"


def interleaved_ratio(row: dict, other: dict) -> dict | None:
    """`row`'s time over `other`'s, round by round, when both were timed in the same
    interleaved rounds: {"ratio", "lo", "hi", "halfwidth"}; None otherwise."""
    if not (row.get("interleaved") and other.get("interleaved")):
        return None
    a, b = row.get("samples_ms") or [], other.get("samples_ms") or []
    if len(a) != len(b) or row.get("rounds") != other.get("rounds") or len(a) < 2:
        return None
    ratio, lo, hi = ratio_interval(a, b)
    return {"ratio": ratio, "lo": lo, "hi": hi, "halfwidth": halfwidth(ratio, lo, hi)}


def derive_metrics(rows: list[dict], device_name: str, dtype: torch.dtype, bound: str,
                   baseline: str | None, gpu: bool) -> None:
    """Throughput, % of peak, speedup vs the baseline (with its interval where the rows were
    interleaved), kt_graph's ratio to every other provider (`ratios`, what the speed targets
    read) and the bridge's overhead, per case. The baseline is `baseline` if it was timed,
    else the fastest provider that is neither kt's nor a yardstick; a yardstick or a row kept
    out of ratios is never the baseline, even when asked for."""
    peak, peak_unit = datasheet_peak(device_name, dtype, bound) if gpu else (None, "")
    ok = {r["provider"]: r for r in rows if r["status"] == "ok" and "p50" in r}
    fair = {p: r for p, r in ok.items() if not r.get("ratio_excluded")}
    base = fair.get(baseline) if baseline else None
    if base is not None and base.get("yardstick"):
        base = None
    if base is None:
        others = [r for r in fair.values()
                  if r["provider"] not in KT_PROVIDERS and not r.get("yardstick")]
        base = min(others, key=lambda r: r["p50"]) if others else None
    for r in ok.values():
        sec = r["p50"] * 1e-3
        r["tflops"] = r["flops"] / sec / 1e12
        r["gb_s"] = r["bytes"] / sec / 1e9
        if peak:
            achieved = r["gb_s"] if bound == "memory" else r["tflops"]
            r["pct_peak"] = 100.0 * achieved / peak
            r["peak"] = f"{peak:g} {peak_unit}"
            if r["pct_peak"] > 105.0:  # no kernel beats the datasheet: the timing missed work
                r["note"] = join_notes(r.get("note", ""), "above the datasheet peak: suspect timing")
        if r.get("ratio_excluded"):
            r["note"] = join_notes(r.get("note", ""), "kept out of ratios and targets (timed "
                                                      "unlike the others)")
            continue
        if base is not None:
            r["baseline"] = base["provider"]
            r["speedup"] = base["p50"] / r["p50"]
            vs = interleaved_ratio(r, base) if r is not base else None
            if vs is not None:
                r["vs_baseline"] = vs
                r["speedup_ci"] = [1.0 / vs["hi"] if vs["hi"] > 0 else math.inf,
                                   1.0 / vs["lo"] if vs["lo"] > 0 else math.inf]
    kt = fair.get("kt_graph")
    if kt is not None:
        ratios = {p: interleaved_ratio(kt, r) for p, r in fair.items() if r is not kt}
        kt["ratios"] = {p: v for p, v in ratios.items() if v is not None}
    if "kt_bridge" in ok and "kt_graph" in ok:  # the same op: the bridge's cost, on each side
        bridge, graph = ok["kt_bridge"], ok["kt_graph"]
        bridge["bridge_overhead_ms"] = bridge["p50"] - graph["p50"]
        bridge["bridge_host_overhead_ms"] = bridge["host_ms"] - graph["host_ms"]
