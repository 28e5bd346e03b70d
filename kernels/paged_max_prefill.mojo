"""kt.paged_rope_attention's prefill on MAX's paged flash attention (tensor cores).

kt rotates this step's queries (RoPE at position cache_lengths[b] + (row - row_offsets[b]),
accurate fp32 sin/cos, Llama 3 frequencies, as `paged_rope_attention.mojo`'s kernels do as they
load them) into a dense scratch buffer q_rot [rows, Hq, D] of the op's dtype; then MAX 26.7's
`flash_attention` (nn.attention.gpu.mha, the kernel behind `mo.mha.ragged.paged`) runs causal
GQA attention of the ragged q_rot over MAX's `PagedKVCache` of the layer, built from the raw
tensors the way MAX's graph boundary builds it (`PagedKVCacheCollection` of blocks,
cache_lengths, lookup_table and the two host-side maximum lengths), and writes o.

MAX fixes the kv heads, head dim and page size at compile time, so the path runs for the
(Hq, Hk, D) of `_max_prefill_heads` (the served models' heads) and pages of MAX_PREFILL_PAGE;
other shapes keep kt's tiled kernel. bf16 takes MAX's FA3 (wgmma); fp16 its FA2 (mma.sync):
MAX 26.7's FA3 does not build for fp16 on sm_90 (a wgmma constraint of the P @ V step fails to instantiate).

The host never reads the row offsets or the cache lengths, so the maximum lengths MAX asks
for are the op's host scalars (`max_prompt_length`, `max_cache_length`, as MAX's own graph
gets them) when the caller knows them and EXACT_LENGTHS is on (paged_rope_attention.mojo), each capped by its bound from shapes: the longest
prompt <= rows, the longest sequence (cached + new) <= table columns x page size; where the
caller passes 0 (unknown), the bounds alone. MAX's sm_90 grid is ceil(max prompt / 128) row
tiles x Hq x batch, and a tile past its sequence's rows exits at once, so the bound rows
launches B times the row tiles B prompts of n tokens need: at the serving shape (8 x 1024,
Hq 32) 16384 blocks, 2048 with work (the H200's 93 TFLOP/s there, against 259-270 where
the empty tiles are few or none: benchmarks/results/kernels_h200/paged_candidates_2026-12-03/).
The exact longest prompt launches only the tiles the longest prompt needs.
"""

from kv_cache.types import KVCacheStaticParams, PagedKVCacheCollection
from layout import Idx, TileTensor, row_major
from max.gpu import block_idx, thread_idx
from max.gpu.host import DeviceContext
from nn.attention.gpu.mha import flash_attention
from nn.attention.mha_mask import CausalMask
from nn.attention.mha_utils import FlashAttentionAlgorithm, MHAConfig

from .paged_kv import PagedLayout, U32Ptr, seq_of_row
from .rope import RopeFreqs, rotate_pair, sincos_f32_accurate

comptime ROTATE_THREADS = 128
comptime MAX_PREFILL_PAGE = 128
comptime MAX_PREFILL_CONFIGS = 2


def _max_prefill_heads(i: Int) -> Tuple[Int, Int, Int]:
    """(Hq, Hk, D) instantiated for MAX's kernel: Llama 3.1 8B's heads (GQA 4, D 128) and
    Llama 3.2 1B's (GQA 4, D 64), the models kt serves. Each instantiation is one more FA3
    kernel in every graph that holds the op (~40 s of compile on a CPU core), so no more."""
    if i == 0:
        return (32, 8, 128)
    return (32, 8, 64)


def _max_prefill_supported[dtype: DType](q_heads: Int, lay: PagedLayout) -> Bool:
    """Whether `_max_prefill_dispatch` has a MAX instantiation for this shape."""
    comptime if dtype != DType.bfloat16 and dtype != DType.float16:
        return False
    if lay.page_size != MAX_PREFILL_PAGE:
        return False
    comptime for i in range(MAX_PREFILL_CONFIGS):
        comptime heads = _max_prefill_heads(i)
        if q_heads == heads[0] and lay.kv_heads == heads[1] and lay.head_dim == heads[2]:
            return True
    return False


def _rotate_queries_gpu[
    dtype: DType
](
    q_rot: Pointer[Scalar[dtype], MutAnyOrigin],
    q: Pointer[Scalar[dtype], MutAnyOrigin],
    cache_lengths: U32Ptr,
    row_offsets: U32Ptr,
    batch: Int32,
    q_heads_: Int32,
    head_dim: Int32,
    q_rs: Int32,
    q_hs: Int32,
    theta: Float32,
    factor: Float32,
    low_freq_factor: Float32,
    high_freq_factor: Float32,
    original_max_position: Float32,
):
    """One block per row of q (a strided view): every head rotated at the row's position into
    the dense q_rot[row, h, :], rounded to dtype."""
    var freqs = RopeFreqs(theta, factor, low_freq_factor, high_freq_factor, original_max_position)
    var q_heads = Int(q_heads_)
    var hd = Int(head_dim)
    var half = hd // 2
    var row = block_idx.x
    var b = seq_of_row(row_offsets, Int(batch), row)
    var pos = Int(cache_lengths[unsafe_offset=b]) + row - Int(row_offsets[unsafe_offset=b])
    for e in range(thread_idx.x, q_heads * half, ROTATE_THREADS):
        var h = e // half
        var i = e % half
        var src = q.unsafe_offset(row * Int(q_rs) + h * Int(q_hs))
        # Accurate fp32 sin/cos: std.math's lower to sin/cos.approx on NVIDIA GPUs.
        var sc = sincos_f32_accurate(SIMD[DType.float32, 1](Float32(pos) * freqs.inv_freq(i, hd)))
        var r = rotate_pair(
            src[unsafe_offset=i].cast[DType.float32](),
            src[unsafe_offset=i + half].cast[DType.float32](),
            sc[1][0],
            sc[0][0],
        )
        var dst = q_rot.unsafe_offset((row * q_heads + h) * hd)
        dst[unsafe_offset=i] = r[0].cast[dtype]()
        dst[unsafe_offset=i + half] = r[1].cast[dtype]()


