"""The `flashinfer` provider of `kt microbench` (pykernels/_flashinfer.py), on the CPU: it is
registered for rope, fused_rope_attention and paged_rope_attention, skipped with its reason
where FlashInfer cannot run, kt's layouts (and MAX's paged cache tables) map onto FlashInfer's,
its RoPE arguments reproduce kt's frequencies, and the gate refuses what FlashInfer computes
where it is not kt's op (FA3's attention without RoPE; plain RoPE on a Llama 3 case), so such
output is never timed. The paged provider's calls run against a stand-in for FlashInfer's
paged wrappers written from their documented contract (no FlashInfer on the CPU)."""

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
from harness.bench.families import Family, load_bench_file, warm_jobs
from harness.bench.gate import Gate
from harness.bench.providers import providers_of
from harness.spec import Unavailable
from pykernels._common import llama3_inv_freq
import pykernels._flashinfer as fi
import pykernels._paged_kv as pkv
from pykernels._flashinfer import (PAGE_SIZE, PAGED_NOTE, attention_call, paged_index,
                                   paged_layout, ragged_indptr, rope_call, to_pages,
                                   unavailable_reason)

REPO = Path(__file__).resolve().parents[1]
KERNELS = ("rope", "fused_rope_attention")
PAGED = pykernels.get("paged_rope_attention")
SETTINGS = Settings(warmup_ms=1, min_reps=3, max_reps=5, budget_s=0.05)


@pytest.mark.parametrize("kernel", KERNELS)
def test_registered_and_compiled_ahead_by_gpu_run(kernel):
    spec = pykernels.get(kernel)
    assert "flashinfer" in providers_of(spec)
    assert "flashinfer" in load_bench_file(spec).warm
    assert any(getattr(t, "provider", None) == "flashinfer" for t in spec.targets)


def test_paged_registered_and_each_kernel_variant_compiled_ahead_by_gpu_run():
    """One phase-1 job per JIT module: decode per head dim, the prefill (FA3 on Hopper)."""
    assert "flashinfer" in providers_of(PAGED)
    jobs = [j for j in warm_jobs(PAGED, load_bench_file(PAGED), "gpu") if j[0] == "flashinfer"]
    assert ["flashinfer", "--where", "D=128", "--where", "S=1"] in jobs
    assert ["flashinfer", "--where", "D=64", "--where", "S=1"] in jobs
    assert any("S=1" not in j for j in jobs)


@pytest.mark.parametrize("kernel", KERNELS + ("paged_rope_attention",))
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


def test_paged_microbench_row_is_na_with_the_reason():
    shape = PAGED.complete({"B": 2, "S": 3, "C": 20, "R": 1, "page": 16, "L": 1, "Hk": 1,
                            "group": 2, "D": 32})
    fam = Family("t", "", "cpu", "bfloat16", "memory", "C", [(shape, PAGED.full_params({}))])
    (row,) = benchmark_families(PAGED, "cpu", [fam], ["flashinfer"], settings=SETTINGS)["rows"]
    assert row["status"] == "n/a" and "p50" not in row
    assert row["note"] == "n/a on cpu: FlashInfer runs on NVIDIA CUDA GPUs only"


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


# --- paged_rope_attention: MAX's paged cache as FlashInfer's ---------------------------------

def _u32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).to(torch.uint32)


