"""The timing engine: quantiles and the stopping rule on synthetic samples, the correctness
gate, and a real CPU measurement."""

import math
import random
import time

import pytest

from harness.timing import (
    MAX_COVER_MS,
    NotCorrect,
    bench,
    cover_ms,
    quantile,
    relative_standard_error,
    stop_reason,
    summarize,
)


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


def test_launch_cover_is_twice_the_slow_enqueues_plus_a_margin_and_capped():
    host = [0.1] * 9 + [1.0]  # ms; the 90th percentile interpolates between 0.1 and 1.0
    assert cover_ms(host) == pytest.approx(2 * quantile(sorted(host), 0.9) + 0.05)
    assert cover_ms([0.02] * 10) == pytest.approx(0.09)
    assert cover_ms([200.0] * 10) == MAX_COVER_MS
    assert cover_ms([]) == MAX_COVER_MS


def _gpu():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    return torch


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
    assert hidden.p50 < 0.5 and hidden.host_ms >= 3.0 and hidden.cover_ms > 3.0
    assert plain.p50 >= 2.5
