"""Bugs planted into a copy of kt's Mojo package and handed to `kt verify --kernels` (imported
by name: pytest puts this folder on sys.path). Each plant is a small source edit of the
shipped CPU path (what runs here); an edit whose target text has gone stale fails loudly
instead of silently testing nothing. The kernels' own plants are in tests/test_<kernel>.py."""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from harness.build import KERNELS


@dataclass(frozen=True)
class Plant:
    name: str
    kernel: str
    file: str
    old: str
    new: str
    dtype: str = "float32"


def plant(tmp_path, p: Plant):
    """A copy of kernels/ with `p` planted; the path of the package."""
    pkg = tmp_path / f"planted_{p.name}"
    shutil.copytree(KERNELS, pkg)
    src = (pkg / p.file).read_text()
    assert p.old in src, f"plant {p.name} is stale: {p.old!r} is not in kernels/{p.file}"
    (pkg / p.file).write_text(src.replace(p.old, p.new))
    return pkg


def assert_caught(kt, tmp_path, p: Plant) -> None:
    """`kt verify` of the planted package fails with a minimal case and a replay line."""
    pkg = plant(tmp_path, p)
    r = kt("verify", p.kernel, "--device", "cpu", "--dtype", p.dtype, "--kernels", str(pkg),
           "--profile", "ci", "--no-triton", json_out=True)
    assert r.code == 1, r.output
    (result,) = r.json["results"]
    assert result["status"] == "ok"
    failure = result["failure"]
    assert failure is not None and "mojo" in failure["what"]
    assert "minimal failing case" in r.stdout
    assert f"kt verify {p.kernel} --device cpu --replay" in r.stdout
