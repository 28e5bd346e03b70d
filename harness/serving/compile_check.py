"""`kt serve-compile`: compile max+kt's served graph for a GPU without the GPU.

MAX compiles for a target it does not see through virtual devices (`max warm-cache --target
cuda:sm_90a`): the whole pipeline (kt's custom architecture, kt's Mojo package, MAX's own
kernels) is built for that GPU on this machine, and nothing runs. A GPU-only compile error
(a kernel branch that only the accelerator instantiates, a signature MAX's GPU graph
specializes differently) shows up here, in minutes on a CPU, instead of in a server log on a
lent GPU. kt reports the compiler's first error as file:line: message, in one line.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..children import die_with_parent
from .config import BenchError, parse_kt_ops
from .engines import EngineNotFound, EngineOptions, get_engine
from .engines.base import ServingSettings
from .engines.max import ENTRY
from .maxkt import check_kernel_path, custom_architecture_spec

TARGET = re.compile(r"(cuda|hip|metal)(:[A-Za-z0-9_]+)?")
# Mojo's "file:line:col: error: message", or an elaboration's "note: constraint failed: ...".
_ERROR = re.compile(r"^(?P<loc>/?[^\s:]+\.mojo:\d+:\d+): (?P<kind>error|note): (?P<msg>.+)$", re.M)


@dataclass
class CompileResult:
    ok: bool
    seconds: float
    error: str | None
    log: str


def first_error(log: str) -> str | None:
    """The compiler's first error in MAX's output: a Mojo location and its message where the
    log has one, else MAX's last error line."""
    for m in _ERROR.finditer(log):
        if m["kind"] == "error" or m["msg"].startswith("constraint failed"):
            return f"{m['loc']}: {m['msg'].strip()}"
    lines = [ln.strip() for ln in log.splitlines() if "Error" in ln or "error:" in ln]
    return lines[-1] if lines else None


def command(python: Path, model: Path, target: str, opts: EngineOptions) -> list[str]:
    """`max warm-cache` for `target` with kt's architecture and the serving settings' flags."""
    argv = [str(python), "-m", ENTRY, "warm-cache", "--target", target, "--model-path", str(model)]
    for flag in get_engine("max").flags(opts).values():
        argv += flag
    return argv + ["--custom-architectures", custom_architecture_spec()]


def compile_check(model: Path, target: str, kernels: Path, ops: str = "", python: str | None = None,
                  settings: ServingSettings | None = None, timeout_s: float = 3600.0,
                  announce=None) -> CompileResult:
    if not TARGET.fullmatch(target):
        raise BenchError(f"--target {target!r}: use API[:ARCH], e.g. cuda:sm_90a (H100/H200), cuda:sm_100a, hip:gfx942")
    engine = get_engine("max")
    settings = settings or ServingSettings()
    opts = EngineOptions(python=python, device="gpu", settings=settings, kt_ops=parse_kt_ops(f"max+kt:{ops}", ops))
    try:
        opts.custom_kernel_path = check_kernel_path(kernels)
        engine.check(opts)
        py = engine.find_python(python)
    except (FileNotFoundError, ValueError, EngineNotFound) as e:
        raise BenchError(str(e)) from None
    env = engine.environment(opts)
    if announce:
        announce(f"compiling max+kt for {target} with {py} (MAX's virtual devices; minutes on a CPU)")
    t0 = time.monotonic()
    # Its own process group, killed with everything MAX forked (compile workers) on any exit.
    proc = subprocess.Popen(command(py, model, target, opts), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=die_with_parent)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise BenchError(f"MAX did not finish compiling for {target} in {timeout_s:.0f} s") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = out
    seconds = time.monotonic() - t0
    if proc.returncode == 0:
        return CompileResult(True, seconds, None, log)
    return CompileResult(False, seconds, first_error(log) or f"MAX exited with code {proc.returncode}", log)
