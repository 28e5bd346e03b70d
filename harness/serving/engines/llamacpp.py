"""llama.cpp through `llama-cpp-python`'s OpenAI server. Needs a GGUF model (`--model`), which
`kt make-model` does not write yet; listed so the plug-in shape is exercised."""

from __future__ import annotations

from pathlib import Path

from .base import Engine, EngineOptions


class LlamaCpp(Engine):
    name = "llamacpp"
    package = "llama-cpp-python"
    install_hint = "pip install 'llama-cpp-python[server]' into .venvs/llamacpp"
    health_path = "/v1/models"

    def command(self, python: Path, model: Path, host: str, port: int, opts: EngineOptions) -> list[str]:
        return [
            str(python), "-m", "llama_cpp.server",
            "--model", str(model),
            "--host", host,
            "--port", str(port),
            "--n_ctx", str(opts.settings.max_model_len),
            *opts.extra_args,
        ]

    def request_fields(self) -> dict:
        return {}
