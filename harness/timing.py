"""The one timing function, `bench`, and its interleaved form for the providers of one case,
`bench_interleaved`. The method, in order:

1. Correctness first: `check()` runs the provider once and compares it with the reference; a
   provider that fails is never timed (`NotCorrect`).
2. Warmup by time budget (`warmup_ms`, at least 3 calls), which also absorbs compilation,
   autotuning, module loading and handle creation. Each call starts on an idle device and
   the host's time until it returns, its enqueue time, is kept; then the device is waited for.
3. Each timed call starts from a cold last-level cache: a buffer twice the L2 (GPU) or 64 MiB
   (CPU) is overwritten before it, outside the timed region (as triton's `do_bench`).
4. Timed with device events on GPUs (CUDA and ROCm share torch's `cuda` event API; Apple Metal
   uses `torch.mps` events), and with the monotonic `perf_counter_ns` on the CPU (the backend
   table is `harness.clocks`).
5. Launch overhead hidden (CUDA and ROCm), as nvbench's "blocking kernel" does: after the
   flush and before the start event, a GPU spin (`torch.cuda._sleep`) is queued on the
   current stream, long enough that the host has queued every launch of `fn` before the GPU
   reaches the start event; the events then measure GPU time alone. Without it a small op
   measures its host overhead (MAX's `execute`, torch.compile's guards), not its kernels.
   (nvbench's kernel spins until the host releases it through mapped memory; torch's spin
   lasts a fixed number of cycles, so its length must be sized. It precedes the start
   event: a longer spin costs wall time, never timed time.)
   - Length, from probe calls (`PROBE_CALLS`): after the warmup, calls made exactly as the
     timed ones are (flush, spin, start event, `fn`), behind a generous spin
     (`clocks.probe_ms`: 5x the warmup's 90th-percentile enqueue time, at least 1 ms). Their
     enqueue times size the timed calls' spin (`clocks.cover_ms`): 1.5x their 90th
     percentile plus 0.1 ms, at most `MAX_COVER_MS`. Warmup calls start on an idle device
     and do not tell: the same calls enqueue for longer behind a busy one (on an H200, up
     to 3.5x).
   - Calibration (`clocks.sleep_rate`, once per process and device): three spins of 10^6
     cycles timed with events; the fastest gives the cycles per ms (the highest clock seen),
     so a spin lasts at least its length at any lower clock.
   - A call that waits for the device itself (a host sync inside `fn`) cannot get ahead of
     the GPU. The probes tell: if in most of them the GPU had passed the start event by the
     time `fn` returned (it waited, or enqueued for longer than the probes' spin), the spin
     is dropped and `fn` is timed as it runs (`hidden` False, `launch_note` says why): its
     events include the host's gaps, as its caller pays them. Nothing can deadlock: the spin
     is a fixed number of cycles that waits for nothing, so whatever waits behind it waits
     at most `MAX_COVER_MS`.
   - Every timed call checks the same thing (the start event already reached when `fn`
     returns); `uncovered` counts those calls, whose samples include GPU idle time.
   - Re-timed once (`retime_cover`, after its samples are taken, items 6 and 8): when more
     than a tenth of a provider's timed calls were uncovered (`too_uncovered`), its samples
     are discarded and it is timed again with a longer spin (`clocks.longer_cover_ms`: at
     least twice as long, up to 2 ms when its own enqueue times ask for more);
     `Timing.retimed_from` keeps the first pass's spin and count. A row still uncovered
     after that is reported as such (`kt microbench` keeps it out of ratios).
   - The host's enqueue time of every timed call is returned (`host_ms`, p50): what a
     caller pays per call when the GPU is not ahead of the host.
   `hide_launch=False` turns the spin off. Metal has no spin kernel: there, launches are not
   hidden and small ops include their launch overhead.
   Steps 1-5 make a provider ready (`prepare`, a `Sampler`); each `Sampler.sample()` is then
   one timed call (flush, spin, events, `fn`).
6. Stopping rule of `bench` (one provider): after `min_reps`, stop once the relative standard
   error of the mean falls under `rse_target`, or at `max_reps`, or when the `budget_s`
   wall-clock budget runs out (spins included); the reason is recorded. A re-timed provider
   (item 5) starts over under the same rule.
7. The raw samples are returned with p10/p50/p90; p50 is the number to quote.

8. Interleaved rounds (`bench_interleaved`, what `kt microbench` runs for the providers of one
   case): the ready providers take one sample each per round, A B C, then B C A, C A B, ...
   (the order rotated by one every round, `rotation`), so clock and power drift reaches every
   provider alike instead of one provider's block of samples. Round i gives each provider's
   sample i and the ratio of any two providers' samples in it; a ratio is reported as the
   median of the per-round ratios with a 95 % percentile-bootstrap interval over rounds
   (`harness.stats.ratio_interval`, seeded: reproducible from the saved samples). Stopping
   rule: after `min_rounds`, stop once every provider's ratio to the `anchor` (kt_graph in
   `kt microbench`) has an interval half-width under `ci_target` of the ratio, or at
   `max_rounds`, or when the `budget_s` wall-clock budget runs out (before `min_rounds` only
   at four times it, after 3 rounds); the reason and the half-width reached are recorded.
   A provider that raises while sampled leaves the rounds (`failed`), the others continue.
   When a provider is re-timed (item 5), the rounds are run once more, every provider's
   samples discarded, so that round i still pairs samples taken together (`retimed` names
   the providers whose spin was lengthened).
9. A second, independent timing (`Sampler.throughput`): `repeats` batches of N calls back to
   back, each after a cache flush, timed on the host clock with one wait for the device at
   the end, less the same batch of flushes alone, divided by N (no events, no spin). Where the
   device is the bottleneck it measures the same GPU time as the events; `timings_agree`
   flags a row whose two timings differ by more than twice their combined relative noise
   (at least 5 %). A host-bound call behind a spin (enqueue longer than half its GPU time) is
   not compared: back to back it measures the host, the events the GPU; nor is a call that
   a flush outlasts five times (the CPU's 64 MiB flush against a small op): the difference
   of two batches is then mostly the flushes' noise.

10. Work on another stream (MAX enqueues on its own): `prepare_on_stream` makes that stream
   torch's current one for every sample, so the flush, the spin and the events land there
   too, then checks once that the events saw at least half of the time the device stays busy
   after a call returns (`clocks.device_tail_ms`, a lower bound of its GPU time without the host's
   enqueue time); else the call is timed host-synchronized (`run(); sync()`), and its note
   says so.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from harness import clocks
from harness.clocks import Clock, backend_of, device_tail_ms, events_missed_work
from harness.io import error_line
from harness.stats import (Throughput, halfwidth, ratio_interval, relative_standard_error,
                           summarize, timings_agree)  # noqa: F401  (timing.timings_agree: the rule beside the method)

# The bootstrap of the stopping rule is coarser than the reported one (it runs every few rounds).
_STOP_RESAMPLES = 500
MAX_BATCH = 64  # most calls in one back-to-back batch


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
    retimed_from: dict | None = None  # the first pass of a re-timed call: cover_ms, uncovered, n
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


def stop_reason(samples: list[float], elapsed_s: float, *, min_reps: int, max_reps: int,
                rse_target: float, budget_s: float) -> str | None:
    """Why sampling one provider should stop now, or None to keep going (item 6)."""
    n = len(samples)
    if n >= max_reps:
        return "max_reps"
    if n >= min_reps and relative_standard_error(samples) < rse_target:
        return "rse"
    if n >= min(min_reps, 3) and elapsed_s >= budget_s:
        return "budget"
    return None


def interleaved_stop(rounds: int, widest: float, elapsed_s: float, *, min_rounds: int,
                     max_rounds: int, ci_target: float, budget_s: float) -> str | None:
    """Why interleaved rounds should stop now (item 8), or None; `widest` is the largest
    relative half-width of the ratios' intervals at the last check."""
    if rounds >= max_rounds:
        return "max_rounds"
    if rounds >= min_rounds and widest <= ci_target:
        return "ci"
    if rounds >= min_rounds and elapsed_s >= budget_s:
        return "budget"
    if rounds >= min(min_rounds, 3) and elapsed_s >= 4 * budget_s:
        return "budget"
    return None


