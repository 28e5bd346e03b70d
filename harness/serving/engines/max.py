"""MAX Serve (`max serve`), stock or with kt's kernels (`--custom-kernel-path`)."""

from __future__ import annotations

from pathlib import Path

from .base import Engine, EngineOptions


class MaxServe(Engine):
    name = "max"
    package = "max"
    install_hint = "scripts/setup-serving.sh max"

    def command(self, python: Path, model: Path, host: str, port: int, opts: EngineOptions) -> list[str]:
        argv = [
            str(python.parent / "max"), "serve",
            "--model-path", str(model),
            "--devices", opts.device,
            "--host", host,
            "--port", str(port),
            "--max-length", str(opts.max_model_len),
            "--max-batch-size", str(opts.max_num_seqs),
        ]
        if opts.custom_kernel_path is not None:
            from ..maxkt import custom_architecture_spec

            argv += ["--custom-architectures", custom_architecture_spec()]
        return argv + list(opts.extra_args)

    def environment(self, opts: EngineOptions) -> dict[str, str]:
        env = super().environment(opts)
        env["MAX_SERVE_DISABLE_TELEMETRY"] = "1"
        if opts.custom_kernel_path is not None:
            env["KT_CUSTOM_KERNEL_PATH"] = str(Path(opts.custom_kernel_path).resolve())
        return env

    def label(self, opts: EngineOptions) -> str:
        return "max+kt" if opts.custom_kernel_path is not None else "max"