def test_paged_index_by_hand():
    """Pages of 4 tokens; sequence 0 ends on a page boundary (5 cached + 3 new = 8), 1 is a
    prefill into an empty cache (6 new), 2 and 3 decode one token (after 9 and after 3, the
    latter filling its only page). Table entries past a sequence's pages (0, MAX's null page,
    or a stale id) are not FlashInfer's."""
    idx = paged_index(cache_lengths=_u32([5, 0, 9, 3]),
                      lookup_table=_u32([[7, 2, 0, 0], [5, 1, 0, 0], [3, 8, 6, 0], [4, 9, 9, 9]]),
                      row_offsets=_u32([0, 3, 9, 10, 11]), page_size=4)
    assert idx.qo_indptr.tolist() == [0, 3, 9, 10, 11]
    assert idx.kv_indptr.tolist() == [0, 2, 4, 7, 8]
    assert idx.kv_indices.tolist() == [7, 2, 5, 1, 3, 8, 6, 4]
    assert idx.kv_last_page_len.tolist() == [4, 2, 2, 4]
    assert idx.positions.tolist() == [5, 6, 7, 0, 1, 2, 3, 4, 5, 9, 3]
    assert all(t.dtype == torch.int32 for t in (idx.qo_indptr, idx.kv_indptr, idx.kv_indices,
                                                 idx.kv_last_page_len))
    assert not idx.decode


def test_paged_index_one_token_decode_and_an_empty_sequence():
    idx = paged_index(_u32([0, 16, 17]), _u32([[3, 0], [1, 2], [5, 4]]), _u32([0, 1, 2, 3]), 16)
    assert idx.decode
    assert idx.qo_indptr.tolist() == [0, 1, 2, 3] and idx.positions.tolist() == [0, 16, 17]
    assert idx.kv_indptr.tolist() == [0, 1, 3, 5] and idx.kv_indices.tolist() == [3, 1, 2, 5, 4]
    assert idx.kv_last_page_len.tolist() == [1, 1, 2]
    none = paged_index(_u32([0]), _u32([[0]]), _u32([0, 0]), 16)  # no cache, no new token
    assert none.kv_indptr.tolist() == [0, 0] and none.kv_last_page_len.tolist() == [0]
    assert none.kv_indices.numel() == 0 and not none.decode


def test_paged_index_refuses_a_table_too_short():
    with pytest.raises(ValueError, match="needs 3 pages"):
        paged_index(_u32([8]), _u32([[1, 2]]), _u32([0, 1]), 4)


PAGED_SHAPES = [
    {"B": 3, "S": 12, "C": 40, "R": 5, "page": 3, "L": 1, "Hk": 2, "group": 3, "D": 32},
    {"B": 2, "S": 1, "C": 128, "R": 0, "page": 128, "L": 1, "Hk": 2, "group": 4, "D": 16},
    {"B": 4, "S": 30, "C": 7, "R": 11, "page": 1, "L": 1, "Hk": 1, "group": 8, "D": 16},
    {"B": 2, "S": 40, "C": 0, "R": 9, "page": 16, "L": 1, "Hk": 2, "group": 2, "D": 16},
]


@pytest.mark.parametrize("free", PAGED_SHAPES, ids=lambda f: "x".join(map(str, f.values())))
def test_paged_index_reads_each_sequence_from_the_cache_as_the_reference_does(free):
    """Through FlashInfer's indices, the (pages, 2, page, Hk, D) view of MAX's blocks yields
    each sequence's keys and values exactly as `_paged_kv.gather` (the reference's read)."""
    shape = PAGED.complete(free)
    inputs = PAGED.make_inputs(shape, PAGED.full_params({}), torch.float32, torch.device("cpu"),
                               torch.Generator().manual_seed(0))
    idx = paged_index(inputs["cache_lengths"], inputs["lookup_table"], inputs["row_offsets"],
                      shape["page"])
    cache = inputs["blocks"].select(2, 0)
    assert cache.is_contiguous() and cache.shape == (shape["P"], 2, shape["page"], shape["Hk"],
                                                     shape["D"])
    for b, (first, n, cached) in enumerate(pkv.sequences(inputs)):
        pages = idx.kv_indices[idx.kv_indptr[b]:idx.kv_indptr[b + 1]].long()
        kv = cache[pages].transpose(0, 1).reshape(2, -1, shape["Hk"], shape["D"])
        kv = kv[:, :len(pages) * shape["page"] - shape["page"] + int(idx.kv_last_page_len[b])]
        k, v = pkv.gather(inputs, b, 0, cached + n)
        assert torch.equal(kv[0], k) and torch.equal(kv[1], v)  # no NaN: no unused slot read
        assert idx.qo_indptr[b] == first and idx.positions[first:first + n].tolist() == \
            list(range(cached, cached + n))
    assert idx.decode == (free["S"] == 1)


