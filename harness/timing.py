"""The one timing function, `bench`. Its method, in order:

1. Correctness first: `check()` runs the provider once and compares it with the reference; a
   provider that fails is never timed (`NotCorrect`).
2. Warmup by time budget (`warmup_ms`, at least 3 calls), which also absorbs compilation,
   autotuning, module loading and handle creation. Each call starts on an idle device and
   the host's time until it returns, its enqueue time, is kept; then the device is waited for.
3. Each timed call starts from a cold last-level cache: a buffer twice the L2 (GPU) or 64 MiB
   (CPU) is overwritten before it, outside the timed region (as triton's `do_bench`).
4. Timed with device events on GPUs (CUDA and ROCm share torch's `cuda` event API; Apple Metal
   uses `torch.mps` events), and with the monotonic `perf_counter_ns` on the CPU.
5. Launch overhead hidden (CUDA and ROCm), as nvbench's "blocking kernel" does: after the
   flush and before the start event, a GPU spin (`torch.cuda._sleep`) is queued on the
   current stream, long enough that the host has queued every launch of `fn` before the GPU
   reaches the start event; the events then measure GPU time alone. Without it a small op
   measures its host overhead (MAX's `execute`, torch.compile's guards), not its kernels.
   - Length (`cover_ms`): twice the 90th percentile of the warmup enqueue times (the first
     call left out) plus 50 us, at most `MAX_COVER_MS`.
   - Calibration (`spin_rate`, once per process and device): three spins of 10^6 cycles timed
     with events; the fastest gives the cycles per ms (the highest clock seen), so a spin
     lasts at least its length at any lower clock.
   - A call that waits for the device itself (a host sync inside `fn`) cannot get ahead of
     the GPU. Two probe calls behind a spin tell: if in both the GPU had passed an event
     queued after the spin by the time `fn` returned (it waited, or enqueued for longer than
     the spin), the spin is dropped and `fn` is timed as it runs (`hidden` False,
     `launch_note` says why): its events include the host's gaps, as its caller pays them.
     Nothing can deadlock: the spin is a fixed number of cycles that waits for nothing, so
     whatever waits behind it waits at most `MAX_COVER_MS`.
   - Every timed call checks the same thing (the start event already reached when `fn`
     returns); `uncovered` counts those calls, whose samples include GPU idle time.
   - The host's enqueue time of every timed call is returned (`host_ms`, p50): what a
     caller pays per call when the GPU is not ahead of the host.
   `hide_launch=False` turns the spin off. Metal has no spin kernel: there, launches are not
   hidden and small ops include their launch overhead.
6. Stopping rule: after `min_reps`, stop once the relative standard error of the mean falls
   under `rse_target`, or at `max_reps`, or when the `budget_s` wall-clock budget runs out;
   the reason is recorded.
7. The raw samples are returned with p10/p50/p90; p50 is the number to quote.

8. Work on another stream (MAX enqueues on its own): `bench_on_stream` makes that stream
   torch's current one, so the flush, the spin and the events land there too, then checks
   once that the events saw at least half of the time the device stays busy after a call
   returns (`device_tail_ms`, a lower bound of its GPU time without the host's enqueue
   time); else the call is timed host-synchronized (`run(); sync()`), and its note says so.

The backend table (`_Clock` and its subclasses) is what ports this to a new device kind; ROCm
and Metal cannot be measured on kt's machines, so their rows are untested here, and results
say which backend timed them.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from harness.io import error_line

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
    hidden: bool = False
    launch_note: str = ""
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
    """Backend table entry, the CPU's: timed regions on the host clock, no device to wait for
    and no spin. Subclasses time regions with device events."""

    can_spin = False

    def __init__(self, backend: str, device: str):
        self.backend, self.device = backend, device

    def region(self):
        return [0], [0]

    def record(self, ev) -> None:
        ev[0] = time.perf_counter_ns()

    def reached(self, ev) -> bool:
        """Whether the device has passed `ev` (the host clock always has)."""
        return True

    def sync(self) -> None:
        pass

    def elapsed_ms(self, start, end) -> float:
        return (end[0] - start[0]) / 1e6

    def spin(self, ms: float) -> None:
        raise NotImplementedError(f"no spin kernel on {self.backend}")

    def flush_buffer(self) -> torch.Tensor:
        return torch.empty(64 * 2**20 // 4, dtype=torch.int32, device=self.device)


class _CudaClock(_Clock):
    """CUDA and ROCm (torch's HIP build keeps the `cuda` API): events and `_sleep` on the
    current stream."""

    can_spin = True

    def region(self):
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def record(self, ev) -> None:
        ev.record()

    def reached(self, ev) -> bool:
        return ev.query()

    def sync(self) -> None:
        torch.cuda.synchronize()

    def elapsed_ms(self, start, end) -> float:
        return start.elapsed_time(end)

    def spin(self, ms: float) -> None:
        torch.cuda._sleep(spin_cycles(ms, _sleep_rate(self.device)))

    def flush_buffer(self) -> torch.Tensor:
        l2 = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 50 * 2**20)
        return torch.empty(2 * l2 // 4, dtype=torch.int32, device=self.device)


class _MetalClock(_CudaClock):
    """Apple Metal: `torch.mps` events; no spin kernel."""

    can_spin = False

    def region(self):
        return torch.mps.event.Event(enable_timing=True), torch.mps.event.Event(enable_timing=True)

    def sync(self) -> None:
        torch.mps.synchronize()

    def spin(self, ms: float) -> None:
        _Clock.spin(self, ms)

    def flush_buffer(self) -> torch.Tensor:
        return _Clock.flush_buffer(self)


def backend_of(device: str) -> str:
    if device.startswith("cuda"):
        return "rocm" if torch.version.hip else "cuda"
    if device.startswith("mps"):
        return "metal"
    return "cpu"


def _clock(backend: str, device: str) -> _Clock:
    kind = {"cuda": _CudaClock, "rocm": _CudaClock, "metal": _MetalClock}.get(backend, _Clock)
    return kind(backend, device)


MAX_COVER_MS = 50.0
SPIN_CALIBRATION_CYCLES = 1_000_000
_SLEEP_RATE: dict[str, float] = {}


def cover_ms(host_enqueue_ms: list[float], cap_ms: float = MAX_COVER_MS) -> float:
    """How long the GPU spin before a timed region must last to cover the host's enqueue
    time of the timed call: twice its 90th percentile plus 50 us, at most `cap_ms`."""
    if not host_enqueue_ms:
        return cap_ms
    return min(cap_ms, 2.0 * quantile(sorted(host_enqueue_ms), 0.9) + 0.05)


def spin_rate(cycles: int, elapsed_ms: list[float]) -> float:
    """Spin-kernel cycles per millisecond from spins of `cycles` cycles that took
    `elapsed_ms`: the fastest one's rate (the highest clock seen), so that a spin sized with
    it lasts at least as long as asked at any lower clock."""
    return cycles / max(min(elapsed_ms), 1e-6)


def spin_cycles(ms: float, rate: float, cap_ms: float = MAX_COVER_MS) -> int:
    """Cycles for a spin of `ms` milliseconds (at most `cap_ms`) at `rate` cycles per ms."""
    return max(1, math.ceil(min(ms, cap_ms) * rate))


def _sleep_rate(device: str) -> float:
    """`torch.cuda._sleep`'s cycles per ms on `device`, measured once per process."""
    if device not in _SLEEP_RATE:
        torch.cuda._sleep(SPIN_CALIBRATION_CYCLES)  # first launch: loads the kernel
        elapsed = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(SPIN_CALIBRATION_CYCLES)
            end.record()
            end.synchronize()
            elapsed.append(start.elapsed_time(end))
        _SLEEP_RATE[device] = spin_rate(SPIN_CALIBRATION_CYCLES, elapsed)
    return _SLEEP_RATE[device]


def _waits_for_device(fn: Callable[[], object], clock: _Clock, cover: float) -> bool:
    """One probe: `fn` behind a spin of `cover` ms; True if by the time it returned the GPU
    had already passed the spin (`fn` waited for the device, or enqueued for longer)."""
    clock.spin(cover)
    mark = clock.region()[0]
    clock.record(mark)
    fn()
    reached = clock.reached(mark)
    clock.sync()
    return reached


def bench(fn: Callable[[], object], *, device: str = "cpu", check: Callable[[], bool] | None = None,
          warmup_ms: float = 50.0, min_reps: int = 10, max_reps: int = 500,
          rse_target: float = 0.01, budget_s: float = 3.0, flush: bool = True,
          hide_launch: bool = True) -> Timing:
    """Time `fn()` on `device` by the method in this module's docstring."""
    if check is not None and not check():
        raise NotCorrect("output differs from the reference")
    backend = backend_of(device)
    clock = _clock(backend, device)
    buf = clock.flush_buffer() if flush else None

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

    cover, note = 0.0, ""
    if not hide_launch:
        note = "launch not hidden: hide_launch=False"
    elif not clock.can_spin:
        note = "" if backend == "cpu" else f"launch not hidden: no spin kernel on {backend}"
    else:
        cover = cover_ms(enqueue[1:] or enqueue)  # the first call may still compile
        if all(_waits_for_device(fn, clock, cover) for _ in range(2)):
            cover, note = 0.0, ("launch not hidden: the call waits for the device (or "
                                "enqueues for longer than a spin covers)")
    samples: list[float] = []
    host: list[float] = []
    uncovered = 0
    began = time.perf_counter()
    while True:
        if buf is not None:
            buf.zero_()
        if cover:
            clock.spin(cover)
        t0, t1 = clock.region()
        clock.record(t0)
        t = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t) * 1e3)
        if cover and clock.reached(t0):
            uncovered += 1
        clock.record(t1)
        clock.sync()
        samples.append(clock.elapsed_ms(t0, t1))
        reason = stop_reason(samples, time.perf_counter() - began, min_reps=min_reps,
                             max_reps=max_reps, rse_target=rse_target, budget_s=budget_s)
        if reason:
            return Timing(samples, backend, reason, calls, host, cover, uncovered,
                          hidden=cover > 0, launch_note=note)


