"""The backend table of `harness.timing` (item 4 of its method) and the launch-hiding spin's
arithmetic (item 5): how a device kind records timed regions, waits, spins and flushes its
cache; and the host clock's cross-check of events on another stream (item 10). A new device
kind is a new `Clock` subclass here; ROCm and Metal cannot be measured on kt's machines, so
their entries are untested, and results say which backend timed them."""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from harness.stats import quantile


class Clock:
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


class CudaClock(Clock):
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
        torch.cuda._sleep(spin_cycles(ms, sleep_rate(self.device)))

    def flush_buffer(self) -> torch.Tensor:
        l2 = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 50 * 2**20)
        return torch.empty(2 * l2 // 4, dtype=torch.int32, device=self.device)


class MetalClock(CudaClock):
    """Apple Metal: `torch.mps` events; no spin kernel."""

    can_spin = False

    def region(self):
        return torch.mps.event.Event(enable_timing=True), torch.mps.event.Event(enable_timing=True)

    def sync(self) -> None:
        torch.mps.synchronize()

    def spin(self, ms: float) -> None:
        Clock.spin(self, ms)

    def flush_buffer(self) -> torch.Tensor:
        return Clock.flush_buffer(self)


def backend_of(device: str) -> str:
    if device.startswith("cuda"):
        return "rocm" if torch.version.hip else "cuda"
    if device.startswith("mps"):
        return "metal"
    return "cpu"


def clock_for(backend: str, device: str) -> Clock:
    """The backend table entry for `backend` (cpu, cuda, rocm, metal) on `device`."""
    kind = {"cuda": CudaClock, "rocm": CudaClock, "metal": MetalClock}.get(backend, Clock)
    return kind(backend, device)


MAX_COVER_MS = 50.0  # no spin lasts longer: what waits behind one waits at most this long
SPIN_CALIBRATION_CYCLES = 1_000_000
SLEEP_RATE: dict[str, float] = {}

# The timed call's spin (`cover_ms`): COVER_FACTOR x the COVER_QUANTILE of the enqueue times of
# probe calls made as the timed calls are, plus COVER_FLOOR_MS. In the H200 run of
# benchmarks/results/kernels_h200 a row's uncovered share was 12-26 % with a spin of 1.1-1.3x
# its median enqueue time, 4-9 % at 1.4-1.6x and at most 4 % at 2x or more: an enqueue time's
# 90th percentile is ~1.3x its median, so 1.5 x p90 is ~2x the median. The floor covers what
# the host does between queueing the spin and calling `fn` (the start event's creation and
# record, a few us) and the scheduler's jitter on a shared host.
COVER_QUANTILE = 0.9
COVER_FACTOR = 1.5
COVER_FLOOR_MS = 0.1
# The probe calls' spin (`probe_ms`), sized from the warmup, whose calls start on an idle
# device: on the H200 the same calls behind a spin enqueued for up to 3.5x the warmup's 90th
# percentile (kt_graph, Triton, F.rms_norm: ~0.06 ms in warmup, ~0.2 ms timed), so probes spin
# PROBE_FACTOR x that, at least PROBE_MIN_MS, long enough that they see a busy device.
PROBE_FACTOR = 5.0
PROBE_MIN_MS = 1.0
# A row re-timed (`longer_cover_ms`) spins at least twice as long as its first pass, up to
# RETIME_MAX_MS when its own enqueue times ask for more: the spin precedes the start event, so
# it costs wall time only, at most 2 ms a sample (0.4 s over 200 rounds).
RETIME_MAX_MS = 2.0


def cover_ms(host_enqueue_ms: list[float], cap_ms: float = MAX_COVER_MS) -> float:
    """How long the GPU spin before a timed region must last to cover the host's enqueue
    time of the timed call: COVER_FACTOR x the COVER_QUANTILE of `host_enqueue_ms` (measured
    behind a spin, as the timed calls are) plus COVER_FLOOR_MS, at most `cap_ms`."""
    if not host_enqueue_ms:
        return cap_ms
    q = quantile(sorted(host_enqueue_ms), COVER_QUANTILE)
    return min(cap_ms, COVER_FACTOR * q + COVER_FLOOR_MS)


def probe_ms(warmup_enqueue_ms: list[float], cap_ms: float = MAX_COVER_MS) -> float:
    """The probe calls' spin: PROBE_FACTOR x the 90th percentile of the warmup's enqueue
    times (on an idle device), at least PROBE_MIN_MS, at most `cap_ms`."""
    if not warmup_enqueue_ms:
        return cap_ms
    q = quantile(sorted(warmup_enqueue_ms), COVER_QUANTILE)
    return min(cap_ms, max(PROBE_MIN_MS, PROBE_FACTOR * q))


def longer_cover_ms(cover: float, host_enqueue_ms: list[float],
                    cap_ms: float = MAX_COVER_MS) -> float:
    """The spin of a re-timed row: twice `cover`, or `cover_ms` of the enqueue times its
    timed calls showed (`host_enqueue_ms`) if that is longer, up to RETIME_MAX_MS; never
    over `cap_ms`."""
    wanted = min(RETIME_MAX_MS, cover_ms(host_enqueue_ms, cap_ms)) if host_enqueue_ms else 0.0
    return min(cap_ms, max(2.0 * cover, wanted))


def spin_rate(cycles: int, elapsed_ms: list[float]) -> float:
    """Spin-kernel cycles per millisecond from spins of `cycles` cycles that took
    `elapsed_ms`: the fastest one's rate (the highest clock seen), so that a spin sized with
    it lasts at least as long as asked at any lower clock."""
    return cycles / max(min(elapsed_ms), 1e-6)


def spin_cycles(ms: float, rate: float, cap_ms: float = MAX_COVER_MS) -> int:
    """Cycles for a spin of `ms` milliseconds (at most `cap_ms`) at `rate` cycles per ms."""
    return max(1, math.ceil(min(ms, cap_ms) * rate))


def sleep_rate(device: str) -> float:
    """`torch.cuda._sleep`'s cycles per ms on `device`, measured once per process."""
    if device not in SLEEP_RATE:
        torch.cuda._sleep(SPIN_CALIBRATION_CYCLES)  # first launch: loads the kernel
        elapsed = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(SPIN_CALIBRATION_CYCLES)
            end.record()
            end.synchronize()
            elapsed.append(start.elapsed_time(end))
        SLEEP_RATE[device] = spin_rate(SPIN_CALIBRATION_CYCLES, elapsed)
    return SLEEP_RATE[device]


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
