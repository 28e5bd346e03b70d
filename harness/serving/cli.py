"""`kt make-model` and `kt serve-bench`: thin click commands over harness.serving."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from . import metrics
from .client import LoadPoint
from .model import PRESETS


def _csv(value: str, kind, name: str) -> list:
    try:
        return [kind(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list", param_hint=name) from None


@click.command("make-model")
@click.argument("preset", type=click.Choice(sorted(PRESETS)))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
def make_model(preset: str, out: Path, seed: int) -> None:
    """Write a random-weight Llama model directory (config, safetensors, local tokenizer)."""
    from .model import make_model as build

    build(preset, out, seed)
    click.echo(f"wrote {preset} model (seed {seed}) to {out}")


@click.command("serve-bench")
@click.option("--model", "model", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Model directory (kt make-model writes one).")
@click.option("--engines", default="max,max+kt,vllm", show_default=True,
              help="Comma-separated: max, max+kt, vllm, llamacpp.")
@click.option("--custom-kernel-path", "--kernels", "custom_kernel_path", type=click.Path(exists=True, path_type=Path),
              help="Mojo package for max+kt [default: kt's kernels/].")
@click.option("--python", "pythons", multiple=True, metavar="ENGINE=PATH",
              help="Interpreter of an engine's environment (else $KT_<ENGINE>_PYTHON, else .venvs/<engine>).")
@click.option("--base-url", help="Attach to a running OpenAI server instead of starting one.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface servers bind to.")
@click.option("--port", type=int, help="First server port [default: a free one].")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dataset", default="random", show_default=True, help="random, sonnet, chat, or a JSONL path.")
@click.option("--num-prompts", default=8, show_default=True)
@click.option("--input-len", default=64, show_default=True, help="Prompt tokens (random, sonnet).")
@click.option("--output-len", default=32, show_default=True, help="Output tokens (EOS ignored).")
@click.option("--max-concurrency", help="Sweep, e.g. 1,4,16 [default: 1, or unbounded with --request-rate].")
@click.option("--request-rate", default="inf", show_default=True, help="Requests/s sweep, e.g. 2,8 (inf: closed loop).")
@click.option("--burstiness", default=1.0, show_default=True, help="Gamma shape of arrivals (1.0: Poisson).")
@click.option("--duration", type=float, help="Stop issuing requests after this many seconds per load point.")
@click.option("--num-warmups", default=1, show_default=True, help="Warmup requests, excluded from results.")
@click.option("--goodput", help="SLOs in ms, e.g. ttft:500,tpot:50.")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", default="serve-bench-results", show_default=True, type=click.Path(path_type=Path))
@click.option("--startup-timeout", default=900.0, show_default=True, help="Seconds to wait for a server.")
@click.option("--request-timeout", default=600.0, show_default=True)
@click.option("--cost-per-hour", type=float, help="$/hour of the machine, for cost per 1M output tokens.")
def serve_bench(model, engines, custom_kernel_path, pythons, base_url, host, port, device, dataset,
                num_prompts, input_len, output_len, max_concurrency, request_rate, burstiness, duration,
                num_warmups, goodput, seed, out, startup_timeout, request_timeout, cost_per_hour) -> None:
    """Serve MODEL with each engine, drive the same streaming workload, compare."""
    from .runner import BenchConfig, BenchError, parse_engines, serve_bench as run

    try:
        slos = metrics.parse_goodput(goodput)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--goodput") from None
    py = {}
    for item in pythons:
        name, sep, path = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: use ENGINE=PATH", param_hint="--python")
        py[name] = path
    rates = _csv(request_rate, float, "--request-rate")
    if max_concurrency:
        concs = _csv(max_concurrency, int, "--max-concurrency")
    else:
        concs = [1] if rates == [float("inf")] else [None]
    if any(c is not None and c < 1 for c in concs):
        raise click.BadParameter("must be at least 1", param_hint="--max-concurrency")
    if any(r <= 0 for r in rates) or burstiness <= 0:
        raise click.BadParameter("rates and burstiness must be positive", param_hint="--request-rate")
    points = [LoadPoint(max_concurrency=c, request_rate=r, burstiness=burstiness, duration_s=duration)
              for r in rates for c in concs]
    names = [e.strip() for e in engines.split(",") if e.strip()]
    try:
        if base_url and len(names) != 1:
            raise BenchError("--base-url measures one engine: give --engines with one name (its label)")
        runs = parse_engines(names, custom_kernel_path, py, base_url, device, seed)
        cfg = BenchConfig(
            model=model, runs=runs, out=out, dataset=dataset, num_prompts=num_prompts, input_len=input_len,
            output_len=output_len, points=points, num_warmups=num_warmups, goodput=slos, seed=seed, host=host,
            port=port, startup_timeout_s=startup_timeout, request_timeout_s=request_timeout,
            cost_per_hour=cost_per_hour, command=shlex.join(["kt", *sys.argv[1:]]),
        )
        run(cfg)
    except BenchError as e:
        raise click.ClickException(str(e)) from None
