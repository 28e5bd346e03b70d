"""Asyncio streaming load generator for OpenAI-compatible servers (aiohttp).

One load point is either a closed loop at `max_concurrency` requests in flight, or an open loop
at `request_rate` requests/s with gamma-distributed gaps (`burstiness` 1.0 is Poisson), optionally
capped by both. `duration_s` stops issuing new requests; those in flight finish and count.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from typing import Callable

import aiohttp

from .metrics import RequestResult
from .workload import Request


@dataclass
class LoadPoint:
    max_concurrency: int | None = None
    request_rate: float = float("inf")
    burstiness: float = 1.0
    duration_s: float | None = None

    @property
    def name(self) -> str:
        parts = []
        if self.max_concurrency is not None:
            parts.append(f"c{self.max_concurrency}")
        if self.request_rate != float("inf"):
            parts.append(f"r{self.request_rate:g}")
        return "-".join(parts) or "cinf"


def payload(req: Request, model: str, extra: dict) -> tuple[str, dict]:
    body: dict = {
        "model": model,
        "max_tokens": req.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    if req.endpoint == "chat":
        body["messages"] = [{"role": r, "content": c} for r, c in (req.messages or ())]
        return "/v1/chat/completions", body
    body["prompt"] = req.prompt
    return "/v1/completions", body


def _chunk_text(chunk: dict) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if "text" in c:
        return c.get("text") or ""
    return (c.get("delta") or {}).get("content") or ""


async def send(
    session: aiohttp.ClientSession,
    base_url: str,
    req: Request,
    model: str,
    extra: dict,
    t0: float,
    count_tokens: Callable[[str], int] | None = None,
    timeout_s: float = 600.0,
) -> RequestResult:
    """Send one streaming request; never raises: failures come back with `error` set."""
    path, body = payload(req, model, extra)
    res = RequestResult(prompt_len=req.prompt_len or 0)
    start = time.perf_counter()
    res.start = start - t0
    last = start
    texts: list[str] = []
    usage = None
    done = False
    try:
        async with session.post(base_url + path, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                text = (await resp.text())[:200].replace("\n", " ")
                res.error = f"HTTP {resp.status}: {text}"
                return res
            async for raw in resp.content:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = f"stream error: {str(chunk['error'])[:200]}"
                    return res
                if chunk.get("usage"):
                    usage = chunk["usage"]
                text = _chunk_text(chunk)
                if text:
                    now = time.perf_counter()
                    if not texts:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                    texts.append(text)
        res.latency = time.perf_counter() - start
    except asyncio.TimeoutError:
        res.error = f"timeout after {timeout_s:g} s"
        return res
    except (aiohttp.ClientError, json.JSONDecodeError, UnicodeDecodeError) as e:
        res.error = f"{type(e).__name__}: {str(e)[:200]}"
        return res
    res.generated_text = "".join(texts)
    if not done:
        res.error = "stream ended without [DONE]"
        return res
    if not texts:
        res.error = "no tokens streamed"
        return res
    if not usage or usage.get("completion_tokens") is None:
        # Stream chunks are not tokens: without usage the output length cannot be checked.
        res.output_tokens = count_tokens(res.generated_text) if count_tokens else len(texts)
        res.error = "no usage in the stream: output length unchecked"
        return res
    res.output_tokens = int(usage["completion_tokens"])
    if not req.prompt_len and usage.get("prompt_tokens"):
        res.prompt_len = int(usage["prompt_tokens"])
    if res.output_tokens != req.output_len:
        res.error = f"output length {res.output_tokens} tokens, asked for {req.output_len}"
        return res
    res.success = True
    return res


async def run_load(
    base_url: str,
    model: str,
    requests: list[Request],
    point: LoadPoint,
    extra: dict,
    seed: int = 0,
    count_tokens: Callable[[str], int] | None = None,
    on_done: Callable[[RequestResult], None] | None = None,
    timeout_s: float = 600.0,
) -> tuple[list[RequestResult], float, int]:
    """Run one load point; return (results in issue order, duration_s, requests not issued)."""
    rng = random.Random(seed)
    sem = asyncio.Semaphore(point.max_concurrency) if point.max_concurrency else None
    conn = aiohttp.TCPConnector(limit=0)
    results: list[RequestResult] = []
    async with aiohttp.ClientSession(connector=conn) as session:
        t0 = time.perf_counter()

        async def one(req: Request) -> RequestResult:
            # The issuing loop acquired `sem` for this request; release it when done.
            try:
                r = await send(session, base_url, req, model, extra, t0, count_tokens, timeout_s)
            finally:
                if sem is not None:
                    sem.release()
            if on_done:
                on_done(r)
            return r

        tasks = []
        for i, req in enumerate(requests):
            if sem is not None:
                await sem.acquire()
            if point.duration_s is not None and time.perf_counter() - t0 >= point.duration_s:
                if sem is not None:
                    sem.release()
                break
            tasks.append(asyncio.create_task(one(req)))
            if point.request_rate != float("inf") and i + 1 < len(requests):
                theta = 1.0 / (point.request_rate * point.burstiness)
                await asyncio.sleep(rng.gammavariate(point.burstiness, theta))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - t0
    return results, duration, len(requests) - len(tasks)
