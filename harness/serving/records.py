"""What a `kt serve-bench` run writes and where it came from: one result row per engine, dataset
and load point (vLLM's result fields plus kt's), the run record, and their provenance (the model,
the GPUs nvidia-smi sees)."""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from harness.io import host_provenance

from . import client
from .config import BenchConfig, EngineRun, Live, Workload, prompts_for


def gpu_info() -> list[dict] | None:
    """Name, driver and memory of each GPU nvidia-smi sees; None without nvidia-smi."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        r = subprocess.run([smi, "--query-gpu=index,name,driver_version,memory.total",
                            "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = []
    for line in r.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            out.append({"index": parts[0], "name": parts[1], "driver": parts[2], "memory_total_mib": parts[3]})
    return out


def kt_provenance() -> dict:
    """kt's side of a serving record, from the helper every kt command uses: host, platform,
    Python and versions of kt's own environment (each engine's are in its own record) and
    kt's git sha as `kt_git_sha`."""
    prov = host_provenance()
    return {"kt_git_sha": prov.pop("git_sha"), **{k: prov[k] for k in ("host", "platform")},
            "kt_python": prov["python"], "kt_versions": prov["versions"]}


def model_provenance(model: Path) -> dict:
    out = {"path": str(model)}
    for name in ("config.json", "kt_model.json"):
        p = Path(model) / name
        if p.exists():
            try:
                out[name.removesuffix(".json")] = json.loads(p.read_text())
            except (OSError, ValueError):
                out[name.removesuffix(".json")] = "unreadable"
    return out


def result_header(cfg: BenchConfig, run: EngineRun, point: client.LoadPoint, model_id: str, whash: str,
                  not_sent: int, gpu_peak_mib: float | None, row: dict, wl: Workload, num_prompts: int) -> dict:
    """The fields of vLLM's result file that describe the run, plus kt's additions."""
    cost = None
    if cfg.cost_per_hour is not None and row["output_throughput"] > 0:
        cost = cfg.cost_per_hour / (row["output_throughput"] * 3600.0) * 1e6
    return {
        "date": datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"),
        "endpoint_type": "openai-chat" if wl.dataset == "chat" else "openai",
        "backend": run.engine,
        "label": run.label,
        "engine": run.label,
        "load": point.name,
        "model_id": model_id,
        "tokenizer_id": str(cfg.model),
        "num_prompts": num_prompts,
        "request_rate": "inf" if point.request_rate == float("inf") else point.request_rate,
        "burstiness": point.burstiness,
        "max_concurrency": point.max_concurrency,
        "duration_cap_s": point.duration_s,
        "not_sent": not_sent,
        "dataset_name": wl.dataset,
        "random_input_len": cfg.input_len,
        "random_output_len": cfg.output_len,
        "seed": cfg.seed,
        "goodput_slos_ms": cfg.goodput or None,
        "gpu_peak_memory_mib": gpu_peak_mib,
        "cost_per_hour_usd": cfg.cost_per_hour,
        "cost_per_1m_output_tokens_usd": cost,
    }


def result_row(cfg: BenchConfig, live: Live, wl: Workload, load_order: int, point: client.LoadPoint,
               measured: dict, *, num_prompts: int, whash: str, not_sent: int, mem: dict, idle: list[str],
               gpus: list[dict] | None) -> dict:
    """One load point's result: `measured` (metrics.compute's row), the header, and where it came
    from: the engine's settings and start-up, the engines idle beside it, its GPU memory, the
    provenance, and the order it ran in."""
    return measured | result_header(cfg, live.run, point, live.model_id, whash, not_sent, mem["peak_mib"],
                                    measured, wl, num_prompts) | {
        "tensor_parallel": live.run.opts.settings.tensor_parallel,
        "settings": live.prov.get("settings"),
        "startup": live.startup,
        "idle_engines_during_load": idle,
        "gpu_memory": mem,
        "provenance": live.prov | kt_provenance() | {
            "model": model_provenance(cfg.model), "command": cfg.command, "gpus": gpus,
            "workload_hash": whash,
        },
        "engine_order": live.order, "load_order": load_order, "dataset_order": wl.order,
    }


def run_record(cfg: BenchConfig, *, started: str, gpus: list[dict] | None, workloads: list[Workload],
               lives: list[Live], rows: list[dict], checks: dict, problems: list[str], interrupted,
               reference: dict | None = None) -> dict:
    """run.json: the command, the model, the start-up mode, each engine's fate and settings, the
    fp32 reference probe (or why there is none), the agreement checks and the problems."""
    return {
        "date": started,
        "command": cfg.command,
        **kt_provenance(),
        "model": model_provenance(cfg.model),
        "startup_mode": cfg.startup,
        "datasets": [w.dataset for w in workloads],
        "load_points": [p.name for p in cfg.points],
        "prompts_per_point": {p.name: prompts_for(cfg, p) for p in cfg.points},
        "input_len": cfg.input_len, "output_len": cfg.output_len,
        "cost_per_hour_usd": cfg.cost_per_hour,
        "gpus": gpus,
        "engines": [
            {"label": lv.run.label, "error": lv.error, "measured": lv.measured, "startup": lv.startup,
             "gpu_memory": lv.prov.get("gpu_memory"),
             "idle_engines_during_load": sorted({e for r in rows if r["engine"] == lv.run.label
                                                 for e in r["idle_engines_during_load"]}),
             **{k: lv.prov.get(k) for k in ("engine_version", "server_command", "settings", "engine_flags",
                                             "engine_defaults_kept", "python", "engine_pythonpath", "device")}}
            for lv in lives
        ],
        "reference": reference,
        "agreement": checks,
        "problems": problems,
        "interrupted": bool(interrupted),
        "load_points_finished": len(rows),
    }
