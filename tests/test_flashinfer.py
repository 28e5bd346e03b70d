"""The `flashinfer` provider of `kt microbench` (pykernels/_flashinfer.py), on the CPU: it is
registered for rope and fused_rope_attention, skipped with its reason where FlashInfer cannot
run, kt's layouts map onto FlashInfer's, its RoPE arguments reproduce kt's frequencies, and
the gate refuses what FlashInfer computes where it is not kt's op (FA3's attention without
RoPE; plain RoPE on a Llama 3 case), so such output is never timed."""

import dataclasses
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pykernels
from harness.bench.engine import Settings, benchmark_families
from harness.bench.families import Family, load_bench_file
from harness.bench.gate import Gate
from harness.bench.providers import providers_of
from harness.spec import Unavailable
from pykernels._common import llama3_inv_freq
from pykernels._flashinfer import (PAGE_SIZE, attention_call, paged_layout, ragged_indptr,
                                   rope_call, to_pages, unavailable_reason)

REPO = Path(__file__).resolve().parents[1]
KERNELS = ("rope", "fused_rope_attention")
SETTINGS = Settings(warmup_ms=1, min_reps=3, max_reps=5, budget_s=0.05)


@pytest.mark.parametrize("kernel", KERNELS)
def test_registered_and_compiled_ahead_by_gpu_run(kernel):
    spec = pykernels.get(kernel)
    assert "flashinfer" in providers_of(spec)
    assert "flashinfer" in load_bench_file(spec).warm
    assert any(getattr(t, "provider", None) == "flashinfer" for t in spec.targets)


@pytest.mark.parametrize("kernel", KERNELS)
def test_skipped_with_its_reason_where_it_cannot_run(kernel):
    prepare = pykernels.get(kernel).providers["flashinfer"]
    with pytest.raises(Unavailable, match="n/a on cpu: FlashInfer runs on NVIDIA CUDA GPUs"):
        prepare("cpu", torch.bfloat16)
    assert "fp16 and bf16 only" in unavailable_reason("cuda:0", torch.float32)
    assert unavailable_reason("mps", torch.bfloat16).startswith("n/a on mps")


def test_without_flashinfer_the_reason_says_how_to_stage_it():
    try:
        import flashinfer  # noqa: F401
        pytest.skip("flashinfer is importable here")
    except ImportError:
        pass
    why = unavailable_reason("cuda:0", torch.bfloat16)
    assert why.startswith("n/a: flashinfer is not importable (ModuleNotFoundError")
    assert "flashinfer bundle" in why


@pytest.mark.parametrize("kernel,shape,params", [
    ("rope", {"B": 1, "S": 16, "Hk": 2, "group": 2, "D": 64}, {}),
    ("fused_rope_attention", {"B": 1, "Sq": 8, "cache": 8, "Hk": 1, "group": 2, "D": 32}, {}),
])
def test_microbench_row_is_na_with_the_reason_and_the_run_goes_on(kernel, shape, params):
    spec = pykernels.get(kernel)
    fam = Family("t", "", "cpu", "bfloat16", "memory", spec.axes[0].name,
                 [(spec.complete(shape), spec.full_params(params))])
    rec = benchmark_families(spec, "cpu", [fam], ["flashinfer", "torch_flash" if kernel !=
                                               "rope" else "torch_eager"], settings=SETTINGS)
    rows = {r["provider"]: r for r in rec["rows"]}
    assert rows["flashinfer"]["status"] == "n/a"
    assert "FlashInfer runs on NVIDIA CUDA GPUs only" in rows["flashinfer"]["note"]
    assert "p50" not in rows["flashinfer"]
    other = next(r for p, r in rows.items() if p != "flashinfer")
    assert other["status"] == "ok" and "p50" in other


def test_ragged_indptr_is_kt_batch_back_to_back():
    assert ragged_indptr(3, 5) == [0, 5, 10, 15]
    q = torch.randn(3, 5, 4, 8)
    flat, ptr = q.reshape(-1, 4, 8), ragged_indptr(3, 5)
    for b in range(3):
        assert torch.equal(flat[ptr[b]:ptr[b + 1]], q[b])


