"""The timing engine: quantiles and the stopping rule on synthetic samples, the correctness
gate, a real CPU measurement, the launch-hiding spin (its arithmetic, and `bench` driving a
simulated GPU on the host clock), and on a GPU the real thing."""

import math
import random
import time

import pytest

from harness import clocks, timing
from harness.clocks import (MAX_COVER_MS, RETIME_MAX_MS, cover_ms, longer_cover_ms, probe_ms,
                            spin_cycles, spin_rate)
from harness.stats import quantile, relative_standard_error, summarize
from harness.timing import NotCorrect, bench, stop_reason


def test_quantiles_match_linear_interpolation():
    s = [float(x) for x in range(1, 11)]  # 1..10
    assert quantile(s, 0.5) == 5.5
    assert math.isclose(quantile(s, 0.1), 1.9)
    assert math.isclose(quantile(s, 0.9), 9.1)
    assert quantile([4.0], 0.9) == 4.0
    stats = summarize(random.Random(0).sample(s, 10))
    assert (stats["p10"], stats["p50"], stats["p90"]) == (quantile(s, 0.1), 5.5, quantile(s, 0.9))


def test_rse_of_constant_samples_is_zero_and_of_one_sample_infinite():
    assert relative_standard_error([2.0] * 5) == 0.0
    assert relative_standard_error([2.0]) == math.inf


def test_stopping_rule():
    kw = dict(min_reps=10, max_reps=100, rse_target=0.01, budget_s=1.0)
    steady = [1.0 + 0.001 * (i % 3) for i in range(10)]
    assert stop_reason(steady[:9], 0.1, **kw) is None  # below min_reps
    assert stop_reason(steady, 0.1, **kw) == "rse"
    noisy = [1.0, 3.0] * 6
    assert stop_reason(noisy, 0.1, **kw) is None
    assert stop_reason(noisy, 1.5, **kw) == "budget"
    assert stop_reason(noisy * 10, 0.1, **kw) == "max_reps"


def test_correctness_gate_refuses_a_wrong_kernel():
    calls = []
    with pytest.raises(NotCorrect):
        bench(lambda: calls.append(1), check=lambda: False)
    assert calls == []


def test_cpu_measurement_sees_a_known_sleep():
    t = bench(lambda: time.sleep(0.002), device="cpu", warmup_ms=5, min_reps=5, max_reps=20,
              budget_s=0.5, flush=False)
    assert t.backend == "cpu" and t.warmup_calls >= 3
    assert 2.0 <= t.p50 < 20.0
    assert t.p10 <= t.p50 <= t.p90
    assert len(t.samples_ms) >= 5 and t.stopped_by in ("rse", "max_reps", "budget")
    assert t.host_ms >= 2.0 and len(t.host_samples_ms) == len(t.samples_ms)
    assert t.cover_ms == 0.0 and t.uncovered == 0  # no spin on a CPU


def test_launch_cover_is_one_and_a_half_slow_enqueues_plus_a_floor_and_capped():
    host = [0.1] * 9 + [1.0]  # ms; the 90th percentile interpolates between 0.1 and 1.0
    assert cover_ms(host) == pytest.approx(1.5 * quantile(sorted(host), 0.9) + 0.1)
    assert cover_ms([0.02] * 10) == pytest.approx(0.13)
    assert cover_ms([200.0] * 10) == MAX_COVER_MS
    assert cover_ms([]) == MAX_COVER_MS
    # the H200's RMSNorm rows that were uncovered: Triton at 16384x4096 enqueued for a median
    # 0.22 ms behind the spin and got 0.20 ms; its p90 (~1.3x the median) now gives ~0.53 ms,
    # over twice its median, where the H200's rows were at most 4 % uncovered
    assert cover_ms([0.22] * 9 + [0.29]) >= 2 * 0.22


