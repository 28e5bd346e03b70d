"""What one `kt serve-bench` run is made of, checked before any server starts: its configuration,
the engines it runs (parsed from `--engines`), the model's config.json, the workloads it sends,
each engine's state while it runs, and the errors that end a run."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import agreement, client, workload
from .engines import Engine, EngineNotFound, EngineOptions, get_engine
from .engines.base import ServingSettings
from .maxkt import check_kernel_path
from .process import ServerProcess

REPO = Path(__file__).resolve().parents[2]
STARTUP_MODES = ("serial", "concurrent")


class BenchError(RuntimeError):
    """Bad input or a missing environment, found before any work: one line, exit 2."""


class RunFailed(RuntimeError):
    """The run finished (results written) but something failed: one line, exit 1."""


class RunInterrupted(RuntimeError):
    """Ctrl-C / SIGTERM: servers stopped, what finished was written; exit 130."""


@dataclass
class EngineRun:
    engine: str  # plug-in name
    label: str  # name in the report: max, max+kt, vllm
    opts: EngineOptions
    base_url: str | None = None


@dataclass
class BenchConfig:
    model: Path
    runs: list[EngineRun]
    out: Path
    datasets: list[str] = field(default_factory=lambda: ["random"])
    num_prompts: int = 8
    prompts_per_load: float = 0.0  # adds this many prompts per unit of load (concurrency or req/s)
    input_len: int = 64
    output_len: int = 32
    points: list[client.LoadPoint] = field(default_factory=lambda: [client.LoadPoint(max_concurrency=1)])
    num_warmups: int = 1
    goodput: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    host: str = "127.0.0.1"
    port: int | None = None
    startup: str = "serial"
    startup_timeout_s: float = 600.0
    measure_after: Path | None = None  # wait for this file before the first measurement
    request_timeout_s: float = 600.0
    cost_per_hour: float | None = None
    command: str = ""
    probe: bool = True  # greedy top-k logprob probe per engine, compared across max and max+kt
    probe_lengths: tuple[int, ...] = agreement.PROBE_LENGTHS  # words per probe prompt, a prompt each
    agreement_tol: float | None = None  # None: by dtype (agreement.default_tol)


def parse_engines(names: list[str], custom_kernel_path: Path | None, pythons: dict[str, str],
                  base_url: str | None, device: str, seed: int, settings: ServingSettings | None = None,
                  engine_env: dict[str, dict[str, str]] | None = None,
                  engine_args: dict[str, list[str]] | None = None) -> list[EngineRun]:
    """'max', 'max+kt' (MAX with --custom-kernel-path, default kt's kernels/), 'max+kt:OP+OP' (only
    those of kt's ops, `KT_OPS`, in MAX's graph: the per-op ablation), 'vllm', ...
    `engine_env` / `engine_args` map an engine's plug-in name (max covers every max+kt) or one
    exact name from `names` to its extra variables / server arguments."""
    runs = []
    settings = settings or ServingSettings()
    if len(set(names)) != len(names):
        raise BenchError("--engines names an engine twice")
    for name in names:
        base, _, variant = name.partition("+")
        variant, _, ops = variant.partition(":")
        if variant not in ("", "kt"):
            raise BenchError(f"unknown engine variant {name!r} (use ENGINE, max+kt or max+kt:OP+OP)")
        if variant == "kt" and base != "max":
            raise BenchError(f"{name!r}: kt's kernels plug into MAX only (max+kt)")
        kt_ops = parse_kt_ops(name, ops) if variant == "kt" else None
        try:
            engine = get_engine(base)
        except EngineNotFound as e:
            raise BenchError(str(e)) from None
        env = dict((engine_env or {}).get(base, {})) | dict((engine_env or {}).get(name, {}) if name != base else {})
        args = list((engine_args or {}).get(base, [])) + (list((engine_args or {}).get(name, [])) if name != base else [])
        opts = EngineOptions(python=pythons.get(base), device=device, seed=seed, settings=settings, env=env,
                             extra_args=args)
        if kt_ops is not None:
            opts.kt_ops = kt_ops
        if variant == "kt" or (base == "max" and custom_kernel_path and len(names) == 1):
            path = custom_kernel_path or REPO / "kernels"
            try:
                opts.custom_kernel_path = check_kernel_path(path)
            except FileNotFoundError as e:
                raise BenchError(str(e)) from None
        try:
            engine.check(opts)
        except ValueError as e:
            raise BenchError(str(e)) from None
        runs.append(EngineRun(base, name if variant else engine.label(opts), opts, base_url))
    return runs


KT_OPS = ("rms_norm", "attention")  # what kt's MAX architecture can swap in (max_arch/kt_max_llama.py)


def parse_kt_ops(name: str, ops: str) -> tuple[str, ...]:
    """The kt ops a max+kt variant puts into MAX's graph: all of KT_OPS for 'max+kt', none for
    'max+kt:none', else the '+'-separated list after the colon ('max+kt:attention'), in order."""
    if not ops:
        return KT_OPS
    if ops == "none":  # kt's architecture with MAX's own layers (for its KT_CHECK modes)
        return ()
    chosen = tuple(o for o in ops.split("+"))
    bad = [o for o in chosen if o not in KT_OPS]
    if bad or len(set(chosen)) != len(chosen):
        raise BenchError(f"{name!r}: kt ops are {', '.join(KT_OPS)}, each at most once, joined by '+' (or none)")
    return chosen


def read_model_config(model: Path) -> dict:
    """The model folder's config.json (empty when there is none); one line when it is unreadable."""
    p = Path(model) / "config.json"
    if not p.exists():
        return {}
    try:
        cfg = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BenchError(f"{p} is not valid JSON: {getattr(e, 'msg', e)}") from None
    if not isinstance(cfg, dict):
        raise BenchError(f"{p} is not a JSON object")
    return cfg


