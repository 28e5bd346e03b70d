import stat
import sys
from pathlib import Path

import pytest

from serving_helpers import FAKE_SERVER


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from harness.serving.model import make_model

    return make_model("tiny", tmp_path_factory.mktemp("model") / "tiny", seed=0)


@pytest.fixture
def fake_python(tmp_path) -> Path:
    """An engine 'interpreter' (and `max` script beside it) that runs the fake OpenAI server."""
    bindir = tmp_path / "fakeenv" / "bin"
    bindir.mkdir(parents=True)
    for name in ("python", "max"):
        shim = bindir / name
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_SERVER}" "$@"\n')
        shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    return bindir / "python"