def rotation(names: list[str], round_index: int) -> tuple[str, ...]:
    """The order of round `round_index`: `names` rotated left by that many places."""
    k = round_index % len(names) if names else 0
    return tuple(names[k:] + names[:k])


def too_uncovered(uncovered: int, n: int) -> bool:
    """Whether more than a tenth of `n` timed calls were uncovered (item 5): their samples
    then include GPU idle time too often for the p50 to be the GPU's time alone."""
    return uncovered > n // 10


def retime_cover(t: Timing) -> float | None:
    """The spin to time `t`'s call again with (item 5), or None: not when its launch was not
    hidden, when few enough calls were uncovered, when it was re-timed already, or when no
    longer spin is allowed."""
    if not t.hidden or t.retimed_from is not None or not too_uncovered(t.uncovered,
                                                                        len(t.samples_ms)):
        return None
    longer = clocks.longer_cover_ms(t.cover_ms, t.host_samples_ms)
    return longer if longer > t.cover_ms else None


def stream_context(stream: int | None, device: str):
    """Make the native stream `stream` torch's current one (CUDA/ROCm), else do nothing."""
    if stream is None or not device.startswith("cuda"):
        return contextlib.nullcontext()
    return torch.cuda.stream(torch.cuda.ExternalStream(stream))


