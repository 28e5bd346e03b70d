"""`kt serve-bench` end to end against a fake engine: reports, teardown on every exit path, and
bad inputs (one clear line, non-zero exit)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serving_helpers import FAKE_SERVER, pids_of

REPO = Path(__file__).resolve().parents[2]


def kt(*args, env=None, **kw):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "harness.serving", *args], cwd=REPO, env=e,
                          capture_output=True, text=True, timeout=180, **kw)


def no_fake_servers(timeout=20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pids_of(str(FAKE_SERVER)):
            return True
        time.sleep(0.2)
    return False


def test_full_report_with_fake_engine(tmp_path, tiny_model, fake_python):
    out = tmp_path / "out"
    r = kt("serve-bench", "--model", str(tiny_model), "--engines", "vllm", "--python", f"vllm={fake_python}",
           "--num-prompts", "6", "--input-len", "16", "--output-len", "5", "--max-concurrency", "1,2",
           "--goodput", "ttft:1000", "--out", str(out),
           env={"FAKE_TOKEN_DELAY": "0.005", "KT_GIT_SHA": "0123abc"})
    assert r.returncode == 0, r.stderr
    assert "vllm" in r.stdout and "c2" in r.stdout  # the table
    for point in ("c1", "c2"):
        d = json.loads((out / "vllm" / f"{point}.json").read_text())
        assert d["completed"] == 6 and d["failed"] == 0
        assert d["total_output_tokens"] == 30 and d["input_lens"] == [16] * 6
        assert d["request_goodput"] is not None
        for key in ("request_throughput", "output_throughput", "total_token_throughput", "median_ttft_ms",
                    "p99_itl_ms", "mean_tpot_ms", "p95_e2el_ms", "max_concurrency", "model_id"):
            assert key in d
        prov = d["provenance"]
        assert prov["engine_version"] == "0.0.0+fake" and prov["workload_hash"] and d["startup"]["cold_start_s"] > 0
        assert "127.0.0.1" in prov["server_command"]
        assert prov["kt_git_sha"] == "0123abc"  # harness.io's provenance, as verify and microbench
    assert json.loads((out / "run.json").read_text())["kt_git_sha"] == "0123abc"
    for png in ("throughput.png", "ttft.png", "itl.png"):
        assert (out / png).stat().st_size > 1000
    assert (out / "report.md").read_text().count("| vllm | random |") == 2  # one line per load point
    assert no_fake_servers(5)


@pytest.mark.parametrize("signo", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_no_server_survives_kt(tmp_path, tiny_model, fake_python, signo):
    env = dict(os.environ, FAKE_TOKEN_DELAY="0.5")
    p = subprocess.Popen([sys.executable, "-m", "harness.serving", "serve-bench", "--model", str(tiny_model),
                          "--engines", "vllm", "--python", f"vllm={fake_python}", "--num-prompts", "50",
                          "--output-len", "50", "--out", str(tmp_path / "o")],
                         cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not pids_of(str(FAKE_SERVER)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pids_of(str(FAKE_SERVER)), "fake server never started"
    time.sleep(3)  # mid-run: warmup and requests in flight
    p.send_signal(signo)
    p.wait(timeout=60)  # it writes the summary, report and plots of what finished first
    assert p.returncode != 0
    assert no_fake_servers(), f"server left after {signal.Signals(signo).name}"


def one_line_error(r):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, r.stderr  # one clear line (a server's log tail may follow it)
    return r.stderr


def test_missing_engine(tiny_model, tmp_path):
    err = one_line_error(kt("serve-bench", "--model", str(tiny_model), "--engines", "vllm",
                            "--out", str(tmp_path), env={"KT_VLLM_PYTHON": "/nonexistent/python"}))
    assert "KT_VLLM_PYTHON" in err
    err = one_line_error(kt("serve-bench", "--model", str(tiny_model), "--engines", "sglang", "--out", str(tmp_path)))
    assert "unknown engine" in err


def test_busy_port(tiny_model, fake_python, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        err = one_line_error(kt("serve-bench", "--model", str(tiny_model), "--engines", "vllm", "--python",
                                f"vllm={fake_python}", "--port", str(port), "--out", str(tmp_path)))
    assert f"port {port}" in err and "busy" in err


def test_unreachable_url(tiny_model, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        err = one_line_error(kt("serve-bench", "--model", str(tiny_model), "--engines", "vllm",
                                "--base-url", f"http://127.0.0.1:{port}", "--out", str(tmp_path)))
    assert "cannot reach" in err


def test_malformed_dataset(tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{oops\n')
    err = one_line_error(kt("serve-bench", "--model", str(tiny_model), "--engines", "vllm",
                            "--dataset", str(bad), "--out", str(tmp_path)))
    assert "malformed dataset" in err and "line 2" in err


def test_server_that_dies_reports_its_log(tiny_model, tmp_path):
    dead = tmp_path / "bin" / "python"
    dead.parent.mkdir()
    dead.write_text('#!/bin/sh\nif [ "$1" = -c ]; then echo 1.0; exit 0; fi\necho "boom: no such model" >&2\nexit 3\n')
    dead.chmod(0o755)
    r = kt("serve-bench", "--model", str(tiny_model), "--engines", "vllm", "--python", f"vllm={dead}",
           "--out", str(tmp_path / "o"))
    err = one_line_error(r)
    assert "exited with code 3" in err and "boom: no such model" in err