def stream_context(stream: int | None, device: str):
    """Make the native stream `stream` torch's current one (CUDA/ROCm), else do nothing."""
    if stream is None or not device.startswith("cuda"):
        return contextlib.nullcontext()
    return torch.cuda.stream(torch.cuda.ExternalStream(stream))


def device_tail_ms(run: Callable[[], object], sync: Callable[[], None], calls: int = 5) -> float:
    """A lower bound of the GPU time per call, from the host clock alone: how long `sync()`
    takes after `run()` returns, less what it takes on an idle device (median of `calls`).
    Whatever stream the work went to, the device was still busy with it that long; the host's
    enqueue time is not in it, so a host-bound op does not inflate it."""
    sync()
    idle = []
    for _ in range(3):
        t0 = time.perf_counter()
        sync()
        idle.append(time.perf_counter() - t0)
    tails = []
    for _ in range(calls):
        run()
        t0 = time.perf_counter()
        sync()
        tails.append(time.perf_counter() - t0 - min(idle))
    return max(0.0, sorted(tails)[len(tails) // 2] * 1e3)


def events_missed_work(event_p50_ms: float, tail_ms: float) -> bool:
    """Whether events recorded around a call saw less than half of `tail_ms`, a lower bound
    of its GPU time (`device_tail_ms`), beyond 10 us of host-clock jitter: then they were
    recorded on a stream the work did not run on."""
    return event_p50_ms < 0.5 * tail_ms - 0.01


def bench_on_stream(run: Callable[[], object], *, stream: int | None,
                    sync: Callable[[], None] | None, device: str,
                    check: Callable[[], bool] | None = None, **bench_kw) -> tuple[Timing, str]:
    """`bench(run)` with `stream` (None: torch's current one) made current, cross-checked
    with the host clock (item 8 of this module's docstring). A call whose work is all done
    before it returns cannot be checked this way: its throughput then exceeds the datasheet
    peak, which `kt microbench` flags. Returns the timing and a note, empty unless the call
    was timed host-synchronized. `check` may be called again by the fallback: it must return
    its first verdict without rerunning."""

    def timed(fn, on, hide_launch=True) -> Timing:
        with stream_context(on, device):
            return bench(fn, device=device, check=check, hide_launch=hide_launch, **bench_kw)

    def synced() -> None:
        run()
        sync()

    try:
        timing = timed(run, stream)
    except NotCorrect:
        raise
    except Exception as e:
        if stream is None or sync is None:
            raise
        return timed(synced, None, hide_launch=False), f"host-synced timing ({error_line(e)})"
    if stream is not None and sync is not None:
        tail = device_tail_ms(run, sync)
        if events_missed_work(timing.p50, tail):
            return (timed(synced, None, hide_launch=False),
                    f"events missed MAX's stream (GPU busy >= {tail:.3f} ms after each call "
                    "returned): host-synced timing")
    return timing, ""