class Sampler:
    """A provider made ready by `prepare` (items 1-5): `sample()` times one call."""

    def __init__(self, fn: Callable[[], object], clock: Clock, buf, cover: float, note: str,
                 warmup_calls: int, stream: int | None, device: str):
        self.fn, self.clock, self.buf, self.cover, self.note = fn, clock, buf, cover, note
        self.warmup_calls, self.stream, self.device = warmup_calls, stream, device
        self.samples: list[float] = []
        self.host: list[float] = []
        self.uncovered = 0
        self.retimed_from: dict | None = None

    def reset(self) -> None:
        self.samples, self.host, self.uncovered = [], [], 0

    def retime(self, cover: float) -> None:
        """Discard the samples and spin for `cover` ms from now on (item 5's re-timing)."""
        self.retimed_from = {"cover_ms": self.cover, "uncovered": self.uncovered,
                             "n": len(self.samples)}
        self.reset()
        self.cover = cover

    def sample(self) -> float:
        clock = self.clock
        with stream_context(self.stream, self.device):
            if self.buf is not None:
                self.buf.zero_()
            if self.cover:
                clock.spin(self.cover)
            t0, t1 = clock.region()
            clock.record(t0)
            t = time.perf_counter()
            self.fn()
            self.host.append((time.perf_counter() - t) * 1e3)
            if self.cover and clock.reached(t0):
                self.uncovered += 1
            clock.record(t1)
            clock.sync()
            ms = clock.elapsed_ms(t0, t1)
        self.samples.append(ms)
        return ms

    def timing(self, stopped_by: str) -> Timing:
        return Timing(list(self.samples), self.clock.backend, stopped_by, self.warmup_calls,
                      list(self.host), self.cover, self.uncovered, hidden=self.cover > 0,
                      launch_note=self.note, retimed_from=self.retimed_from)

    def _batch_ms(self, calls: int, with_fn: bool) -> float:
        self.clock.sync()
        t = time.perf_counter()
        for _ in range(calls):
            if self.buf is not None:
                self.buf.zero_()
            if with_fn:
                self.fn()
        self.clock.sync()
        return (time.perf_counter() - t) * 1e3

    def throughput(self, repeats: int = 3, batch_ms: float = 20.0) -> Throughput:
        """Item 9: `repeats` batches of N back-to-back calls (N filling about `batch_ms`)."""
        out = []
        with stream_context(self.stream, self.device):
            flush_ms = self._batch_ms(1, False) if self.buf is not None else 0.0
            per_call = max(statistics.median(self.samples) if self.samples else 1.0,
                           statistics.median(self.host) if self.host else 0.0, 1e-3) + flush_ms
            calls = min(MAX_BATCH, max(2, math.ceil(batch_ms / per_call)))
            for _ in range(repeats):
                both = self._batch_ms(calls, True)
                flushes = self._batch_ms(calls, False) if self.buf is not None else 0.0
                out.append((both - flushes) / calls)
        return Throughput(out, calls, flush_ms)


