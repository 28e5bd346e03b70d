"""Serving metrics from recorded streams, with the keys of `vllm bench serve`'s result file.

Definitions (as in vLLM's benchmarks/serve.py):
* TTFT: request sent -> first non-empty streamed chunk.
* ITL: gaps between consecutive non-empty chunks (a chunk may hold several tokens; chunks are
  not tokens, so ITL is per chunk, as vLLM's is).
* TPOT: (E2EL - TTFT) / (output_tokens - 1) per request, output_tokens from the server's
  `usage` (or the tokenizer when the server sends none); requests with one token have none.
* E2EL: request sent -> last byte of the stream.
* Throughputs divide totals over completed requests by the wall-clock duration of the load point.
* Goodput: completed requests per second that meet every SLO given (`ttft:500,tpot:50` in ms;
  keys ttft, tpot, e2el).
* A statistic with no data (no request completed; no request with 2+ tokens for TPOT) is None:
  missing, never 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (90, 95, 99)
SLO_KEYS = ("ttft", "tpot", "e2el")


@dataclass
class RequestResult:
    """One request as it happened. Times in seconds."""

    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0  # E2EL
    start: float = 0.0  # relative to the load point's start
    generated_text: str = ""
    error: str = ""


def parse_goodput(spec: str | None) -> dict[str, float]:
    """'ttft:500,tpot:50' -> {'ttft': 500.0, 'tpot': 50.0} (milliseconds)."""
    if not spec:
        return {}
    out = {}
    for part in spec.replace(" ", ",").split(","):
        if not part:
            continue
        key, sep, value = part.partition(":")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"bad --goodput item {part!r}: use KEY:MS with KEY in {', '.join(SLO_KEYS)}")
        try:
            out[key] = float(value)
        except ValueError:
            raise ValueError(f"bad --goodput value in {part!r}: not a number") from None
        if out[key] <= 0:
            raise ValueError(f"bad --goodput value in {part!r}: must be positive")
    return out


def _tpot(r: RequestResult) -> float | None:
    if r.output_tokens > 1:
        return (r.latency - r.ttft) / (r.output_tokens - 1)
    return None


def _stats(name: str, values_s: list[float]) -> dict[str, float | None]:
    """mean/median/std/percentiles in ms; None for each when there is no value (a metric with no
    data is missing, never 0)."""
    keys = [f"mean_{name}_ms", f"median_{name}_ms", f"std_{name}_ms", *(f"p{p}_{name}_ms" for p in PERCENTILES)]
    if not values_s:
        return dict.fromkeys(keys)
    a = np.asarray(values_s, dtype=np.float64) * 1000.0
    out = {
        f"mean_{name}_ms": float(a.mean()),
        f"median_{name}_ms": float(np.median(a)),
        f"std_{name}_ms": float(a.std()),
    }
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = float(np.percentile(a, p))
    return out


def compute(results: list[RequestResult], duration_s: float, slos: dict[str, float] | None = None) -> dict:
    """Aggregate metrics over one load point. Failed requests count in `failed` and `errors`,
    never in the latency statistics."""
    ok = [r for r in results if r.success]
    tpots = [t for t in (_tpot(r) for r in ok) if t is not None]
    itls = [x for r in ok for x in r.itl]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    duration_s = max(duration_s, 1e-9)

    good = 0
    if slos:
        for r in ok:
            measured = {"ttft": r.ttft * 1000, "tpot": (_tpot(r) or 0.0) * 1000, "e2el": r.latency * 1000}
            good += all(measured[k] <= v for k, v in slos.items())

    # Peak output tokens/s over 1-second buckets, from each request's chunk times.
    buckets: dict[int, int] = {}
    for r in ok:
        t = r.start + r.ttft
        times = [t]
        for gap in r.itl:
            t += gap
            times.append(t)
        per_chunk = r.output_tokens / len(times)
        for x in times:
            buckets[int(x)] = buckets.get(int(x), 0) + per_chunk

    errors: dict[str, int] = {}
    for r in results:
        if not r.success:
            errors[r.error] = errors.get(r.error, 0) + 1

    out = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s,
        "request_goodput": (good / duration_s) if slos else None,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
        "max_output_tokens_per_s": max(buckets.values()) if buckets else None,
    }
    out |= _stats("ttft", [r.ttft for r in ok])
    out |= _stats("tpot", tpots)
    out |= _stats("itl", itls)
    out |= _stats("e2el", [r.latency for r in ok])
    out |= {
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_tokens for r in results],
        # microseconds are the timer's resolution: more digits only make the files larger
        "ttfts": [round(r.ttft, 6) for r in results],
        "itls": [[round(x, 6) for x in r.itl] for r in results],
        "generated_texts": [r.generated_text for r in results],
        "errors": [r.error for r in results],
        "error_counts": errors,
    }
    return out
