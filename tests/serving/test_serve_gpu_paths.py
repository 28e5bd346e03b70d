"""The GPU-only paths that can be checked without a GPU: per-process GPU memory attribution (a
stand-in nvidia-smi), sharded random weights, prompts per load point, and --startup concurrent
(two stand-in engines started at once, each measured while the other sits idle)."""

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.serving import client, model
from harness.serving.config import BenchConfig, prompts_for
from harness.serving.gpumem import GpuMonitor, parse_compute_apps

REPO = Path(__file__).resolve().parents[2]


def fake_smi(tmp_path: Path, apps: str, used: str) -> Path:
    (tmp_path / "apps.csv").write_text(apps)
    (tmp_path / "gpu.csv").write_text(used)
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"""#!/bin/sh
case "$1" in
  --query-compute-apps=*) cat {tmp_path}/apps.csv ;;
  --query-gpu=*) cat {tmp_path}/gpu.csv ;;
esac
""")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    return smi


@pytest.fixture
def engine_group():
    """A stand-in server: a process group of two processes, as kt starts servers."""
    p = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                          "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                          "print(c.pid, flush=True); time.sleep(60)"],
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
    child = int(p.stdout.readline())
    yield p.pid, child
    os.killpg(p.pid, 9)
    p.wait()


def test_memory_is_attributed_per_process_group(tmp_path, engine_group):
    leader, child = engine_group
    other = os.getpid()  # a process of someone else that also holds GPU memory
    smi = fake_smi(tmp_path, f"{leader}, 1000\n{child}, 30000\n{other}, 50000\n", "0, 81000\n")
    mon = GpuMonitor(smi=str(smi))
    mon.register("vllm", leader)
    mon.register("max", 999999)
    t0 = time.monotonic()
    mon.sample_once()
    (tmp_path / "apps.csv").write_text(f"{leader}, 1000\n{child}, 40000\n{other}, 50000\n")
    mon.sample_once()
    v = mon.peak("vllm", t0)
    assert v["peak_mib"] == 41000 and v["attribution"].startswith("per process")
    assert v["device_peak_used_mib"] == 81000
    assert mon.peak("max", t0)["peak_mib"] == 0  # listed nowhere: holds nothing


def test_memory_falls_back_to_the_device_total_and_says_so(tmp_path, engine_group):
    leader, _ = engine_group
    smi = fake_smi(tmp_path, "4000001, 30000\n", "0, 31000\n1, 500\n")  # ids from another PID namespace
    mon = GpuMonitor(smi=str(smi))
    mon.register("vllm", leader)
    t0 = time.monotonic()
    mon.sample_once()
    v = mon.peak("vllm", t0)
    assert v["peak_mib"] is None and v["device_peak_used_mib"] == 31500 and "device total" in v["attribution"]
    assert parse_compute_apps("[N/A], [N/A]\n12, 7\n12, 3\n") == {12: 10.0}
    assert GpuMonitor(smi=None).peak("x", 0)["peak_mib"] is None


def test_sharded_weights_equal_one_file(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    one = model.make_model("tiny", tmp_path / "one", seed=5)
    monkeypatch.setattr(model, "SHARD_BYTES", 3_000_000)
    many = model.make_model("tiny", tmp_path / "many", seed=5)
    index = json.loads((many / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (many / "model.safetensors").exists()
    merged = {}
    for f in files:
        merged |= load_file(str(many / f))
    ref = load_file(str(one / "model.safetensors"))
    assert merged.keys() == ref.keys() and all((merged[k] == ref[k]).all() for k in ref)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ref.values())
    assert json.loads((many / "kt_model.json").read_text())["weight_files"] == files
    for f in many.iterdir():
        assert f.stat().st_mode & stat.S_IRGRP


def test_prompts_per_load_point():
    cfg = BenchConfig(model=Path("."), runs=[], out=Path("."), num_prompts=16, prompts_per_load=4)
    assert prompts_for(cfg, client.LoadPoint(max_concurrency=1)) == 20
    assert prompts_for(cfg, client.LoadPoint(max_concurrency=128)) == 16 + 512
    assert prompts_for(cfg, client.LoadPoint(request_rate=2.5)) == 16 + 10


def test_concurrent_startup_is_recorded_in_every_row(tmp_path, tiny_model, fake_python):
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "harness.serving", "serve-bench", "--model", str(tiny_model),
                        "--engines", "max,vllm", "--python", f"max={fake_python}", "--python", f"vllm={fake_python}",
                        "--startup", "concurrent", "--dataset", "random,sonnet", "--input-len", "64",
                        "--num-prompts", "2", "--prompts-per-load", "1", "--max-concurrency", "1,2",
                        "--request-rate", "50", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, FAKE_START_DELAY="1.5", FAKE_TOKEN_DELAY="0.002"))
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (out / "max").glob("*.json"))
    assert names == sorted([f"{d}_{p}.json" for d in ("random", "sonnet") for p in ("c1", "c2", "r50")] + ["probe.json"])
    first, second = (json.loads((out / e / "random_c1.json").read_text()) for e in ("max", "vllm"))
    for row, other in ((first, "vllm"), (second, "max")):
        st = row["startup"]
        assert st["mode"] == "concurrent" and st["started_with"] == [other]
        assert st["cold_start_s"] >= 1.5
    assert first["idle_engines_during_load"] == ["vllm"]  # measured while vllm sat idle
    assert second["idle_engines_during_load"] == []  # max was stopped once measured
    r50 = json.loads((out / "vllm" / "sonnet_r50.json").read_text())
    assert r50["request_rate"] == 50 and r50["max_concurrency"] is None and r50["num_prompts"] == 2 + 50
    assert json.loads((out / "vllm" / "random_c2.json").read_text())["num_prompts"] == 4
    assert second["settings"]["prefix_caching"] is False and second["tensor_parallel"] == 1
    engines = {e["label"]: e for e in json.loads((out / "run.json").read_text())["engines"]}
    assert engines["max"]["idle_engines_during_load"] == ["vllm"] and engines["vllm"]["idle_engines_during_load"] == []
    report = (out / "report.md").read_text()
    assert "**concurrent**" in report and "Ratios to vllm" in report
    for f in ("throughput_random.png", "throughput_sonnet.png"):
        assert (out / f).exists()


