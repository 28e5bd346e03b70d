"""RoPE on the new keys of a ragged batch as they are stored, with the values, into MAX's
paged KV cache (the key half of MAX's `mo.fused_qk_rope.ragged.paged`, plus the value store).

    for new token t of sequence b (row r = row_offsets[b] + t), pos = cache_lengths[b] + t:
        K[b, pos] = rope(k[r], pos),   V[b, pos] = v[r]

where K[b, pos] / V[b, pos] are the cache slots that position pos of sequence b maps to
through the block table (`pykernels._paged_kv` states the layout). RoPE is `pykernels.rope`'s
(Su et al. 2021, half rotation, Llama 3 frequency scaling). The op mutates the cache in place:
what is checked is the whole cache after the op, so a write to a wrong slot, page or layer
fails as surely as a wrong rotation.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from harness.spec import Axis, Case, KernelSpec, Param, Params, Shape, TensorArg, Tensors
import pykernels._paged_kv as pkv
from pykernels._common import apply_rope, bf16_rne, freq_param_decls, rope_cos_sin, triton_inv_freq

LAYER = Param("layer", (0, 1, 2), dtype="int32", doc="the layer of the cache written")


def make_inputs(shape: Shape, params: Params, dtype: torch.dtype, device: torch.device,
                gen: torch.Generator) -> Tensors:
    """k, v ~ N(0, 1); a cache with random contents at the cached positions and NaN in every
    slot the step writes, every unowned page and the null page."""
    rows = (shape["T"], shape["Hk"], shape["D"])
    k = torch.randn(rows, generator=gen, device=gen.device).cpu()
    v = torch.randn(rows, generator=gen, device=gen.device).cpu()
    cache = pkv.make_cache(shape, dtype, device, gen, filled=False)
    return {"k": k.to(device=device, dtype=dtype), "v": v.to(device=device, dtype=dtype), **cache}


def reference(inputs: Tensors, params: Params) -> tuple[torch.Tensor]:
    """The cache after the step: rotated keys and values written to each new position's slot,
    every step in the inputs' dtype."""
    blocks = inputs["blocks"].clone()
    layer, d = int(params["layer"]), inputs["k"].shape[-1]
    for b, (first, n, cached) in enumerate(pkv.sequences(inputs)):
        if n == 0:
            continue
        pos = torch.arange(cached, cached + n, device=blocks.device)
        cos, sin = rope_cos_sin(pos[None], d, params, blocks.dtype)
        k = apply_rope(inputs["k"][None, first:first + n], cos, sin)[0]
        pages, slot = (x.to(blocks.device) for x in pkv.slots(inputs, b, range(cached, cached + n)))
        blocks[pages, 0, layer, slot] = k
        blocks[pages, 1, layer, slot] = inputs["v"][first:first + n]
    return (blocks,)


