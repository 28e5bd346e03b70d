"""The one timing function, `bench`. Its method, in order:

1. Correctness first: `check()` runs the provider once and compares it with the reference; a
   provider that fails is never timed (`NotCorrect`).
2. Warmup by time budget (`warmup_ms`, at least 3 calls), which also absorbs compilation,
   autotuning, module loading and handle creation, and yields a first per-call estimate.
3. Each timed call starts from a cold last-level cache: a buffer twice the L2 (GPU) or 64 MiB
   (CPU) is overwritten before it, outside the timed region (as triton's `do_bench`).
4. Timed with device events on GPUs (CUDA and ROCm share torch's `cuda` event API; Apple Metal
   uses `torch.mps` events), and with the monotonic `perf_counter_ns` on the CPU.
5. Launch overhead hidden (CUDA and ROCm): before each timed region a GPU spin
   (`torch.cuda._sleep`) is queued on the stream, long enough to cover the host's time to
   enqueue `fn` (measured during warmup; twice its 90th percentile plus 50 us, at most
   `MAX_COVER_MS`), so every launch of `fn` is queued before the GPU reaches the start event
   and the events measure GPU time alone, as nvbench's "blocking kernel" does. Without it a
   small op measures its host overhead (MAX's `execute`, torch.compile's guards), not its
   kernels. The host's enqueue time is measured on every timed call too and returned
   (`host_ms`, p50): it is what a caller pays when the GPU is not ahead of the host;
   `uncovered` counts timed calls whose enqueue outlasted the spin (their samples include
   GPU idle time). Metal has no spin kernel: there, launches are not hidden.
6. Stopping rule: after `min_reps`, stop once the relative standard error of the mean falls
   under `rse_target`, or at `max_reps`, or when the `budget_s` wall-clock budget runs out;
   the reason is recorded.
7. The raw samples are returned with p10/p50/p90; p50 is the number to quote.

The backend table is what ports this to a new device kind; ROCm and Metal cannot be measured
on kt's machines, so their rows are untested here, and results say which backend timed them.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch


class NotCorrect(Exception):
    """The provider failed its correctness check and was not timed."""


@dataclass
class Timing:
    samples_ms: list[float]
    backend: str
    stopped_by: str
    warmup_calls: int
    host_samples_ms: list[float] = field(default_factory=list)
    cover_ms: float = 0.0
    uncovered: int = 0
    host_ms: float = field(init=False)
    p10: float = field(init=False)
    p50: float = field(init=False)
    p90: float = field(init=False)
    mean: float = field(init=False)
    rse: float = field(init=False)

    def __post_init__(self) -> None:
        s = summarize(self.samples_ms)
        self.p10, self.p50, self.p90, self.mean, self.rse = s["p10"], s["p50"], s["p90"], s["mean"], s["rse"]
        self.host_ms = summarize(self.host_samples_ms)["p50"]

    def as_dict(self) -> dict:
        return asdict(self)


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


def stop_reason(samples: list[float], elapsed_s: float, *, min_reps: int, max_reps: int,
                rse_target: float, budget_s: float) -> str | None:
    """Why sampling should stop now, or None to keep going."""
    n = len(samples)
    if n >= max_reps:
        return "max_reps"
    if n >= min_reps and relative_standard_error(samples) < rse_target:
        return "rse"
    if n >= min(min_reps, 3) and elapsed_s >= budget_s:
        return "budget"
    return None


class _Clock:
    """Backend table entry: start/stop one timed region, read its milliseconds later."""

    def __init__(self, backend: str):
        self.backend = backend

    def region(self):
        if self.backend in ("cuda", "rocm"):
            return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if self.backend == "metal":
            return torch.mps.event.Event(enable_timing=True), torch.mps.event.Event(enable_timing=True)
        return [0], [0]

    def record(self, ev) -> None:
        if self.backend == "cpu":
            ev[0] = time.perf_counter_ns()
        else:
            ev.record()

    def sync(self) -> None:
        if self.backend in ("cuda", "rocm"):
            torch.cuda.synchronize()
        elif self.backend == "metal":
            torch.mps.synchronize()

    def elapsed_ms(self, start, end) -> float:
        if self.backend == "cpu":
            return (end[0] - start[0]) / 1e6
        return start.elapsed_time(end)


def backend_of(device: str) -> str:
    if device.startswith("cuda"):
        return "rocm" if torch.version.hip else "cuda"
    if device.startswith("mps"):
        return "metal"
    return "cpu"


def _flush_buffer(backend: str, device: str) -> torch.Tensor:
    if backend in ("cuda", "rocm"):
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
        return torch.empty(2 * l2 // 4, dtype=torch.int32, device=device)
    return torch.empty(64 * 2**20 // 4, dtype=torch.int32, device=device)


MAX_COVER_MS = 50.0
_SLEEP_CYCLES_PER_MS: dict[str, float] = {}


def cover_ms(host_enqueue_ms: list[float], cap_ms: float = MAX_COVER_MS) -> float:
    """How long the GPU spin before a timed region must last to cover the host's enqueue
    time of the timed call: twice its 90th percentile plus 50 us, at most `cap_ms`."""
    if not host_enqueue_ms:
        return cap_ms
    return min(cap_ms, 2.0 * quantile(sorted(host_enqueue_ms), 0.9) + 0.05)


def _sleep_cycles_per_ms(device: str) -> float:
    """GPU clock cycles per millisecond of `torch.cuda._sleep`, measured once per device."""
    if device not in _SLEEP_CYCLES_PER_MS:
        cycles = 2_000_000
        torch.cuda._sleep(cycles)  # first launch: module load
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _SLEEP_CYCLES_PER_MS[device] = cycles / max(start.elapsed_time(end), 1e-3)
    return _SLEEP_CYCLES_PER_MS[device]


def bench(fn: Callable[[], object], *, device: str = "cpu", check: Callable[[], bool] | None = None,
          warmup_ms: float = 50.0, min_reps: int = 10, max_reps: int = 500,
          rse_target: float = 0.01, budget_s: float = 3.0, flush: bool = True,
          hide_launch: bool = True) -> Timing:
    """Time `fn()` on `device` by the method in this module's docstring."""
    if check is not None and not check():
        raise NotCorrect("output differs from the reference")
    backend = backend_of(device)
    clock = _Clock(backend)
    buf = _flush_buffer(backend, device) if flush else None

    clock.sync()
    start = time.perf_counter()
    calls = 0
    enqueue: list[float] = []
    while calls < 3 or (time.perf_counter() - start) * 1e3 < warmup_ms:
        t = time.perf_counter()
        fn()
        enqueue.append((time.perf_counter() - t) * 1e3)
        calls += 1
        clock.sync()

    spin_cycles, cover = 0, 0.0
    if hide_launch and backend in ("cuda", "rocm"):
        cover = cover_ms(enqueue[1:] or enqueue)  # the first call may still compile
        spin_cycles = int(cover * _sleep_cycles_per_ms(device))
    samples: list[float] = []
    host: list[float] = []
    uncovered = 0
    began = time.perf_counter()
    while True:
        if buf is not None:
            buf.zero_()
        if spin_cycles:
            torch.cuda._sleep(spin_cycles)
        t0, t1 = clock.region()
        clock.record(t0)
        t = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t) * 1e3)
        clock.record(t1)
        clock.sync()
        if spin_cycles and host[-1] > cover:
            uncovered += 1
        samples.append(clock.elapsed_ms(t0, t1))
        reason = stop_reason(samples, time.perf_counter() - began, min_reps=min_reps,
                             max_reps=max_reps, rse_target=rse_target, budget_s=budget_s)
        if reason:
            return Timing(samples, backend, reason, calls, host, cover, uncovered)
