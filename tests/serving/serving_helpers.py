"""Helpers shared by the serving tests (imported by name: pytest puts this folder on sys.path)."""

import os
from pathlib import Path

FAKE_SERVER = Path(__file__).parent / "fake_openai_server.py"


def pids_of(pattern: str) -> list[int]:
    """Live processes whose command line contains `pattern` (read from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next((ln for ln in (d / "status").read_text().splitlines() if ln.startswith("State:")), "")
        except OSError:
            continue
        if pattern in cmd and " Z " not in state + " " and int(d.name) != os.getpid():
            out.append(int(d.name))
    return out


def group_members(pgids: set[int]) -> list[int]:
    """Live (non-zombie) processes whose process group is in `pgids`."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp in pgids and state != "Z":
            out.append(int(d.name))
    return out


def engine_python(engine: str = "max") -> Path:
    """The engine environment's interpreter; a test that needs it skips where it is missing,
    except under CI (CI=1), where setup installs every engine and its absence is a failure."""
    import pytest

    from harness.serving.engines import EngineNotFound, get_engine

    try:
        return get_engine(engine).find_python()
    except EngineNotFound as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))
