"""`harness.precompiled`'s package cache: keyed by the package's Mojo sources and the
compiler version, built once however many processes ask at the same time."""

import threading
from pathlib import Path

import pytest

from harness import build, precompiled


def _package(root: Path, body: str = "def twice(x: Int) -> Int:\n    return 2 * x\n") -> Path:
    pkg = root / "pkg"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.mojo").write_text("")
    (pkg / "ops.mojo").write_text(body)
    return pkg


def test_digest_follows_the_mojo_sources_only(tmp_path):
    pkg = _package(tmp_path)
    first = precompiled.package_digest(pkg)
    assert precompiled.package_digest(pkg) == first
    (pkg / "NOTES.md").write_text("not compiled")
    assert precompiled.package_digest(pkg) == first
    (pkg / "ops.mojo").write_text("def twice(x: Int) -> Int:\n    return x + x\n")
    assert precompiled.package_digest(pkg) != first


def test_a_compiled_package_file_is_used_as_it_is(tmp_path):
    mojoc = tmp_path / "k.mojoc"
    mojoc.write_bytes(b"\0")
    assert precompiled.precompiled_package(mojoc) == mojoc


@pytest.mark.slow
def test_concurrent_callers_share_one_build(tmp_path, monkeypatch):
    monkeypatch.setenv("KT_CACHE_DIR", str(tmp_path / "cache"))
    pkg = _package(tmp_path)
    got: list[Path] = []
    threads = [threading.Thread(target=lambda: got.append(precompiled.precompiled_package(pkg)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 1 and got[0].exists() and got[0].suffix == ".mojoc"
    assert [p.name for p in got[0].parent.glob("*.mojoc")] == [got[0].name]
    built = got[0].stat().st_ino  # a build would replace the file
    assert precompiled.precompiled_package(pkg) == got[0] and got[0].stat().st_ino == built
    (pkg / "ops.mojo").write_text("def twice(x: Int) -> Int:\n    return x +\n")
    with pytest.raises(build.BuildError, match=r"ops\.mojo:\d+:\d+: "):
        precompiled.precompiled_package(pkg)


def test_a_compiled_package_file_named_unlike_an_identifier_is_copied(tmp_path, monkeypatch):
    """MAX imports a `.mojoc` by its file name: `my-kernels.mojoc` is copied under a valid one."""
    monkeypatch.setenv("KT_CACHE_DIR", str(tmp_path / "cache"))
    mojoc = tmp_path / "my-kernels.mojoc"
    mojoc.write_bytes(b"\0\1")
    got = precompiled.precompiled_package(mojoc)
    assert got.stem.isidentifier() and got.read_bytes() == b"\0\1"
    assert precompiled.precompiled_package(mojoc) == got


def test_compiler_diagnostics_become_one_line_naming_the_argument():
    """The shape of MAX 26.7's message for an op whose `w` is declared rank 2 (the real
    compiler's: tests/test_cli.py)."""
    import pykernels
    import torch

    text = (
        "error: invalid call to 'execute': value passed to 'w' cannot be converted from "
        "'ManagedTensorSlice[IOSpec(), static_spec=StaticTensorSpec(Int(64))]' to "
        "'ManagedTensorSlice[IOSpec[_, _].Input, static_spec=w.static_spec]'\n"
        "            pkg.rms_norm.RMSNorm.execute[target = \"cpu\"](a, b, c, d, e)\n"
        "Imported from <unknown>:19:\n"
        "/p/rms_norm.mojo:90:9: note: function declared here\n"
        "    def execute[\n"
        "note: .rank of the first value is 'Int(1)' but the second value is 'Int(2)'\n")
    line = build.op_mismatch_summary(pykernels.get("rms_norm"), torch.bfloat16, text)
    assert line == (
        "/p/rms_norm.mojo:90:9: kt.rms_norm: invalid call to 'execute': value passed to 'w' "
        "does not have the declared type (rank: kt passes 1, the op declares 2); kt calls "
        "execute(y: OutputTensor[bfloat16, rank=2], x: InputTensor[bfloat16, rank=2], "
        "w: InputTensor[bfloat16, rank=1], eps: Float32, ctx: DeviceContext)")
    assert build.op_mismatch_summary(pykernels.get("rms_norm"), torch.float32, "warning: x") is None
