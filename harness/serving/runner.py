"""`kt serve-bench`: start each engine, drive it with one workload at each load point, report.

For each engine in turn (one at a time, so they do not compete for the machine): find its
interpreter, start its server on a free 127.0.0.1 port (or attach to `--base-url`), wait for
health, record the cold start, send warmup requests (excluded), run every load point, write one
JSON per load point, stop the server. Then print the comparison table and write plots.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shlex
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from harness.io import git_sha

from . import agreement, client, metrics, report, workload
from .engines import EngineNotFound, EngineOptions, get_engine
from .maxkt import check_kernel_path
from .process import ServerError, ServerProcess, free_port, port_in_use

REPO = Path(__file__).resolve().parents[2]


class BenchError(RuntimeError):
    """A user-facing failure: one line, no traceback."""


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
    dataset: str = "random"
    num_prompts: int = 8
    input_len: int = 64
    output_len: int = 32
    points: list[client.LoadPoint] = field(default_factory=lambda: [client.LoadPoint(max_concurrency=1)])
    num_warmups: int = 1
    goodput: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    host: str = "127.0.0.1"
    port: int | None = None
    startup_timeout_s: float = 600.0
    request_timeout_s: float = 600.0
    cost_per_hour: float | None = None
    command: str = ""
    probe: bool = True  # greedy top-k logprob probe per engine, compared across max and max+kt


def parse_engines(names: list[str], custom_kernel_path: Path | None, pythons: dict[str, str],
                  base_url: str | None, device: str, seed: int) -> list[EngineRun]:
    """'max', 'max+kt' (MAX with --custom-kernel-path, default kt's kernels/), 'vllm', ..."""
    runs = []
    for name in names:
        base, _, variant = name.partition("+")
        if variant not in ("", "kt"):
            raise BenchError(f"unknown engine variant {name!r} (use ENGINE or max+kt)")
        if variant == "kt" and base != "max":
            raise BenchError(f"{name!r}: kt's kernels plug into MAX only (max+kt)")
        try:
            get_engine(base)
        except EngineNotFound as e:
            raise BenchError(str(e)) from None
        opts = EngineOptions(python=pythons.get(base), device=device, seed=seed)
        if variant == "kt" or (base == "max" and custom_kernel_path and len(names) == 1):
            path = custom_kernel_path or REPO / "kernels"
            try:
                opts.custom_kernel_path = check_kernel_path(path)
            except FileNotFoundError as e:
                raise BenchError(str(e)) from None
        runs.append(EngineRun(base, name if variant else get_engine(base).label(opts), opts, base_url))
    return runs


def _get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def served_model(base_url: str) -> str:
    try:
        data = _get_json(base_url + "/v1/models")
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise BenchError(f"cannot reach an OpenAI server at {base_url}: {getattr(e, 'reason', e)}") from None
    ids = [m.get("id") for m in data.get("data", [])]
    if not ids:
        raise BenchError(f"{base_url}/v1/models lists no model")
    return ids[0]


class GpuSampler:
    """Peak GPU memory (MiB) over a run, sampled from nvidia-smi every 0.5 s; None without one."""

    def __init__(self) -> None:
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "GpuSampler":
        if shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                r = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=5,
                )
                used = sum(float(x) for x in r.stdout.split())
                self.peak_mib = max(self.peak_mib or 0.0, used)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(0.5)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)


def model_provenance(model: Path) -> dict:
    out = {"path": str(model)}
    for name in ("config.json", "kt_model.json"):
        p = Path(model) / name
        if p.exists():
            out[name.removesuffix(".json")] = json.loads(p.read_text())
    return out