def test_probes_spin_well_past_the_warmups_enqueue_times():
    # warmup calls start on an idle device; behind a spin the H200's were up to 3.5x slower
    assert probe_ms([0.06] * 10) == 1.0  # the floor
    assert probe_ms([0.3] * 10) == pytest.approx(1.5)  # 5x the 90th percentile
    assert probe_ms([0.2] * 9 + [1.0]) == pytest.approx(5 * quantile([0.2] * 9 + [1.0], 0.9))
    assert probe_ms([100.0]) == probe_ms([]) == MAX_COVER_MS


def test_a_retimed_spin_is_at_least_twice_as_long_and_bounded():
    assert longer_cover_ms(0.2, [0.19] * 10) == pytest.approx(0.4)  # doubling is enough
    assert longer_cover_ms(0.2, [0.6] * 10) == pytest.approx(1.5 * 0.6 + 0.1)  # rounds ask more
    assert longer_cover_ms(0.2, [5.0] * 10) == RETIME_MAX_MS  # at most 2 ms ...
    assert longer_cover_ms(1.5, [5.0] * 10) == pytest.approx(3.0)  # ... unless doubling is more
    assert longer_cover_ms(40.0, [5.0] * 10) == MAX_COVER_MS
    assert longer_cover_ms(0.2, []) == pytest.approx(0.4)


def test_more_than_a_tenth_uncovered_is_too_many():
    assert not timing.too_uncovered(20, 200) and timing.too_uncovered(21, 200)
    assert not timing.too_uncovered(7, 74) and timing.too_uncovered(8, 74)
    assert not timing.too_uncovered(1, 10) and timing.too_uncovered(2, 10)
    assert not timing.too_uncovered(0, 3)


def _timed(n, uncovered, cover=0.2, host=0.3, hidden=True, retimed_from=None):
    return timing.Timing([0.05] * n, "cuda", "ci", 3, [host] * n, cover_ms=cover,
                         uncovered=uncovered, hidden=hidden, retimed_from=retimed_from)


def test_retime_decision():
    assert timing.retime_cover(_timed(200, 20)) is None  # 10 %: covered enough
    assert timing.retime_cover(_timed(200, 179)) == pytest.approx(1.5 * 0.3 + 0.1)
    assert timing.retime_cover(_timed(200, 179, host=0.05)) == pytest.approx(0.4)
    first = {"cover_ms": 0.1, "uncovered": 150, "n": 200}
    assert timing.retime_cover(_timed(200, 179, retimed_from=first)) is None  # once only
    assert timing.retime_cover(_timed(200, 0, cover=0.0, hidden=False)) is None  # not hidden
    assert timing.retime_cover(_timed(200, 179, cover=MAX_COVER_MS)) is None  # nothing longer


def test_most_probes_past_the_start_event_mean_the_call_waits_for_the_device():
    assert timing.waits_for_device([True] * 10)
    assert timing.waits_for_device([True] * 6 + [False] * 4)
    assert not timing.waits_for_device([True] * 5 + [False] * 5)
    assert not timing.waits_for_device([False] * 10)


def test_spin_calibration_takes_the_highest_clock_and_the_cap_bounds_every_spin():
    # three spins of 1e6 cycles: the fastest (0.5 ms, 2 GHz) sets the rate, so the spin
    # lasts at least as long as asked when the clock is lower
    assert spin_rate(1_000_000, [0.6, 0.5, 0.55]) == pytest.approx(2e6)
    assert spin_cycles(2.0, 2e6) == 4_000_000
    assert spin_cycles(10 * MAX_COVER_MS, 2e6) == spin_cycles(MAX_COVER_MS, 2e6) == 100_000_000
    assert spin_cycles(0.0, 2e6) == 1


class SimGpu(clocks.Clock):
    """A GPU with one in-order stream, simulated on the host clock: work starts when it is
    enqueued or when the work before it ends, whichever is later; an event completes when
    the work queued before it has."""

    can_spin = True

    def __init__(self, backend="cuda", can_spin=True):
        super().__init__(backend, "cuda")
        self.can_spin = can_spin
        self.free_at = time.perf_counter()
        self.spins = 0

    def launch(self, ms: float) -> None:
        self.free_at = max(time.perf_counter(), self.free_at) + ms / 1e3

    def region(self):
        return [0.0], [0.0]

    def record(self, ev) -> None:
        ev[0] = max(time.perf_counter(), self.free_at)

    def reached(self, ev) -> bool:
        return time.perf_counter() >= ev[0]

    def sync(self) -> None:
        time.sleep(max(0.0, self.free_at - time.perf_counter()))

    def elapsed_ms(self, start, end) -> float:
        return (end[0] - start[0]) * 1e3

    def spin(self, ms: float) -> None:
        self.spins += 1
        self.launch(ms)