class _FakeFlashInfer:
    """FlashInfer's paged wrappers as documented (flashinfer/decode.py, prefill.py at 0.6.18;
    the module docstring of pykernels/_flashinfer.py), computed plainly in fp32: sequence b's
    queries are rows qo_indptr[b].., its keys the first kv_len slots of its pages, query i of
    qo_len sees keys j <= kv_len - qo_len + i when causal, q head h reads kv head h // group.
    Strict about what the provider must pass; records each plan."""

    __version__ = "0.0.fake"
    plans: list
    fail_auto = False

    def __init__(self):
        self.plans = []
        fake = self

        class _Wrapper:
            def __init__(self, workspace, kv_layout, use_tensor_cores=False, backend="auto"):
                assert kv_layout == "NHD" and workspace.dtype == torch.uint8
                self.use_tensor_cores, self._backend = use_tensor_cores, backend

            def _plan(self, qo_indptr, indptr, indices, last, hq, hk, d, page, causal, **kw):
                for t in (qo_indptr, indptr, indices, last):
                    assert t.dtype == torch.int32 and t.dim() == 1
                assert kw["pos_encoding_mode"] == "NONE" and kw["q_data_type"] == kw["kv_data_type"]
                if self._backend == "auto" and fake.fail_auto:
                    raise RuntimeError("nvcc: FA3 module failed to build\nmore")
                self._backend = "fa3" if self._backend == "auto" else self._backend
                self.args = (qo_indptr, indptr, indices, last, hq, hk, d, page, causal,
                             kw["sm_scale"])
                fake.plans.append((type(self).__name__, self._backend, self.use_tensor_cores,
                                   causal))

            def run(self, q, paged_kv_cache):
                qo_indptr, indptr, indices, last, hq, hk, d, page, causal, scale = self.args
                k_cache, v_cache = paged_kv_cache.unbind(1)
                assert k_cache.shape[1:] == (page, hk, d) and q.shape[1:] == (hq, d)
                o = torch.empty_like(q)
                for b in range(len(indptr) - 1):
                    pages = indices[indptr[b]:indptr[b + 1]].long()
                    kv_len = (len(pages) - 1) * page + int(last[b])
                    k = k_cache[pages].reshape(-1, hk, d)[:kv_len].float()
                    v = v_cache[pages].reshape(-1, hk, d)[:kv_len].float()
                    rows = slice(int(qo_indptr[b]), int(qo_indptr[b + 1]))
                    qb = q[rows].float()
                    heads = torch.arange(hq) // (hq // hk)
                    s = torch.einsum("qhd,khd->hqk", qb, k[:, heads]) * scale
                    if causal:
                        i, j = torch.arange(len(qb))[:, None], torch.arange(kv_len)[None, :]
                        s = s.masked_fill(j > kv_len - len(qb) + i, float("-inf"))
                    o[rows] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v[:, heads]).to(q.dtype)
                return o

        class BatchDecodeWithPagedKVCacheWrapper(_Wrapper):
            def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim,
                     page_size, **kw):
                batch = torch.arange(len(indptr), dtype=torch.int32)
                self._plan(batch, indptr, indices, last_page_len, num_qo_heads, num_kv_heads,
                           head_dim, page_size, False, **kw)

        class BatchPrefillWithPagedKVCacheWrapper(_Wrapper):
            def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len,
                     num_qo_heads, num_kv_heads, head_dim_qk, page_size, causal=False, **kw):
                self._plan(qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len,
                           num_qo_heads, num_kv_heads, head_dim_qk, page_size, causal, **kw)

        self.BatchDecodeWithPagedKVCacheWrapper = BatchDecodeWithPagedKVCacheWrapper
        self.BatchPrefillWithPagedKVCacheWrapper = BatchPrefillWithPagedKVCacheWrapper