def _max_flash_attention[
    dtype: DType, HQ: Int, HK: Int, D: Int, PAGE: Int
](
    o: Pointer[Scalar[dtype], MutAnyOrigin],
    q_rot: Pointer[Scalar[dtype], MutAnyOrigin],
    blocks: Pointer[Scalar[dtype], MutAnyOrigin],
    cache_lengths: U32Ptr,
    table: U32Ptr,
    row_offsets: U32Ptr,
    rows: Int,
    batch: Int,
    max_prompt: Int,
    max_seq: Int,
    pages: Int,
    scale: Float32,
    lay: PagedLayout,
    ctx: DeviceContext,
) raises:
    """MAX's ragged flash attention with a causal mask over layer lay.layer of the paged
    cache blocks [pages, 2, layers, PAGE, HK, D]; q_rot and o dense [rows, HQ, D]; max_prompt
    and max_seq bound the new tokens and the length (cached + new) of every sequence."""
    comptime Collection = PagedKVCacheCollection[
        dtype,
        KVCacheStaticParams(num_heads=HK, head_size=D),
        PAGE,
        MutAnyOrigin,
        ImmutAnyOrigin,
        ImmutAnyOrigin,
        MutUntrackedOrigin,
    ]
    comptime ALGORITHM = FlashAttentionAlgorithm(2) if dtype == DType.float16 else FlashAttentionAlgorithm(-1)
    var kv = Collection(
        TileTensor(blocks, row_major(pages, Idx[2], lay.layers, Idx[PAGE], Idx[HK], Idx[D])),
        TileTensor(cache_lengths, row_major(batch)).as_imm(),
        TileTensor(table, row_major(batch, lay.table_cols)).as_imm(),
        UInt32(max_prompt),
        UInt32(max_seq),
    )
    var qt = TileTensor(q_rot, row_major(rows, Idx[HQ], Idx[D]))
    var ot = TileTensor(o, row_major(rows, Idx[HQ], Idx[D]))
    var offsets = TileTensor(row_offsets, row_major(batch + 1))
    flash_attention[config=MHAConfig[dtype](HQ, D, algorithm=ALGORITHM), ragged=True](
        ot,
        qt.as_imm(),
        kv.get_key_cache(lay.layer),
        kv.get_value_cache(lay.layer),
        CausalMask(),
        offsets.as_imm(),
        scale,
        ctx,
        q_max_seq_len=Optional[Int](max_prompt),
    )


def _max_prefill_dispatch[
    dtype: DType
](
    o: Pointer[Scalar[dtype], MutAnyOrigin],
    q: Pointer[Scalar[dtype], MutAnyOrigin],
    blocks: Pointer[Scalar[dtype], MutAnyOrigin],
    cache_lengths: U32Ptr,
    table: U32Ptr,
    row_offsets: U32Ptr,
    rows: Int,
    batch: Int,
    max_prompt: Int,
    max_seq: Int,
    q_heads: Int,
    q_rs: Int,
    q_hs: Int,
    scale: Float32,
    lay: PagedLayout,
    pages: Int,
    freqs: RopeFreqs,
    ctx: DeviceContext,
) raises:
    """kt's query rotation into a scratch buffer, then `_max_flash_attention` for the runtime
    shape (max_prompt <= rows and max_seq <= table columns x page size: the maximum lengths
    MAX's kernel is given); the caller checks `_max_prefill_supported` first."""
    comptime if dtype == DType.bfloat16 or dtype == DType.float16:
        comptime for i in range(MAX_PREFILL_CONFIGS):
            comptime HQ = _max_prefill_heads(i)[0]
            comptime HK = _max_prefill_heads(i)[1]
            comptime D = _max_prefill_heads(i)[2]
            if q_heads == HQ and lay.kv_heads == HK and lay.head_dim == D and lay.page_size == MAX_PREFILL_PAGE:
                var q_rot = ctx.enqueue_create_buffer[dtype](rows * HQ * D)
                var qr = q_rot.unsafe_ptr().as_unsafe_any_origin()
                ctx.enqueue_function[_rotate_queries_gpu[dtype]](
                    qr, q, cache_lengths, row_offsets, Int32(batch), Int32(HQ), Int32(D),
                    Int32(q_rs), Int32(q_hs), freqs.theta, freqs.factor, freqs.low_freq_factor,
                    freqs.high_freq_factor, freqs.original_max_position,
                    grid_dim=rows, block_dim=ROTATE_THREADS,
                )
                _max_flash_attention[dtype, HQ, HK, D, MAX_PREFILL_PAGE](
                    o, qr, blocks, cache_lengths, table, row_offsets, rows, batch, max_prompt,
                    max_seq, pages, scale, lay, ctx,
                )
                # Frees are stream-ordered: the buffer outlives the kernels that use it.
                _ = q_rot^
                return
    raise Error("kt.paged_rope_attention: no MAX prefill instantiation for this shape")
