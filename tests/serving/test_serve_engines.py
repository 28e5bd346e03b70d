"""`kt serve-bench` against the real engines on CPU: MAX Serve (stock and with kt's kernels) and
vLLM, with the tiny model. Needs the environments of scripts/setup-serving.sh; without them the
tests skip, except under CI, where a missing environment is a failure.

* the end-to-end run: every engine, started at once (`--startup concurrent`: their cold starts,
  each a model compile, overlap), concurrency 1 and 4, report table, JSON, PNGs;
* MAX+kt agrees with stock MAX (greedy tokens, or logprobs at a near-tie);
* every engine, stock MAX included, agrees with the fp32 reference (transformers on the CPU,
  under MAX's Python, once the servers are down);
* a planted broken kt.rms_norm, kt.paged_rope_store or kt.paged_rope_attention changes MAX+kt's
  output: each kernel is in the served path;
* killing kt (SIGKILL, which no handler sees) leaves no MAX process behind.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.serving import agreement
from serving_helpers import engine_python, group_members, pids_of

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
pytestmark = pytest.mark.slow


def need(engine: str) -> None:
    engine_python(engine)


def kt(*args, timeout=1200):
    return subprocess.run([sys.executable, "-m", "harness.serving", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def gone(pattern: str, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pids_of(pattern):
            return True
        time.sleep(0.5)
    return False


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    need("max")
    need("vllm")
    from harness.serving.model import make_model

    model = make_model("tiny", tmp_path_factory.mktemp("m") / "tiny", seed=0)
    out = tmp_path_factory.mktemp("report")
    t0 = time.monotonic()
    r = kt("serve-bench", "--model", str(model), "--engines", "max,max+kt,vllm", "--startup", "concurrent",
           "--num-prompts", "4", "--input-len", "32", "--output-len", "8", "--max-concurrency", "1,4",
           "--startup-timeout", "1500", "--out", str(out), timeout=1800)
    print(r.stdout)
    print(r.stderr[-3000:], file=sys.stderr)
    print(f"serve-bench took {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return model, out, r


def test_end_to_end_report(e2e):
    model, out, r = e2e
    assert r.returncode == 0, r.stderr[-3000:]
    for label in ("max", "max_kt", "vllm"):
        for point in ("c1", "c4"):
            d = json.loads((out / label / f"{point}.json").read_text())
            assert (d["completed"], d["failed"]) == (4, 0), d["error_counts"]
            assert d["output_lens"] == [8] * 4  # EOS ignored: exactly the requested tokens
            assert d["input_lens"] == [32] * 4
            assert d["median_ttft_ms"] > 0 and d["output_throughput"] > 0
            assert d["startup"]["cold_start_s"] > 0 and d["startup"]["mode"] == "concurrent"
    assert "max+kt" in r.stdout and "vllm" in r.stdout
    for png in ("throughput.png", "ttft.png", "itl.png"):
        assert (out / png).exists()
    assert gone(str(model)), "a server outlived kt serve-bench"


def test_max_kt_agrees_with_stock_max(e2e):
    _, out, r = e2e
    assert r.returncode == 0
    check = json.loads((out / "agreement.json").read_text())["max+kt vs max"]
    assert check["ok"], check["summary"]
    assert check["steps_compared"] > 0
    log = (out / "logs" / "max_kt.log").read_text(errors="replace")
    assert "kt: 2 attention layers call kt.paged_rope_store + kt.paged_rope_attention" in log


def test_every_engine_agrees_with_the_fp32_reference(e2e):
    model, out, r = e2e
    assert r.returncode == 0
    ref = json.loads((out / "reference" / "probe.json").read_text())
    assert (ref["device"], ref["dtype"]) == ("cpu", "float32") and len(ref["steps"]) == len(ref["texts"]) == 4
    checks = json.loads((out / "agreement.json").read_text())
    for label in ("max", "max+kt", "vllm"):
        check = checks[f"{label} vs reference"]
        assert check["ok"] and check["steps_compared"] > 0, f"{label}: {check['summary']}"
    assert checks["max vs reference"]["identical"] == 4  # the same fp32 model, no near-tie on the tiny one
    assert "- reference: fp32, transformers" in (out / "report.md").read_text()


def planted_package(broken: Path, tmp_path: Path) -> Path:
    """kt's Mojo package with the kernel files of `broken` laid over it."""
    pkg = tmp_path / f"kernels_{broken.name}"
    shutil.copytree(REPO / "kernels", pkg)
    for f in broken.glob("*.mojo"):
        if f.name != "__init__.mojo":
            assert (pkg / f.name).exists(), f"{f.name} replaces no kernel of kt's package"
            shutil.copy(f, pkg / f.name)
    return pkg


@pytest.mark.parametrize("broken", ["broken_kernels", "broken_paged_rope_store",
                                    "broken_paged_rope_attention"])
def test_broken_kernel_changes_the_output(e2e, tmp_path, broken):
    """kt.rms_norm without normalization, keys stored without RoPE, queries left unrotated:
    each changes what max+kt serves, so each kernel is in every request's path."""
    model, out, r = e2e
    assert r.returncode == 0
    pkg = planted_package(HERE / broken, tmp_path)
    broken = kt("serve-bench", "--model", str(model), "--engines", "max+kt", "--custom-kernel-path",
                str(pkg), "--num-prompts", "1", "--output-len", "4", "--out", str(tmp_path / "out"))
    assert broken.returncode == 0, broken.stderr[-3000:]
    stock = json.loads((out / "max" / "probe.json").read_text())["steps"]
    planted = json.loads((tmp_path / "out" / "max_kt" / "probe.json").read_text())["steps"]
    res = agreement.compare(stock, planted)
    assert not res.ok and res.mismatches, res.summary()
    assert gone(str(model))


def test_sigkill_of_kt_leaves_no_max_process(e2e, tmp_path):
    model = e2e[0]
    p = subprocess.Popen([sys.executable, "-m", "harness.serving", "serve-bench", "--model", str(model),
                          "--engines", "max", "--num-prompts", "200", "--output-len", "64", "--out", str(tmp_path)],
                         cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    log = tmp_path / "logs" / "max.log"
    while time.monotonic() < deadline:
        if log.exists() and "Server ready" in log.read_text(errors="replace"):
            break
        assert p.poll() is None, p.stderr.read()
        time.sleep(1)
    time.sleep(3)  # requests in flight
    groups = {os.getpgid(pid) for pid in pids_of(str(model)) if pid != p.pid} - {os.getpgid(0)}
    assert len(group_members(groups)) >= 3  # supervisor, MAX's API server, its workers
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=10)
    deadline = time.monotonic() + 30
    while group_members(groups) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not group_members(groups), "MAX (or one of its workers) survived kt's SIGKILL"