def _paged_rows(monkeypatch, fake, free_shapes, params=None):
    monkeypatch.setattr(fi, "_flashinfer", lambda device, dtype: fake)
    cases = [(PAGED.complete(f), PAGED.full_params(params or {})) for f in free_shapes]
    fam = Family("t", "", "cpu", "bfloat16", "compute", "S", cases)
    return benchmark_families(PAGED, "cpu", [fam], ["flashinfer"], settings=SETTINGS)["rows"]


def test_paged_provider_passes_the_gate_on_decode_and_prefill(monkeypatch):
    """Queries rotated outside, attention alone: the op's function (ragged prefill after a
    prefix, an empty cache, pages of 1 and 3, decode ending on a page boundary), checked and
    timed; decode on the tensor-core decode wrapper (FA2), prefill causal on FlashInfer's
    backend choice."""
    fake = _FakeFlashInfer()
    shapes = PAGED_SHAPES + [{"B": 3, "S": 1, "C": 31, "R": 0, "page": 16, "L": 1, "Hk": 2,
                              "group": 4, "D": 64}]
    rows = _paged_rows(monkeypatch, fake, shapes)
    for row in rows:
        assert row["status"] == "ok" and row["check"]["passed"] and "p50" in row, row
        # a loaded CPU may add its own "timings disagree: ..." after it: not what this checks
        note = row["note"].removesuffix(f"; {row.get('timings_note')}")
        assert note.endswith(f"; {PAGED_NOTE}; flashinfer 0.0.fake"), row["note"]
    decode = [r for r, f in zip(rows, shapes) if f["S"] == 1]
    assert all(r["note"].startswith("FlashInfer batch decode (tensor cores, FA2)") for r in decode)
    assert "FlashInfer FA3 batch prefill, causal, paged KV (page 3)" in rows[0]["note"]
    assert ("BatchDecodeWithPagedKVCacheWrapper", "fa2", True, False) in fake.plans
    assert ("BatchPrefillWithPagedKVCacheWrapper", "fa3", False, True) in fake.plans


def test_paged_provider_rotates_the_queries_it_is_checked_on(monkeypatch):
    """Attention on unrotated queries (FlashInfer alone, nothing done outside) is WRONG: the
    gate is what makes the row the op's."""
    monkeypatch.setattr(fi, "rotated_queries", lambda q, positions, params: q.contiguous())
    (row,) = _paged_rows(monkeypatch, _FakeFlashInfer(), PAGED_SHAPES[:1])
    assert row["status"] == "WRONG" and "p50" not in row


def test_paged_provider_falls_back_to_fa2_once_its_backend_choice_fails(monkeypatch):
    fake = _FakeFlashInfer()
    fake.fail_auto = True
    rows = _paged_rows(monkeypatch, fake, [PAGED_SHAPES[0], PAGED_SHAPES[3]])
    assert all(r["status"] == "ok" for r in rows)
    assert all("FlashInfer FA2 batch prefill, causal (its own choice failed to plan: "
               "RuntimeError: nvcc: FA3 module failed to build)" in r["note"] for r in rows)
    assert [p[1] for p in fake.plans] == ["fa2", "fa2"]  # the choice is not retried


def test_paged_provider_is_na_on_a_multi_layer_cache(monkeypatch):
    free = {**PAGED_SHAPES[0], "L": 3}
    (row,) = _paged_rows(monkeypatch, _FakeFlashInfer(), [free], {"layer": 1})
    assert row["status"] == "n/a" and "a cache of 3 layers" in row["note"]
