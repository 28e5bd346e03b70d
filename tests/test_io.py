"""Result files and provenance: atomic 0644 JSON, one reader for plain and .xz results (and
scripts/compact-results.sh, which makes the .xz), the git sha (KT_GIT_SHA, `-dirty`), and
nothing the install writes is tracked (else every fresh clone reports `-dirty`)."""

import json
import lzma
import os
import shutil
import stat
import subprocess

import pytest

from harness import io


def test_json_is_written_whole_and_group_readable(tmp_path):
    path = tmp_path / "sub" / "r.json"
    io.write_json_atomic(path, {"a": 1})
    io.write_json_atomic(path, {"a": 2, "p": tmp_path})  # Paths are written as strings
    assert json.loads(path.read_text()) == {"a": 2, "p": str(tmp_path)}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temp file left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "r.json"
    io.write_json_atomic(path, {"a": 1})
    loop: dict = {}
    loop["self"] = loop
    with pytest.raises(ValueError, match="Circular"):
        io.write_json_atomic(path, loop)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_result_reads_the_same_plain_or_xz(tmp_path):
    doc = {"kernel": "rope", "rows": [{"provider": "kt_graph", "p50": 0.125, "label": "µ"}]}
    plain, packed = tmp_path / "a" / "r.json", tmp_path / "b" / "r.json.xz"
    io.write_json_atomic(plain, doc)
    packed.parent.mkdir()
    packed.write_bytes(lzma.compress(plain.read_bytes(), preset=9 | lzma.PRESET_EXTREME))
    assert io.read_result_json(plain) == io.read_result_json(packed) == doc
    assert io.read_result_text(packed) == plain.read_text()
    # FILE.json names its FILE.json.xz once only that is committed; a plain file wins
    assert io.result_path(packed.with_suffix("")) == packed
    assert io.read_result_json(packed.with_suffix("")) == doc
    assert io.result_path(plain) == plain
    with pytest.raises(OSError):
        io.read_result_json(tmp_path / "missing.json")
    (tmp_path / "bad.json.xz").write_bytes(packed.read_bytes()[:-20])  # truncated
    with pytest.raises(ValueError, match="xz"):
        io.read_result_json(tmp_path / "bad.json")
    for f in ("bench/compare.py", "bench/summary.py", "bench/__main__.py"):  # every reader of a saved run
        assert "read_result_json(" in (io.REPO / "harness" / f).read_text(), f


@pytest.mark.skipif(not shutil.which("xz"), reason="no xz")
def test_compact_results_packs_large_text_results_and_stages_the_rename(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "scripts").mkdir()
    shutil.copy(io.REPO / "scripts" / "compact-results.sh", tmp_path / "scripts")
    res = tmp_path / "benchmarks" / "results"
    res.mkdir(parents=True)
    big = json.dumps({"rows": [{"i": i, "p50": i / 7} for i in range(4000)]})
    for name in ("big.json", "run.log", "small.json", "plot.png", "README.md"):
        (res / name).write_text(big if name != "small.json" else "{}")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "x")
    (res / "new.json").write_text(big)  # untracked, as a session copies a run in
    subprocess.run(["bash", "scripts/compact-results.sh"], cwd=tmp_path, check=True, capture_output=True)
    staged = subprocess.run(["git", "-C", str(tmp_path), "status", "--porcelain"], capture_output=True,
                            text=True).stdout.split("\n")
    assert sorted(ln for ln in staged if ln) == sorted([
        "D  benchmarks/results/big.json", "A  benchmarks/results/big.json.xz",
        "A  benchmarks/results/new.json.xz", "D  benchmarks/results/run.log",
        "A  benchmarks/results/run.log.xz"])
    assert sorted(p.name for p in res.iterdir()) == [
        "README.md", "big.json.xz", "new.json.xz", "plot.png", "run.log.xz", "small.json"]
    assert io.read_result_text(res / "big.json") == big == (res / "plot.png").read_text()


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                   check=True, capture_output=True)


def test_git_sha_says_dirty_and_kt_git_sha_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("KT_GIT_SHA", raising=False)
    monkeypatch.setattr(io, "REPO", tmp_path)
    _git(tmp_path, "init", "-q")
    (tmp_path / "f").write_text("1")
    _git(tmp_path, "add", "f")
    _git(tmp_path, "commit", "-q", "-m", "x")
    sha = io.git_sha()
    assert sha and len(sha) == 40
    (tmp_path / "untracked").write_text("")
    assert io.git_sha() == sha
    (tmp_path / "f").write_text("2")
    assert io.git_sha() == sha + "-dirty"
    monkeypatch.setenv("KT_GIT_SHA", "abc123")
    assert io.git_sha() == "abc123"
    assert io.provenance()["git_sha"] == "abc123"


def test_nothing_the_install_writes_is_tracked():
    tracked = subprocess.run(["git", "-C", str(io.REPO), "ls-files"], capture_output=True,
                             text=True).stdout.splitlines()
    if not tracked:
        pytest.skip("not a git checkout")
    assert not [f for f in tracked if ".egg-info" in f or "__pycache__" in f]


def test_provenance_names_versions_and_devices():
    prov = io.provenance()
    assert {"time_utc", "host", "platform", "python", "gpu", "versions", "git_sha"} <= set(prov)
    assert {"torch", "triton", "max", "mojo"} <= set(prov["versions"])
    assert os.environ.get("KT_GIT_SHA") or prov["git_sha"] is None or len(prov["git_sha"]) >= 40


def test_every_command_takes_provenance_from_one_helper(monkeypatch):
    """verify and microbench records are `io.provenance()`, serve-bench's are built on
    `io.host_provenance()`: all honour KT_GIT_SHA, and nothing else in harness/ computes a
    git sha or a host name (end to end: tests/serving/test_serve_process.py)."""
    from harness.serving.records import kt_provenance

    monkeypatch.setenv("KT_GIT_SHA", "f00d")
    assert io.provenance()["git_sha"] == "f00d"
    assert kt_provenance()["kt_git_sha"] == "f00d"
    for f in (io.REPO / "harness").rglob("*.py"):
        if f == io.REPO / "harness" / "io.py":
            continue
        text = f.read_text()
        for own in ("rev-parse", "KT_GIT_SHA", "platform.node"):
            assert own not in text, f"{f.relative_to(io.REPO)} computes its own provenance ({own})"
    for f in ("verify/cli.py", "bench/engine.py"):
        assert "provenance(" in (io.REPO / "harness" / f).read_text()
