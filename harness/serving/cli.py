"""`kt make-model` and `kt serve-bench`: thin click commands over harness.serving."""

from __future__ import annotations

import os
import re
import shlex
import sys
import tempfile
from pathlib import Path

import click

from . import agreement, metrics
from .client import LoadPoint
from .model import PRESETS


def _csv(value: str, kind, name: str) -> list:
    try:
        return [kind(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list", param_hint=name) from None


class UsageError(click.ClickException):
    """Bad input or a missing environment, found before any work: one line, exit 2."""

    exit_code = 2


def check_out_dir(out: Path) -> None:
    """--out must be a folder kt can write, checked before any work (one line, exit 2)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".kt-write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def _engine_args(items: tuple[str, ...]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        engine, sep, arg = item.partition("=")
        if not (sep and engine and arg):
            raise click.BadParameter(f"{item!r}: use ENGINE=ARG", param_hint="--engine-arg")
        out.setdefault(engine, []).append(arg)
    return out


def _engine_env(items: tuple[str, ...]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for item in items:
        engine, sep1, rest = item.partition("=")
        var, sep2, value = rest.partition("=")
        if not (sep1 and sep2 and engine and var):
            raise click.BadParameter(f"{item!r}: use ENGINE=VAR=VALUE", param_hint="--engine-env")
        out.setdefault(engine, {})[var] = value
    return out


@click.command("make-model")
@click.argument("preset", type=click.Choice(sorted(PRESETS)))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
@click.option("--device", "gen_device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the random weights are drawn (auto: CUDA when torch sees a GPU). The same seed gives "
                   "different weights on CPU and CUDA; kt_model.json records which.")
def make_model(preset: str, out: Path, seed: int, gen_device: str) -> None:
    """Write a random-weight Llama model directory (config, safetensors, local tokenizer)."""
    from .model import make_model as build

    try:
        build(preset, out, seed, device=gen_device)
    except (OSError, RuntimeError, ValueError) as e:
        raise UsageError(f"make-model {preset} {out}: {e}") from None
    click.echo(f"wrote {preset} model (seed {seed}) to {out}")


@click.command("serve-bench")
@click.option("--model", "model", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Model directory (kt make-model writes one).")
@click.option("--engines", default="max,max+kt,vllm", show_default=True,
              help="Comma-separated: max, max+kt, vllm, llamacpp. max+kt:OP+OP puts only those of kt's ops "
                   "(rms_norm, attention) into MAX's graph, e.g. max+kt:attention; each is checked against max.")
@click.option("--custom-kernel-path", "--kernels", "custom_kernel_path", type=click.Path(exists=True, path_type=Path),
              help="Mojo package for max+kt [default: kt's kernels/].")
@click.option("--python", "pythons", multiple=True, metavar="ENGINE=PATH",
              help="Interpreter of an engine's environment (else $KT_<ENGINE>_PYTHON, else .venvs/<engine>).")
@click.option("--engine-env", "engine_env", multiple=True, metavar="ENGINE=VAR=VALUE",
              help="A variable of an engine's environment, e.g. max=PYTHONPATH=/tmp/site-max (max covers "
                   "max+kt); $KT_<ENGINE>_PYTHONPATH sets PYTHONPATH the same way. An exact name from "
                   "--engines (max+kt:attention) sets it for that run only.")
@click.option("--engine-arg", "engine_arg", multiple=True, metavar="ENGINE=ARG",
              help="One more argument of an engine's server command, e.g. max+kt=--no-device-graph-capture "
                   "(repeat for several; an engine name or an exact name from --engines).")
@click.option("--base-url", help="Attach to a running OpenAI server instead of starting one.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface servers bind to.")
@click.option("--port", type=int, help="First server port [default: a free one].")
@click.option("--device", default="cpu", show_default=True, help="cpu or gpu (gpu:0,1 lists GPUs).")
@click.option("--tensor-parallel", "tensor_parallel", default=1, show_default=True, type=click.IntRange(1, 64),
              help="GPUs each engine splits the model across, by its own mechanism (MAX: --devices gpu:0..N-1; "
                   "vLLM: --tensor-parallel-size N).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Compute dtype on every engine [default: the checkpoint's torch_dtype].")
@click.option("--max-num-seqs", default=16, show_default=True, type=click.IntRange(1),
              help="Requests batched at once (MAX --max-batch-size, vLLM --max-num-seqs).")
@click.option("--max-model-len", default=2048, show_default=True, type=click.IntRange(16),
              help="Longest sequence (MAX --max-length, vLLM --max-model-len).")
@click.option("--kv-cache-memory", type=click.FloatRange(0.01, 0.99),
              help="GPU memory share per engine (MAX --device-memory-utilization, vLLM --gpu-memory-utilization) "
                   "[default: each engine's own].")
@click.option("--prefix-caching/--no-prefix-caching", default=False, show_default=True,
              help="KV-cache reuse across requests, on every engine.")
@click.option("--startup", type=click.Choice(["serial", "concurrent"]), default="serial", show_default=True,
              help="serial: one engine at a time. concurrent: start every engine at once (cold starts measured "
                   "together, marked so), then measure one at a time while the others sit idle.")
@click.option("--measure-after", type=click.Path(dir_okay=False, path_type=Path),
              help="Wait (at most --startup-timeout) until this file exists before the first load point, "
                   "e.g. while another job on the same GPU finishes its timing; the wait is recorded.")
@click.option("--dataset", default="random", show_default=True,
              help="Comma-separated: random, sonnet, chat, or JSONL paths; each runs every load point.")
@click.option("--num-prompts", default=8, show_default=True, type=click.IntRange(1, 1_000_000),
              help="Prompts per load point (plus --prompts-per-load times the load).")
@click.option("--prompts-per-load", default=0.0, show_default=True, type=click.FloatRange(0, 10_000),
              help="Extra prompts per unit of load: K x concurrency (closed loop), K x req/s (open loop).")
@click.option("--input-len", default=64, show_default=True, help="Prompt tokens (random, sonnet).")
@click.option("--output-len", default=32, show_default=True, help="Output tokens (EOS ignored).")
@click.option("--max-concurrency", help="Closed-loop sweep, e.g. 1,8,32 [default: 1 unless --request-rate].")
@click.option("--request-rate", help="Open-loop sweep in requests/s, e.g. 2,8 (gamma arrivals).")
@click.option("--rate-max-concurrency", type=click.IntRange(1), help="Cap on requests in flight at open-loop points.")
@click.option("--burstiness", default=1.0, show_default=True, help="Gamma shape of arrivals (1.0: Poisson).")
@click.option("--duration", type=float, help="Stop issuing requests after this many seconds per load point.")
@click.option("--num-warmups", default=1, show_default=True, type=click.IntRange(0, 10_000),
              help="Warmup requests, excluded from results (the first, sent even with 0, ends the cold start).")
@click.option("--goodput", help="SLOs in ms, e.g. ttft:500,tpot:50.")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", default="serve-bench-results", show_default=True, type=click.Path(path_type=Path))
@click.option("--startup-timeout", default=900.0, show_default=True, help="Seconds to wait for a server.")
@click.option("--request-timeout", default=600.0, show_default=True)
@click.option("--cost-per-hour", type=click.FloatRange(0), help="$/hour of the machine, for cost per 1M output tokens.")
@click.option("--agreement-tol", type=click.FloatRange(0), help="Logprob tolerance (nats) of the max+kt vs max check "
              "[default: 0.01 for float32, 1.0 for 16-bit weights].")
@click.option("--probe-lengths", help="Words (one token each) per agreement-probe prompt, one prompt per entry, "
              "e.g. 1,7,24,200 [default: 100,127,128,300, those that fit --max-model-len].")
def serve_bench(model, engines, custom_kernel_path, pythons, engine_env, engine_arg, base_url, host, port, device,
                tensor_parallel, dtype, max_num_seqs, max_model_len, kv_cache_memory, prefix_caching, startup, measure_after,
                dataset, num_prompts, prompts_per_load, input_len, output_len, max_concurrency, request_rate,
                rate_max_concurrency, burstiness, duration, num_warmups, goodput, seed, out, startup_timeout,
                request_timeout, cost_per_hour, agreement_tol, probe_lengths) -> None:
    """Serve MODEL with each engine, drive the same streaming workloads, compare."""
    from .engines.base import ServingSettings
    from .config import BenchConfig, BenchError, RunFailed, RunInterrupted, parse_engines
    from .runner import serve_bench as run

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
    envs = _engine_env(engine_env)
    eargs = _engine_args(engine_arg)
    concs = _csv(max_concurrency, int, "--max-concurrency") if max_concurrency else []
    rates = _csv(request_rate, float, "--request-rate") if request_rate else []
    if any(c < 1 for c in concs):
        raise click.BadParameter("must be at least 1", param_hint="--max-concurrency")
    if any(r <= 0 for r in rates) or burstiness <= 0:
        raise click.BadParameter("rates and burstiness must be positive", param_hint="--request-rate")
    if duration is not None and duration <= 0:
        raise click.BadParameter("must be positive", param_hint="--duration")
    if not concs and not rates:
        concs = [1]
    lengths = (tuple(_csv(probe_lengths, int, "--probe-lengths")) if probe_lengths
               else agreement.fitting_lengths(max_model_len))
    if not lengths or any(n < 1 for n in lengths):
        raise click.BadParameter("give lengths of at least 1", param_hint="--probe-lengths")
    if max(lengths) + agreement.PROBE_TOKENS + 1 > max_model_len:
        raise click.BadParameter(f"the longest probe ({max(lengths)} words, BOS and {agreement.PROBE_TOKENS} generated "
                                 f"tokens) must fit --max-model-len {max_model_len}", param_hint="--probe-lengths")
    points = [LoadPoint(max_concurrency=c, duration_s=duration) for c in concs]
    points += [LoadPoint(max_concurrency=rate_max_concurrency if r != float("inf") else (rate_max_concurrency or 1),
                         request_rate=r, burstiness=burstiness, duration_s=duration) for r in rates]
    if not re.fullmatch(r"cpu|gpu(:\d+(,\d+)*)?", device):
        raise click.BadParameter(f"{device!r}: use cpu, gpu or gpu:0,1,...", param_hint="--device")
    names = [e.strip() for e in engines.split(",") if e.strip()]
    datasets = [d.strip() for d in dataset.split(",") if d.strip()]
    if not datasets:
        raise click.BadParameter("give at least one dataset", param_hint="--dataset")
    check_out_dir(out)
    settings = ServingSettings(dtype=dtype, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                               kv_cache_memory=kv_cache_memory, prefix_caching=prefix_caching,
                               tensor_parallel=tensor_parallel)
    try:
        if base_url and len(names) != 1:
            raise BenchError("--base-url measures one engine: give --engines with one name (its label)")
        runs = parse_engines(names, custom_kernel_path, py, base_url, device, seed, settings, envs, eargs)
        cfg = BenchConfig(
            model=model, runs=runs, out=out, datasets=datasets, num_prompts=num_prompts,
            prompts_per_load=prompts_per_load, input_len=input_len, output_len=output_len, points=points,
            num_warmups=num_warmups, goodput=slos, seed=seed, host=host, port=port, startup=startup, measure_after=measure_after,
            startup_timeout_s=startup_timeout, request_timeout_s=request_timeout, cost_per_hour=cost_per_hour,
            command=shlex.join(["kt", *sys.argv[1:]]), agreement_tol=agreement_tol, probe_lengths=lengths,
        )
        run(cfg)
    except BenchError as e:
        raise UsageError(str(e)) from None
    except RunFailed as e:
        raise click.ClickException(str(e)) from None
    except RunInterrupted as e:
        click.echo(f"kt serve-bench: {e}", err=True)
        raise SystemExit(130) from None


@click.command("serve-compile")
@click.option("--model", "model", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Model directory (kt make-model writes one).")
@click.option("--target", default="cuda:sm_90a", show_default=True,
              help="GPU to compile for, API[:ARCH]: cuda:sm_90a (H100, H200), cuda:sm_100a, hip:gfx942, ...")
@click.option("--custom-kernel-path", "--kernels", "custom_kernel_path", type=click.Path(exists=True, path_type=Path),
              help="Mojo package max+kt serves [default: kt's kernels/].")
@click.option("--kt-ops", default="", help="Only these of kt's ops, '+'-joined (rms_norm, attention) [default: all].")
@click.option("--python", "python", help="MAX's interpreter (else $KT_MAX_PYTHON, else .venvs/max).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Weights' encoding [default: the checkpoint's].")
@click.option("--max-num-seqs", default=16, show_default=True, type=click.IntRange(1))
@click.option("--max-model-len", default=2048, show_default=True, type=click.IntRange(16))
@click.option("--log", "log_path", type=click.Path(dir_okay=False, path_type=Path), help="Write MAX's whole output here.")
@click.option("--timeout", "timeout_s", default=3600.0, show_default=True, help="Seconds MAX may take.")
def serve_compile(model, target, custom_kernel_path, kt_ops, python, dtype, max_num_seqs, max_model_len, log_path,
                  timeout_s) -> None:
    """Compile max+kt's served graph (kt's architecture and kernels, MAX's Llama) for a GPU that is
    not here, through MAX's virtual devices: GPU-only compile errors before a GPU session."""
    from .compile_check import compile_check
    from .config import REPO, BenchError
    from .engines.base import ServingSettings

    settings = ServingSettings(dtype=dtype, max_num_seqs=max_num_seqs, max_model_len=max_model_len)
    try:
        res = compile_check(model, target, custom_kernel_path or REPO / "kernels", kt_ops, python, settings,
                            timeout_s, announce=lambda m: click.echo(f"kt serve-compile: {m}", err=True))
    except BenchError as e:
        raise UsageError(str(e)) from None
    if log_path:
        log_path.write_text(res.log)
    if not res.ok:
        raise click.ClickException(f"max+kt does not compile for {target}: {res.error}")
    click.echo(f"max+kt compiles for {target} ({res.seconds:.0f} s)")