@pytest.fixture
def sim(monkeypatch):
    gpu = SimGpu()
    monkeypatch.setattr(timing, "_clock", lambda backend, device: gpu)
    return gpu


FAST = dict(device="cuda", warmup_ms=5, min_reps=5, max_reps=12, budget_s=0.5, flush=False)


def test_hidden_launch_times_the_device_not_the_host(sim):
    """2 ms of host work before a 0.3 ms kernel: behind the spin the events see the
    kernel; without it they see the host's 2 ms too."""

    def host_bound():
        time.sleep(0.002)
        sim.launch(0.3)

    hidden = bench(host_bound, **FAST)
    assert hidden.hidden and not hidden.launch_note
    assert hidden.cover_ms >= 1.5 * 2.0 + 0.1 and hidden.host_ms >= 2.0
    assert 0.29 <= hidden.p50 < 1.0
    assert hidden.uncovered <= len(hidden.samples_ms) // 4
    plain = bench(host_bound, **FAST, hide_launch=False)
    assert not plain.hidden and plain.cover_ms == 0 and "hide_launch=False" in plain.launch_note
    assert plain.p50 >= 2.0


def test_a_call_that_waits_for_the_device_is_timed_without_the_spin(sim):
    """A call that synchronizes inside cannot get ahead of the GPU: the probes find it out,
    the timed calls run without a spin (no deadlock, no spin time in host_ms)."""

    def blocking():
        sim.launch(1.0)
        sim.sync()

    t = bench(blocking, **FAST)
    assert not t.hidden and t.cover_ms == 0.0 and "waits for the device" in t.launch_note
    assert sim.spins == timing.PROBE_CALLS  # the probes' spins, none in the timed loop
    assert 0.95 <= t.p50 < 5.0 and t.host_ms >= 0.95 and t.uncovered == 0


class VirtualGpu(SimGpu):
    """`SimGpu` on a virtual clock that moves only when the host works (`host(ms)`) or waits
    for the device: the launch-hiding tests get exact enqueue times, whatever else loads
    the machine. `timing`'s host clock reads it too."""

    def __init__(self):
        clocks.Clock.__init__(self, "cuda", "cuda")
        self.now_ms, self.free_at, self.spins = 0.0, 0.0, 0

    def host(self, ms: float) -> None:
        self.now_ms += ms

    def launch(self, ms: float) -> None:
        self.free_at = max(self.now_ms, self.free_at) + ms

    def record(self, ev) -> None:
        ev[0] = max(self.now_ms, self.free_at)

    def reached(self, ev) -> bool:
        return self.now_ms >= ev[0]

    def sync(self) -> None:
        self.now_ms = max(self.now_ms, self.free_at)

    def elapsed_ms(self, start, end) -> float:
        return end[0] - start[0]

    def perf_counter(self) -> float:
        return self.now_ms / 1e3


@pytest.fixture
def vgpu(monkeypatch):
    import types

    gpu = VirtualGpu()
    monkeypatch.setattr(timing, "_clock", lambda backend, device: gpu)
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=gpu.perf_counter))
    return gpu


def _slows_down(gpu, probe_ms, timed_ms, kernel_ms=0.1):
    """A call whose host work is `probe_ms` in warmup and probes, `timed_ms` after them."""

    def call():
        gpu.host(probe_ms if gpu.spins <= timing.PROBE_CALLS else timed_ms)
        gpu.launch(kernel_ms)
    return call