def checkpoint_dtype(model_cfg: dict) -> str | None:
    d = model_cfg.get("torch_dtype") or model_cfg.get("dtype")
    return d if isinstance(d, str) else None


def prompts_for(cfg: BenchConfig, point: client.LoadPoint) -> int:
    """--num-prompts plus --prompts-per-load times the point's load (its concurrency in a closed
    loop, its request rate in req/s in an open one)."""
    load = point.max_concurrency if point.request_rate == float("inf") else point.request_rate
    return cfg.num_prompts + math.ceil(cfg.prompts_per_load * (load or 0))


@dataclass
class Workload:
    dataset: str
    order: int
    requests: list[workload.Request]  # enough for the largest point; each point takes a prefix


def build_workloads(cfg: BenchConfig) -> tuple[list[Workload], list[workload.Request]]:
    """One workload per dataset, with enough requests for the largest load point, and the warmup
    requests (at least one: the first request ends the cold start)."""
    n_max = max(prompts_for(cfg, p) for p in cfg.points)
    n_warm = max(cfg.num_warmups, 1)
    try:
        workloads = [
            Workload(Path(ds).name if ds not in ("random", "sonnet", "chat") else ds, i,
                     workload.build(ds, cfg.model, n_max, cfg.input_len, cfg.output_len, cfg.seed))
            for i, ds in enumerate(cfg.datasets)]
        warm = workload.build(cfg.datasets[0], cfg.model, n_warm, cfg.input_len, cfg.output_len,
                              cfg.seed + 1)[:n_warm]
    except workload.DatasetError as e:
        raise BenchError(str(e)) from None
    return workloads, warm


@dataclass
class Live:
    """One engine's run: its server and what kt learned while starting it."""

    run: EngineRun
    order: int
    engine: Engine
    prov: dict
    python: Path | None = None
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    server: ServerProcess | None = None
    base_url: str = ""
    model_id: str = ""
    started_at: float | None = None  # monotonic
    ready_at: float | None = None  # health answered
    first_ok_at: float | None = None  # first request succeeded: end of the cold start
    stopped_at: float | None = None
    startup: dict = field(default_factory=dict)
    error: str | None = None
    measured: bool = False

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]", "_", self.run.label)

    @property
    def up(self) -> bool:
        return self.server is not None and self.stopped_at is None and self.error is None


def engine_lives(cfg: BenchConfig) -> list[Live]:
    """Each engine's interpreter, environment, version and settings, found before any server starts
    (one line when an engine's environment is missing); an attached engine's are unknown."""
    lives = []
    for order, run in enumerate(cfg.runs):
        engine = get_engine(run.engine)
        prov = {"label": run.label, "engine": run.engine, "base_url": run.base_url}
        live = Live(run, order, engine, prov)
        if not run.base_url:
            try:
                live.python = engine.find_python(run.opts.python)
                live.env = engine.environment(run.opts)
                prov["engine_version"] = engine.version(live.python, live.env)
            except EngineNotFound as e:
                raise BenchError(str(e)) from None
            prov["python"] = str(live.python)
            if live.env.get("PYTHONPATH"):
                prov["engine_pythonpath"] = live.env["PYTHONPATH"]
            if run.opts.custom_kernel_path:
                prov["custom_kernel_path"] = str(run.opts.custom_kernel_path)
        else:
            prov["engine_version"] = "unknown (attached)"
        prov |= engine.settings_record(run.opts)
        prov["device"] = run.opts.device
        lives.append(live)
    return lives


def fit_to_gpu(lives: list[Live], gpus: list[dict] | None, model: Path) -> None:
    """Give each engine the GPU's memory (from `gpus`, nvidia-smi's list) and the checkpoint's size,
    and record its settings again from these facts (vLLM's KV cache in bytes is sized from them);
    a setting they cannot meet is one line."""
    weights = sum(p.stat().st_size for p in Path(model).glob("*.safetensors")) or None
    try:
        gpu_mib = float(gpus[0]["memory_total_mib"]) if gpus else None
    except ValueError:
        gpu_mib = None
    for live in lives:
        live.run.opts.gpu_memory_bytes = int(gpu_mib * 2**20) if gpu_mib else None
        live.run.opts.weights_bytes = weights
        try:
            live.prov |= live.engine.settings_record(live.run.opts)
        except ValueError as e:
            raise BenchError(str(e)) from None
