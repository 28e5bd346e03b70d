"""Causal attention of a ragged batch over MAX's paged KV cache, RoPE applied to the queries
inside the op (the contract of MAX's `mo.mha.ragged.paged` with a causal mask, with the query
rotation of `mo.fused_qk_rope.ragged.paged` fused in).

    for new token t of sequence b (row r = row_offsets[b] + t), pos = cache_lengths[b] + t:
        o[r, h] = softmax_j(scale * rope(q[r, h], pos) . K[b, j]) V[b, j],   j = 0 .. pos

K[b, j] / V[b, j] are position j's key and value of sequence b in the paged cache (keys
already rotated: `paged_rope_store` wrote them; `pykernels._paged_kv` states the layout).
Query head h reads kv head h // (Hq/Hk) (GQA, Ainslie et al. 2023); scale <= 0 means
1/sqrt(D). Prefill (empty cache), prefill after a cached prefix and decode (one new token per
sequence) are the same op. RoPE is `pykernels.rope`'s (half rotation, Llama 3 frequencies);
softmax attention as in Vaswani et al. 2017; the Triton twin is FlashAttention-2's online
softmax (Dao 2023) over keys fetched through the block table. The cache is read, never
written: it is checked unchanged after the op.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from harness.spec import Axis, Case, KernelSpec, Param, Params, Shape, TensorArg, Tensors
import pykernels._paged_kv as pkv
from pykernels._common import (apply_rope, bf16_rne, f32, freq_param_decls, rope_cos_sin,
                               triton_inv_freq)
from pykernels._flashinfer import paged_attention_provider

LAYER = Param("layer", (0, 1, 2), dtype="int32", doc="the layer of the cache read")


def _exact(which: int):
    """resolve for a maximum length: "exact" is pkv.max_lengths(inputs)[which]; a number is
    passed as it is (0: unknown)."""
    return lambda value, inputs: pkv.max_lengths(inputs)[which] if value == "exact" else value


# The host-side maximum lengths MAX's paged collection carries; the op sizes its GPU launches
# from them, or from bounds from shapes where they are 0 (unknown). Both are drawn, so the
# exact values and the fallback are verified.
MAX_LENGTHS = (
    Param("max_prompt_length", ("exact", 0), dtype="int32", resolve=_exact(0),
          doc="the most new tokens of a sequence: exact (from row_offsets) or 0 (unknown)"),
    Param("max_cache_length", ("exact", 0), dtype="int32", resolve=_exact(1),
          doc="the longest sequence after the step, cached + new: exact (from cache_lengths "
              "and row_offsets) or 0 (unknown)"),
)


def softmax_scale(params: Params, head_dim: int) -> float:
    """The logit scale: the `scale` param, or 1/sqrt(D) when it is <= 0."""
    scale = f32(params["scale"])
    return scale if scale > 0 else 1.0 / math.sqrt(head_dim)


def make_inputs(shape: Shape, params: Params, dtype: torch.dtype, device: torch.device,
                gen: torch.Generator) -> Tensors:
    """Keys and values ~N(0, 1) in the cache (this step's included), q ~ N(0, s^2) with s set
    from the softmax scale so that the logits are ~N(0, 1); every slot no position maps to,
    every unowned page and the null page are NaN."""
    s = 1.0 / (softmax_scale(params, shape["D"]) * math.sqrt(shape["D"]))
    q = torch.randn((shape["T"], shape["Hq"], shape["D"]), generator=gen, device=gen.device).cpu() * s
    cache = pkv.make_cache(shape, dtype, device, gen, filled=True)
    return {"q": q.to(device=device, dtype=dtype), **cache}


def reference(inputs: Tensors, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: its keys and values gathered through the block table, the queries rotated
    at their positions, masked softmax attention with the kv heads repeated per group, every
    step in the inputs' dtype. Then the cache, unchanged."""
    q, blocks = inputs["q"], inputs["blocks"]
    hq, d = q.shape[1], q.shape[2]
    layer = int(params["layer"])
    o = torch.empty_like(q)
    for b, (first, n, cached) in enumerate(pkv.sequences(inputs)):
        if n == 0:
            continue
        k, v = pkv.gather(inputs, b, layer, cached + n)
        group = hq // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        qpos = torch.arange(cached, cached + n, device=q.device)
        qr = apply_rope(q[None, first:first + n], *rope_cos_sin(qpos[None], d, params, q.dtype))[0]
        scores = torch.einsum("qhd,khd->hqk", qr * softmax_scale(params, d), k)
        kpos = torch.arange(cached + n, device=q.device)
        scores = scores.masked_fill(kpos[None, None, :] > qpos[None, :, None], float("-inf"))
        o[first:first + n] = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)
    return o, blocks.clone()


