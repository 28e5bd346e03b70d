"""Interleaved rounds: the providers of one case timed alternately (item 8 of
`harness.timing`'s docstring), so that clock and power drift reach every provider alike and
each round yields a ratio; the rounds stop when every ratio's interval is narrow enough, at the
budget, or at the cap, and run once more when a provider's spin had to be lengthened (item 5)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from harness.io import error_line
from harness.stats import halfwidth, ratio_interval, relative_standard_error
from harness.timing import Sampler, Timing, retime_cover

# The bootstrap of the stopping rule is coarser than the reported one (it runs every few rounds).
_STOP_RESAMPLES = 500


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
