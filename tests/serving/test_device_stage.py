"""scripts/stage-part.sh and scripts/device-stage.sh with small bundles packed as
shared/offline-site.sh packs them (tar of a folder site-NAME | xz | split into NAME.partNN):
parts of several bundles arrive one call at a time, in any order, and each bundle is unpacked
once all of its parts are there."""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not shutil.which("xz") or not shutil.which("split"), reason="needs xz and split")


def pack(bundles: Path, name: str, files: dict[str, bytes], part_bytes: int) -> list[Path]:
    site = bundles / ".work" / f"site-{name}"
    for rel, data in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(data)
    out = bundles / name
    out.mkdir(parents=True)
    subprocess.run(f"tar -C {shlex.quote(str(site.parent))} -cf - site-{name} | xz -1 -T1 | "
                   f"split -b {part_bytes} -d - {shlex.quote(str(out / name))}.part", shell=True, check=True)
    shutil.rmtree(site)
    return sorted(out.iterdir())


@pytest.fixture
def setup(tmp_path):
    bundles = tmp_path / "bundles"
    # Incompressible content, so that each bundle splits into the parts wanted.
    parts = {
        "max": pack(bundles, "max", {"max/__init__.py": b"V = 'max'\n", "blob": os.urandom(9000)}, 4000),
        "extras": pack(bundles, "extras", {"transformers/__init__.py": b"V = '5.12.1'\n"}, 4000),
        "vllm": pack(bundles, "vllm", {"vllm/__init__.py": b"V = '0.26.0'\n", "blob": os.urandom(5000)}, 4000),
    }
    repo = tmp_path / "repo"  # the repository copy a GPU call runs in
    (repo / "scripts").mkdir(parents=True)
    for s in ("device-stage.sh", "stage-part.sh"):
        shutil.copy(REPO / "scripts" / s, repo / "scripts" / s)
    env = dict(os.environ, BUNDLES=str(bundles), STAGE=str(tmp_path / "stage"), SITES=str(tmp_path / "sites"))
    return repo, env, parts, tmp_path


def stage_part(repo, env, k):
    return subprocess.run(["bash", "scripts/stage-part.sh", str(k)], cwd=repo, env=env, capture_output=True,
                          text=True, check=True).stdout