@triton.jit
def _attention_kernel(Q, O, BLOCKS, SEQ, CACHE, OFFSETS, TABLE, INV_FREQ, qk_scale, table_cols,
                      layers, layer, Hq, Hk, PAGE: tl.constexpr, HALF: tl.constexpr,
                      HALF_P: tl.constexpr, BLOCK_N: tl.constexpr, BF16_RNE: tl.constexpr):
    """One program per (row, q head): the query rotated at its position and pre-scaled (fp32),
    then keys in tiles of BLOCK_N, each key's page and slot looked up in the block table, with
    an online softmax (base 2). Head vectors are handled as their two halves (the rotation
    needs no shuffle); D/2 is padded to HALF_P."""
    row = tl.program_id(0)
    h = tl.program_id(1)
    dtype = Q.dtype.element_ty
    b = tl.load(SEQ + row)
    pos = tl.load(CACHE + b) + row - tl.load(OFFSETS + b)
    kvh = h // (Hq // Hk)
    i = tl.arange(0, HALF_P)
    dmask = i < HALF
    q_off = (row * Hq + h).to(tl.int64) * (2 * HALF)
    angle = pos.to(tl.float32) * tl.load(INV_FREQ + i, mask=dmask, other=0.0)
    c, s = tl.cos(angle), tl.sin(angle)
    q1 = tl.load(Q + q_off + i, mask=dmask, other=0.0).to(tl.float32)
    q2 = tl.load(Q + q_off + HALF + i, mask=dmask, other=0.0).to(tl.float32)
    q1, q2 = (q1 * c - q2 * s) * qk_scale, (q2 * c + q1 * s) * qk_scale

    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc1 = tl.zeros([HALF_P], tl.float32)
    acc2 = tl.zeros([HALF_P], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    v_shift = layers * PAGE * Hk * (2 * HALF)
    for start in range(0, pos + 1, BLOCK_N):
        j = start + offs_n
        jmask = j <= pos
        page = tl.load(TABLE + b * table_cols + j // PAGE, mask=jmask, other=0).to(tl.int64)
        k_off = (((page * 2 * layers + layer) * PAGE + j % PAGE) * Hk + kvh) * (2 * HALF)
        kv_mask = jmask[:, None] & dmask[None, :]
        k1 = tl.load(BLOCKS + k_off[:, None] + i[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        k2 = tl.load(BLOCKS + k_off[:, None] + HALF + i[None, :], mask=kv_mask,
                     other=0.0).to(tl.float32)
        qk = tl.sum(k1 * q1[None, :] + k2 * q2[None, :], 1)
        qk = tl.where(jmask, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        v1 = tl.load(BLOCKS + v_shift + k_off[:, None] + i[None, :], mask=kv_mask,
                     other=0.0).to(tl.float32)
        v2 = tl.load(BLOCKS + v_shift + k_off[:, None] + HALF + i[None, :], mask=kv_mask,
                     other=0.0).to(tl.float32)
        acc1 = acc1 * alpha + tl.sum(p[:, None] * v1, 0)
        acc2 = acc2 * alpha + tl.sum(p[:, None] * v2, 0)
        m_i = m_new
    o1, o2 = acc1 / l_i, acc2 / l_i
    if BF16_RNE:
        o1, o2 = o1 * 65537.0 - (o1 * 65537.0 - o1), o2 * 65537.0 - (o2 * 65537.0 - o2)
    tl.store(O + q_off + i, o1.to(dtype), mask=dmask)
    tl.store(O + q_off + HALF + i, o2.to(dtype), mask=dmask)


def triton_attention(inputs: Tensors, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
    q, blocks = inputs["q"].contiguous(), inputs["blocks"].contiguous()
    rows, hq, d = q.shape
    o = torch.empty_like(q)
    if rows:
        seq, cache, offsets, table = pkv.triton_index(inputs)
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        _attention_kernel[(rows, hq)](
            q, o, blocks, seq, cache, offsets, table, triton_inv_freq(d, params, q.device),
            softmax_scale(params, d) * 1.4426950408889634, table.shape[1], blocks.shape[2],
            int(params["layer"]), hq, blocks.shape[4], PAGE=blocks.shape[3], HALF=d // 2,
            HALF_P=triton.next_power_of_2(d // 2), BLOCK_N=256 if interpret else 32,
            BF16_RNE=bf16_rne(q.dtype), num_warps=4)
    return o, inputs["blocks"].clone()


def flops(shape: Shape, params: Params) -> float:
    """4 D per visible (query, key) pair and q head (q.k and p.v), plus RoPE's 3 per element
    of q; exp and the softmax bookkeeping are not counted."""
    pairs = sum(n * c + n * (n + 1) // 2
                for n, c in zip(pkv.new_tokens(shape), pkv.cached_tokens(shape)))
    return 4.0 * shape["D"] * shape["Hq"] * pairs + 3.0 * shape["T"] * shape["Hq"] * shape["D"]


def nbytes(shape: Shape, params: Params, dtype: torch.dtype) -> float:
    """q read and o written once, every live token's key and value of the layer read once,
    the index tensors."""
    qo = 2 * shape["T"] * shape["Hq"] * shape["D"]
    kv = 2 * pkv.live_tokens(shape) * shape["Hk"] * shape["D"]
    return float((qo + kv) * dtype.itemsize + pkv.index_bytes(shape))


def _case(b, s, c, r, page, hk, group, d, why, layers=1, **params) -> Case:
    return Case(pkv.full_shape(b, s, c, r, page, layers, Hk=hk, group=group, D=d),
                {"layer": 0, "scale": 0.0, "theta": 500000.0, "factor": 8.0,
                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position": 8192.0, **params}, why)


SPEC = KernelSpec(
    name="paged_rope_attention",
    op="kt.paged_rope_attention",
    summary="RoPE on the queries fused into causal GQA attention over MAX's paged KV cache "
            "(ragged prefill, prefill after a prefix, decode)",
    axes=pkv.axes(ci_s=40, ci_c=150) + (
        Axis("Hk", lo=1, hi=8, edges=(1,), ci_hi=2, doc="kv heads"),
        Axis("group", lo=1, hi=8, edges=(1, 3, 4, 8), ci_hi=4, doc="q heads per kv head (GQA)"),
        Axis("D", choices=(16, 32, 64, 80, 96, 128, 256), doc="head dim"),
    ),
    derived={"Hq": lambda s: s["Hk"] * s["group"], **pkv.DERIVED},
    params=(LAYER, *MAX_LENGTHS,
            Param("scale", (0.0, 0.3), doc="logit scale; <= 0 means 1/sqrt(D)"))
    + freq_param_decls(),
    inputs=(TensorArg("q", ("T", "Hq", "D")),
            TensorArg("blocks", pkv.BLOCKS, mutable=True, partial=True)) + pkv.index_args(),
    outputs=(TensorArg("o", ("T", "Hq", "D")),),
    make_inputs=make_inputs,
    reference=reference,
    triton=triton_attention,
    flops=flops,
    bytes=nbytes,
    constraint=pkv.layer_ok,
    # stock MAX's paged kernels, and FlashInfer's paged attention alone on queries rotated
    # before the timed call (its fused RoPE would rotate the cached keys again)
    providers={"max_paged": pkv.max_paged_provider("attention", softmax_scale),
               "flashinfer": paged_attention_provider(softmax_scale)},
    golden=(
        _case(1, 1, 0, 0, 16, 1, 1, 16, "one token, empty cache: o = v of position 0 whatever "
              "the logit"),
        _case(2, 37, 0, 5, 16, 2, 4, 64, "ragged prefill over empty caches (37 and 32 tokens), "
              "GQA 4: the causal mask per sequence, queries at positions 0.."),
        _case(1, 17, 111, 0, 64, 1, 2, 80, "prefill after a cached prefix spanning a page "
              "boundary (positions 111..127 on pages 1 and 2); D/2 = 40"),
        _case(3, 1, 300, 11, 128, 8, 4, 128, "Llama 3 8B decode (32 q, 8 kv heads, D 128), "
              "one token per sequence after ragged caches of 300, 267, 234"),
        _case(3, 1, 40, 11, 128, 8, 4, 128, "the 8B heads' decode after caches of 40, 29, 18 with "
              "the maximum lengths unknown (0): the split-KV decode sized from the block table",
              max_prompt_length=0,
              max_cache_length=0),
        _case(3, 24, 40, 9, 128, 8, 4, 64, "Llama 3.2 1B heads (32 q, 8 kv, D 64) in pages of "
              "128 (MAX's paged flash attention on the GPU): ragged prompts of 24, 15, 6 after "
              "ragged prefixes, the launch sized by the exact longest prompt"),
        _case(3, 24, 40, 9, 128, 8, 4, 64, "the same prefill with the maximum lengths unknown "
              "(0): MAX's kernel given q's rows and the table's length", max_prompt_length=0,
              max_cache_length=0),
        _case(2, 1, 128, 0, 128, 2, 2, 32, "decode after a full page: the new key is the first "
              "slot of the next page"),
        _case(2, 6, 9, 1, 1, 1, 3, 32, "one token per page, GQA 3: every key through its own "
              "table entry"),
        _case(2, 20, 13, 3, 3, 2, 1, 96, "pages of 3, ragged cache and new tokens, D = 96",
              scale=0.3, theta=10000.0, factor=1.0),
        _case(2, 5, 40, 2, 16, 1, 8, 16, "8 q heads on one kv head, layer 1 of 3", layers=3,
              layer=1),
        _case(1, 9, 23, 0, 16, 1, 2, 256, "D = 256, the largest head"),
    ),
)
