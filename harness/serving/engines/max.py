"""MAX Serve, stock or with kt's kernels (`--custom-kernel-path`).

Started as `python -m max._entrypoints.pipelines serve` (the module behind the `max` console
script): a bundle's or venv's `bin/max` wrapper carries the interpreter path of the machine that
built it, the module runs under whichever interpreter kt is given.
"""

from __future__ import annotations

import re
from pathlib import Path

from .base import Engine, EngineOptions

ENTRY = "max._entrypoints.pipelines"
# MAX's weight encodings for the dtypes a checkpoint can be computed in.
ENCODINGS = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def max_devices(device: str, tp: int) -> str:
    """MAX's --devices for kt's --device and --tensor-parallel: MAX splits a model across every
    device listed (tensor parallelism), so N devices are gpu:0,...,N-1."""
    if tp == 1 or ":" in device:
        return device
    return "gpu:" + ",".join(str(i) for i in range(tp))


class MaxServe(Engine):
    name = "max"
    package = "max"
    install_hint = "scripts/setup-serving.sh max"

    def check(self, opts: EngineOptions) -> None:
        s = opts.settings
        if s.tensor_parallel > 1 and not opts.device.startswith("gpu"):
            raise ValueError(f"max: --tensor-parallel {s.tensor_parallel} needs GPUs (MAX runs on one CPU device)")
        if ":" in opts.device and len(opts.device.split(":", 1)[1].split(",")) != s.tensor_parallel:
            raise ValueError(f"max: --device {opts.device} lists a different number of devices than "
                             f"--tensor-parallel {s.tensor_parallel}")
        if s.dtype is not None and s.dtype not in ENCODINGS:
            raise ValueError(f"max: dtype {s.dtype} is not one of {', '.join(ENCODINGS)}")

    def flags(self, opts: EngineOptions) -> dict[str, list[str]]:
        """kt setting -> the MAX flags that carry it."""
        s = opts.settings
        out = {
            "device": ["--devices", max_devices(opts.device, s.tensor_parallel)],
            "max_model_len": ["--max-length", str(s.max_model_len)],
            "max_num_seqs": ["--max-batch-size", str(s.max_num_seqs)],
            "prefix_caching": ["--enable-prefix-caching" if s.prefix_caching else "--no-enable-prefix-caching"],
        }
        if s.dtype is not None:
            out["dtype"] = ["--quantization-encoding", ENCODINGS[s.dtype]]
        if s.kv_cache_memory is not None:
            out["kv_cache_memory"] = ["--device-memory-utilization", f"{s.kv_cache_memory:g}"]
        return out

    def command(self, python: Path, model: Path, host: str, port: int, opts: EngineOptions) -> list[str]:
        argv = [str(python), "-m", ENTRY, "serve", "--model-path", str(model), "--host", host, "--port", str(port)]
        for flag in self.flags(opts).values():
            argv += flag
        if opts.custom_kernel_path is not None:
            from ..maxkt import custom_architecture_spec

            argv += ["--custom-architectures", custom_architecture_spec()]
        return argv + list(opts.extra_args)

    def environment(self, opts: EngineOptions) -> dict[str, str]:
        env = super().environment(opts)
        env["MAX_SERVE_DISABLE_TELEMETRY"] = "1"
        env["MODULAR_TELEMETRY_ENABLED"] = "0"
        if opts.custom_kernel_path is not None:
            # --engine-env max+kt:...=KT_CUSTOM_KERNEL_PATH=... serves another package in one run.
            env["KT_CUSTOM_KERNEL_PATH"] = opts.env.get("KT_CUSTOM_KERNEL_PATH") or str(
                Path(opts.custom_kernel_path).resolve())
            if opts.kt_ops is not None:
                env["KT_OPS"] = ",".join(opts.kt_ops) or "none"
        return env

    def label(self, opts: EngineOptions) -> str:
        return "max+kt" if opts.custom_kernel_path is not None else "max"

    def settings_record(self, opts: EngineOptions) -> dict:
        rec = super().settings_record(opts)
        rec["engine_flags"] = {k: " ".join(v) for k, v in self.flags(opts).items()}
        if opts.custom_kernel_path is not None:
            from ..config import KT_OPS

            rec["kt_ops"] = list(KT_OPS if opts.kt_ops is None else opts.kt_ops)
        if opts.extra_args:
            rec["extra_args"] = list(opts.extra_args)
        rec["engine_defaults_kept"] = {
            "device_graph_capture": "MAX's default (--device-graph-capture not given)",
            "kv_cache_memory": "share of the memory free when MAX starts, weights included",
        }
        return rec

    def parse_log(self, text: str) -> dict:
        """MAX's phase lines (CompilationTimer, the model worker, the memory plan)."""
        out: dict = {}
        sums = {
            "build_graph_s": r"Building (?:.+ )?graph took ([\d.]+) seconds",
            "compile_s": r"Compiling .+ took ([\d.]+) seconds",
            "load_s": r"Initializing .+ took ([\d.]+) seconds",
            "build_compile_init_s": r"Building, compiling, and initializing .+ took ([\d.]+) seconds",
            "worker_startup_s": r"Worker process startup took ([\d.]+)s",
            "device_graph_capture_s": r"Device graph instantiation complete in ([\d.]+)s",
        }
        for key, pat in sums.items():
            vals = [float(v) for v in re.findall(pat, text)]
            if vals:
                out[key] = round(sum(vals), 3)
        # "Model worker startup total: 527.4s — spawn: 18.5s, driver: 0.0s, compile: 499.8s [...], ..."
        m = re.findall(r"Model worker startup total: ([\d.]+)s\W+(.*)", text)
        if m:
            total, rest = m[-1]
            out["worker_startup_total_s"] = float(total)
            rest = re.sub(r"\[[^]]*\]", "", rest)  # "[unaccounted: ...]" asides
            out["worker_startup_breakdown_s"] = {k: float(v) for k, v in re.findall(r"(\w+): ([\d.]+)s", rest)}
        m = re.findall(r"cache_memory: ([\d.]+ \w+)", text)
        if m:
            out["kv_cache_memory"] = m[-1]
        return out