def test_calls_that_outlast_the_spin_are_counted_and_retimed_once(vgpu):
    """The enqueue time grows after the probes (0.1 ms, then 3 ms): the GPU reaches the
    start event before the host has queued the kernel, every timed call says so; re-timed
    with the longest spin a re-timing gets (2 ms), every call still does."""
    t = bench(_slows_down(vgpu, 0.1, 3.0), **FAST)
    first = t.retimed_from
    assert first == {"cover_ms": pytest.approx(1.5 * 0.1 + 0.1), "uncovered": 5, "n": 5}
    assert t.hidden and t.cover_ms == RETIME_MAX_MS
    assert t.uncovered == len(t.samples_ms) == 5
    assert t.p50 == pytest.approx(3.0 - RETIME_MAX_MS + 0.1)  # GPU idle time timed
    assert timing.too_uncovered(t.uncovered, len(t.samples_ms))


def test_a_retimed_call_with_a_longer_spin_is_covered(vgpu):
    """Probes see 0.1 ms of host work, the timed calls 1 ms: the first pass is uncovered,
    the second, behind a spin sized from the first pass's enqueue times, is not."""
    t = bench(_slows_down(vgpu, 0.1, 1.0), **FAST)
    assert t.retimed_from == {"cover_ms": pytest.approx(0.25), "uncovered": 5, "n": 5}
    assert t.cover_ms == pytest.approx(1.5 * 1.0 + 0.1)
    assert t.uncovered == 0 and t.p50 == pytest.approx(0.1)  # the kernel, not the host


def test_a_covered_call_is_timed_once(vgpu):
    """Enqueue times behind the spin as in the probes: one pass, spin from the probes."""
    t = bench(_slows_down(vgpu, 0.3, 0.3), **FAST)
    assert t.retimed_from is None and t.uncovered == 0
    assert t.cover_ms == pytest.approx(1.5 * 0.3 + 0.1) and t.p50 == pytest.approx(0.1)
    assert vgpu.spins == timing.PROBE_CALLS + len(t.samples_ms)


def test_probes_see_the_enqueue_time_of_a_busy_device_not_the_warmups(vgpu):
    """Warmup calls on an idle device enqueue in 0.05 ms, behind a spin in 0.2 ms (what the
    H200 showed): the spin is sized from the probes, and the timed calls are covered."""

    def call():
        gpu_busy = vgpu.free_at > vgpu.now_ms
        vgpu.host(0.2 if gpu_busy else 0.05)
        vgpu.launch(0.1)

    t = bench(call, **FAST)
    assert t.cover_ms == pytest.approx(1.5 * 0.2 + 0.1) and t.uncovered == 0
    assert t.retimed_from is None and t.host_ms == pytest.approx(0.2)


def test_no_spin_kernel_no_hiding(monkeypatch):
    gpu = SimGpu(backend="metal", can_spin=False)
    monkeypatch.setattr(timing, "_clock", lambda backend, device: gpu)

    def host_bound():
        time.sleep(0.001)
        gpu.launch(0.2)

    t = bench(host_bound, **dict(FAST, device="mps"))
    assert t.backend == "metal" and not t.hidden and gpu.spins == 0
    assert "no spin kernel on metal" in t.launch_note and t.p50 >= 1.0


def _gpu():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    return torch


@pytest.mark.gpu
def test_gpu_hidden_launch_times_the_kernel_not_the_host():
    """A call that spends 3 ms on the host before enqueueing a tiny kernel: with launches
    hidden the events see microseconds, without they see the host's 3 ms."""
    torch = _gpu()
    x = torch.ones(1024, device="cuda")

    def slow_host():
        time.sleep(0.003)
        x.add_(1.0)

    hidden = bench(slow_host, device="cuda", warmup_ms=20, min_reps=5, max_reps=10, budget_s=1)
    plain = bench(slow_host, device="cuda", warmup_ms=20, min_reps=5, max_reps=10, budget_s=1,
                  hide_launch=False)
    assert hidden.hidden and hidden.p50 < 0.5 and hidden.host_ms >= 3.0
    assert hidden.cover_ms >= 1.5 * 3.0 + 0.1 and hidden.uncovered <= 2
    assert plain.p50 >= 2.5


