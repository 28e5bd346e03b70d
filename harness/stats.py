"""The statistics of `harness.timing`: quantiles, the relative standard error of the stopping
rule, the median ratio of two interleaved providers with its bootstrap confidence interval
over rounds (seeded, so a saved run's intervals are reproducible from its samples), and
whether the two timings of one call agree."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import numpy as np

# Resamples of the percentile bootstrap; seed of its generator (fixed: same samples, same CI).
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
AGREE_FLOOR = 0.05  # two timings closer than this never disagree


def quantile(sorted_samples: list[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted samples (numpy's default method)."""
    if not sorted_samples:
        return math.nan
    pos = q * (len(sorted_samples) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_samples) - 1)
    return sorted_samples[lo] + (sorted_samples[hi] - sorted_samples[lo]) * (pos - lo)


def relative_standard_error(samples: list[float]) -> float:
    """std / sqrt(n) / mean; infinite with fewer than two samples."""
    if len(samples) < 2:
        return math.inf
    mean = statistics.fmean(samples)
    return statistics.stdev(samples) / math.sqrt(len(samples)) / mean if mean > 0 else math.inf


def summarize(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"p10": quantile(s, 0.1), "p50": quantile(s, 0.5), "p90": quantile(s, 0.9),
            "mean": statistics.fmean(s) if s else math.nan, "rse": relative_standard_error(s),
            "n": len(s)}


def ratio_interval(num: list[float], den: list[float], *, confidence: float = CONFIDENCE,
                   resamples: int = BOOTSTRAP_RESAMPLES,
                   seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """(median, lo, hi) of the per-round ratios num[i] / den[i]: the median and its percentile
    bootstrap interval (rounds resampled with replacement, `resamples` times, from a generator
    seeded with `seed`). Rounds, not single samples, are resampled: both samples of a round
    share its drift. (nan, nan, nan) without rounds; (median, -inf, inf) with one."""
    r = np.asarray(num, dtype=float)[: len(den)] / np.asarray(den, dtype=float)[: len(num)]
    r = r[np.isfinite(r)]
    if r.size == 0:
        return math.nan, math.nan, math.nan
    med = float(np.median(r))
    if r.size == 1:
        return med, -math.inf, math.inf
    rng = np.random.default_rng(seed)
    meds = np.median(r[rng.integers(0, r.size, size=(resamples, r.size))], axis=1)
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(meds, [tail, 1.0 - tail])
    return med, float(lo), float(hi)


def median_ratio_interval(num: list[float], den: list[float], *, confidence: float = CONFIDENCE,
                          resamples: int = BOOTSTRAP_RESAMPLES,
                          seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """(ratio, lo, hi): median(num) / median(den) and its percentile bootstrap interval, the two
    samples resampled independently (unpaired: e.g. the requests of one load point on two
    engines). (nan, nan, nan) when either sample is empty."""
    a = np.asarray(num, dtype=float)
    b = np.asarray(den, dtype=float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size == 0 or b.size == 0 or np.median(b) == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    ma = np.median(a[rng.integers(0, a.size, size=(resamples, a.size))], axis=1)
    mb = np.median(b[rng.integers(0, b.size, size=(resamples, b.size))], axis=1)
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(ma / mb, [tail, 1.0 - tail])
    return float(np.median(a) / np.median(b)), float(lo), float(hi)


def halfwidth(ratio: float, lo: float, hi: float) -> float:
    """Half the interval's width relative to the ratio (0.01: +-1 %); inf if unbounded."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or ratio <= 0:
        return math.inf
    return (hi - lo) / 2.0 / ratio


@dataclass
class Throughput:
    """harness/timing.py item 9: the per-call time of back-to-back batches (median of
    `samples_ms`, one per batch of `calls` calls) and their relative spread
    (max - min) / median."""

    samples_ms: list[float]
    calls: int
    flush_ms: float = 0.0  # one cache flush (subtracted from each batch)
    per_call_ms: float = field(init=False)
    spread: float = field(init=False)

    def __post_init__(self) -> None:
        self.per_call_ms = statistics.median(self.samples_ms)
        lo, hi = min(self.samples_ms), max(self.samples_ms)
        self.spread = (hi - lo) / self.per_call_ms if self.per_call_ms > 0 else math.inf


def timings_agree(event, second: Throughput,
                  floor: float = AGREE_FLOOR) -> tuple[bool | None, str]:
    """harness/timing.py item 9, for `event` (a `timing.Timing`): (True, "") when its p50 and
    the back-to-back time agree within max(`floor`, 2 x their combined relative noise);
    (False, why) when not; (None, why) for a host-bound call behind a spin, which back to
    back measures the host."""
    if event.hidden and event.host_ms > 0.5 * event.p50:
        return None, (f"back-to-back timing not compared: host-bound (enqueue {event.host_ms:.3f}"
                      f" ms > half the GPU time {event.p50:.3f} ms)")
    if event.p50 <= 0:
        return None, "back-to-back timing not compared: no event time"
    if second.flush_ms > 5.0 * event.p50 or second.per_call_ms <= 0:
        return None, (f"back-to-back timing not compared: the cache flush between calls "
                      f"({second.flush_ms:.3f} ms) dwarfs the call")
    noise = (event.p90 - event.p10) / event.p50
    limit = max(floor, 2.0 * math.hypot(noise, second.spread))
    change = second.per_call_ms / event.p50 - 1.0
    if abs(change) > limit:
        return False, (f"timings disagree: back-to-back {second.per_call_ms:.4f} ms/call vs "
                       f"events {event.p50:.4f} ms ({100 * change:+.0f}%, noise limit "
                       f"±{100 * limit:.0f}%)")
    return True, ""
