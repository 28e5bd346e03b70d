"""serve-bench under faults (issue 12, serving part), against the fake engine: what finished is
saved on Ctrl-C / SIGTERM, a server that fails every request is a failure, output lengths are
checked, a metric with no data is missing, bad paths and bad data are one line before any work,
result files are readable by the group."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.serving import agreement, metrics, workload
from harness.serving.metrics import RequestResult
from serving_helpers import FAKE_SERVER, pids_of

REPO = Path(__file__).resolve().parents[2]


def kt(*args, env=None, timeout=180, **kw):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "harness.serving", "serve-bench", *args], cwd=REPO, env=e,
                          capture_output=True, text=True, timeout=timeout, **kw)


def error_lines(stderr):
    return [ln for ln in stderr.splitlines() if ln.startswith("Error:")]


@pytest.mark.parametrize("signo", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_saves_the_finished_load_points(tmp_path, tiny_model, fake_python, signo):
    out = tmp_path / "o"
    p = subprocess.Popen([sys.executable, "-m", "harness.serving", "serve-bench", "--model", str(tiny_model),
                          "--engines", "vllm", "--python", f"vllm={fake_python}", "--num-prompts", "6",
                          "--output-len", "10", "--max-concurrency", "1,2", "--out", str(out)],
                         cwd=REPO, env=dict(os.environ, FAKE_TOKEN_DELAY="0.1"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not (out / "vllm" / "c1.json").exists() and time.monotonic() < deadline:
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.1)
    time.sleep(0.5)  # inside c2
    p.send_signal(signo)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stderr
    said = [ln for ln in stderr.splitlines() if "interrupted by" in ln]
    assert len(said) == 1 and "1 load point(s) that finished" in said[0], stderr
    assert "Traceback" not in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [r["load"] for r in summary] == ["c1"]
    assert json.loads((out / "run.json").read_text())["interrupted"] is True
    assert "Interrupted" in (out / "report.md").read_text() and "| vllm | random | c1 |" in (out / "report.md").read_text()
    assert "c1" in stdout  # the table of what finished
    assert not (out / "vllm" / "c2.json").exists()
    deadline = time.monotonic() + 20
    while pids_of(str(FAKE_SERVER)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pids_of(str(FAKE_SERVER))


@pytest.fixture
def failing_server(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([sys.executable, str(FAKE_SERVER), "--port", str(port)], env=dict(os.environ, FAKE_FAIL="1"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import urllib.request

    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    p.terminate()
    p.wait(timeout=10)


def test_base_url_that_fails_every_request_is_a_failure(tmp_path, tiny_model, failing_server):
    out = tmp_path / "o"
    r = kt("--model", str(tiny_model), "--engines", "vllm", "--base-url", failing_server, "--num-prompts", "4",
           "--num-warmups", "0", "--out", str(out))
    assert r.returncode == 1, r.stderr
    errs = error_lines(r.stderr)
    assert len(errs) == 1 and "4 of 4 requests failed" in errs[0] and "0/4 requests succeeded" in errs[0]
    d = json.loads((out / "vllm" / "c1.json").read_text())
    assert (d["completed"], d["failed"]) == (0, 4) and d["error_counts"]
    for key in ("median_ttft_ms", "p99_itl_ms", "mean_tpot_ms", "median_e2el_ms", "max_output_tokens_per_s"):
        assert d[key] is None, key  # no data: missing, not 0
    line = next(ln for ln in (out / "report.md").read_text().splitlines() if ln.startswith("| vllm | random | c1"))
    assert "| 0/4 |" in line and "| - |" in line and "0.0 |" not in line.split("| 0/4 |")[1].split("|")[3]


def test_output_length_mismatch_is_an_error(tmp_path, tiny_model, fake_python):
    out = tmp_path / "o"
    r = kt("--model", str(tiny_model), "--engines", "vllm", "--python", f"vllm={fake_python}", "--num-prompts", "3",
           "--output-len", "5", "--out", str(out), env={"FAKE_SHORT": "1"})
    assert r.returncode == 1
    # The first request (the end of the cold start) already fails: the engine is reported, nothing measured.
    assert "output length 4 tokens, asked for 5" in error_lines(r.stderr)[0]
    r = kt("--model", str(tiny_model), "--engines", "vllm", "--python", f"vllm={fake_python}", "--num-prompts", "3",
           "--output-len", "5", "--out", str(out), env={"FAKE_NO_USAGE": "1"})
    assert r.returncode == 1 and "no usage in the stream" in r.stderr


def test_a_load_point_with_failed_requests_reports_them():
    ok = RequestResult(success=True, prompt_len=3, output_tokens=4, ttft=0.1, itl=[0.01] * 3, latency=0.13)
    bad = RequestResult(error="output length 3 tokens, asked for 4")
    m = metrics.compute([ok, bad, bad], 1.0)
    assert (m["completed"], m["failed"]) == (1, 2) and m["error_counts"] == {bad.error: 2}
    empty = metrics.compute([bad], 1.0)
    assert empty["median_ttft_ms"] is None and empty["mean_tpot_ms"] is None and empty["max_output_tokens_per_s"] is None
    assert empty["output_throughput"] == 0.0  # a count over the duration: 0 is the measurement


@pytest.mark.parametrize("where", ["/proc/kt-out", "a-file"])
def test_out_is_checked_before_any_work(tmp_path, tiny_model, where):
    bad = Path(where) if where.startswith("/") else tmp_path / where
    if where == "a-file":
        bad.write_text("x")
    t0 = time.monotonic()
    # An engine interpreter that does not exist: reached only if --out were checked late.
    r = kt("--model", str(tiny_model), "--engines", "vllm", "--python", "vllm=/nonexistent/python", "--out", str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errs = error_lines(r.stderr)
    assert len(errs) == 1 and "--out" in errs[0], r.stderr
    assert time.monotonic() - t0 < 30


def test_corrupt_config_json_is_one_line(tmp_path, tiny_model, fake_python):
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    r = kt("--model", str(model), "--engines", "vllm", "--python", f"vllm={fake_python}", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errs = error_lines(r.stderr)
    assert len(errs) == 1 and "config.json is not valid JSON" in errs[0]


def test_dataset_with_a_bad_output_len_is_one_line(tmp_path, tiny_model, fake_python):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "hello", "output_len": 4}\n{"prompt": "there", "output_len": "abc"}\n')
    r = kt("--model", str(tiny_model), "--engines", "vllm", "--python", f"vllm={fake_python}", "--dataset", str(data),
           "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errs = error_lines(r.stderr)
    assert len(errs) == 1 and "line 2: output_len 'abc' is not a positive integer" in errs[0]
    with pytest.raises(workload.DatasetError):
        workload.build(str(data), tiny_model, 2, 8, 8, 0)


def test_result_files_are_group_readable(tmp_path, tiny_model, fake_python):
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "harness.serving", "serve-bench", "--model", str(tiny_model),
                        "--engines", "vllm", "--python", f"vllm={fake_python}", "--num-prompts", "2",
                        "--max-concurrency", "1,2", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=180, preexec_fn=lambda: os.umask(0o077))
    assert r.returncode == 0, r.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".json", ".md", ".png", ".log"}
    for p in files:
        assert p.stat().st_mode & stat.S_IRGRP, f"{p} is {oct(p.stat().st_mode)}"


def test_measure_after_waits_for_its_file_and_records_the_wait(tmp_path, tiny_model, fake_python):
    """--measure-after: the engine is up, but no load point starts before the file exists."""
    out, flag = tmp_path / "o", tmp_path / "gpu-free"
    p = subprocess.Popen([sys.executable, "-m", "harness.serving", "serve-bench", "--model", str(tiny_model),
                          "--engines", "vllm", "--python", f"vllm={fake_python}", "--num-prompts", "2",
                          "--output-len", "4", "--measure-after", str(flag), "--out", str(out)],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(8)
        assert p.poll() is None
        assert not (out / "vllm" / "c1.json").exists()  # held back
        flag.touch()
        _, stderr = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 0, stderr
    row = json.loads((out / "vllm" / "c1.json").read_text())
    held = row["startup"]["measure_after"]
    assert held["found"] is True and held["path"] == str(flag) and held["waited_s"] > 0


@pytest.mark.parametrize("lengths, says", [("0,3", "give lengths of at least 1"),
                                           ("3,2040", "the longest probe (2040 words, BOS and 16 generated tokens) must fit --max-model-len 2048"),
                                           ("a,b", "is not a comma-separated list")])
def test_bad_probe_lengths_are_one_line(tmp_path, tiny_model, fake_python, lengths, says):
    r = kt("--model", str(tiny_model), "--engines", "vllm", "--python", f"vllm={fake_python}",
           "--probe-lengths", lengths, "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errs = error_lines(r.stderr)
    assert len(errs) == 1 and says in errs[0], r.stderr[-1000:]
    assert not (tmp_path / "o").exists()


def test_probe_lengths_set_the_probe_prompts(tmp_path, tiny_model, fake_python):
    """--probe-lengths 1,24,3: three probe prompts of 1, 24 and 3 words (one token each). The
    words are drawn prompt after prompt, so the 1-word prompt is the default's first word."""
    out = tmp_path / "o"
    r = kt("--model", str(tiny_model), "--engines", "vllm", "--python", f"vllm={fake_python}", "--num-prompts", "1",
           "--probe-lengths", "1,24,3", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    prompts = json.loads((out / "vllm" / "probe.json").read_text())["prompts"]
    tok = workload.load_tokenizer(tiny_model)
    assert [workload.count_tokens(tok, p) for p in prompts] == [1, 24, 3]
    default = agreement.probe_prompts(workload.stable_words(tok))
    assert prompts[0] == default[0][: len(prompts[0])] and prompts[1] != default[1]


def test_default_probe_lengths_fit_the_context():
    """The default probes (100, 127, 128, 300 words) keep those that fit --max-model-len with BOS
    and the 16 greedy steps; the longest that fits when none does."""
    assert agreement.fitting_lengths(2048) == (100, 127, 128, 300)
    assert agreement.fitting_lengths(256) == (100, 127, 128)
    assert agreement.fitting_lengths(64) == (47,)