PROBE_CALLS = 10  # probe calls that size the spin (item 5)


def waits_for_device(reached: list[bool]) -> bool:
    """Whether probe calls behind a spin show a call that cannot get ahead of the device:
    in most of them (`reached`: one flag per probe) the GPU had passed the start event by
    the time the call returned."""
    return sum(reached) > len(reached) // 2


_clock = clocks.clock_for  # (tests put a simulated device here)

def prepare(fn: Callable[[], object], *, device: str = "cpu",
            check: Callable[[], bool] | None = None, warmup_ms: float = 50.0, flush: bool = True,
            hide_launch: bool = True, stream: int | None = None) -> Sampler:
    """Items 1-5 for `fn` on `device` (with native `stream` made current): a ready `Sampler`."""
    if check is not None and not check():
        raise NotCorrect("output differs from the reference")
    backend = backend_of(device)
    clock = _clock(backend, device)
    buf = clock.flush_buffer() if flush else None
    with stream_context(stream, device):
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
    sampler = Sampler(fn, clock, buf, 0.0, "", calls, stream, device)
    if not hide_launch:
        sampler.note = "launch not hidden: hide_launch=False"
    elif not clock.can_spin:
        sampler.note = "" if backend == "cpu" else f"launch not hidden: no spin kernel on {backend}"
    else:  # the first warmup call may still compile: left out
        sampler.cover = clocks.probe_ms(enqueue[1:] or enqueue)
        reached = []
        for _ in range(PROBE_CALLS):
            before = sampler.uncovered
            sampler.sample()
            reached.append(sampler.uncovered > before)
        if waits_for_device(reached):
            sampler.cover = 0.0
            sampler.note = ("launch not hidden: the call waits for the device (or enqueues "
                            "for longer than a spin covers)")
        else:
            sampler.cover = clocks.cover_ms(sampler.host)
        sampler.reset()
    return sampler


def bench(fn: Callable[[], object], *, device: str = "cpu", check: Callable[[], bool] | None = None,
          warmup_ms: float = 50.0, min_reps: int = 10, max_reps: int = 500,
          rse_target: float = 0.01, budget_s: float = 3.0, flush: bool = True,
          hide_launch: bool = True) -> Timing:
    """Time `fn()` alone on `device` by items 1-7 of this module's docstring."""
    sampler = prepare(fn, device=device, check=check, warmup_ms=warmup_ms, flush=flush,
                      hide_launch=hide_launch)
    while True:
        began = time.perf_counter()
        while True:
            sampler.sample()
            reason = stop_reason(sampler.samples, time.perf_counter() - began,
                                 min_reps=min_reps, max_reps=max_reps, rse_target=rse_target,
                                 budget_s=budget_s)
            if reason:
                break
        t = sampler.timing(reason)
        longer = retime_cover(t)
        if longer is None:
            return t
        sampler.retime(longer)


@dataclass
class Interleaved:
    """What `bench_interleaved` measured: a `Timing` per provider (sample i of each is round
    i), the order of every round, why it stopped, the anchor of the stopping rule and the
    widest relative interval half-width of the ratios to it at the last check; `failed`:
    providers that raised while sampled, with the error; `retimed`: providers whose spin was
    lengthened before the rounds were run again (item 5), whose rounds these are."""

    timings: dict[str, Timing]
    orders: list[tuple[str, ...]]
    stopped_by: str
    anchor: str | None
    halfwidth: float
    failed: dict[str, str]
    retimed: tuple[str, ...] = ()


def widest_halfwidth(samples: dict[str, list[float]], anchor: str,
                     resamples: int = _STOP_RESAMPLES) -> float:
    """The largest relative half-width of the intervals of every provider's ratio to
    `anchor`; alone, the anchor's 1.96 x relative standard error (a normal 95 % interval)."""
    others = [n for n in samples if n != anchor]
    if not others:
        return 1.96 * relative_standard_error(samples[anchor])
    return max(halfwidth(*ratio_interval(samples[n], samples[anchor], resamples=resamples))
               for n in others)


