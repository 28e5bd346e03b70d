"""Where a result came from: machine, driver, library versions, git sha, time."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_sha() -> str | None:
    """HEAD's sha, "-dirty" if tracked files differ from it. KT_GIT_SHA overrides it: for a
    copy of the tree on another machine whose git metadata is not this checkout's."""
    if os.environ.get("KT_GIT_SHA"):
        return os.environ["KT_GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not re.fullmatch(r"[0-9a-f]{40}", sha):
        return None
    return sha + ("-dirty" if dirty else "")


def gpu_info() -> dict | None:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    info = {"name": props.name, "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda, "hip": torch.version.hip}
    try:
        info["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        info["driver"] = None
    return info


def provenance(devices=None) -> dict:
    """A JSON-ready record of the machine and software a result was measured with."""
    return {
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "devices": [d.label for d in devices] if devices else None,
        "gpu": gpu_info(),
        "versions": {d: _version(d) for d in ("torch", "triton", "max", "mojo", "mojo-compiler",
                                                "hypothesis")},
        "git_sha": git_sha(),
    }