@pytest.mark.gpu
def test_gpu_small_op_is_covered_without_a_retime():
    """What the H200 got wrong: a small op's calls enqueued for longer behind the spin than
    in warmup, and most were uncovered. Sized from probes behind a spin, they are covered."""
    torch = _gpu()
    x = torch.ones(1 << 20, device="cuda")
    t = bench(lambda: x.mul_(1.0).add_(0.0), device="cuda", warmup_ms=20, min_reps=50,
              max_reps=200, budget_s=1)
    assert t.hidden and t.cover_ms >= 0.1
    assert not timing.too_uncovered(t.uncovered, len(t.samples_ms))
    assert t.retimed_from is None


@pytest.mark.gpu
def test_gpu_spin_lasts_at_least_what_it_was_sized_for():
    torch = _gpu()
    clocks.sleep_rate("cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    clocks.CudaClock("cuda", "cuda").spin(2.0)
    end.record()
    end.synchronize()
    assert 1.6 <= start.elapsed_time(end) < 6.0  # 2 ms, within clock drift since calibration


@pytest.mark.gpu
def test_gpu_call_that_synchronizes_is_timed_and_does_not_hang():
    torch = _gpu()
    x = torch.ones(1 << 20, device="cuda")

    def synced():
        x.add_(1.0)
        torch.cuda.synchronize()

    t = bench(synced, device="cuda", warmup_ms=10, min_reps=5, max_reps=10, budget_s=1)
    assert not t.hidden and "waits for the device" in t.launch_note and t.p50 > 0


@pytest.mark.gpu
def test_gpu_spin_and_events_follow_the_current_stream():
    """As `kt microbench` times MAX: its stream made torch's current one (ExternalStream);
    the flush, the spin and the events land there, so hiding works there too."""
    torch = _gpu()
    side = torch.cuda.Stream()
    x = torch.ones(1024, device="cuda")

    def slow_host():
        time.sleep(0.003)
        x.add_(1.0)  # on the current stream, as MAX's execute enqueues on its own

    with torch.cuda.stream(torch.cuda.ExternalStream(side.cuda_stream)):
        t = bench(slow_host, device="cuda", warmup_ms=20, min_reps=5, max_reps=10, budget_s=1)
    assert t.hidden and t.p50 < 0.5 and t.host_ms >= 3.0


def test_the_stream_check_passes_host_bound_ops_and_catches_missed_work():
    # rope through MAX on an H100: 30 us of GPU work behind 150 us of host enqueue; hidden
    # events see 0.030 ms, the device is busy ~0.02 ms after execute returns: no alarm
    # (the old rule, events < half the host-synchronized wall time, fired here)
    assert not clocks.events_missed_work(0.030, 0.020)
    assert not clocks.events_missed_work(1.0, 1.0)
    # events on a stream the work did not run on see ~2 us of a 1 ms kernel
    assert clocks.events_missed_work(0.002, 1.0)
    assert not clocks.events_missed_work(0.002, 0.02)  # within the host clock's jitter


class _Device:
    """A device busy until a host-clock time; `sync` waits for it."""

    def __init__(self):
        self.until = 0.0

    def busy(self, ms):
        self.until = max(time.perf_counter(), self.until) + ms / 1e3

    def sync(self):
        time.sleep(max(0.0, self.until - time.perf_counter()))


def test_tail_is_the_device_time_after_the_call_returns_not_the_host_time():
    dev = _Device()
    assert 2.5 <= clocks.device_tail_ms(lambda: dev.busy(3.0), dev.sync) < 6.0

    def host_bound():
        time.sleep(0.003)
        dev.busy(0.0)

    assert clocks.device_tail_ms(host_bound, dev.sync) < 0.5




# --- interleaved rounds, ratio intervals, the second timing (harness/timing.py items 8, 9) ---

def _busy(ms: float) -> None:
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass


def test_bootstrap_interval_covers_the_true_ratio_about_95_percent_of_the_time():
    import numpy as np

    from harness.stats import ratio_interval

    rng = np.random.default_rng(7)
    covered, trials = 0, 200
    for _ in range(trials):
        base = rng.uniform(0.8, 1.2, 25)  # drift shared by both providers in a round
        den = base * rng.lognormal(0.0, 0.03, 25)
        num = 1.5 * base * rng.lognormal(0.0, 0.03, 25)
        _, lo, hi = ratio_interval(list(num), list(den))
        covered += lo <= 1.5 <= hi
    assert 0.88 <= covered / trials <= 0.995
    # seeded: the same samples give the same interval
    assert ratio_interval([2.0, 2.2, 1.9, 2.1], [1.0] * 4) == ratio_interval([2.0, 2.2, 1.9, 2.1],
                                                                             [1.0] * 4)


def test_rounds_rotate_the_order():
    assert [timing.rotation(["a", "b", "c"], r) for r in range(4)] == [
        ("a", "b", "c"), ("b", "c", "a"), ("c", "a", "b"), ("a", "b", "c")]


class Virtual(clocks.Clock):
    """A CPU whose clock moves only when a provider works (`work(ms)`): the statistics are
    tested exactly, whatever else loads the machine. `timing`'s host clock reads it too."""

    def __init__(self):
        super().__init__("cpu", "cpu")
        self.now_ms = 0.0

    def work(self, ms: float) -> None:
        self.now_ms += ms

    def record(self, ev) -> None:
        ev[0] = self.now_ms * 1e6

    def perf_counter(self) -> float:
        return self.now_ms / 1e3


@pytest.fixture
def virtual(monkeypatch):
    import types

    v = Virtual()
    monkeypatch.setattr(timing, "_clock", lambda backend, device: v)
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=v.perf_counter))
    return v


