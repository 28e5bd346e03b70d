"""FlashInfer as a `kt microbench` provider: its attention kernels with RoPE applied inside
(`pos_encoding_mode="ROPE_LLAMA"`) for `fused_rope_attention`, its standalone RoPE for `rope`,
and its paged attention alone over MAX's paged KV cache for `paged_rope_attention`.

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
- Paged attention (`BatchDecodeWithPagedKVCacheWrapper`, `BatchPrefillWithPagedKVCacheWrapper`)
  takes the cache as one tensor (max_num_pages, 2, page_size, Hk, D) for NHD, 0 = keys,
  1 = values (split by `unbind(1)`, strides kept), and the pages of sequence b as above;
  the prefill wrapper's qo_indptr places sequence b's queries at rows
  qo_indptr[b]..qo_indptr[b+1]. Only slots below a sequence's length are read (FA2 loads
  the rest zero-filled or masked, FA3's paged loader zero-fills them). `backend="auto"` is FA3
  on Hopper when `pos_encoding_mode="NONE"`, else FA2; with `use_tensor_cores=True` decode
  runs the FA2 prefill kernel, one query row per sequence and the GQA group packed into the
  query tile (what vLLM always and SGLang from group 4 on choose).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from harness.spec import Bound, Params, Tensors, Unavailable
from pykernels._common import apply_rope, f32, rope_cos_sin

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


# --- paged_rope_attention: FlashInfer's attention alone on MAX's paged cache ----------------

@dataclass(frozen=True)
class PagedIndex:
    """FlashInfer's view of one ragged batch over a paged cache, int32 on the CPU."""

    qo_indptr: torch.Tensor  # [B + 1] the queries of sequence b: rows qo_indptr[b] ..
    kv_indptr: torch.Tensor  # [B + 1] its pages: kv_indices[kv_indptr[b] : kv_indptr[b+1]]
    kv_indices: torch.Tensor  # [kv_indptr[-1]] page ids, sequence by sequence, in order
    kv_last_page_len: torch.Tensor  # [B] tokens on its last page (1 .. page; 0: no pages)
    positions: torch.Tensor  # [T] the position of each query row (its rotation angle)

    @property
    def decode(self) -> bool:
        """Every sequence has exactly one new token."""
        return bool(((self.qo_indptr[1:] - self.qo_indptr[:-1]) == 1).all())


