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


def pytest_collection_finish(session):
    """Tell `twins` which registered Triton-twin cases this session kept (after -k, -m):
    only those run in its interpreted child."""
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