@pytest.mark.parametrize("kv_len", [1, 15, 16, 17, 48, 100])
def test_paged_layout_and_pages_rebuild_each_sequence(kv_len):
    b, h, d = 3, 2, 4
    k = torch.randn(b, kv_len, h, d)
    lay = paged_layout(b, kv_len, PAGE_SIZE)
    pages = to_pages(k, PAGE_SIZE)
    assert pages.shape == (b * lay.pages_per_seq, PAGE_SIZE, h, d)
    assert lay.indptr[-1] == len(lay.indices) and all(1 <= n <= PAGE_SIZE
                                                      for n in lay.last_page_len)
    if kv_len % PAGE_SIZE == 0:
        assert pages.data_ptr() == k.data_ptr()  # a view: nothing copied
    for s in range(b):  # what FlashInfer reads for sequence s: its pages, the last one partly
        ids = lay.indices[lay.indptr[s]:lay.indptr[s + 1]]
        seq = torch.cat([pages[i] for i in ids[:-1]] + [pages[ids[-1]][:lay.last_page_len[s]]])
        assert torch.equal(seq, k[s])


def test_paged_layout_rejects_empty_sequences():
    with pytest.raises(ValueError, match="must be >= 1"):
        paged_layout(2, 0, PAGE_SIZE)


def test_attention_call_decode_prefill_and_what_flashinfer_cannot_express():
    spec = pykernels.get("fused_rope_attention")
    llama3 = spec.full_params({"theta": 500000.0, "factor": 8.0, "causal": 1})
    plain = {**llama3, "factor": 1.0}
    dec = attention_call(1, llama3, 0.125)
    assert dec.decode and not dec.causal and dec.sm_scale == 0.125
    assert dec.rope_theta == 500000.0 and dec.rope_scale == 1.0
    assert "decode kernel" in dec.note and "no Llama 3 scaling" in dec.note
    assert "factor 8" in dec.note
    pre = attention_call(128, plain, 0.1)
    assert not pre.decode and pre.causal and "FA2" in pre.note
    assert "Llama 3" not in pre.note
    assert not attention_call(128, {**plain, "causal": 0}, 0.1).causal


def _flashinfer_inv_freq(dim: int, name: str, kw: dict) -> torch.Tensor:
    """FlashInfer's RoPE frequencies (include/flashinfer/pos_enc.cuh, in fp64 without its
    fast-math rounding): theta^(-2i/D) / rope_scale; the Llama 3.1 variant blends freq /
    rope_scale and freq by smooth = clamp(freq * L / (2 pi (high - low)) - low / (high - low),
    0, 1)."""
    freq = kw["rope_theta"] ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if name == "apply_rope_pos_ids":
        return freq / kw["rope_scale"]
    low, high = kw["low_freq_factor"], kw["high_freq_factor"]
    smooth = (freq * kw["old_context_len"] / (2 * math.pi * (high - low))
              - low / (high - low)).clamp(0.0, 1.0)
    return (1 - smooth) * freq / kw["rope_scale"] + smooth * freq


@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("theta,factor,low,high,ctx", [
    (10000.0, 1.0, 1.0, 4.0, 8192.0), (500000.0, 1.0, 1.0, 4.0, 8192.0),
    (500000.0, 8.0, 1.0, 4.0, 8192.0), (500000.0, 32.0, 1.0, 4.0, 8192.0),  # Llama 3.2
    (1000000.0, 4.0, 2.0, 8.0, 4096.0)])
def test_rope_arguments_reproduce_kt_frequencies(dim, theta, factor, low, high, ctx):
    params = {"theta": theta, "factor": factor, "low_freq_factor": low,
              "high_freq_factor": high, "original_max_position": ctx}
    name, kw = rope_call(params)
    assert name == ("apply_rope_pos_ids" if factor == 1.0 else "apply_llama31_rope_pos_ids")
    assert kw["interleave"] is False  # kt's half rotation, not interleaved pairs
    ours = llama3_inv_freq(dim, theta, factor, low, high, ctx, dtype=torch.float64)
    torch.testing.assert_close(_flashinfer_inv_freq(dim, name, kw), ours, rtol=1e-12, atol=0)


# --- the gate on what FlashInfer returns where it is not kt's op ---------------------------