def device_stage(repo, env, args):
    r = subprocess.run(["bash", "scripts/device-stage.sh", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    exports = dict(line.removeprefix("export ").split("=", 1) for line in r.stdout.splitlines())
    return exports, r.stderr


def calls_of(repo, env):
    out = subprocess.run(["bash", "scripts/stage-part.sh", "list"], cwd=repo, env=env, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    calls = [ln.split(": ", 1)[1].rsplit(" (", 1)[0].split() for ln in out if ln.startswith("call ")]
    return calls, out[-1].split(": ", 1)[1].split()


def budget_of(repo, env):
    out = subprocess.run(["bash", "scripts/stage-part.sh", "list"], cwd=repo, env=env, capture_output=True,
                         text=True, check=True).stdout
    return int(next(ln for ln in out.splitlines() if ln.startswith("budget: ")).split()[1])


def test_parts_accumulate_and_each_bundle_unpacks_when_complete(setup):
    repo, env, parts, tmp = setup
    env = dict(env, STAGE_BUDGET="4000")  # one 4000-byte part per call; small parts may share one
    counts = {k: len(v) for k, v in parts.items()}
    assert counts == {"max": 3, "extras": 1, "vllm": 2}
    calls, args = calls_of(repo, env)
    assert args == ["max=3", "extras=1", "vllm=2"]
    assert sorted(p for c in calls for p in c) == sorted(p.name for v in parts.values() for p in v)
    sites = tmp / "sites"
    staged = set()
    for k, call in enumerate(calls, 1):
        stage_part(repo, env, k)
        assert sorted(p.name for p in (repo / ".stage").iterdir()) == sorted(call)  # this call's parts only
        assert sum(p.stat().st_size for p in (repo / ".stage").iterdir()) <= 4000
        exports, err = device_stage(repo, env, args)
        staged |= set(call)
        have = {b for b in parts if all(p.name in staged for p in parts[b])}
        want = ([] if not {"max", "extras"} <= have else ["max"]) + (["vllm"] if "vllm" in have else [])
        assert exports["KT_STAGE_READY"] == '"' + " ".join(want) + '"', (k, call, err)
        if "max" not in have:
            assert not (sites / "site-max").exists()
    assert exports["KT_MAX_PYTHONPATH"] == f"{sites}/site-max:{sites}/site-extras"  # toolchain first, then extras
    assert exports["KT_VLLM_PYTHONPATH"] == f"{sites}/site-vllm"  # vLLM alone, over the machine's packages
    assert (sites / "site-max" / "max" / "__init__.py").read_text() == "V = 'max'\n"
    assert (sites / "site-vllm" / "vllm" / "__init__.py").read_text() == "V = '0.26.0'\n"
    assert not list((tmp / "stage").glob("*.part*"))  # parts deleted once unpacked
    # A later call with nothing new unpacks nothing again and prints the same environment.
    shutil.rmtree(repo / ".stage")
    (sites / "site-max" / "marker").write_text("kept")
    again, err = device_stage(repo, env, args)
    assert again == exports and (sites / "site-max" / "marker").exists() and "unpacked (" in err


def test_small_parts_share_a_call(tmp_path):
    """The bundles as built: 57 MiB parts, and two small ones (extras, vllm's last) in one call."""
    sizes = {"max": [57, 57, 56.4], "extras": [35.2], "vllm": [57, 57, 57, 57, 8.4]}
    for b, mib in sizes.items():
        (tmp_path / b).mkdir()
        for i, m in enumerate(mib):
            with open(tmp_path / b / f"{b}.part{i:02d}", "wb") as fh:
                fh.truncate(int(m * 1024 * 1024))  # sparse: no disk used
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "stage-part.sh", repo / "scripts")
    calls, args = calls_of(repo, dict(os.environ, BUNDLES=str(tmp_path)))
    assert len(calls) == 8 and ["extras.part00", "vllm.part04"] in calls
    assert args == ["max=3", "extras=1", "vllm=5"]


def test_out_of_order_parts_and_a_bundle_still_missing(setup):
    repo, env, parts, tmp = setup
    every = {p.name: p for v in parts.values() for p in v}

    def call_with(name):  # a call that carries this one part
        shutil.rmtree(repo / ".stage", ignore_errors=True)
        (repo / ".stage").mkdir()
        shutil.copy(every[name], repo / ".stage" / name)

    for name in ("vllm.part01", "max.part01", "extras.part00", "max.part00"):
        call_with(name)
        exports, err = device_stage(repo, env, ["max=3", "extras=1", "vllm=2"])
    assert exports["KT_STAGE_READY"] == '""'
    assert "max: 2/3 parts (missing max.part02)" in err and "vllm: 1/2 parts (missing vllm.part00)" in err
    call_with("max.part02")
    exports, _ = device_stage(repo, env, ["max=3", "extras=1", "vllm=2"])
    assert exports["KT_STAGE_READY"] == '"max"' and "KT_VLLM_PYTHONPATH" not in exports
    # With no extras bundle asked for, MAX's environment is the toolchain alone.
    exports, _ = device_stage(repo, env, ["max=3", "vllm=2"])
    assert exports["KT_MAX_PYTHONPATH"] == f"{tmp}/sites/site-max"


def test_corrupt_part_fails_without_a_half_made_site(setup):
    repo, env, parts, tmp = setup
    bad = parts["extras"][0]
    bad.write_bytes(bad.read_bytes()[:-50])  # truncated in transit
    env = dict(env, BUNDLE_ORDER="extras")
    stage_part(repo, env, 1)
    r = subprocess.run(["bash", "scripts/device-stage.sh", "extras=1"], cwd=repo, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 1 and "unpacking failed" in r.stderr
    assert not (tmp / "sites" / "site-extras").exists()
    assert not list((tmp / "stage").glob(".unpack-*"))


def test_a_waiter_reads_no_parts(setup):
    """STAGE_COPY=0 (gpu_serve.sh's background wait) unpacks what the calls staged, never .stage/."""
    repo, env, parts, tmp = setup
    env = dict(env, BUNDLE_ORDER="extras")
    stage_part(repo, env, 1)  # extras, in .stage/ but not yet taken by a call
    r = subprocess.run(["bash", "scripts/device-stage.sh", "extras=1"], cwd=repo, env=dict(env, STAGE_COPY="0"),
                       capture_output=True, text=True)
    assert r.returncode == 0 and "extras: 0/1 parts" in r.stderr
    exports, _ = device_stage(repo, env, ["extras=1"])  # the call itself takes and unpacks it
    assert (tmp / "sites" / "site-extras" / "transformers" / "__init__.py").exists()


def test_parts_larger_than_the_budget_are_recut_and_still_unpack(setup):
    """A call carries at most 64 MiB with the repository: parts cut for 57 MiB are re-cut to the
    budget (slices of one stream), and device-stage.sh gets the new counts."""
    repo, env, parts, tmp = setup
    env = dict(env, STAGE_BUDGET="2500")
    calls, args = calls_of(repo, env)
    size = {b: sum(p.stat().st_size for p in v) for b, v in parts.items()}
    assert args == [f"{b}={-(-size[b] // 2500)}" for b in ("max", "extras", "vllm")]
    for k in range(1, len(calls) + 1):
        stage_part(repo, env, k)
        assert sum(p.stat().st_size for p in (repo / ".stage").iterdir()) <= 2500
        exports, err = device_stage(repo, env, args)
    assert exports["KT_STAGE_READY"] == '"max vllm"', err
    assert (tmp / "sites" / "site-max" / "max" / "__init__.py").read_text() == "V = 'max'\n"
    # Listing again re-uses the cut parts; a bundle built again is cut again.
    cut = tmp / "bundles" / ".cut-2500" / "max" / ".done"
    stamp = cut.stat().st_mtime_ns
    assert calls_of(repo, env) == (calls, args) and cut.stat().st_mtime_ns == stamp
    os.utime(parts["max"][0], ns=(stamp + 10**9, stamp + 10**9))
    assert calls_of(repo, env) == (calls, args) and cut.stat().st_mtime_ns != stamp


def test_default_budget_leaves_room_for_the_repository(setup):
    repo, env, _, _ = setup
    assert budget_of(repo, env) == 63 << 20  # not a git checkout: nothing else travels
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "results.json").write_bytes(os.urandom(300_000))
    (repo / ".gitignore").write_text(".stage/\nignored.bin\n")
    (repo / "ignored.bin").write_bytes(b"x" * 500_000)  # ignored files do not travel
    travel = sum(p.stat().st_size for p in (repo / "scripts").iterdir()) + 300_000 + len(".stage/\nignored.bin\n")
    assert budget_of(repo, env) == (63 << 20) - travel