def paged_index(cache_lengths: torch.Tensor, lookup_table: torch.Tensor,
                row_offsets: torch.Tensor, page_size: int) -> PagedIndex:
    """MAX's index tensors (`pykernels._paged_kv`) as FlashInfer's: sequence b holds
    kv_len = cache_lengths[b] + its new tokens (the step's keys are in the cache already),
    on the first ceil(kv_len / page) pages of its lookup-table row; its last page holds
    kv_len - (pages - 1) * page tokens (a full page when kv_len ends on a page boundary).
    qo_indptr is row_offsets; new token t of sequence b is at position cache_lengths[b] + t."""
    off = row_offsets.to(torch.int64).cpu()
    cache = cache_lengths.to(torch.int64).cpu()
    table = lookup_table.to(torch.int64).cpu()
    new = off[1:] - off[:-1]
    kv_len = cache + new
    pages = -(-kv_len // page_size)
    if len(pages) and int(pages.max()) > table.shape[1]:
        raise ValueError(f"a sequence needs {int(pages.max())} pages, the lookup table has "
                         f"{table.shape[1]} columns")
    zero = torch.zeros(1, dtype=torch.int64)
    owned = torch.arange(table.shape[1])[None, :] < pages[:, None]
    positions = torch.cat([torch.arange(c, c + n) for c, n in zip(cache.tolist(), new.tolist())]
                          or [zero[:0]])
    return PagedIndex(off.to(torch.int32), torch.cat((zero, pages.cumsum(0))).to(torch.int32),
                      table[owned].to(torch.int32),  # row-major: sequence, then page order
                      (kv_len - (pages - 1).clamp(min=0) * page_size).to(torch.int32),
                      positions)


def rotated_queries(q: torch.Tensor, positions: torch.Tensor, params: Params) -> torch.Tensor:
    """q (T, Hq, D) rotated at `positions` by the reference's RoPE in fp32 (half rotation,
    Llama 3 frequencies), rounded once to q's dtype."""
    cos, sin = rope_cos_sin(positions.to(q.device)[None], q.shape[-1], params, torch.float32)
    return apply_rope(q.float()[None], cos, sin)[0].to(q.dtype).contiguous()


PAGED_NOTE = "attention alone, queries rotated outside the timed call"


def paged_attention_provider(softmax_scale):
    """`prepare(device, dtype)` of paged_rope_attention's `flashinfer` provider: FlashInfer's
    attention without RoPE (`pos_encoding_mode="NONE"`) on the op's own cache, fed the queries
    already rotated. Its fused RoPE would rotate the cached keys again and has no Llama 3
    frequencies, so it would compute another function; this is the op less its query rotation,
    as cuDNN SDPA alone is for fused_rope_attention, but checked by the gate (same function).
    The index tensors, the rotation and the wrapper's plan are built at bind time; the timed
    call is `run`. Decode batches (one new token per sequence) use the decode wrapper on tensor
    cores (FA2); the rest the paged prefill wrapper, causal (bottom-right: query t of sequence
    b sees keys 0 .. cache_lengths[b] + t), on FlashInfer's backend choice (FA3 on Hopper),
    falling back to FA2 for the rest of the run if that fails to plan (the row says so)."""

    def prepare(device: str, dtype: torch.dtype):
        flashinfer = _flashinfer(device, dtype)
        version = getattr(flashinfer, "__version__", "?")
        workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        failed: dict[str, str] = {}  # "auto" -> why FlashInfer's choice failed to plan

        def plan_prefill(idx: PagedIndex, heads: tuple[int, int, int, int], kw: dict):
            """The paged prefill wrapper planned on FlashInfer's backend choice, or on FA2
            once that choice has failed to plan; and what it runs, for the row's note."""
            backend = "fa2" if failed else "auto"
            w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=backend)
            try:
                w.plan(*(t.to(device) for t in (idx.qo_indptr, idx.kv_indptr, idx.kv_indices,
                                                idx.kv_last_page_len)),
                       *heads, causal=True, **kw)
            except Exception as e:
                if failed:
                    raise
                failed["auto"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}"
                return plan_prefill(idx, heads, kw)
            chosen = str(getattr(w, "_backend", backend)).upper()
            why = f" (its own choice failed to plan: {failed['auto']})" if failed else ""
            return w, f"FlashInfer {chosen} batch prefill, causal{why}"

        def bind(inputs: Tensors, params: Params) -> Bound:
            q, blocks = inputs["q"], inputs["blocks"]
            _, _, layers, page, hk, d = blocks.shape
            if layers != 1:
                raise Unavailable(f"n/a: a cache of {layers} layers; FlashInfer's paged cache "
                                  "(pages, 2, page, Hk, D) is one layer's (L = 1 only)")
            hq = q.shape[1]
            idx = paged_index(inputs["cache_lengths"], inputs["lookup_table"],
                              inputs["row_offsets"], page)
            cache = blocks.select(2, 0)  # [P, 2, page, Hk, D]: FlashInfer's NHD paged cache
            qr = rotated_queries(q, idx.positions, params)
            kw = dict(pos_encoding_mode="NONE", sm_scale=softmax_scale(params, d),
                      q_data_type=dtype, kv_data_type=dtype)
            if idx.decode:
                w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    workspace, "NHD", use_tensor_cores=True, backend="fa2")
                w.plan(*(t.to(device) for t in (idx.kv_indptr, idx.kv_indices,
                                                idx.kv_last_page_len)), hq, hk, d, page, **kw)
                what = "FlashInfer batch decode (tensor cores, FA2)"
            else:
                w, what = plan_prefill(idx, (hq, hk, d, page), kw)
            note = f"{what}, paged KV (page {page}); {PAGED_NOTE}; flashinfer {version}"
            return Bound(lambda: w.run(qr, cache), lambda o: (o, blocks), note=note)

        return bind

    return prepare