def run_point(base_url: str, model_id: str, reqs: list[workload.Request], point: client.LoadPoint,
              extra: dict, cfg: BenchConfig, count_tokens, progress: Progress | None, label: str):
    task = progress.add_task(f"{label} {point.name}", total=len(reqs)) if progress else None

    def done(_r: metrics.RequestResult) -> None:
        if progress is not None:
            progress.advance(task)

    results, duration, not_sent = asyncio.run(
        client.run_load(base_url, model_id, reqs, point, extra, cfg.seed, count_tokens, done,
                        cfg.request_timeout_s)
    )
    if progress is not None:
        progress.update(task, visible=False)
    return results, duration, not_sent


def serve_bench(cfg: BenchConfig, console: Console | None = None) -> list[dict]:
    """Run the whole benchmark; return one row (metrics + provenance) per engine and load point."""
    console = console or Console(stderr=True, soft_wrap=True)
    try:
        reqs = workload.build(cfg.dataset, cfg.model, cfg.num_prompts, cfg.input_len, cfg.output_len, cfg.seed)
        warm = workload.build(cfg.dataset, cfg.model, max(cfg.num_warmups, 1), cfg.input_len,
                              cfg.output_len, cfg.seed + 1)[: cfg.num_warmups]
    except workload.DatasetError as e:
        raise BenchError(str(e)) from None
    whash = workload.workload_hash(reqs)
    tok = workload.load_tokenizer(cfg.model) if (Path(cfg.model) / "tokenizer.json").exists() else None
    count_tokens = (lambda s: workload.count_tokens(tok, s)) if tok else None
    if cfg.port is not None and port_in_use(cfg.host, cfg.port):
        raise BenchError(f"port {cfg.port} on {cfg.host} is busy")

    probe_prompts_ = agreement.probe_prompts(workload.stable_words(tok)) if tok and cfg.probe else []
    probes: dict[str, list] = {}
    rows: list[dict] = []
    cfg.out.mkdir(parents=True, exist_ok=True)
    for order, run in enumerate(cfg.runs):
        engine = get_engine(run.engine)
        server = None
        prov = {"label": run.label, "engine": run.engine, "base_url": run.base_url}
        try:
            if run.base_url:
                base_url = run.base_url.rstrip("/")
                model_id = served_model(base_url)
                prov["engine_version"] = "unknown (attached)"
                cold_start = None
            else:
                python = engine.find_python(run.opts.python)
                prov["engine_version"] = engine.version(python)
                prov["python"] = str(python)
                port = cfg.port + order if cfg.port is not None else free_port(cfg.host)
                if port_in_use(cfg.host, port):
                    raise BenchError(f"port {port} on {cfg.host} is busy")
                base_url = f"http://{cfg.host}:{port}"
                argv = engine.command(python, Path(cfg.model).resolve(), cfg.host, port, run.opts)
                prov["server_command"] = shlex.join(argv)
                if run.opts.custom_kernel_path:
                    prov["custom_kernel_path"] = str(run.opts.custom_kernel_path)
                log = cfg.out / "logs" / f"{run.label.replace('+', '_')}.log"
                server = ServerProcess(run.label, argv, engine.environment(run.opts), log,
                                       base_url + engine.health_path)
                console.print(f"[bold]{run.label}[/]: starting {engine.name} {prov['engine_version']} "
                              f"on {base_url} (log {log})")
                server.start()
                with console.status(f"{run.label}: waiting for health"):
                    cold_start = server.wait_healthy(cfg.startup_timeout_s)
                console.print(f"{run.label}: ready after {cold_start:.1f} s")
                model_id = served_model(base_url)
            prov["cold_start_s"] = cold_start
            extra = engine.request_fields()
            if warm:
                run_point(base_url, model_id, warm, client.LoadPoint(max_concurrency=1), extra, cfg,
                          count_tokens, None, run.label)
            if probe_prompts_:
                try:
                    probes[run.label] = agreement.probe(base_url, model_id, probe_prompts_, extra=extra,
                                                        timeout_s=cfg.request_timeout_s)
                    report.write_json_atomic(cfg.out / run.label.replace("+", "_") / "probe.json",
                                             {"prompts": probe_prompts_, "steps": probes[run.label]})
                except (urllib.error.URLError, OSError, KeyError, TypeError, ValueError) as e:
                    console.print(f"[yellow]{run.label}: logprob probe failed, no agreement check: {e}[/]")
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=console, transient=True) as progress:
                for pi, point in enumerate(cfg.points):
                    with GpuSampler() as gpu:
                        results, duration, not_sent = run_point(base_url, model_id, reqs, point, extra,
                                                                cfg, count_tokens, progress, run.label)
                    row = metrics.compute(results, duration, cfg.goodput)
                    row |= result_header(cfg, run, point, model_id, whash, not_sent, gpu.peak_mib, row)
                    row |= {"provenance": prov | {"model": model_provenance(cfg.model), "command": cfg.command,
                                                  "kt_git_sha": git_sha(), "host": platform.node(),
                                                  "platform": platform.platform(), "workload_hash": whash}}
                    row |= {"engine_order": order, "load_order": pi}
                    path = cfg.out / run.label.replace("+", "_") / f"{point.name}.json"
                    report.write_json_atomic(path, row)
                    rows.append(row)
                    console.print(f"{run.label} {point.name}: {row['completed']} ok, {row['failed']} failed, "
                                  f"{row['output_throughput']:.1f} out tok/s -> {path}")
                    if row["failed"]:
                        for err, n in row["error_counts"].items():
                            console.print(f"  [red]{n} x {err}[/]")
        except EngineNotFound as e:
            raise BenchError(str(e)) from None
        except ServerError as e:
            raise BenchError(str(e)) from None
        finally:
            if server is not None:
                server.stop()
    checks = {}
    for label, steps in probes.items():
        base = label.removesuffix("+kt")
        if label != base and base in probes:
            res = agreement.compare(probes[base], steps)
            checks[f"{label} vs {base}"] = asdict(res) | {"ok": res.ok, "summary": res.summary()}
            console.print(f"[bold]{label} vs {base}[/]: {res.summary()}")
    if checks:
        report.write_json_atomic(cfg.out / "agreement.json", checks)
    summary = [{k: v for k, v in r.items() if not isinstance(v, list)} for r in rows]
    report.write_json_atomic(cfg.out / "summary.json", summary)
    md = report.markdown(rows)
    tmp = cfg.out / ".report.md.tmp"
    tmp.write_text(md)
    os.replace(tmp, cfg.out / "report.md")
    report.print_table(rows, Console(width=200))
    for p in report.plots(rows, cfg.out):
        console.print(f"plot: {p}")
    return rows


