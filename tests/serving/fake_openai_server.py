"""A stand-in OpenAI-compatible streaming server for tests that need no real engine.

Run as `python fake_openai_server.py --host H --port P [--token-delay S] [...ignored]`. It serves
/health, /v1/models and streaming /v1/completions and /v1/chat/completions, emitting
`max_tokens` one-word chunks `--token-delay` seconds apart, then a usage chunk and [DONE].

Used as an engine's "python" through a shim (see conftest.py): called with `-c CODE`, it prints
a version, so `Engine.version()` works.

Faults, by environment variable: FAKE_FAIL=1 answers every completion with HTTP 500;
FAKE_SHORT=N streams N tokens fewer than asked (usage says so); FAKE_NO_USAGE=1 sends no usage;
FAKE_START_DELAY=S sleeps S seconds before serving; FAKE_NO_LOGPROBS=1 answers a request for
logprobs with HTTP 400, as MAX Serve does with its overlap scheduler (its default on GPUs).
"""

import argparse
import asyncio
import json
import os
import sys

from aiohttp import web


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--token-delay", type=float, default=float(os.environ.get("FAKE_TOKEN_DELAY", "0.01")))
    ap.add_argument("--model", default="fake-model")
    args, _ = ap.parse_known_args()

    async def health(_):
        return web.Response(text="ok")

    async def models(_):
        return web.json_response({"object": "list", "data": [{"id": args.model, "object": "model"}]})

    async def complete(request: web.Request):
        body = await request.json()
        chat = "messages" in body
        if os.environ.get("FAKE_FAIL"):
            return web.Response(status=500, text="engine error: out of cheese")
        n = max(1, int(body.get("max_tokens", 8)) - int(os.environ.get("FAKE_SHORT", "0")))
        if not body.get("stream"):
            if body.get("logprobs") and os.environ.get("FAKE_NO_LOGPROBS"):
                return web.Response(status=400, text="logprobs are not supported with the overlap scheduler")
            tops = [{f" w{i}": -0.1, " other": -2.5} for i in range(n)]
            text = "".join(f" w{i}" for i in range(n))
            return web.json_response({"choices": [{"index": 0, "text": text, "logprobs": {"top_logprobs": tops}}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(n):
            await asyncio.sleep(args.token_delay)
            text = f" w{i}"
            choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
            await resp.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
        usage = {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}
        if not os.environ.get("FAKE_NO_USAGE"):
            await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", complete)
    app.router.add_post("/v1/chat/completions", complete)
    import time

    time.sleep(float(os.environ.get("FAKE_START_DELAY", "0")))
    print(f"fake server on {args.host}:{args.port} pid {os.getpid()}", flush=True)
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "-c":  # Engine.version() asking for the package
        print("0.0.0+fake")
        sys.exit(0)
    main()
