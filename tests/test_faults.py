"""`kt verify` and `kt microbench` under faults: a kernel that never returns (planted: a
side-effect-free infinite loop in rms_norm's CPU path), SIGTERM and Ctrl-C mid-run, result
paths kt cannot write, a --compare with nothing to compare, and the build cache after a
precompile is interrupted. Nothing is lost, nothing is left running, nothing passes falsely.
(serve-bench's faults: tests/serving/test_serve_faults.py.)"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.build import KERNELS
from harness.precompiled import clean_stale_staging, prune_precompiled
from plants import Plant, plant

REPO = Path(__file__).resolve().parents[1]
# Rows of 4096 (golden case 2, every cpu microbench shape) never end; smaller ones pass first.
SPIN = Plant("rms_norm_spins_forever", "rms_norm", "rms_norm.mojo",
             "    var r = rsqrt(_sum_squares[dtype](x, n) / Float32(n) + eps)",
             "    while n == 4096:\n        pass\n"
             "    var r = rsqrt(_sum_squares[dtype](x, n) / Float32(n) + eps)",
             dtype="bfloat16")  # the cpu microbench family's dtype: one compile serves both


@pytest.fixture(scope="module")
def spinning_pkg(tmp_path_factory) -> Path:
    return plant(tmp_path_factory.mktemp("spin"), SPIN)


def _kt_cmd() -> list[str]:
    exe = shutil.which("kt", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "harness"]


class Running:
    """A `kt` command in the background; its stderr lines collected as they come."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.proc = subprocess.Popen([*_kt_cmd(), *args], cwd=REPO, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=dict(os.environ, COLUMNS="200", **(env or {})))
        self.err: list[str] = []
        self._out: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(f, lines), daemon=True)
                         for f, lines in ((self.proc.stderr, self.err),
                                          (self.proc.stdout, self._out))]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    def wait_for(self, predicate, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert self.proc.poll() is None, "".join(self.err)
            assert time.monotonic() < deadline, "".join(self.err)
            time.sleep(0.2)

    def wait_for_line(self, needle: str, timeout: float = 600) -> None:
        self.wait_for(lambda: any(needle in ln for ln in self.err), timeout)

    def stop(self, signo: int, timeout: float = 30) -> int:
        """Send `signo`, wait for kt to exit; its exit code (stdout is then `self.out`)."""
        self.proc.send_signal(signo)
        self.proc.wait(timeout=timeout)
        for t in self._readers:
            t.join(timeout=10)
        self.out = "".join(self._out)
        return self.proc.returncode


def _left_running(marker: str) -> list[str]:
    """Command lines of live processes that mention `marker` (zombies have none)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            found.append(f"{d.name}: {cmd[:200]}")
    return found


def _assert_nothing_left(marker: str) -> None:
    deadline = time.monotonic() + 5
    while _left_running(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _left_running(marker)


def _one_error_line(stderr: str, code: int, rc: int, *needles: str) -> None:
    assert rc == code, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("kt")]
    assert len(errors) == 1 and errors[0].startswith("kt: error: "), stderr
    assert "Traceback" not in stderr
    for n in needles:
        assert n in errors[0], errors[0]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _spinning_verify(spinning_pkg: Path, *extra: str) -> Running:
    """`kt verify rms_norm` in bf16 on the spinning package, once its worker has compiled."""
    run = Running("verify", "rms_norm", "--device", "cpu", "--dtype", "bfloat16", "--kernels",
                  str(spinning_pkg), "--profile", "ci", "--no-triton", *extra)
    run.wait_for_line("compiled bfloat16")
    return run


# --- hangs --------------------------------------------------------------------------------

@pytest.mark.slow
def test_hanging_kernel_is_a_hang_with_its_case_and_a_replay_line(kt, spinning_pkg):
    r = kt("verify", "rms_norm", "--device", "cpu", "--dtype", "bfloat16", "--kernels",
           str(spinning_pkg), "--profile", "ci", "--no-triton", "--case-timeout", "3",
           json_out=True)
    assert r.code == 1, r.output
    (res,) = r.json["results"]
    assert res["status"] == "hang" and res["limit_s"] == 3
    assert res["last_case"]["dtype"] == "bfloat16" and res["last_case"]["shape"]["N"] == 4096
    assert res["passed"] == {"bfloat16": 2}  # the golden cases before it
    assert "HANG" in r.stdout and "no result within 3 s" in r.stdout
    assert "replay: kt verify rms_norm --device cpu --replay" in r.stdout
    assert "--case-timeout 3" in r.stdout.split("replay: ")[1]
    assert "Traceback" not in r.output
    _assert_nothing_left(str(spinning_pkg))


@pytest.mark.slow
def test_sigterm_stops_verify_and_its_worker_and_saves(spinning_pkg, tmp_path):
    out = tmp_path / "v.json"
    run = _spinning_verify(spinning_pkg, "--json", str(out))
    time.sleep(2)  # inside the kernel's endless loop (the default limit is minutes away)
    t0 = time.monotonic()
    rc = run.stop(signal.SIGTERM)
    assert time.monotonic() - t0 < 15
    _one_error_line("".join(run.err), 130, rc, "interrupted")
    doc = json.loads(out.read_text())
    assert doc["interrupted"] is True
    (res,) = doc["results"]
    assert res["status"] == "interrupted" and res["last_case"]["dtype"] == "bfloat16"
    assert "INTERRUPTED" in run.out
    assert _mode(out) == 0o644
    _assert_nothing_left(str(spinning_pkg))


@pytest.mark.slow
def test_a_worker_dies_with_kt_even_after_sigkill(spinning_pkg):
    run = _spinning_verify(spinning_pkg)
    assert _left_running(str(spinning_pkg))  # the worker, spinning
    run.stop(signal.SIGKILL)
    _assert_nothing_left(str(spinning_pkg))


@pytest.mark.slow
def test_ctrl_c_keeps_the_examples_that_passed(spinning_pkg, tmp_path):
    out = tmp_path / "v.json"
    run = _spinning_verify(spinning_pkg, "--json", str(out))
    time.sleep(8)  # golden cases 0 and 1 pass, case 2 (N=4096) spins
    rc = run.stop(signal.SIGINT)
    _one_error_line("".join(run.err), 130, rc, "interrupted", str(out))
    (res,) = json.loads(out.read_text())["results"]
    assert res["status"] == "interrupted" and res["passed"]["bfloat16"] == 2
    assert res["examples"] == 2 and res["last_case"]["shape"]["N"] == 4096
    _assert_nothing_left(str(spinning_pkg))


@pytest.mark.slow
def test_microbench_hang_is_a_row_and_the_others_are_timed(kt, spinning_pkg, tmp_path):
    save = tmp_path / "m.json"
    # the limit covers every provider's check and timing: torch_eager's, on a loaded 2-core
    # machine, can take several seconds
    r = kt("microbench", "rms_norm", "--device", "cpu", "--providers", "torch_eager,kt_graph",
           "--kernels", str(spinning_pkg), "--case-timeout", "15", "--budget", "0.05",
           "--save", str(save))
    assert r.code == 1, r.output
    rows = json.loads(save.read_text())["rows"]
    hung = [row for row in rows if row["provider"] == "kt_graph"]
    assert [row["status"] for row in hung] == ["hang"]
    assert "no result within 15 s" in hung[0]["note"]
    eager = [row for row in rows if row["provider"] == "torch_eager"]
    assert len(eager) == 2 and all(row["status"] == "ok" and row["p50"] > 0 for row in eager)
    assert _mode(save) == 0o644
    _assert_nothing_left(str(spinning_pkg))


@pytest.mark.slow
def test_sigterm_stops_microbench_in_a_hanging_kernel_and_saves_the_rows(spinning_pkg, tmp_path):
    save = tmp_path / "m.json"
    run = Running("microbench", "rms_norm", "--device", "cpu", "--providers",
                  "torch_eager,kt_graph", "--kernels", str(spinning_pkg), "--budget", "0.05",
                  "--save", str(save))
    run.wait_for_line("inputs and reference")
    time.sleep(8)  # torch_eager timed, kt_graph compiled (cached) and spinning
    rc = run.stop(signal.SIGTERM)
    _one_error_line("".join(run.err), 130, rc, "interrupted", str(save))
    doc = json.loads(save.read_text())
    # a case's rows finish together (its providers' rounds are interleaved): none finished yet
    assert doc["interrupted"] is True and doc["rows"] == []
    _assert_nothing_left(str(spinning_pkg))


# --- results lost, false passes -----------------------------------------------------------

def test_unwritable_result_paths_fail_before_any_work(kt, tmp_path):
    for args, needle in (
            (("verify", "rms_norm", "--device", "cpu", "--json", "/proc/kt.json"),
             "--json /proc/kt.json: cannot write there"),
            (("verify", "rms_norm", "--device", "cpu", "--json", str(tmp_path)), "--json"),
            (("microbench", "rms_norm", "--device", "cpu", "--save", "/proc/kt.json"),
             "--save /proc/kt.json: cannot write there"),
            (("microbench", "rms_norm", "--device", "cpu", "--plot", "/proc/kt.png"),
             "--plot /proc/kt.png: cannot write there")):
        r = kt(*args)
        _one_error_line(r.stderr, 2, r.code, needle)
        assert "compiled" not in r.output and "reference" not in r.output


def test_examples_and_time_limits_are_bounded(kt):
    for args in (("--examples", "100000000000000000000000"), ("--examples", "0"),
                 ("--case-timeout", "0")):
        r = kt("verify", "rms_norm", "--device", "cpu", *args)
        _one_error_line(r.stderr, 2, r.code, args[0])


def _old_run(path: Path, kernel: str, shape: dict) -> Path:
    row = {"kernel": kernel, "provider": "torch_eager", "shape": shape, "params": {},
           "dtype": "bfloat16", "device": "elsewhere", "status": "ok",
           "p10": 1.0, "p50": 1.0, "p90": 1.0}
    path.write_text(json.dumps({"rows": [row]}))
    return path


def test_compare_with_another_kernels_run_is_an_error(kt, tmp_path):
    old = _old_run(tmp_path / "rope.json", "rope", {"B": 1})
    r = kt("microbench", "rms_norm", "--device", "cpu", "--compare", str(old))
    _one_error_line(r.stderr, 2, r.code, "no row of kernel rms_norm", "rope")
    assert "reference" not in r.output


def test_compare_matching_no_row_is_an_error_not_a_pass(kt, tmp_path):
    old = _old_run(tmp_path / "old.json", "rms_norm", {"M": 3, "N": 5})
    save = tmp_path / "new.json"
    r = kt("microbench", "rms_norm", "--device", "cpu", "--providers", "torch_eager",
           "--budget", "0.05", "--compare", str(old), "--save", str(save))
    _one_error_line(r.stderr, 2, r.code, "nothing was compared")
    assert len(json.loads(save.read_text())["rows"]) == 2  # the run itself is kept


# --- the build cache ----------------------------------------------------------------------

def test_stale_staging_folders_of_dead_processes_are_removed(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = tmp_path / f".staging.{gone.pid}"
    live = tmp_path / f".staging.{os.getpid()}"
    for d in (dead, live):
        d.mkdir()
        (d / "half.mojoc").write_bytes(b"x")
    dead_copy = tmp_path / f".kt_0123.mojoc.{gone.pid}"
    dead_copy.write_bytes(b"x")
    assert sorted(clean_stale_staging(tmp_path)) == sorted([dead, dead_copy])
    assert not dead.exists() and not dead_copy.exists() and live.exists()


def test_prune_keeps_the_most_recently_used_packages(tmp_path):
    now = time.time()
    for i in range(5):
        f = tmp_path / f"pkg{i}_digest.mojoc"
        f.write_bytes(b"x")
        os.utime(f, (now - 1000, now - 1000))  # built in this order: 4 last
        lock = tmp_path / f"{f.name}.lock"
        lock.touch()
        os.utime(lock, (now - 100 * i, now - 100 * i))  # used in this order: 0 last
    (tmp_path / "broken_digest.mojoc.lock").touch()  # a build that failed: no package
    held = open(tmp_path / "pkg4_digest.mojoc.lock", "a")
    fcntl.flock(held, fcntl.LOCK_EX)  # another process building pkg4 right now
    try:
        removed = prune_precompiled(tmp_path, keep=2)
    finally:
        held.close()
    assert sorted(f.name for f in removed) == [f"pkg{i}_digest.mojoc" for i in (2, 3, 4)]
    left = sorted(f.name for f in tmp_path.iterdir())
    assert left == ["pkg0_digest.mojoc", "pkg0_digest.mojoc.lock", "pkg1_digest.mojoc",
                    "pkg1_digest.mojoc.lock", "pkg4_digest.mojoc.lock"]


@pytest.mark.slow
def test_ctrl_c_during_precompile_leaves_no_staging_and_no_compiler(tmp_path):
    pkg = tmp_path / "fresh_kernels"
    shutil.copytree(KERNELS, pkg)
    cache = tmp_path / "cache"
    run = Running("verify", "rms_norm", "--device", "cpu", "--kernels", str(pkg), "--no-triton",
                  env={"KT_CACHE_DIR": str(cache)})
    staging = cache / "mojo_pkg"
    run.wait_for(lambda: any(staging.glob(".staging.*")), timeout=120)
    time.sleep(1)  # mojo precompile is running
    rc = run.stop(signal.SIGINT)
    _one_error_line("".join(run.err), 130, rc, "interrupted")
    assert not list(staging.glob(".staging.*"))
    assert not list(staging.glob("*.mojoc"))
    _assert_nothing_left(str(pkg))
