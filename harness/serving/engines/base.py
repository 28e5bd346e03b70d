"""The small interface every serving engine implements.

An engine says how to find its interpreter (flag, then `KT_<NAME>_PYTHON`, then the venv that
`scripts/setup-serving.sh` creates, then a pixi environment), the command line that serves a
local model directory with an OpenAI-compatible API, its health URL, its version, and which
request fields make it produce exactly `max_tokens` tokens.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


class EngineNotFound(RuntimeError):
    """The engine's interpreter or package is not installed where kt looks."""


@dataclass
class EngineOptions:
    """What a user can say about one engine run."""

    python: str | None = None  # interpreter of the engine's environment
    device: str = "cpu"
    custom_kernel_path: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    max_model_len: int = 2048
    max_num_seqs: int = 16
    seed: int = 0


class Engine:
    name: str = ""
    package: str = ""  # distribution whose version is reported
    install_hint: str = ""
    health_path: str = "/health"

    @property
    def env_var(self) -> str:
        return f"KT_{self.name.upper()}_PYTHON"

    def candidates(self) -> list[Path]:
        return [
            REPO / ".venvs" / self.name / "bin" / "python",
            REPO / ".pixi" / "envs" / self.name / "bin" / "python",
        ]

    def find_python(self, explicit: str | None = None) -> Path:
        """The engine environment's interpreter: `explicit`, else $KT_<NAME>_PYTHON, else the
        first existing candidate. Raises EngineNotFound with the install hint."""
        for source, value in (("--python", explicit), (self.env_var, os.environ.get(self.env_var))):
            if value:
                p = Path(value)
                if not p.exists():
                    raise EngineNotFound(f"{self.name}: {source}={value} does not exist")
                return p
        for p in self.candidates():
            if p.exists():
                return p
        raise EngineNotFound(
            f"{self.name}: no environment found (set {self.env_var} or run: {self.install_hint})"
        )

    def version(self, python: Path) -> str:
        code = f"import importlib.metadata as m; print(m.version({self.package!r}))"
        try:
            r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise EngineNotFound(f"{self.name}: cannot run {python}: {e}") from e
        if r.returncode != 0:
            raise EngineNotFound(
                f"{self.name}: package {self.package!r} is not installed in {python} "
                f"(run: {self.install_hint})"
            )
        return r.stdout.strip()

    def command(self, python: Path, model: Path, host: str, port: int, opts: EngineOptions) -> list[str]:
        raise NotImplementedError

    def environment(self, opts: EngineOptions) -> dict[str, str]:
        env = dict(os.environ)
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
                   DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
        # The engine's own environment, not kt's.
        for var in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
            env.pop(var, None)
        return env

    def request_fields(self) -> dict:
        """Fields added to every request so that exactly max_tokens tokens come back."""
        return {"ignore_eos": True}

    def label(self, opts: EngineOptions) -> str:
        return self.name