@triton.jit
def _store_kernel(K, V, BLOCKS, SEQ, CACHE, OFFSETS, TABLE, INV_FREQ, table_cols, layers, layer,
                  Hk, PAGE: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
                  BF16_RNE: tl.constexpr):
    """One program per (row, kv head): the sequence of the row, its position, the page and
    slot through the block table, then the key rotated and the value copied into the slot."""
    row = tl.program_id(0)
    h = tl.program_id(1)
    dtype = K.dtype.element_ty
    b = tl.load(SEQ + row)
    pos = tl.load(CACHE + b) + row - tl.load(OFFSETS + b)
    page = tl.load(TABLE + b * table_cols + pos // PAGE).to(tl.int64)
    i = tl.arange(0, HALF_P)
    mask = i < HALF
    src = (row * Hk + h).to(tl.int64) * (2 * HALF)
    k_dst = (((page * 2 * layers + layer) * PAGE + pos % PAGE) * Hk + h) * (2 * HALF)
    v_dst = k_dst + layers * PAGE * Hk * (2 * HALF)
    angle = pos.to(tl.float32) * tl.load(INV_FREQ + i, mask=mask, other=0.0)
    c, s = tl.cos(angle), tl.sin(angle)
    k1 = tl.load(K + src + i, mask=mask, other=0.0).to(tl.float32)
    k2 = tl.load(K + src + HALF + i, mask=mask, other=0.0).to(tl.float32)
    r1, r2 = k1 * c - k2 * s, k2 * c + k1 * s
    if BF16_RNE:
        r1, r2 = r1 * 65537.0 - (r1 * 65537.0 - r1), r2 * 65537.0 - (r2 * 65537.0 - r2)
    tl.store(BLOCKS + k_dst + i, r1.to(dtype), mask=mask)
    tl.store(BLOCKS + k_dst + HALF + i, r2.to(dtype), mask=mask)
    tl.store(BLOCKS + v_dst + i, tl.load(V + src + i, mask=mask), mask=mask)
    tl.store(BLOCKS + v_dst + HALF + i, tl.load(V + src + HALF + i, mask=mask), mask=mask)


def triton_store(inputs: Tensors, params: Params) -> tuple[torch.Tensor]:
    """The Triton twin, on a copy of the cache (the inputs are left as they are)."""
    k, v = inputs["k"].contiguous(), inputs["v"].contiguous()
    blocks = inputs["blocks"].clone(memory_format=torch.contiguous_format)
    rows, hk, d = k.shape
    if rows == 0:
        return (blocks,)
    seq, cache, offsets, table = pkv.triton_index(inputs)
    _store_kernel[(rows, hk)](
        k, v, blocks, seq, cache, offsets, table, triton_inv_freq(d, params, k.device),
        table.shape[1], blocks.shape[2], int(params["layer"]), hk,
        PAGE=blocks.shape[3], HALF=d // 2, HALF_P=triton.next_power_of_2(d // 2),
        BF16_RNE=bf16_rne(k.dtype), num_warps=1 if os.environ.get("TRITON_INTERPRET") else 2)
    return (blocks,)


def flops(shape: Shape, params: Params) -> float:
    """RoPE's 3 per key element (two multiplies and an add per output)."""
    return 3.0 * shape["T"] * shape["Hk"] * shape["D"]


def nbytes(shape: Shape, params: Params, dtype: torch.dtype) -> float:
    """k and v read, the same number of elements written into the cache, the index tensors."""
    kv = 2 * shape["T"] * shape["Hk"] * shape["D"] * dtype.itemsize
    return float(2 * kv + pkv.index_bytes(shape))


def _case(b, s, c, r, page, hk, d, why, layers=1, **params) -> Case:
    return Case(pkv.full_shape(b, s, c, r, page, layers, Hk=hk, D=d),
                {"layer": 0, "theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position": 8192.0, **params}, why)


SPEC = KernelSpec(
    name="paged_rope_store",
    op="kt.paged_rope_store",
    summary="RoPE on a ragged batch's new keys as they are written, with the values, into "
            "MAX's paged KV cache",
    axes=pkv.axes() + (
        Axis("Hk", lo=1, hi=8, edges=(1,), ci_hi=2, doc="kv heads"),
        Axis("D", choices=(16, 32, 64, 80, 96, 128, 256), doc="head dim"),
    ),
    derived=pkv.DERIVED,
    params=(LAYER,) + freq_param_decls(),
    inputs=(TensorArg("k", ("T", "Hk", "D")), TensorArg("v", ("T", "Hk", "D")),
            TensorArg("blocks", pkv.BLOCKS, mutable=True, partial=True)) + pkv.index_args(),
    outputs=(),
    make_inputs=make_inputs,
    reference=reference,
    triton=triton_store,
    flops=flops,
    bytes=nbytes,
    constraint=pkv.layer_ok,
    providers={"max_paged": pkv.max_paged_provider("store")},
    golden=(
        _case(1, 1, 0, 0, 16, 1, 16, "one token into an empty cache: position 0, slot 0 of "
              "the sequence's first page"),
        _case(1, 5, 126, 0, 128, 2, 64, "new tokens spanning a page boundary: positions "
              "126..130, two slots on one page and three on the next"),
        _case(2, 1, 127, 0, 128, 2, 32, "decode into the last slot of a page"),
        _case(2, 1, 128, 0, 128, 2, 32, "decode after a full page: the first slot of the "
              "next page (a slot index taken from the cache length, not the page)"),
        _case(3, 40, 70, 7, 16, 2, 32, "ragged batch into layer 1 of 2: per-sequence cache "
              "lengths and row offsets, pages shuffled", layers=2, layer=1),
        _case(2, 9, 3, 1, 1, 1, 16, "one token per page: every position its own page"),
        _case(2, 7, 5, 2, 3, 1, 80, "page of 3 and D = 80 (D/2 = 40 is padded by the twin)",
              theta=10000.0, factor=1.0),
        _case(2, 3, 200, 1, 128, 8, 128, "Llama 3 8B heads (8 kv heads, D 128), 128-token "
              "pages"),
        _case(1, 2, 0, 0, 16, 1, 256, "D = 256, the largest head"),
    ),
)