def test_interleaved_providers_of_known_cost_give_their_true_ratio_despite_drift(virtual):
    """Two providers costing 2 ms and 1 ms (3 % noise each), both 60 % slower in every
    third round (a clock drop) and slower and slower as time goes on (heat): interleaved,
    the per-round ratio stays 2 and its interval holds it."""
    import numpy as np

    from harness.stats import ratio_interval

    rng = np.random.default_rng(3)
    calls = {"n": 0}

    def provider(ms):
        def run():
            rnd = calls["n"] // 2  # the round (two calls each, after the warmups)
            calls["n"] += 1
            drift = (1.6 if rnd % 3 == 0 else 1.0) * (1 + virtual.now_ms / 200)
            virtual.work(ms * drift * rng.lognormal(0.0, 0.03))
        return run

    samplers = {name: timing.prepare(provider(ms), warmup_ms=0, flush=False)
                for name, ms in (("slow", 2.0), ("fast", 1.0))}
    calls["n"] = 0
    inter = timing.bench_interleaved(samplers, anchor="fast", min_rounds=10, max_rounds=400,
                                     ci_target=0.01, budget_s=99.0)
    assert inter.orders[:3] == [("slow", "fast"), ("fast", "slow"), ("slow", "fast")]
    assert inter.stopped_by == "ci" and not inter.failed and inter.halfwidth <= 0.01
    a, b = inter.timings["slow"].samples_ms, inter.timings["fast"].samples_ms
    assert len(a) == len(b) == len(inter.orders) >= 10
    ratio, lo, hi = ratio_interval(a, b)
    assert lo <= 2.0 <= hi and abs(ratio / 2.0 - 1) < 0.02


def test_blocks_of_samples_carry_drift_that_rounds_cancel(virtual):
    """The same two providers on a clock that slows down steadily, timed one after the other
    (`bench`, one block each) and interleaved: the blocks' ratio is off by the drift, the
    interleaved interval holds the true ratio."""
    from harness.stats import ratio_interval

    def provider(ms):
        return lambda: virtual.work(ms * (1 + virtual.now_ms / 50))

    kw = dict(device="cpu", warmup_ms=0, flush=False, min_reps=20, max_reps=20, budget_s=99)
    blocked = bench(provider(2.0), **kw).p50 / bench(provider(1.0), **kw).p50
    assert abs(blocked / 2.0 - 1) > 0.15
    samplers = {n: timing.prepare(provider(ms), warmup_ms=0, flush=False)
                for n, ms in (("slow", 2.0), ("fast", 1.0))}
    inter = timing.bench_interleaved(samplers, min_rounds=20, max_rounds=20, budget_s=99)
    _, lo, hi = ratio_interval(inter.timings["slow"].samples_ms, inter.timings["fast"].samples_ms)
    assert lo <= 2.0 * 1.02 and hi >= 2.0 * 0.98 and hi < 2.2