def result_header(cfg: BenchConfig, run: EngineRun, point: client.LoadPoint, model_id: str, whash: str,
                  not_sent: int, gpu_peak_mib: float | None, row: dict) -> dict:
    """The fields of vLLM's result file that describe the run, plus kt's additions."""
    cost = None
    if cfg.cost_per_hour is not None and row["output_throughput"] > 0:
        cost = cfg.cost_per_hour / (row["output_throughput"] * 3600.0) * 1e6
    return {
        "date": datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"),
        "endpoint_type": "openai-chat" if cfg.dataset == "chat" else "openai",
        "backend": run.engine,
        "label": run.label,
        "engine": run.label,
        "load": point.name,
        "model_id": model_id,
        "tokenizer_id": str(cfg.model),
        "num_prompts": cfg.num_prompts,
        "request_rate": "inf" if point.request_rate == float("inf") else point.request_rate,
        "burstiness": point.burstiness,
        "max_concurrency": point.max_concurrency,
        "duration_cap_s": point.duration_s,
        "not_sent": not_sent,
        "dataset_name": cfg.dataset,
        "random_input_len": cfg.input_len,
        "random_output_len": cfg.output_len,
        "seed": cfg.seed,
        "goodput_slos_ms": cfg.goodput or None,
        "gpu_peak_memory_mib": gpu_peak_mib,
        "cost_per_1m_output_tokens_usd": cost,
    }
