"""RoPE on the step's new keys as they are written, with the values, into MAX's paged cache.

For new token t of sequence b (row r = row_offsets[b] + t of k and v), at position
pos = cache_lengths[b] + t:

    blocks[page, 0, layer, slot] = rope(k[r], pos),   blocks[page, 1, layer, slot] = v[r],
    page = lookup_table[b, pos // page_size],          slot = pos % page_size.

The contract of MAX's `mo.fused_qk_rope.ragged.paged` for the keys (kv_collection, ragged
input_row_offsets, positions from the cache lengths) with Llama 3 frequencies computed in the
kernel (`rope.mojo`'s `RopeFreqs`: half rotation, fp32 angles, one rounding to the cache's
dtype). The queries are not touched: `kt.paged_rope_attention` rotates them as it loads them.
The cache is mutated in place; nothing else in it changes.
"""

import extensibility
from extensibility import InputTensor
from extensibility.managed_tensor_slice import _MutableInputTensor as MutableInputTensor
from max.algorithm import sync_parallelize
from max.gpu import block_idx, thread_idx
from max.gpu.host import DeviceContext
from max.gpu.host.info import is_cpu
from max.gpu.sync import barrier
from std.math import cos, sin
from std.memory import unsafe_stack_allocation

from .paged_kv import PagedLayout, U32Ptr, seq_of_row
from .rope import RopeFreqs, rotate_pair, sincos_f32_accurate

comptime GPU_BLOCK = 128
comptime MAX_HEAD_DIM = 256


@fieldwise_init
struct RowStrides(TrivialRegisterPassable):
    """Element strides of k's and v's rows and heads (their head dims are contiguous)."""

    var k_row: Int
    var k_head: Int
    var v_row: Int
    var v_head: Int


def _store_row[
    dtype: DType
](
    blocks: Pointer[Scalar[dtype], MutAnyOrigin],
    k: Pointer[Scalar[dtype], MutAnyOrigin],
    v: Pointer[Scalar[dtype], MutAnyOrigin],
    cache_lengths: U32Ptr,
    table: U32Ptr,
    row_offsets: U32Ptr,
    batch: Int,
    row: Int,
    st: RowStrides,
    lay: PagedLayout,
    freqs: RopeFreqs,
):
    """The CPU path for one row: every kv head of k[row] rotated and stored, v[row] copied."""
    var b = seq_of_row(row_offsets, batch, row)
    var pos = Int(cache_lengths[unsafe_offset=b]) + row - Int(row_offsets[unsafe_offset=b])
    var d = lay.head_dim
    var half = d // 2
    for h in range(lay.kv_heads):
        var src = row * st.k_row + h * st.k_head
        var vsrc = row * st.v_row + h * st.v_head
        var kdst = lay.token_row(table, b, pos, 0, h)
        var vdst = lay.token_row(table, b, pos, 1, h)
        for i in range(half):
            var angle = Float32(pos) * freqs.inv_freq(i, d)
            var r = rotate_pair(
                k[unsafe_offset=src + i].cast[DType.float32](),
                k[unsafe_offset=src + i + half].cast[DType.float32](),
                cos(angle),
                sin(angle),
            )
            blocks[unsafe_offset=kdst + i] = r[0].cast[dtype]()
            blocks[unsafe_offset=kdst + i + half] = r[1].cast[dtype]()
        for i in range(d):
            blocks[unsafe_offset=vdst + i] = v[unsafe_offset=vsrc + i]


