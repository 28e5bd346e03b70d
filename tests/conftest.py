import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# tests/new_kernel/ mirrors the repository's layout for tests/test_new_kernel.py: its
# test file runs only inside the copy that test makes.
collect_ignore = ["new_kernel"]


def _has_gpu() -> bool:
    try:
        import torch
        from max import driver

        return torch.cuda.is_available() and driver.accelerator_count() > 0
    except Exception:
        return False


def _process_environ() -> dict[str, str]:
    """The C-level environment that a child started without `env=` inherits, which native code
    can change behind `os.environ`'s back."""
    environ = ctypes.POINTER(ctypes.c_char_p).in_dll(ctypes.CDLL(None), "environ")
    out, i = {}, 0
    while environ[i] is not None:
        key, _, value = os.fsdecode(environ[i]).partition("=")
        out[key] = value
        i += 1
    return out


def restore_child_environment() -> None:
    """Make the environment children inherit `os.environ` again. Loading MAX's Mojo-built
    `max._kv_cache_ops` (any `import max.nn`, as the stock-MAX references in pykernels do)
    setenv()s PYTHONEXECUTABLE to the `python3` on PATH and PYTHONPATH to ':'; a venv console
    script started afterwards (`.venv/bin/mojo`, `.venv/bin/kt`) then runs outside its venv."""
    seen = _process_environ()
    for key in seen.keys() - os.environ.keys():
        os.unsetenv(key)
    for key, value in os.environ.items():
        if seen.get(key) != value:
            os.putenv(key, value)


@pytest.fixture(autouse=True)
def _children_inherit_os_environ():
    yield
    restore_child_environment()


def pytest_collection_finish(session):
    """Undo what imports at collection did to the children's environment; tell `twins` which
    registered Triton-twin cases this session kept (after -k, -m): only those run in its
    interpreted child."""
    restore_child_environment()
    twins = sys.modules.get("twins")
    if twins is not None:
        twins.select(item.callspec.params["twin_case"] for item in session.items
                     if "twin_case" in getattr(getattr(item, "callspec", None), "params", {}))


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="no GPU visible to torch and MAX")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class KtRun:
    def __init__(self, proc: subprocess.CompletedProcess, json_path: Path | None):
        self.code = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.json = json.loads(json_path.read_text()) if json_path and json_path.exists() else None

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@pytest.fixture
def kt(tmp_path):
    """Run the real `kt` CLI in a child process; returns exit code, output and --json."""

    def run(*args: str, json_out: bool = False, timeout: int = 1200) -> KtRun:
        exe = shutil.which("kt", path=str(Path(sys.executable).parent))
        cmd = [exe] if exe else [sys.executable, "-m", "harness"]
        json_path = tmp_path / "result.json" if json_out else None
        extra = ["--json", str(json_path)] if json_path else []
        env = dict(os.environ, COLUMNS="200")
        proc = subprocess.run([*cmd, *args, *extra], capture_output=True, text=True,
                              timeout=timeout, cwd=REPO, env=env)
        return KtRun(proc, json_path)

    return run