def test_a_failed_concurrent_start_is_retried_alone(tmp_path, tiny_model, fake_python):
    flaky = tmp_path / "flaky" / "python"  # fails its first start, serves on the second
    flaky.parent.mkdir()
    flaky.write_text(f'#!/bin/sh\nif [ "$1" = -c ]; then exec "{fake_python}" "$@"; fi\n'
                     f'if [ ! -e {tmp_path}/tried ]; then touch {tmp_path}/tried; echo "CUDA out of memory" >&2; exit 1; fi\n'
                     f'exec "{fake_python}" "$@"\n')
    flaky.chmod(0o755)
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "harness.serving", "serve-bench", "--model", str(tiny_model),
                        "--engines", "max,vllm", "--python", f"max={fake_python}", "--python", f"vllm={flaky}",
                        "--startup", "concurrent", "--num-prompts", "2", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    v = json.loads((out / "vllm" / "c1.json").read_text())["startup"]
    assert v["mode"] == "serial (retry)" and v["started_with"] == []
    assert "concurrent start failed" in v["note"]
    m = json.loads((out / "max" / "c1.json").read_text())["startup"]
    assert m["mode"] == "concurrent"


def test_agreement_falls_back_to_greedy_texts_without_logprobs(tmp_path, tiny_model, fake_python):
    """MAX Serve on a GPU turns on its overlap scheduler, which refuses logprobs (HTTP 400): the
    agreement check then compares greedy completions as text, and says so."""
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "harness.serving", "serve-bench", "--model", str(tiny_model),
                        "--engines", "max,max+kt", "--python", f"max={fake_python}", "--num-prompts", "1",
                        "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, FAKE_NO_LOGPROBS="1"))
    assert r.returncode == 0, r.stderr
    check = json.loads((out / "agreement.json").read_text())["max+kt vs max"]
    assert check["ok"] and check["mode"].startswith("greedy text") and check["identical"] == 4
    probe = json.loads((out / "max" / "probe.json").read_text())
    assert "steps" not in probe and len(probe["texts"]) == 4 and "overlap" in probe["logprobs_refused"]
    from harness.serving import agreement

    bad = agreement.compare_texts([" a b c", " d e"], [" a b x", " d e"])
    assert not bad.ok and bad.identical == 1 and "character 5" in bad.mismatches[0]


def test_gpu_run_with_a_stand_in_nvidia_smi(tmp_path, tiny_model, fake_python):
    """--device gpu end to end with a stand-in nvidia-smi that reports the engine's server as a
    GPU process holding 1234 MiB: the GPU is recorded, the memory is attributed to the engine, and
    vLLM's KV cache is sized from the GPU's memory and the model's weights."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    smi = bindir / "nvidia-smi"
    smi.write_text("""#!/bin/sh
case "$1" in
  --query-compute-apps=*) for p in $(pgrep -f fake_openai_server.py); do echo "$p, 1234"; done ;;
  --query-gpu=index,name,*) echo "0, NVIDIA H200, 580.159.03, 143771" ;;
  --query-gpu=*) echo "0, 5000" ;;
esac
""")
    smi.chmod(0o755)
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "harness.serving", "serve-bench", "--model", str(tiny_model),
                        "--engines", "vllm", "--python", f"vllm={fake_python}", "--device", "gpu",
                        "--kv-cache-memory", "0.28", "--cost-per-hour", "3.5", "--num-prompts", "4", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", FAKE_TOKEN_DELAY="0.05"))
    assert r.returncode == 0, r.stderr
    row = json.loads((out / "vllm" / "c1.json").read_text())
    assert row["provenance"]["gpus"][0]["name"] == "NVIDIA H200"
    weights = sum(p.stat().st_size for p in tiny_model.glob("*.safetensors"))
    assert f"--kv-cache-memory-bytes {int(0.28 * 143771 * 2**20 - weights)}" in row["provenance"]["server_command"]
    assert row["gpu_memory"]["attribution"].startswith("per process") and row["gpu_peak_memory_mib"] == 1234
    assert row["cost_per_1m_output_tokens_usd"] == pytest.approx(3.5 / (row["output_throughput"] * 3600) * 1e6)
    run = json.loads((out / "run.json").read_text())
    assert run["engines"][0]["gpu_memory"]["peak_mib"] == 1234
