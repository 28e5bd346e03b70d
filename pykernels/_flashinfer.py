"""FlashInfer as a `kt microbench` provider: its attention kernels with RoPE applied inside
(`pos_encoding_mode="ROPE_LLAMA"`) for `fused_rope_attention`, its standalone RoPE for `rope`.

What this mapping relies on, read in flashinfer-python 0.7.2.post1 (its wheel: flashinfer/
prefill.py, decode.py, rope.py, utils.py and the JIT sources data/include/flashinfer/pos_enc.cuh,
attention/prefill.cuh, attention/decode.cuh; the same in flashinfer-ai/flashinfer at 0.6.18):
- Tensors are NHD, tokens first: q (tokens, Hq, D), k and v (tokens, Hk, D); a batch is
  ragged, sequence b holding rows indptr[b]..indptr[b+1] (int32). kt's (B, S, H, D) is that
  with indptr = 0, S, 2S, .. and no copy. A paged KV cache is (pages, page_size, Hk, D) per
  tensor, sequence b owning pages indices[indptr[b]:indptr[b+1]], the last holding
  last_page_len tokens. GQA: query head h reads kv head h // (Hq / Hk). fp16 and bf16 only.
- ROPE_LLAMA rotates the two halves of the head (kt's and HF's layout) by angles
  pos * theta^(-2i/D) / rope_scale: plain RoPE with linear position scaling, no Llama 3
  frequency bands. The prefill kernel rotates query i at position kv_len - qo_len + i and
  key j at j, and its causal mask is bottom-right aligned, as kt's op; the decode kernel
  rotates its query at kv_len - 1. Angles come from fast-math `__powf` and `__sincosf`.
- Its FA3 (Hopper) prefill backend takes `pos_encoding_mode` and returns attention without
  RoPE (FlashInfer 0.7.2.post1 on the H200): the gate finds that WRONG. This provider asks
  for the FA2 backend, and for the CUDA-core decode kernel (`use_tensor_cores=False`,
  `backend="fa2"`: with tensor cores decode goes through the prefill kernels and their
  backend choice, and "auto" may route decode to cuDNN, on Blackwell, without RoPE only).
- `apply_rope_pos_ids` (plain) and `apply_llama31_rope_pos_ids` (Llama 3.1 bands: smooth =
  (L / wavelen - low) / (high - low) clamped to [0, 1], blending freq / rope_scale with
  freq: HF's formula) take q (nnz, Hq, D), k (nnz, Hk, D) and one int32 or int64 position
  per token, and return new tensors; `interleave=False` is the half rotation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from harness.spec import Bound, Params, Tensors, Unavailable
from pykernels._common import f32

# The paged KV cache of the decode rows: vLLM's default block size.
PAGE_SIZE = 16
# FlashInfer's recommended float workspace (split-KV partial results).
WORKSPACE_BYTES = 128 << 20


def unavailable_reason(device: str, dtype: torch.dtype) -> str | None:
    """Why FlashInfer cannot run on torch device `device` in `dtype`, or None: it needs an
    NVIDIA CUDA device, fp16 or bf16, and an importable `flashinfer` (staged on the GPU
    machine as the `flashinfer` bundle: benchmarks/README.md)."""
    if not device.startswith("cuda") or torch.version.hip is not None:
        where = "ROCm" if torch.version.hip is not None else device
        return f"n/a on {where}: FlashInfer runs on NVIDIA CUDA GPUs only"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"n/a in {str(dtype).removeprefix('torch.')}: FlashInfer takes fp16 and bf16 only"
    try:
        import flashinfer  # noqa: F401
    except Exception as e:  # ImportError, or a broken install failing at import
        first = (str(e).splitlines() or [""])[0][:160]
        return (f"n/a: flashinfer is not importable ({type(e).__name__}: {first}); stage the "
                "flashinfer bundle (benchmarks/README.md)")
    return None


def _flashinfer(device: str, dtype: torch.dtype):
    why = unavailable_reason(device, dtype)
    if why:
        raise Unavailable(why)
    import flashinfer

    return flashinfer


def ragged_indptr(batch: int, length: int) -> list[int]:
    """indptr of `batch` sequences of `length` tokens each, stored back to back."""
    return [b * length for b in range(batch + 1)]


@dataclass(frozen=True)
class PagedLayout:
    """A paged KV cache of `batch` sequences of `kv_len` tokens, each sequence in its own
    run of `pages_per_seq` consecutive pages (FlashInfer's indptr, indices, last_page_len)."""

    page_size: int
    pages_per_seq: int
    indptr: list[int]
    indices: list[int]
    last_page_len: list[int]


def paged_layout(batch: int, kv_len: int, page_size: int) -> PagedLayout:
    if batch < 1 or kv_len < 1 or page_size < 1:
        raise ValueError(f"batch, kv_len and page_size must be >= 1, got {batch}, {kv_len}, "
                         f"{page_size}")
    per = -(-kv_len // page_size)
    return PagedLayout(page_size, per, [b * per for b in range(batch + 1)],
                       list(range(batch * per)), [kv_len - (per - 1) * page_size] * batch)


def to_pages(x: torch.Tensor, page_size: int) -> torch.Tensor:
    """kt's (B, S, H, D) as (B * ceil(S / P), P, H, D) pages in `paged_layout`'s order: a view
    when P divides S, else a copy with the last page of each sequence zero-padded."""
    b, s, h, d = x.shape
    per = -(-s // page_size)
    if per * page_size != s:
        x = F.pad(x, (0, 0, 0, 0, 0, per * page_size - s))
    return x.reshape(b * per, page_size, h, d)


@dataclass(frozen=True)
class AttentionCall:
    """FlashInfer's arguments for one fused_rope_attention case."""

    decode: bool  # one query per sequence: the decode kernel over a paged cache
    causal: bool
    sm_scale: float
    rope_theta: float
    rope_scale: float
    note: str


def attention_call(sq: int, params: Params, sm_scale: float) -> AttentionCall:
    """The call for `sq` queries per sequence under the spec's `params`. FlashInfer's fused
    RoPE is plain (rope_scale 1): where the case asks for Llama 3 scaling (factor != 1) the
    note says so and the correctness gate decides."""
    decode = sq == 1
    theta, factor = f32(params["theta"]), f32(params["factor"])
    note = ("FlashInfer decode kernel (CUDA cores), paged KV, page size "
            f"{PAGE_SIZE}" if decode else "FlashInfer FA2 batch prefill, ragged KV")
    note += f", RoPE inside (ROPE_LLAMA, theta {theta:g})"
    if factor != 1.0:
        note += (f"; plain RoPE only: FlashInfer's fused RoPE has no Llama 3 scaling, this "
                 f"case asks factor {factor:g}")
    return AttentionCall(decode, bool(params["causal"]) and not decode, sm_scale, theta, 1.0,
                         note)


def _i32(values: list[int], device: str) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def attention_provider(softmax_scale):
    """`prepare(device, dtype)` of fused_rope_attention's `flashinfer` provider;
    `softmax_scale(params, D)` is the spec's logit scale. The timed call is the wrapper's
    `run` (planned at bind time, as a serving engine plans once per batch for all layers)."""

    def prepare(device: str, dtype: torch.dtype):
        flashinfer = _flashinfer(device, dtype)
        version = getattr(flashinfer, "__version__", "?")
        workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)

        def bind(inputs: Tensors, params: Params) -> Bound:
            q, k, v = inputs["q"], inputs["k"], inputs["v"]
            b, sq, hq, d = q.shape
            skv, hk = k.shape[1], k.shape[2]
            call = attention_call(sq, params, softmax_scale(params, d))
            rope = dict(pos_encoding_mode="ROPE_LLAMA", sm_scale=call.sm_scale,
                        rope_scale=call.rope_scale, rope_theta=call.rope_theta)
            note = f"{call.note}; flashinfer {version}"
            if call.decode:
                lay = paged_layout(b, skv, PAGE_SIZE)
                cache = (to_pages(k, PAGE_SIZE), to_pages(v, PAGE_SIZE))
                w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    workspace, "NHD", use_tensor_cores=False, backend="fa2")
                w.plan(_i32(lay.indptr, device), _i32(lay.indices, device),
                       _i32(lay.last_page_len, device), hq, hk, d, PAGE_SIZE,
                       q_data_type=dtype, kv_data_type=dtype, **rope)
                q3 = q.reshape(b, hq, d)
                return Bound(lambda: w.run(q3, cache), lambda o: (o.reshape(q.shape),),
                             note=note)
            w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD", backend="fa2")
            w.plan(_i32(ragged_indptr(b, sq), device), _i32(ragged_indptr(b, skv), device),
                   hq, hk, d, causal=call.causal, q_data_type=dtype, kv_data_type=dtype, **rope)
            q3, k3, v3 = (x.reshape(-1, x.shape[2], d) for x in (q, k, v))
            return Bound(lambda: w.run(q3, k3, v3), lambda o: (o.reshape(q.shape),), note=note)

        return bind

    return prepare


def rope_call(params: Params) -> tuple[str, dict]:
    """FlashInfer's standalone RoPE for kt's rope params: the function's name and its keyword
    arguments (half rotation; plain RoPE at factor 1, else Llama 3.1 scaling)."""
    theta, factor = f32(params["theta"]), f32(params["factor"])
    if factor == 1.0:
        return "apply_rope_pos_ids", {"interleave": False, "rope_scale": 1.0,
                                      "rope_theta": theta}
    return "apply_llama31_rope_pos_ids", {
        "interleave": False, "rope_scale": factor, "rope_theta": theta,
        "low_freq_factor": f32(params["low_freq_factor"]),
        "high_freq_factor": f32(params["high_freq_factor"]),
        "old_context_len": f32(params["original_max_position"])}


def rope_provider(device: str, dtype: torch.dtype):
    """`prepare(device, dtype)` of rope's `flashinfer` provider: q and k as (B*S, H, D) views
    and the per-token positions (int64) straight from kt's inputs."""
    flashinfer = _flashinfer(device, dtype)
    version = getattr(flashinfer, "__version__", "?")

    def bind(inputs: Tensors, params: Params) -> Bound:
        q, k, pos = inputs["q"], inputs["k"], inputs["positions"]
        b, s, hq, d = q.shape
        name, kw = rope_call(params)
        fn = getattr(flashinfer, name)
        q3, k3 = q.reshape(b * s, hq, d), k.reshape(b * s, k.shape[2], d)
        pos_ids = pos.reshape(-1).contiguous()
        return Bound(lambda: fn(q3, k3, pos_ids, **kw),
                     lambda r: (r[0].reshape(q.shape), r[1].reshape(k.shape)),
                     note=f"FlashInfer {name}; flashinfer {version}")

    return bind