def _attention(q, k, v, scale):
    """Causal (bottom-right) GQA attention of q, k, v as given: no RoPE at all, which is what
    FlashInfer's FA3 backend returned with pos_encoding_mode="ROPE_LLAMA"."""
    sq, skv, group = q.shape[1], k.shape[1], q.shape[2] // k.shape[2]
    qt, kt, vt = (x.transpose(1, 2).double() for x in (q, k, v))
    kt, vt = kt.repeat_interleave(group, 1), vt.repeat_interleave(group, 1)
    mask = torch.ones(sq, skv, dtype=torch.bool).tril(skv - sq)
    o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    return o.transpose(1, 2).to(q.dtype)


def _case(factor: float):
    spec = pykernels.get("fused_rope_attention")
    shape = spec.complete({"B": 1, "Sq": 16, "cache": 2032, "Hk": 2, "group": 2, "D": 64})
    params = spec.full_params({"causal": 1, "theta": 500000.0, "factor": factor})
    inputs = spec.make_inputs(shape, params, torch.bfloat16, torch.device("cpu"),
                              torch.Generator().manual_seed(0))
    return spec, shape, params, inputs


def test_gate_refuses_attention_without_rope_and_plain_rope_on_a_llama3_case():
    spec, shape, params, inputs = _case(8.0)
    gate = Gate(spec, shape, params, inputs)
    scale = 1 / math.sqrt(shape["D"])
    no_rope = _attention(inputs["q"], inputs["k"], inputs["v"], scale)
    assert not all(c.passed for c in gate.check((no_rope,)))
    plain = spec.reference(inputs, {**params, "factor": 1.0})
    assert not all(c.passed for c in gate.check(plain))
    assert all(c.passed for c in gate.check(spec.reference(inputs, params)))  # the control


def test_gate_accepts_plain_rope_on_a_plain_case():
    spec, shape, params, inputs = _case(1.0)
    assert all(c.passed for c in Gate(spec, shape, params, inputs).check(
        spec.reference(inputs, params)))


def test_attention_without_rope_is_a_wrong_row_never_timed():
    spec, shape, params, _ = _case(1.0)

    def fa3_like(device, dtype):
        def bind(inputs, p):
            return lambda: (_attention(inputs["q"], inputs["k"], inputs["v"],
                                       1 / math.sqrt(inputs["q"].shape[-1])),)
        return bind

    spec = dataclasses.replace(spec, providers={**spec.providers, "fa3_like": fa3_like})
    fam = Family("t", "", "cpu", "bfloat16", "compute", "Sq", [(shape, params)])
    rec = benchmark_families(spec, "cpu", [fam], ["fa3_like"], settings=SETTINGS)
    (row,) = rec["rows"]
    assert row["status"] == "WRONG" and not row["check"]["passed"]
    assert "p50" not in row and "samples_ms" not in row


@pytest.mark.skipif(not shutil.which("xz") or not shutil.which("split"), reason="needs xz and split")
def test_device_stage_unpacks_the_flashinfer_bundle_and_exports_its_path(tmp_path):
    """A `flashinfer` bundle packed as shared/offline-site.sh packs one (a folder
    site-flashinfer, tar | xz | split) becomes KT_FLASHINFER_PYTHONPATH, which gpu_run.sh and
    gpu_kernels.sh put on PYTHONPATH."""
    site = tmp_path / "work" / "site-flashinfer" / "flashinfer"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("__version__ = '0.7.2.post1'\n")
    (tmp_path / ".stage").mkdir()
    subprocess.run(f"tar -C {tmp_path / 'work'} -cf - site-flashinfer | xz -1 -T1 | "
                   f"split -b 1M -d - {tmp_path / '.stage' / 'flashinfer.part'}", shell=True,
                   check=True)
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "device-stage.sh", tmp_path / "scripts")
    env = dict(os.environ, STAGE=str(tmp_path / "stage"), SITES=str(tmp_path / "sites"))
    r = subprocess.run(["bash", "scripts/device-stage.sh", "max=3", "flashinfer=1"],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    exports = dict(line.removeprefix("export ").split("=", 1) for line in r.stdout.splitlines())
    path = tmp_path / "sites" / "site-flashinfer"
    assert exports["KT_FLASHINFER_PYTHONPATH"] == str(path)
    assert exports["KT_STAGE_READY"] == '"flashinfer"'  # MAX's parts are missing
    assert (path / "flashinfer" / "__init__.py").read_text().startswith("__version__")
    for script in ("gpu_run.sh", "gpu_kernels.sh"):
        assert "KT_FLASHINFER_PYTHONPATH" in (REPO / "benchmarks" / script).read_text()