def _store_gpu[
    dtype: DType
](
    blocks: Pointer[Scalar[dtype], MutAnyOrigin],
    k: Pointer[Scalar[dtype], MutAnyOrigin],
    v: Pointer[Scalar[dtype], MutAnyOrigin],
    cache_lengths: U32Ptr,
    table: U32Ptr,
    row_offsets: U32Ptr,
    batch_: Int32,
    page_size: Int32,
    layers: Int32,
    kv_heads: Int32,
    head_dim: Int32,
    layer: Int32,
    table_cols: Int32,
    k_rs: Int32,
    k_hs: Int32,
    v_rs: Int32,
    v_hs: Int32,
    theta: Float32,
    factor: Float32,
    low_freq_factor: Float32,
    high_freq_factor: Float32,
    original_max_position: Float32,
):
    """One block per new token: the block fills the frequencies in shared memory, then its
    threads rotate the (head, pair)s of the token's keys and copy its values into the page."""
    var lay = PagedLayout(
        Int(page_size), Int(layers), Int(kv_heads), Int(head_dim), Int(layer), Int(table_cols)
    )
    var freqs = RopeFreqs(theta, factor, low_freq_factor, high_freq_factor, original_max_position)
    var st = RowStrides(Int(k_rs), Int(k_hs), Int(v_rs), Int(v_hs))
    var row = block_idx.x
    var tid = thread_idx.x
    var d = lay.head_dim
    var half = d // 2
    var b = seq_of_row(row_offsets, Int(batch_), row)
    var pos = Int(cache_lengths[unsafe_offset=b]) + row - Int(row_offsets[unsafe_offset=b])
    var inv_s = unsafe_stack_allocation[MAX_HEAD_DIM // 2, Float32, address_space=.SHARED]()
    for i in range(tid, half, GPU_BLOCK):
        inv_s[unsafe_offset=i] = freqs.inv_freq(i, d)
    barrier()
    for e in range(tid, lay.kv_heads * half, GPU_BLOCK):
        var h = e // half
        var i = e % half
        var src = row * st.k_row + h * st.k_head
        var dst = lay.token_row(table, b, pos, 0, h)
        # Accurate fp32 sin/cos: std.math's lower to sin/cos.approx on NVIDIA GPUs.
        var sc = sincos_f32_accurate(SIMD[DType.float32, 1](Float32(pos) * inv_s[unsafe_offset=i]))
        var r = rotate_pair(
            k[unsafe_offset=src + i].cast[DType.float32](),
            k[unsafe_offset=src + i + half].cast[DType.float32](),
            sc[1][0],
            sc[0][0],
        )
        blocks[unsafe_offset=dst + i] = r[0].cast[dtype]()
        blocks[unsafe_offset=dst + i + half] = r[1].cast[dtype]()
    for e in range(tid, lay.kv_heads * d, GPU_BLOCK):
        var h = e // d
        var i = e % d
        blocks[unsafe_offset=lay.token_row(table, b, pos, 1, h) + i] = v[
            unsafe_offset=row * st.v_row + h * st.v_head + i
        ]


def paged_rope_store_gpu[
    dtype: DType
](
    blocks: Pointer[Scalar[dtype], MutAnyOrigin],
    k: Pointer[Scalar[dtype], MutAnyOrigin],
    v: Pointer[Scalar[dtype], MutAnyOrigin],
    cache_lengths: U32Ptr,
    table: U32Ptr,
    row_offsets: U32Ptr,
    rows: Int,
    batch: Int,
    st: RowStrides,
    lay: PagedLayout,
    freqs: RopeFreqs,
    ctx: DeviceContext,
) raises:
    """The op's GPU branch: `_store_gpu` over the step's rows."""
    if rows == 0:
        return
    ctx.enqueue_function[_store_gpu[dtype]](
        blocks, k, v, cache_lengths, table, row_offsets,
        Int32(batch), Int32(lay.page_size), Int32(lay.layers), Int32(lay.kv_heads),
        Int32(lay.head_dim), Int32(lay.layer), Int32(lay.table_cols),
        Int32(st.k_row), Int32(st.k_head), Int32(st.v_row), Int32(st.v_head),
        freqs.theta, freqs.factor, freqs.low_freq_factor, freqs.high_freq_factor,
        freqs.original_max_position,
        grid_dim=rows, block_dim=GPU_BLOCK,
    )


@extensibility.register("kt.paged_rope_store")
struct PagedRopeStore:
    @staticmethod
    def execute[
        dtype: DType, //, target: StaticString
    ](
        k: InputTensor[dtype=dtype, rank=3, ...],
        v: InputTensor[dtype=dtype, rank=3, ...],
        blocks: MutableInputTensor[dtype=dtype, rank=6, ...],
        cache_lengths: InputTensor[dtype=DType.uint32, rank=1, ...],
        lookup_table: InputTensor[dtype=DType.uint32, rank=2, ...],
        row_offsets: InputTensor[dtype=DType.uint32, rank=1, ...],
        layer: Int32,
        theta: Float32,
        factor: Float32,
        low_freq_factor: Float32,
        high_freq_factor: Float32,
        original_max_position: Float32,
        ctx: DeviceContext,
    ) raises:
        var rows = k.dim_size(0)
        var kv_heads = k.dim_size(1)
        var head_dim = k.dim_size(2)
        var batch = cache_lengths.dim_size(0)
        if blocks.dim_size(1) != 2 or blocks.dim_size(4) != kv_heads or blocks.dim_size(5) != head_dim:
            raise Error("kt.paged_rope_store: blocks must be [pages, 2, layers, page, kv heads, head dim] of k's heads and head dim")
        if v.dim_size(0) != rows or v.dim_size(1) != kv_heads or v.dim_size(2) != head_dim:
            raise Error("kt.paged_rope_store: v must have k's shape")
        if head_dim % 2 != 0 or head_dim > MAX_HEAD_DIM:
            raise Error("kt.paged_rope_store: head_dim must be even and at most ", MAX_HEAD_DIM)
        if Int(layer) < 0 or Int(layer) >= blocks.dim_size(2):
            raise Error("kt.paged_rope_store: layer out of range")
        if lookup_table.dim_size(0) != batch or row_offsets.dim_size(0) != batch + 1:
            raise Error("kt.paged_rope_store: lookup_table and row_offsets must cover the batch of cache_lengths")
        var lay = PagedLayout(
            blocks.dim_size(3), blocks.dim_size(2), kv_heads, head_dim, Int(layer),
            lookup_table.dim_size(1),
        )
        # k and v may be strided views (MAX's GPU graphs hand slices of the QKV projection to
        # their consumers as views): rows and heads are addressed through their strides.
        if k.stride_length[2]() != 1 or v.stride_length[2]() != 1:
            raise Error("kt.paged_rope_store: k's and v's head dims must be contiguous")
        if blocks.stride_length[5]() != 1 or blocks.stride_length[4]() != head_dim or blocks.stride_length[0]() != 2 * lay.layers * lay.page_size * kv_heads * head_dim:
            raise Error("kt.paged_rope_store: the cache's pages must be dense (a padded page stride is not supported)")
        var st = RowStrides(
            k.stride_length[0](), k.stride_length[1](), v.stride_length[0](), v.stride_length[1]()
        )
        var freqs = RopeFreqs(theta, factor, low_freq_factor, high_freq_factor, original_max_position)
        var bp = blocks.unsafe_ptr()
        var kp = k.unsafe_ptr()
        var vp = v.unsafe_ptr()
        var cl = cache_lengths.unsafe_ptr()
        var lt = lookup_table.unsafe_ptr()
        var ro = row_offsets.unsafe_ptr()
        comptime if is_cpu[target]():
            if batch == 0:
                return

            def store_row(row: Int) {var bp, var kp, var vp, var cl, var lt, var ro, var batch, var st, var lay, var freqs}:
                _store_row[dtype](bp, kp, vp, cl, lt, ro, batch, row, st, lay, freqs)

            sync_parallelize(store_row, rows)
        else:
            paged_rope_store_gpu[dtype](bp, kp, vp, cl, lt, ro, rows, batch, st, lay, freqs, ctx)