def test_a_provider_that_raises_leaves_the_rounds_and_the_others_go_on(virtual):
    calls = {"n": 0}

    def broken():
        calls["n"] += 1
        virtual.work(0.2)
        if calls["n"] > 5:  # after warmup and two rounds
            raise RuntimeError("device lost\nmore")

    samplers = {"ok": timing.prepare(lambda: virtual.work(0.2), warmup_ms=0, flush=False),
                "broken": timing.prepare(broken, warmup_ms=0, flush=False)}
    inter = timing.bench_interleaved(samplers, anchor="broken", min_rounds=5, max_rounds=8,
                                     ci_target=0.0, budget_s=99)
    assert inter.failed == {"broken": "RuntimeError: device lost"}
    assert "broken" not in inter.timings and len(inter.timings["ok"].samples_ms) == 8
    assert inter.anchor == "ok"


def test_interleaved_stopping_rule():
    kw = dict(min_rounds=10, max_rounds=50, ci_target=0.01, budget_s=1.0)
    assert timing.interleaved_stop(9, 0.001, 0.1, **kw) is None  # below min_rounds
    assert timing.interleaved_stop(10, 0.009, 0.1, **kw) == "ci"
    assert timing.interleaved_stop(10, 0.05, 0.1, **kw) is None
    assert timing.interleaved_stop(10, 0.05, 1.1, **kw) == "budget"
    assert timing.interleaved_stop(5, 0.05, 1.1, **kw) is None  # long case: min_rounds first
    assert timing.interleaved_stop(3, 0.05, 4.1, **kw) == "budget"  # unless 4x over budget
    assert timing.interleaved_stop(50, 0.05, 0.1, **kw) == "max_rounds"


def test_the_second_timing_agrees_on_a_steady_call_and_flags_one_that_changes_back_to_back(
        virtual):
    steady = timing.prepare(lambda: virtual.work(1.0), warmup_ms=0, flush=False)
    last = {"end": -1.0}

    def throttles():  # 1 ms after a pause, 3 ms when called back to back
        virtual.work(3.0 if virtual.now_ms - last["end"] < 0.5 else 1.0)
        last["end"] = virtual.now_ms

    throttled = timing.prepare(throttles, warmup_ms=0, flush=False)
    spacer = timing.prepare(lambda: virtual.work(3.0), warmup_ms=0, flush=False)
    inter = timing.bench_interleaved({"steady": steady, "throttles": throttled,
                                      "spacer": spacer}, min_rounds=6, max_rounds=6, budget_s=99)
    second = steady.throughput()
    assert second.per_call_ms == pytest.approx(1.0) and second.calls == 20
    assert timing.timings_agree(inter.timings["steady"], second) == (True, "")
    t = inter.timings["throttles"]
    assert t.p50 == pytest.approx(1.0)
    second = throttled.throughput()
    assert second.per_call_ms > 2.5
    agree, why = timing.timings_agree(t, second)
    assert agree is False and "timings disagree" in why


def test_the_second_timing_subtracts_the_flushes_on_a_real_cpu():
    s = timing.prepare(lambda: _busy(2.0), warmup_ms=0)
    s.sample()
    second = s.throughput(repeats=3)
    assert second.flush_ms > 0 and second.calls >= 2 and len(second.samples_ms) == 3


def test_agreement_rule_on_synthetic_timings():
    from harness.stats import Throughput, timings_agree

    event = timing.Timing([1.0, 1.01, 0.99, 1.0], "cuda", "ci", 3, [0.1] * 4, cover_ms=0.3,
                          hidden=True)
    assert timings_agree(event, Throughput([1.03, 1.02, 1.04], 8))[0] is True
    assert timings_agree(event, Throughput([1.2, 1.21, 1.19], 8))[0] is False
    assert timings_agree(event, Throughput([1.2, 0.8, 1.0], 8))[0] is True  # noisy: no verdict
    host_bound = timing.Timing([0.03] * 4, "cuda", "ci", 3, [0.15] * 4, cover_ms=0.4,
                               hidden=True)
    agree, why = timings_agree(host_bound, Throughput([0.16] * 3, 64))
    assert agree is None and "host-bound" in why


