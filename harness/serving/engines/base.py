"""The interface every serving engine implements.

An engine says how to find its interpreter (flag, then `KT_<NAME>_PYTHON`, then the venv that
`scripts/setup-serving.sh` creates, then a pixi environment), the environment it runs in, the
command line that serves a local model directory with an OpenAI-compatible API, its health URL,
its version, which request fields make it produce exactly `max_tokens` tokens, and how to read
its cold start (compile, load) from its log.

Fair settings (`ServingSettings`) are kt's names; each engine maps them onto its own flags, and
`settings_record()` says which flag carried each one, so every result states what ran.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

# NVLink multicast can take a host's shared GPUs out of service; it is kept off in every engine
# (NCCL, PyTorch symmetric memory, NVSHMEM). Harmless on one GPU and on the CPU.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class EngineNotFound(RuntimeError):
    """The engine's interpreter or package is not installed where kt looks."""


@dataclass
class ServingSettings:
    """What must be the same across engines for a fair comparison (None: the engine's default).

    dtype: compute dtype of the weights (kt passes the checkpoint's when not given).
    max_num_seqs: requests batched at once (MAX --max-batch-size, vLLM --max-num-seqs).
    max_model_len: longest sequence (MAX --max-length, vLLM --max-model-len).
    kv_cache_memory: share of the GPU's memory the engine may take, the KV cache being what is
        left after weights and activations (MAX --device-memory-utilization, a share of the memory
        free at its start; vLLM --gpu-memory-utilization, a share of the total).
    prefix_caching: reuse of KV-cache pages across requests (off: every request computes its
        whole prompt).
    tensor_parallel: devices the model is split across, by the engine's own mechanism.
    """

    dtype: str | None = None
    max_num_seqs: int = 16
    max_model_len: int = 2048
    kv_cache_memory: float | None = None
    prefix_caching: bool = False
    tensor_parallel: int = 1


@dataclass
class EngineOptions:
    """What a user can say about one engine run."""

    python: str | None = None  # interpreter of the engine's environment
    device: str = "cpu"
    custom_kernel_path: Path | None = None
    kt_ops: tuple[str, ...] | None = None  # with custom_kernel_path: which kt ops go into MAX's graph (None: all)
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # set in the engine's environment, last
    settings: ServingSettings = field(default_factory=ServingSettings)
    seed: int = 0
    # Facts kt measures before starting the engine (None where unknown): memory of one GPU, and
    # the checkpoint's weight bytes.
    gpu_memory_bytes: int | None = None
    weights_bytes: int | None = None


def env_overrides(name: str, explicit: dict[str, str]) -> dict[str, str]:
    """The engine's environment variables: $KT_<NAME>_PYTHONPATH as PYTHONPATH, then
    `--engine-env NAME=VAR=VALUE` items (which win)."""
    out = {}
    pp = os.environ.get(f"KT_{name.upper()}_PYTHONPATH")
    if pp:
        out["PYTHONPATH"] = pp
    return out | explicit


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

    def version(self, python: Path, env: dict[str, str] | None = None) -> str:
        """The engine package's version, asked of `python` in the engine's environment `env`."""
        code = f"import importlib.metadata as m; print(m.version({self.package!r}))"
        try:
            r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60, env=env)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise EngineNotFound(f"{self.name}: cannot run {python}: {e}") from e
        if r.returncode != 0:
            where = f"{python} with PYTHONPATH={env['PYTHONPATH']}" if env and env.get("PYTHONPATH") else str(python)
            raise EngineNotFound(
                f"{self.name}: package {self.package!r} is not installed in {where} (run: {self.install_hint})"
            )
        return r.stdout.strip()

    def command(self, python: Path, model: Path, host: str, port: int, opts: EngineOptions) -> list[str]:
        raise NotImplementedError

    def check(self, opts: EngineOptions) -> None:
        """Raise ValueError when this engine cannot honour `opts` (one line for the user)."""

    def environment(self, opts: EngineOptions) -> dict[str, str]:
        env = dict(os.environ)
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
                   DO_NOT_TRACK="1", PYTHONUNBUFFERED="1", **NO_MULTICAST)
        # The engine's own environment, not kt's.
        for var in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
            env.pop(var, None)
        env.update(env_overrides(self.name, opts.env))
        return env

    def request_fields(self) -> dict:
        """Fields added to every request so that exactly max_tokens tokens come back."""
        return {"ignore_eos": True}

    def label(self, opts: EngineOptions) -> str:
        return self.name

    def settings_record(self, opts: EngineOptions) -> dict:
        """kt's fair settings as run, each with the engine flag that carried it."""
        return {"settings": asdict(opts.settings), "engine_flags": {}}

    def parse_log(self, text: str) -> dict:
        """What the server's log says about its start: {'compile_s', 'load_s', ...}, where known."""
        return {}