def bench_interleaved(samplers: dict[str, Sampler], *, anchor: str | None = None,
                      min_rounds: int = 10, max_rounds: int = 200, ci_target: float = 0.01,
                      budget_s: float = 3.0) -> Interleaved:
    """Time ready providers in rotated rounds by item 8 of this module's docstring; once
    more, every sample discarded, if one of them is re-timed with a longer spin (item 5)."""
    kw = dict(min_rounds=min_rounds, max_rounds=max_rounds, ci_target=ci_target,
              budget_s=budget_s)
    inter = _rounds(samplers, anchor, **kw)
    longer = {n: c for n, t in inter.timings.items() if (c := retime_cover(t)) is not None}
    if not longer:
        return inter
    live = {n: s for n, s in samplers.items() if n not in inter.failed}
    for n, s in live.items():
        if n in longer:
            s.retime(longer[n])
        else:
            s.reset()
    again = _rounds(live, inter.anchor, **kw)
    again.failed = {**inter.failed, **again.failed}
    again.retimed = tuple(longer)
    return again


def _rounds(samplers: dict[str, Sampler], anchor: str | None, *, min_rounds: int,
            max_rounds: int, ci_target: float, budget_s: float) -> Interleaved:
    names = list(samplers)
    failed: dict[str, str] = {}
    orders: list[tuple[str, ...]] = []
    widest, next_check, reason = math.inf, min_rounds, "failed"
    began = time.perf_counter()
    while True:
        live = [n for n in names if n not in failed]
        if not live:
            break
        order = rotation(live, len(orders))
        for n in order:
            try:
                samplers[n].sample()
            except Exception as e:  # its rounds end here; the others' go on
                failed[n] = error_line(e)
        orders.append(order)
        live = [n for n in names if n not in failed]
        if anchor not in live:
            anchor = live[0] if live else None
        rounds = len(orders)
        if anchor is not None and rounds >= next_check:
            widest = widest_halfwidth({n: samplers[n].samples for n in live}, anchor)
            next_check = rounds + max(1, rounds // 5)
        stop = interleaved_stop(rounds, widest, time.perf_counter() - began,
                                min_rounds=min_rounds, max_rounds=max_rounds,
                                ci_target=ci_target, budget_s=budget_s)
        if stop:
            reason = stop
            if anchor is not None:
                widest = widest_halfwidth({n: samplers[n].samples for n in live}, anchor)
            break
    timings = {n: samplers[n].timing(reason) for n in names if n not in failed}
    return Interleaved(timings, orders, reason, anchor, widest, failed)


def prepare_on_stream(run: Callable[[], object], *, stream: int | None,
                      sync: Callable[[], None] | None, device: str,
                      check: Callable[[], bool] | None = None, **prepare_kw) -> tuple[Sampler, str]:
    """`prepare(run)` with `stream` (None: torch's current one) made current, cross-checked
    with the host clock (item 10 of this module's docstring) on three samples, which are then
    discarded. A call whose work is all done before it returns cannot be checked this way:
    its throughput then exceeds the datasheet peak, which `kt microbench` flags. Returns the
    sampler and a note, empty unless the call is timed host-synchronized. `check` may be
    called again by the fallback: it must return its first verdict without rerunning."""

    def ready(fn, on, hide_launch=True) -> Sampler:
        return prepare(fn, device=device, check=check, hide_launch=hide_launch, stream=on,
                       **prepare_kw)

    def synced() -> None:
        run()
        sync()

    try:
        sampler = ready(run, stream)
        if stream is not None and sync is not None:
            probe = statistics.median(sampler.sample() for _ in range(3))
            sampler.reset()
            tail = device_tail_ms(run, sync)
            if events_missed_work(probe, tail):
                return (ready(synced, None, hide_launch=False),
                        f"events missed MAX's stream (GPU busy >= {tail:.3f} ms after each call "
                        "returned): host-synced timing")
    except NotCorrect:
        raise
    except Exception as e:
        if stream is None or sync is None:
            raise
        return ready(synced, None, hide_launch=False), f"host-synced timing ({error_line(e)})"
    return sampler, ""