def test_target_levels_are_met_only_by_an_interval_below_them():
    from harness.spec import RatioTarget, interval_verdict

    assert interval_verdict(1.0, 0.90, 0.97) == "met"
    assert interval_verdict(1.0, 1.01, 1.10) == "missed"
    assert interval_verdict(1.0, 0.97, 1.02) == "within noise"
    goal = RatioTarget("goal", "x", ("f",), levels=((1.0, "goal"), (0.95, "moonshot")))
    assert goal.verdict(0.96, 0.98) == "goal met, moonshot missed"
    assert goal.verdict(0.93, 0.97) == "goal met, moonshot within noise"
    assert goal.verdict(0.99, 1.02) == "goal within noise, moonshot missed"


def test_interleaved_rounds_keep_each_providers_launch_hidden(sim):
    """On the simulated GPU: a host-bound provider (2 ms of host work before 0.3 ms of GPU
    work) and a GPU-bound one (0.6 ms): each sample of the rounds runs behind its own spin,
    so the ratio is of GPU times, 0.5, not of host times."""
    from harness.stats import ratio_interval

    def host_bound():
        time.sleep(0.002)
        sim.launch(0.3)

    samplers = {"host": timing.prepare(host_bound, device="cuda", warmup_ms=5, flush=False),
                "gpu": timing.prepare(lambda: sim.launch(0.6), device="cuda", warmup_ms=5,
                                      flush=False)}
    assert samplers["host"].cover >= 1.5 * 2.0 + 0.1
    inter = timing.bench_interleaved(samplers, anchor="gpu", min_rounds=6, max_rounds=8,
                                     ci_target=0.0, budget_s=2.0)
    assert all(t.hidden for t in inter.timings.values())
    ratio, _, _ = ratio_interval(inter.timings["host"].samples_ms, inter.timings["gpu"].samples_ms)
    assert 0.4 < ratio < 0.7


def test_interleaved_rounds_are_run_again_when_a_provider_is_retimed(vgpu):
    """A provider whose timed calls enqueue for longer than its probes did (0.1 ms, then
    1 ms): its spin is lengthened and the rounds run again for everyone, so that every
    round still pairs samples taken together; the covered provider keeps its spin."""
    phase = {"timed": False}

    def slows_down():
        vgpu.host(1.0 if phase["timed"] else 0.1)
        vgpu.launch(0.3)

    def steady():
        vgpu.host(0.05)
        vgpu.launch(0.6)

    samplers = {"slow": timing.prepare(slows_down, device="cuda", warmup_ms=5, flush=False),
                "gpu": timing.prepare(steady, device="cuda", warmup_ms=5, flush=False)}
    gpu_cover = samplers["gpu"].cover
    phase["timed"] = True
    inter = timing.bench_interleaved(samplers, anchor="gpu", min_rounds=8, max_rounds=8,
                                     budget_s=99.0)
    assert inter.retimed == ("slow",) and not inter.failed and inter.stopped_by == "max_rounds"
    slow, gpu = inter.timings["slow"], inter.timings["gpu"]
    assert slow.retimed_from == {"cover_ms": pytest.approx(0.25), "uncovered": 8, "n": 8}
    assert slow.cover_ms == pytest.approx(1.6) and slow.uncovered == 0
    assert gpu.retimed_from is None and gpu.cover_ms == gpu_cover and gpu.uncovered == 0
    assert len(slow.samples_ms) == len(gpu.samples_ms) == len(inter.orders) == 8
    assert inter.orders[0] == ("slow", "gpu")  # the second run's rounds, rotated afresh
    assert slow.p50 == pytest.approx(0.3) and gpu.p50 == pytest.approx(0.6)
