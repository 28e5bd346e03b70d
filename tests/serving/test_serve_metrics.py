"""Metrics math: hand-made results, and streams replayed through the real client."""

import asyncio
import json

import numpy as np
import pytest
from aiohttp import web

from harness.serving import client, metrics, report
from harness.serving.metrics import RequestResult
from harness.serving.workload import Request


def rr(ttft, itl, out, prompt=10, start=0.0, ok=True, error=""):
    return RequestResult(success=ok, prompt_len=prompt, output_tokens=out, ttft=ttft, itl=list(itl),
                         latency=ttft + sum(itl), start=start, error=error)


def test_definitions_match_vllm():
    rs = [rr(0.1, [0.02, 0.02, 0.02], 4), rr(0.3, [0.04, 0.06], 3)]
    m = metrics.compute(rs, duration_s=2.0)
    assert m["completed"] == 2 and m["failed"] == 0
    assert m["total_input_tokens"] == 20 and m["total_output_tokens"] == 7
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(3.5)
    assert m["total_token_throughput"] == pytest.approx(13.5)
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["median_ttft_ms"] == pytest.approx(200.0)
    # TPOT = (E2EL - TTFT) / (out - 1): 0.06/3 and 0.10/2
    assert m["mean_tpot_ms"] == pytest.approx((20.0 + 50.0) / 2)
    itls = np.array([0.02, 0.02, 0.02, 0.04, 0.06]) * 1000
    assert m["mean_itl_ms"] == pytest.approx(itls.mean())
    assert m["p99_itl_ms"] == pytest.approx(np.percentile(itls, 99))
    assert m["median_e2el_ms"] == pytest.approx(np.median([160.0, 400.0]))
    for key in ("mean", "median", "std", "p90", "p95", "p99"):
        for what in ("ttft", "tpot", "itl", "e2el"):
            assert f"{key}_{what}_ms" in m


def test_failures_are_counted_with_reasons_not_in_latency():
    rs = [rr(0.1, [0.01], 2), rr(0, [], 0, ok=False, error="HTTP 500: boom"),
          rr(0, [], 0, ok=False, error="HTTP 500: boom"), rr(0, [], 0, ok=False, error="timeout after 5 s")]
    m = metrics.compute(rs, 1.0)
    assert (m["completed"], m["failed"]) == (1, 3)
    assert m["error_counts"] == {"HTTP 500: boom": 2, "timeout after 5 s": 1}
    assert len(m["errors"]) == 4  # every request is in the per-request lists, none dropped
    assert m["mean_ttft_ms"] == pytest.approx(100.0)


def test_goodput_counts_requests_meeting_every_slo():
    rs = [rr(0.1, [0.01] * 3, 4), rr(0.5, [0.01] * 3, 4), rr(0.1, [0.2] * 3, 4)]
    slos = metrics.parse_goodput("ttft:200,tpot:50")
    m = metrics.compute(rs, 2.0, slos)
    assert m["request_goodput"] == pytest.approx(0.5)  # only the first meets both
    assert metrics.compute(rs, 2.0)["request_goodput"] is None


@pytest.mark.parametrize("bad", ["ttft", "foo:1", "ttft:x", "ttft:-1"])
def test_bad_goodput_spec(bad):
    with pytest.raises(ValueError):
        metrics.parse_goodput(bad)


# A stream recorded from MAX Serve 26.7 (/v1/completions, ignore_eos, include_usage), trimmed.
RECORDED = [
    {"choices": [{"index": 0, "text": " or", "finish_reason": None}], "usage": None},
    {"choices": [{"index": 0, "text": "own", "finish_reason": None}], "usage": None},
    {"choices": [{"index": 0, "text": "", "finish_reason": None}], "usage": None},
    {"choices": [{"index": 0, "text": " batch", "finish_reason": "length"}], "usage": None},
    {"choices": [], "usage": {"completion_tokens": 4, "prompt_tokens": 4, "total_tokens": 8}},
]


async def _replay(chunks, delays, tail=b"data: [DONE]\n\n", status=200):
    async def handler(request):
        if status != 200:
            return web.Response(status=status, text="engine overloaded")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for chunk, d in zip(chunks, delays):
            await asyncio.sleep(d)
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(tail)
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        results, duration, not_sent = await client.run_load(
            f"http://127.0.0.1:{port}", "m", [Request("completions", 4, prompt="x", prompt_len=3)],
            client.LoadPoint(max_concurrency=1), {})
    finally:
        await runner.cleanup()
    return results[0]


def test_recorded_stream_ttft_itl_tokens_from_usage():
    r = asyncio.run(_replay(RECORDED, [0.2, 0.05, 0.0, 0.1, 0.0]))
    assert r.success, r.error
    assert r.output_tokens == 4  # from usage, not from the 3 non-empty chunks
    assert r.generated_text == " orown batch"
    assert r.ttft == pytest.approx(0.2, abs=0.08)
    assert len(r.itl) == 2  # empty chunks are not tokens
    assert r.itl[0] == pytest.approx(0.05, abs=0.04) and r.itl[1] == pytest.approx(0.1, abs=0.05)
    assert r.latency >= r.ttft + sum(r.itl) - 1e-6


def test_truncated_stream_and_http_error_are_failures():
    r = asyncio.run(_replay(RECORDED[:2], [0, 0], tail=b""))
    assert not r.success and r.error == "stream ended without [DONE]"
    r = asyncio.run(_replay([], [], status=503))
    assert not r.success and r.error.startswith("HTTP 503")


def test_ratios_are_to_stock_max_when_vllm_did_not_run():
    """max+kt measured first (engine order 0) is still read against stock max: the target is
    max+kt / max, never max / max+kt."""
    def row(engine, order, tput):
        return {"engine": engine, "engine_order": order, "dataset_name": "random", "load": "c8",
                "load_order": 1, "output_throughput": tput, "median_ttft_ms": 10.0, "median_tpot_ms": 2.0}
    text = report.ratios([row("max+kt", 0, 90.0), row("max", 1, 100.0)])
    assert text.startswith("Ratios to max ")
    assert "| random | c8 | 100.0 | 0.90 |" in text
    assert report.ratios([row("max+kt", 0, 90.0), row("max", 1, 100.0), row("vllm", 2, 50.0)]).startswith("Ratios to vllm ")


def test_latency_ratios_carry_an_interval_over_the_requests():
    """TPOT from each request's gaps over its tokens after the first; a clear 1.5x is outside
    the noise, two draws of the same distribution are inside it (~)."""
    rng = np.random.default_rng(1)

    def row(engine, order, scale):
        n = 64
        ttfts = list(0.02 * scale * rng.uniform(0.9, 1.1, n))
        itls = [list(0.002 * scale * rng.uniform(0.9, 1.1, 15)) for _ in range(n)]
        return {"engine": engine, "engine_order": order, "dataset_name": "random", "load": "c8", "load_order": 1,
                "output_throughput": 100.0 / scale, "median_ttft_ms": 1000 * float(np.median(ttfts)),
                "median_tpot_ms": 2.0 * scale, "ttfts": ttfts, "itls": itls, "output_lens": [16] * n}
    assert report.per_request(row("max", 1, 1.0), "tpot")[0] == pytest.approx(0.002, rel=0.11)
    slow = report.ratios([row("max+kt", 0, 1.5), row("max", 1, 1.0)]).splitlines()[-1]
    same = report.ratios([row("max+kt", 0, 1.0), row("max", 1, 1.0)]).splitlines()[-1]
    assert " 1.50 [" in slow and "~" not in slow
    assert same.count("~") == 2
