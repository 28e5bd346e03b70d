"""Causal attention over MAX's paged KV cache, the queries rotated (RoPE) as they are loaded.

For new token t of sequence b (row r = row_offsets[b] + t of q), at position
pos = cache_lengths[b] + t, and q head h reading kv head h // (Hq / Hk) (GQA):

    o[r, h] = softmax_j(scale * rope(q[r, h], pos) . K[b, j]) V[b, j],   j = 0 .. pos,

where K[b, j], V[b, j] are the key and value of position j of sequence b in the paged cache
(`paged_kv.mojo`), keys already rotated (`kt.paged_rope_store` wrote this step's). So prefill
(cache_lengths 0), prefill after a cached prefix and decode (one new token) are one op, as
MAX's `mo.mha.ragged.paged` with a causal mask. scale <= 0 means 1/sqrt(D). RoPE follows
`rope.mojo` (half rotation, Llama 3 frequencies); softmax subtracts the running maximum and
everything accumulates in fp32. The cache is read, never written (it is an in-place operand
only so that MAX orders this op after the store).

Two host scalars size the GPU launches, as MAX's paged collection carries them
(`max_prompt_length`, `max_cache_length` of MAX's `PagedCacheValues`): the most new tokens
of any sequence of the batch and the longest sequence after this step (cached + new), exact
or upper bounds; 0 means unknown, and the op falls back to bounds from shapes (q's rows, the
table's columns x page size). The host never reads the index tensors themselves, so a value
below the truth leaves keys or rows out. The CPU path does not need them.
"""

import extensibility
from extensibility import InputTensor, OutputTensor
from extensibility.managed_tensor_slice import _MutableInputTensor as MutableInputTensor
from max.algorithm import sync_parallelize
from max.gpu import MAX_THREADS_PER_BLOCK_METADATA, block_idx, thread_idx
from max.gpu.primitives.warp import shuffle_xor, vote
from max.gpu.host import DeviceContext, FuncAttribute
from max.gpu.host.info import is_cpu
from max.gpu.memory import AddressSpace, external_memory
from max.gpu.sync import barrier
from std.math import ceildiv, cos, exp, exp2, inf, sin, sqrt
from std.memory import alloc, unsafe_stack_allocation
from std.sys import size_of
from std.utils import StaticTuple

from .fused_rope_attention import (
    DECODE_MIN_CHUNK,
    DECODE_TARGET_BLOCKS,
    DECODE_THREADS,
    DECODE_WARPS,
    LOG2E,
    _decode_combine_gpu,
    _decode_heads_per_block,
    _decode_write_partial,
    _merge_scale,
)
from .paged_kv import KeyRows, PagedLayout, U32Ptr, seq_of_row
from .paged_max_prefill import _max_prefill_dispatch, _max_prefill_supported
from .rope import RopeFreqs, rotate_pair, sincos_f32_accurate

comptime GPU_BLOCK = 128
comptime MAX_HEAD_DIM = 256


def _attend_row[
    dtype: DType
](
    o: Pointer[Scalar[dtype], MutAnyOrigin],
    q: Pointer[Scalar[dtype], MutAnyOrigin],
    blocks: Pointer[Scalar[dtype], MutAnyOrigin],
    cache_lengths: U32Ptr,
    table: U32Ptr,
    row_offsets: U32Ptr,
    batch: Int,
    q_heads: Int,
    item: Int,
    q_rs: Int,
    q_hs: Int,
    scale: Float32,
    lay: PagedLayout,
    freqs: RopeFreqs,
):
    """The CPU path for one (row, q head): scores against every visible key, max-subtracted
    softmax, weighted sum of the values."""
    var row = item // q_heads
    var h = item % q_heads
    var kvh = h // (q_heads // lay.kv_heads)
    var b = seq_of_row(row_offsets, batch, row)
    var pos = Int(cache_lengths[unsafe_offset=b]) + row - Int(row_offsets[unsafe_offset=b])
    var d = lay.head_dim
    var half = d // 2
    var q_rot = alloc[Float32](d)
    var acc = alloc[Float32](d)
    var scores = alloc[Float32](pos + 1)
    var src = q.unsafe_offset(row * q_rs + h * q_hs)
    for i in range(half):
        var angle = Float32(pos) * freqs.inv_freq(i, d)
        var r = rotate_pair(
            src[unsafe_offset=i].cast[DType.float32](),
            src[unsafe_offset=i + half].cast[DType.float32](),
            cos(angle),
            sin(angle),
        )
        q_rot[unsafe_offset=i] = r[0]
        q_rot[unsafe_offset=i + half] = r[1]
    var m = -inf[DType.float32]()
    for j in range(pos + 1):
        var key = blocks.unsafe_offset(lay.token_row(table, b, j, 0, kvh))
        var dot = Float32(0)
        for i in range(d):
            dot += q_rot[unsafe_offset=i] * key[unsafe_offset=i].cast[DType.float32]()
        var s = dot * scale
        scores[unsafe_offset=j] = s
        m = max(m, s)
    for i in range(d):
        acc[unsafe_offset=i] = 0
    var l = Float32(0)
    for j in range(pos + 1):
        var p = exp(scores[unsafe_offset=j] - m)
        l += p
        var val = blocks.unsafe_offset(lay.token_row(table, b, j, 1, kvh))
        for i in range(d):
            acc[unsafe_offset=i] += p * val[unsafe_offset=i].cast[DType.float32]()
    var dst = o.unsafe_offset(item * d)
    for i in range(d):
        dst[unsafe_offset=i] = (acc[unsafe_offset=i] / l).cast[dtype]()
    q_rot.unsafe_free()
    acc.unsafe_free()
    scores.unsafe_free()


def _attention_gpu[
    dtype: DType
](
    o: Pointer[Scalar[dtype], MutAnyOrigin],
    q: Pointer[Scalar[dtype], MutAnyOrigin],
    blocks: Pointer[Scalar[dtype], MutAnyOrigin],
    cache_lengths: U32Ptr,
    table: U32Ptr,
    row_offsets: U32Ptr,
    batch_: Int32,
    q_heads_: Int32,
    page_size: Int32,
    layers: Int32,
    kv_heads: Int32,
    head_dim: Int32,
    layer: Int32,
    table_cols: Int32,
    q_rs: Int32,
    q_hs: Int32,
    scale: Float32,
    theta: Float32,
    factor: Float32,
    low_freq_factor: Float32,
    high_freq_factor: Float32,
    original_max_position: Float32,
):
    """One block per (row, q head): the rotated, pre-scaled query in shared memory, keys in
    tiles of GPU_BLOCK (one per thread, looked up through the block table) with an online
    softmax; each thread accumulates head dims tid and tid + GPU_BLOCK of the output."""
    var lay = PagedLayout(
        Int(page_size), Int(layers), Int(kv_heads), Int(head_dim), Int(layer), Int(table_cols)
    )
    var freqs = RopeFreqs(theta, factor, low_freq_factor, high_freq_factor, original_max_position)
    var q_heads = Int(q_heads_)
    var item = block_idx.x
    var tid = thread_idx.x
    var row = item // q_heads
    var h = item % q_heads
    var kvh = h // (q_heads // lay.kv_heads)
    var b = seq_of_row(row_offsets, Int(batch_), row)
    var pos = Int(cache_lengths[unsafe_offset=b]) + row - Int(row_offsets[unsafe_offset=b])
    var d = lay.head_dim
    var half = d // 2

    var q_s = unsafe_stack_allocation[MAX_HEAD_DIM, Float32, address_space=.SHARED]()
    var p_s = unsafe_stack_allocation[GPU_BLOCK, Float32, address_space=.SHARED]()
    var red_s = unsafe_stack_allocation[GPU_BLOCK, Float32, address_space=.SHARED]()
    var src = q.unsafe_offset(row * Int(q_rs) + h * Int(q_hs))
    for i in range(tid, half, GPU_BLOCK):
        # Accurate fp32 sin/cos: std.math's lower to sin/cos.approx on NVIDIA GPUs.
        var sc = sincos_f32_accurate(SIMD[DType.float32, 1](Float32(pos) * freqs.inv_freq(i, d)))
        var r = rotate_pair(
            src[unsafe_offset=i].cast[DType.float32](),
            src[unsafe_offset=i + half].cast[DType.float32](),
            sc[1][0],
            sc[0][0],
        )
        q_s[unsafe_offset=i] = r[0] * scale
        q_s[unsafe_offset=i + half] = r[1] * scale
    barrier()

    var m = -inf[DType.float32]()
    var l = Float32(0)
    var acc0 = Float32(0)
    var acc1 = Float32(0)
    var tile = 0
    while tile <= pos:
        var j = tile + tid
        var s = -inf[DType.float32]()
        if j <= pos:
            var key = blocks.unsafe_offset(lay.token_row(table, b, j, 0, kvh))
            var dot = Float32(0)
            for i in range(d):
                dot += q_s[unsafe_offset=i] * key[unsafe_offset=i].cast[DType.float32]()
            s = dot
        red_s[unsafe_offset=tid] = s
        barrier()
        var stride = GPU_BLOCK // 2
        while stride > 0:
            if tid < stride:
                red_s[unsafe_offset=tid] = max(
                    red_s[unsafe_offset=tid], red_s[unsafe_offset=tid + stride]
                )
            barrier()
            stride //= 2
        var m_new = max(m, red_s[unsafe_offset=0])
        barrier()
        var p = exp(s - m_new) if j <= pos else Float32(0)
        p_s[unsafe_offset=tid] = p
        red_s[unsafe_offset=tid] = p
        barrier()
        stride = GPU_BLOCK // 2
        while stride > 0:
            if tid < stride:
                red_s[unsafe_offset=tid] += red_s[unsafe_offset=tid + stride]
            barrier()
            stride //= 2
        var correction = exp(m - m_new)
        l = l * correction + red_s[unsafe_offset=0]
        acc0 *= correction
        acc1 *= correction
        var n = min(GPU_BLOCK, pos + 1 - tile)
        for t in range(n):
            var val = blocks.unsafe_offset(lay.token_row(table, b, tile + t, 1, kvh))
            var pt = p_s[unsafe_offset=t]
            if tid < d:
                acc0 += pt * val[unsafe_offset=tid].cast[DType.float32]()
            if tid + GPU_BLOCK < d:
                acc1 += pt * val[unsafe_offset=tid + GPU_BLOCK].cast[DType.float32]()
        m = m_new
        tile += GPU_BLOCK
        barrier()

    var dst = o.unsafe_offset(item * d)
    if tid < d:
        dst[unsafe_offset=tid] = (acc0 / l).cast[dtype]()
    if tid + GPU_BLOCK < d:
        dst[unsafe_offset=tid + GPU_BLOCK] = (acc1 / l).cast[dtype]()


# Prefill (several new tokens per sequence): flash attention on CUDA cores through the block
# table. A block owns PREFILL_BM (query row, q head) pairs of ONE sequence, PREFILL_BM // GH
# consecutive rows times GH q heads sharing one kv head, so every key and value it brings
# into shared memory serves PREFILL_BM queries (the per-row kernel above reads them once per
# query). 256 threads as a 16 x 16 grid; thread (ty, tx) owns queries ty + 16 i and keys
# tx + 16 j (i, j < 4) of a score tile, and queries ty + 16 i and head dims 4 tx + 64 c
# of the output.
comptime PREFILL_BM = 64
comptime PREFILL_BN = 64
comptime PREFILL_THREADS = 256
comptime PREFILL_MAX_HEADS = 8


def _prefill_heads_per_block(group: Int) -> Int:
    """q heads of one kv group in one block: the largest power of two dividing the group,
    at most PREFILL_MAX_HEADS (so PREFILL_BM // GH >= 8 rows a block)."""
    var gh = PREFILL_MAX_HEADS
    while group % gh != 0:
        gh //= 2
    return gh


def _prefill_head_dim(head_dim: Int) -> Int:
    """The padded head dim of the tiled kernel's instantiation for head_dim (<= 256)."""
    if head_dim <= 64:
        return 64
    if head_dim <= 128:
        return 128
    return 256


def _prefill_tiles(rows: Int, batch: Int, rb: Int) -> Int:
    """Grid size along the row tiles: sequence b's tiles are numbered from
    T(b) = row_offsets[b] // rb + b, and T(b) + ceil(n_b / rb) <= T(b + 1) (n_b the new
    rows of b), so rows // rb + batch = T(batch) numbers them all from shapes alone; at
    most one number per sequence is left without a tile."""
    return rows // rb + batch


def _prefill_smem_floats[D: Int]() -> Int:
    """fp32 shared memory of `_prefill_gpu[_, D]`: queries, keys, values (the keys' buffer
    when D > 64, to fit two blocks an SM at D 128) and probabilities."""
    comptime QS = D + 4
    comptime PS = PREFILL_BN + 16
    comptime if D > 64:
        return PREFILL_BM * QS + PREFILL_BN * QS + PREFILL_BM * PS
    return PREFILL_BM * QS + PREFILL_BN * QS + PREFILL_BN * D + PREFILL_BM * PS


@__llvm_metadata(
    MAX_THREADS_PER_BLOCK_METADATA=StaticTuple[Int32, 1](Int32(PREFILL_THREADS)),
    `nvvm.minctasm`=SIMDLength(MB),
)
def _prefill_gpu[
    dtype: DType, D: Int, MB: Int
](
    o: Pointer[Scalar[dtype], MutAnyOrigin],
    q: Pointer[Scalar[dtype], MutAnyOrigin],
    blocks: Pointer[Scalar[dtype], MutAnyOrigin],
    cache_lengths: U32Ptr,
    table: U32Ptr,
    row_offsets: U32Ptr,
    batch_: Int32,
    q_heads_: Int32,
    page_size: Int32,
    layers: Int32,
    kv_heads: Int32,
    head_dim: Int32,
    layer: Int32,
    table_cols: Int32,
    q_rs: Int32,
    q_hs: Int32,
    heads_per_block: Int32,
    vec_: Int32,
    scale_log2: Float32,
    theta: Float32,
    factor: Float32,
    low_freq_factor: Float32,
    high_freq_factor: Float32,
    original_max_position: Float32,
):
    """Grid (`_prefill_tiles`, kv heads * group / GH), PREFILL_THREADS threads, dynamic
    shared memory `_prefill_smem_floats[D]` floats; D is head_dim rounded up to 64, 128 or
    256 (the padding dims are zero in queries, keys and values). MB: blocks an SM the
    registers must leave room for (ptxas caps them at 65536 / (256 MB)).

    Tile t belongs to the last sequence b with T(b) = row_offsets[b] // RB + b <= t (binary
    search), RB = PREFILL_BM // GH rows; it is that sequence's tile t - T(b), counted from
    the last (the longest tiles start first), and a number past the sequence's tiles exits.
    Query qi of the block is row qi // GH of the tile, head qi % GH of the block's heads; a
    row past the sequence's end stands in for its last row (computed, not written). The
    block rotates its queries at their positions (pre-scaled by scale * log2 e) into shared
    memory once, then walks the keys 0 .. (last row's position) in tiles of PREFILL_BN:
    keys and values brought in through the block table (16-byte loads when vec_), the score
    tile (each key past a query's position masked), an online softmax in base 2 (each
    query's running max shared by the 16 threads of its row of the thread grid, its sum
    kept per thread and reduced at the end), and the probabilities through shared memory
    into the output accumulators."""
    comptime BM = PREFILL_BM
    comptime BN = PREFILL_BN
    comptime NT = PREFILL_THREADS
    comptime QS = D + 4  # padded strides: conflict-free 16-byte reads of 16 rows
    comptime KS = D + 4
    comptime SHARE_KV = D > 64
    comptime VS = KS if SHARE_KV else D
    comptime PS = BN + 16
    comptime DC = D // 64  # output chunks of 4 dims a thread
    comptime NEG_INF = -inf[DType.float32]()
    comptime F4 = SIMD[DType.float32, 4]

    var lay = PagedLayout(
        Int(page_size), Int(layers), Int(kv_heads), Int(head_dim), Int(layer), Int(table_cols)
    )
    var freqs = RopeFreqs(theta, factor, low_freq_factor, high_freq_factor, original_max_position)
    var batch = Int(batch_)
    var q_heads = Int(q_heads_)
    var hd = Int(head_dim)
    var half = hd // 2
    var gh = Int(heads_per_block)
    var rb = BM // gh
    var group = q_heads // lay.kv_heads
    var subs = group // gh
    var kvh = block_idx.y // subs
    var h0 = kvh * group + (block_idx.y % subs) * gh
    var t = block_idx.x
    var tid = thread_idx.x
    var tx = tid % 16
    var ty = tid // 16

    # The block's sequence and rows (uniform over the block: an empty tile exits whole).
    var lo = 0
    var hi = batch - 1
    while lo < hi:
        var mid = (lo + hi + 1) // 2
        if Int(row_offsets[unsafe_offset=mid]) // rb + mid <= t:
            lo = mid
        else:
            hi = mid - 1
    var b = lo
    var seq_first = Int(row_offsets[unsafe_offset=b])
    var n_rows = Int(row_offsets[unsafe_offset=b + 1]) - seq_first
    var n_tiles = ceildiv(n_rows, rb)
    var i = t - (seq_first // rb + b)
    if i >= n_tiles:
        return
    var r0 = (n_tiles - 1 - i) * rb
    var r_last = min(r0 + rb, n_rows) - 1
    var cached = Int(cache_lengths[unsafe_offset=b])
    var max_pos = cached + r_last

    var smem = external_memory[Float32, address_space=AddressSpace.SHARED, alignment=16]()
    var q_s = smem
    var k_s = q_s.unsafe_offset(BM * QS)
    var v_s = k_s if SHARE_KV else k_s.unsafe_offset(BN * KS)
    var p_s = k_s.unsafe_offset(BN * KS) if SHARE_KV else v_s.unsafe_offset(BN * VS)

    # Queries: rotate, pre-scale, zero the padding dims.
    for e in range(tid, BM * (D // 2), NT):
        var qi = e // (D // 2)
        var d = e % (D // 2)
        var r = min(r0 + qi // gh, r_last)
        var pos = cached + r
        if d < half:
            var src = q.unsafe_offset((seq_first + r) * Int(q_rs) + (h0 + qi % gh) * Int(q_hs))
            # Accurate fp32 sin/cos: std.math's lower to sin/cos.approx on NVIDIA GPUs.
            var sc = sincos_f32_accurate(SIMD[DType.float32, 1](Float32(pos) * freqs.inv_freq(d, hd)))
            var rot = rotate_pair(
                src[unsafe_offset=d].cast[DType.float32](),
                src[unsafe_offset=d + half].cast[DType.float32](),
                sc[1][0],
                sc[0][0],
            )
            q_s[unsafe_offset=qi * QS + d] = rot[0] * scale_log2
            q_s[unsafe_offset=qi * QS + d + half] = rot[1] * scale_log2
        else:
            # The padding dims hd .. D - 1, two for each d past half.
            q_s[unsafe_offset=qi * QS + hd + 2 * (d - half)] = 0
            q_s[unsafe_offset=qi * QS + hd + 2 * (d - half) + 1] = 0

    # This thread's queries: position (the mask), the running max and partial sum.
    var qpos = StaticTuple[Int32, 4](fill=0)
    comptime for mm in range(4):
        qpos[mm] = Int32(cached + min(r0 + (ty + 16 * mm) // gh, r_last))
    var m = StaticTuple[Float32, 4](fill=NEG_INF)
    var l = StaticTuple[Float32, 4](fill=0)
    var acc = StaticTuple[F4, 4 * DC](fill=0)
    var vstride = lay.layers * lay.page_size * lay.kv_heads * hd
    var vec = Int(vec_) != 0

    var k0 = 0
    while k0 <= max_pos:
        barrier()  # the previous tile's readers of k_s, v_s and p_s are done
        _prefill_load_tile[dtype, D](k_s, KS, blocks, table, lay, b, kvh, k0, max_pos, 0, vec)
        comptime if not SHARE_KV:
            _prefill_load_tile[dtype, D](v_s, VS, blocks, table, lay, b, kvh, k0, max_pos, vstride, vec)
        barrier()

        var s = StaticTuple[Float32, 16](fill=0)
        for d in range(0, D, 4):
            var qv = StaticTuple[F4, 4](fill=0)
            var kv = StaticTuple[F4, 4](fill=0)
            comptime for mm in range(4):
                qv[mm] = q_s.unsafe_load[width=4, alignment=16]((ty + 16 * mm) * QS + d)
            comptime for kk in range(4):
                kv[kk] = k_s.unsafe_load[width=4, alignment=16]((tx + 16 * kk) * KS + d)
            comptime for mm in range(4):
                comptime for kk in range(4):
                    comptime for e in range(4):
                        s[mm * 4 + kk] = qv[mm][e].fma(kv[kk][e], s[mm * 4 + kk])

        comptime for mm in range(4):
            var mx = NEG_INF
            var visible = qpos[mm] - Int32(k0 + tx)  # keys tx + 16 kk of the tile up to this
            comptime for kk in range(4):
                if Int32(16 * kk) > visible:
                    s[mm * 4 + kk] = NEG_INF
                mx = max(mx, s[mm * 4 + kk])
            comptime for step in range(4):
                mx = max(mx, shuffle_xor(mx, UInt32(1 << step)))
            # Key 0 is in every query's first tile, so m_new is finite from then on.
            var m_new = max(m[mm], mx)
            var corr = _merge_scale(m[mm], m_new)
            var psum = Float32(0)
            comptime for kk in range(4):
                var p = exp2(s[mm * 4 + kk] - m_new)
                psum += p
                p_s[unsafe_offset=(ty + 16 * mm) * PS + tx + 16 * kk] = p
            l[mm] = l[mm] * corr + psum
            m[mm] = m_new
            comptime for c in range(DC):
                acc[mm * DC + c] = acc[mm * DC + c] * corr

        comptime if SHARE_KV:
            barrier()  # every score read its keys
            _prefill_load_tile[dtype, D](v_s, VS, blocks, table, lay, b, kvh, k0, max_pos, vstride, vec)
        barrier()

        for kb in range(0, BN, 4):
            var pv = StaticTuple[F4, 4](fill=0)
            comptime for mm in range(4):
                pv[mm] = p_s.unsafe_load[width=4, alignment=16]((ty + 16 * mm) * PS + kb)
            comptime for kk in range(4):
                comptime for c in range(DC):
                    var vv = v_s.unsafe_load[width=4, alignment=16]((kb + kk) * VS + 4 * tx + 64 * c)
                    comptime for mm in range(4):
                        acc[mm * DC + c] = vv.fma(F4(pv[mm][kk]), acc[mm * DC + c])
        k0 += BN

    comptime for mm in range(4):
        var lt = l[mm]
        comptime for step in range(4):
            lt += shuffle_xor(lt, UInt32(1 << step))
        var qi = ty + 16 * mm
        var r = r0 + qi // gh
        if r < n_rows:
            var dst = o.unsafe_offset(((seq_first + r) * q_heads + h0 + qi % gh) * hd)
            var inv = Float32(1) / lt
            comptime for c in range(DC):
                comptime for e in range(4):
                    var d = 4 * tx + 64 * c + e
                    if d < hd:
                        dst[unsafe_offset=d] = (acc[mm * DC + c][e] * inv).cast[dtype]()


def _prefill_load_tile[
    dtype: DType, D: Int
](
    dst: Pointer[Float32, MutUntrackedOrigin, address_space=AddressSpace.SHARED],
    stride: Int,
    blocks: Pointer[Scalar[dtype], MutAnyOrigin],
    table: U32Ptr,
    lay: PagedLayout,
    b: Int,
    kvh: Int,
    k0: Int,
    max_pos: Int,
    kv_offset: Int,
    vec: Bool,
):
    """Keys (kv_offset 0) or values of positions k0 .. k0 + PREFILL_BN - 1 of sequence b,
    kv head kvh, into dst[key * stride + d] as fp32; positions past max_pos and dims past
    the head dim are zero (their scores are masked, but 0 * garbage could be NaN). vec:
    16-byte loads (head dim a multiple of the width, 16-byte aligned cache)."""
    comptime W = 16 // size_of[dtype]()
    var hd = lay.head_dim
    if vec:
        for e in range(thread_idx.x, PREFILL_BN * (D // W), PREFILL_THREADS):
            var key = e // (D // W)
            var d = (e % (D // W)) * W
            var x = SIMD[DType.float32, W](0)
            var j = k0 + key
            if j <= max_pos and d < hd:
                x = blocks.unsafe_load[width=W, alignment=16](
                    lay.token_row(table, b, j, 0, kvh) + kv_offset + d
                ).cast[DType.float32]()
            comptime for e4 in range(W // 4):
                dst.unsafe_store[alignment=16](key * stride + d + 4 * e4, x.slice[4, offset=4 * e4]())
    else:
        for e in range(thread_idx.x, PREFILL_BN * D, PREFILL_THREADS):
            var key = e // D
            var d = e % D
            var x = Float32(0)
            var j = k0 + key
            if j <= max_pos and d < hd:
                x = blocks[unsafe_offset=lay.token_row(table, b, j, 0, kvh) + kv_offset + d].cast[DType.float32]()
            dst[unsafe_offset=key * stride + d] = x


# Decode (one new token per sequence, 16-bit dtypes, D 64 or 128): split-KV flash decoding
# through the block table. Keys are rotated in the cache already, so only the queries are
# rotated, once per block, into shared memory. Two kernels share the block's prologue
# (`_decode_queries`) and epilogue (`_decode_write_partial`): `_split_decode_gpu`, one key
# per lane group at a time, and `_tiled_decode_gpu`, TILE_KEYS keys per lane group at a time.

# Keys a lane group of `_tiled_decode_gpu` takes per step.
comptime TILE_KEYS = 4
# `_tiled_decode_gpu` moves a head's running maximum only when a score passes it by more than
# this (log2 units), so its probabilities are at most 2^LAZY_MAX and most steps skip the
# accumulator rescale.
comptime LAZY_MAX = Float32(8)


def _split_decode_supported[dtype: DType](head_dim: Int) -> Bool:
    """Whether `_split_decode_gpu` has an instantiation for this dtype and head dim."""
    comptime if dtype != DType.bfloat16 and dtype != DType.float16:
        return False
    return head_dim == 64 or head_dim == 128


@always_inline
def _decode_queries[
    dtype: DType, D: Int, GB: Int
](
    q: Pointer[Scalar[dtype], MutAnyOrigin],
    row: Int,
    q_rs: Int,
    q_hs: Int,
    h0: Int,
    pos: Int,
    freqs: RopeFreqs,
    scale_log2: Float32,
    i0: Int,
    hx: Int,
) -> StaticTuple[SIMD[DType.float32, 16 // size_of[dtype]()], GB]:
    """The block's GB queries (q heads h0 .. h0 + GB - 1 of `row`) rotated at position pos
    and pre-scaled by scale_log2, through shared memory (the whole block calls it: a
    barrier). Entry g is this lane's slice i0 .. i0 + W - 1 of head h0 + (g ^ hx)."""
    comptime W = 16 // size_of[dtype]()
    comptime HALF = D // 2
    var tid = thread_idx.x
    var q_s = unsafe_stack_allocation[GB * D, Float32, address_space=.SHARED]()
    for e in range(tid, GB * HALF, DECODE_THREADS):
        var g = e // HALF
        var i = e % HALF
        var src = q.unsafe_offset(row * q_rs + (h0 + g) * q_hs)
        # Accurate fp32 sin/cos: std.math's lower to sin/cos.approx on NVIDIA GPUs.
        var sc = sincos_f32_accurate(SIMD[DType.float32, 1](Float32(pos) * freqs.inv_freq(i, D)))
        var r = rotate_pair(
            src[unsafe_offset=i].cast[DType.float32](),
            src[unsafe_offset=i + HALF].cast[DType.float32](),
            sc[1][0],
            sc[0][0],
        )
        q_s[unsafe_offset=g * D + i] = r[0] * scale_log2
        q_s[unsafe_offset=g * D + i + HALF] = r[1] * scale_log2
    barrier()
    var qv = StaticTuple[SIMD[DType.float32, W], GB](fill=0)
    comptime for g in range(GB):
        var hg = g ^ hx
        comptime for e in range(W):
            qv[g][e] = q_s[unsafe_offset=hg * D + i0 + e]
    return qv


@always_inline
def _split_decode_gpu[
    dtype: DType, D: Int, GB: Int, pipelined: Bool
](
    m_part: Pointer[Float32, MutAnyOrigin],
    l_part: Pointer[Float32, MutAnyOrigin],
    acc_part: Pointer[Float32, MutAnyOrigin],
    q: Pointer[Scalar[dtype], MutAnyOrigin],
    blocks: Pointer[Scalar[dtype], MutAnyOrigin],
    cache_lengths: U32Ptr,
    table: U32Ptr,
    row_offsets: U32Ptr,
    batch_: Int32,
    q_heads_: Int32,
    page_size: Int32,
    layers: Int32,
    kv_heads: Int32,
    layer: Int32,
    table_cols: Int32,
    q_rs: Int32,
    q_hs: Int32,
    chunk_: Int32,
    splits_: Int32,
    scale_log2: Float32,
    theta: Float32,
    factor: Float32,
    low_freq_factor: Float32,
    high_freq_factor: Float32,
    original_max_position: Float32,
):
    """One block per (split of the keys, kv head and GB of its q heads, query row):
    grid = (splits, kv_heads * group / GB, rows), DECODE_THREADS threads.

    The row's query sees keys 0..pos. The block rotates its GB queries (position pos,
    pre-scaled by scale * log2 e) into shared memory. A key is read by TPK = D / W lanes,
    each holding a W-element (16-byte) slice, found through the block table; the dot
    products are summed by a TPK-lane butterfly. Each group of TPK lanes keeps an online
    softmax (base 2) per head over the keys it visits; the groups merge through warp
    shuffles, the warps through shared memory, and the block writes m, l and the
    unnormalized output for `_decode_combine_gpu`. A split past the row's last key
    writes an empty state (m = -inf, l = 0).

    With `pipelined`, a lane finds its key's row with 32-bit page arithmetic and loads the
    next key's slices (table lookup, then K and V) before the current key's dot products and
    softmax, so each lane has two keys' loads in flight instead of one.
    """
    comptime W = 16 // size_of[dtype]()
    comptime TPK = D // W
    comptime KPW = 32 // TPK
    comptime STREAMS = DECODE_WARPS * KPW
    comptime F = SIMD[DType.float32, W]
    comptime NEG_INF = -inf[DType.float32]()

    var lay = PagedLayout(
        Int(page_size), Int(layers), Int(kv_heads), D, Int(layer), Int(table_cols)
    )
    var freqs = RopeFreqs(theta, factor, low_freq_factor, high_freq_factor, original_max_position)
    var q_heads = Int(q_heads_)
    var group = q_heads // lay.kv_heads
    var subs = group // GB
    var split = block_idx.x
    var kvh = block_idx.y // subs
    var h0 = kvh * group + (block_idx.y % subs) * GB
    var row = block_idx.z
    var splits = Int(splits_)
    var chunk = Int(chunk_)
    var tid = thread_idx.x
    var lane = tid % 32
    var warp = tid // 32
    var i0 = (lane % TPK) * W
    var stream = warp * KPW + lane // TPK
    var b = seq_of_row(row_offsets, Int(batch_), row)
    var pos = Int(cache_lengths[unsafe_offset=b]) + row - Int(row_offsets[unsafe_offset=b])

    var qv = _decode_queries[dtype, D, GB](
        q, row, Int(q_rs), Int(q_hs), h0, pos, freqs, scale_log2, i0, 0
    )

    var m = StaticTuple[Float32, GB](fill=NEG_INF)
    var l = StaticTuple[Float32, GB](fill=0)
    var acc = StaticTuple[F, GB](fill=0)
    var start = split * chunk
    var end = min(start + chunk, pos + 1)
    # Warp-uniform trip count: every lane runs every iteration (the butterflies need the
    # whole warp); a lane past the end masks its key out.
    var warp_first = start + warp * KPW
    var j = start + stream
    var v_off = lay.value_offset()
    var rows_of = lay.key_rows(b, kvh, i0)
    var kn = SIMD[dtype, W](0)
    var vn = SIMD[dtype, W](0)
    comptime if pipelined:
        if j < end:
            var krow = rows_of.row(table, j)
            kn = blocks.unsafe_load[width=W, alignment=16](krow)
            vn = blocks.unsafe_load[width=W, alignment=16](krow + v_off)
    while warp_first < end:
        var live = j < end
        var kr = SIMD[dtype, W](0)
        var vr = SIMD[dtype, W](0)
        comptime if pipelined:
            kr = kn
            vr = vn
            if j + STREAMS < end:
                var krow = rows_of.row(table, j + STREAMS)
                kn = blocks.unsafe_load[width=W, alignment=16](krow)
                vn = blocks.unsafe_load[width=W, alignment=16](krow + v_off)
        else:
            if live:
                var krow = lay.token_row(table, b, j, 0, kvh) + i0
                kr = blocks.unsafe_load[width=W, alignment=16](krow)
                vr = blocks.unsafe_load[width=W, alignment=16](krow + v_off)
        var kf = kr.cast[DType.float32]()
        var vf = vr.cast[DType.float32]()
        comptime for g in range(GB):
            var dot = (qv[g] * kf).reduce_add()
            comptime for step in range(5):
                comptime off = TPK >> (step + 1)
                comptime if off > 0:
                    dot += shuffle_xor(dot, UInt32(off))
            if live:
                var m_new = max(m[g], dot)
                var corr = _merge_scale(m[g], m_new)
                var p = exp2(dot - m_new)
                l[g] = l[g] * corr + p
                acc[g] = vf.fma(F(p), acc[g] * corr)
                m[g] = m_new
        j += STREAMS
        warp_first += STREAMS

    _decode_write_partial[D, GB, W](
        m, l, acc, 0, m_part, l_part, acc_part, (row * q_heads + h0) * splits + split, splits
    )


@always_inline
def _tile_rows[
    U: Int
](
    table: U32Ptr,
    rows_of: KeyRows,
    entry: Int,
    slot: UInt32,
    j0: Int,
    end: Int,
    ux: Int,
    last: Int,
) -> StaticTuple[Int, U]:
    """Key rows (`rows_of`) of positions j0 + (u ^ ux), u < U, (entry, slot) locating j0;
    `last`, a row every lane may read, for positions at or past `end` (so the loads need
    no branch and read no stale slot: its values times p = 0 could be NaN). A tile inside
    one page (always, when U divides the page and j0) takes one table lookup."""
    var rows = StaticTuple[Int, U](fill=last)
    if j0 < end:
        if slot + UInt32(U) <= rows_of.page:
            var r0 = rows_of.row_at(table, entry, slot)
            comptime for u in range(U):
                var x = u ^ ux
                if j0 + x < end:
                    rows[u] = r0 + Int(UInt32(x) * rows_of.slot_stride)
        else:
            comptime for u in range(U):
                var x = u ^ ux
                if j0 + x < end:
                    var at = rows_of.step(entry, slot, UInt32(x))
                    rows[u] = rows_of.row_at(table, at[0], at[1])
    return rows


@always_inline
def _load_key_tile[
    dtype: DType, U: Int
](
    blocks: Pointer[Scalar[dtype], MutAnyOrigin], rows: StaticTuple[Int, U], v_off: Int
) -> StaticTuple[SIMD[dtype, 16 // size_of[dtype]()], 2 * U]:
    """This lane's 16-byte slices of the keys at `rows` (entries 0 .. U - 1) and of their
    values (entries U .. 2U - 1)."""
    comptime W = 16 // size_of[dtype]()
    var kv = StaticTuple[SIMD[dtype, W], 2 * U](fill=0)
    comptime for u in range(U):
        kv[u] = blocks.unsafe_load[width=W, alignment=16](rows[u])
    comptime for u in range(U):
        kv[U + u] = blocks.unsafe_load[width=W, alignment=16](rows[u] + v_off)
    return kv


@__llvm_metadata(
    MAX_THREADS_PER_BLOCK_METADATA=StaticTuple[Int32, 1](Int32(DECODE_THREADS)),
)
def _tiled_decode_gpu[
    dtype: DType, D: Int, GB: Int, U: Int = TILE_KEYS
](
    m_part: Pointer[Float32, MutAnyOrigin],
    l_part: Pointer[Float32, MutAnyOrigin],
    acc_part: Pointer[Float32, MutAnyOrigin],
    q: Pointer[Scalar[dtype], MutAnyOrigin],
    blocks: Pointer[Scalar[dtype], MutAnyOrigin],
    cache_lengths: U32Ptr,
    table: U32Ptr,
    row_offsets: U32Ptr,
    batch_: Int32,
    q_heads_: Int32,
    page_size: Int32,
    layers: Int32,
    kv_heads: Int32,
    layer: Int32,
    table_cols: Int32,
    q_rs: Int32,
    q_hs: Int32,
    chunk_: Int32,
    splits_: Int32,
    scale_log2: Float32,
    theta: Float32,
    factor: Float32,
    low_freq_factor: Float32,
    high_freq_factor: Float32,
    original_max_position: Float32,
):
    """`_split_decode_gpu`'s grid, block and output, with fewer instructions a key: each
    group of TPK = D / W lanes (lane slice i0 = W t, t = lane % TPK) takes a tile of U
    consecutive keys at a time, the stream s = warp * KPW + lane / TPK taking tiles
    j0 = start + (n STREAMS + s) U, n = 0, 1, ..., its next tile's K and V loaded before the
    current one is used. Per tile:

    Scores. The N = U GB (key, head) scores of the tile are numbered v = u GB + g. Lane t
    has f = R (t / DUP) (R = max(1, N / TPK) scores a lane ends with, DUP = max(1, TPK / N)
    lanes holding each) and keeps its registers in the order v ^ f: its entry u of the tile
    is key j0 + (u ^ f / GB), its query entry g is head h0 + (g ^ f % GB), so its partial
    dot product (over its W dims) in entry e = u GB + g belongs to score e ^ f.

    Reduce-scatter (recursive halving), steps k = 0 .. log2 min(N, TPK) - 1 with lane mask
    mk = TPK >> (k + 1) and half h = N >> (k + 1): entry e < h += partner (lane ^ mk)'s
    entry e + h. The partner's f is f ^ h, so its entry e + h holds score (e + h) ^ f ^ h
    = e ^ f: the same score. Invariant after step k: entry e < h of lane t holds score
    e ^ f summed over the 2^(k+1) lanes that differ from t only in the bits mk .. TPK / 2.
    No lane selects: the half kept is always the lower. Then a butterfly over the lane bits
    below DUP (lanes with the same f) completes the sums. Lane t then holds, in entry
    r < R, the full score f + r: key f / GB of the tile, head f % GB + r (R <= GB).

    Softmax. The lanes holding a head's U scores differ in the lane bits TPK / U ..
    TPK / 2; a max butterfly over them gives the tile's maximum, and m (kept per lane for
    its R heads, equal in those lanes) moves to it when it passes m by more than LAZY_MAX;
    when m moves in any lane of the warp (a vote), the correction exp2(m - m_new) rescales
    l and, shuffled to the lanes as below, the accumulators. p = exp2(score - m), one a
    score; l (per lane, for its key of the tile) += p.

    Values. Entry (u, g) of the output needs p of score (u GB + g) ^ f, which lane
    t ^ ((u GB + g) / R) DUP holds in entry (u GB + g) % R (f of that lane is
    f ^ R ((u GB + g) / R)): one xor shuffle each, then acc[g] += V[u] p. The head
    corrections come the same way (u = 0).

    At the end l is summed over the key lanes (bits TPK / U .. TPK / 2), and m and l are
    gathered into the output's head order (entry g: head h0 + (g ^ f % GB)) for
    `_decode_write_partial`. A tile costs a lane 2 W U conversions and 2 W N FMAs (dot and
    V), N - R + R log2(DUP U) shuffles for the scores and their maxima, N - 1 for p (GB - 1
    more when a maximum moves) and 2 R exp2: at D 128, GB 4, 8 shuffles and half an exp2 a
    key, where `_split_decode_gpu` spends 16 shuffles (and adds), 8 exp2 and 32 rescaling
    multiplies."""
    comptime W = 16 // size_of[dtype]()
    comptime TPK = D // W
    comptime KPW = 32 // TPK
    comptime STREAMS = DECODE_WARPS * KPW
    comptime N = U * GB
    comptime R = max(1, N // TPK)
    comptime DUP = max(1, TPK // N)
    comptime F = SIMD[DType.float32, W]
    comptime NEG_INF = -inf[DType.float32]()
    comptime STEP = STREAMS * U
    comptime assert U <= TPK and R <= GB, "a tile's scores must fit the lanes of a key"

    var lay = PagedLayout(
        Int(page_size), Int(layers), Int(kv_heads), D, Int(layer), Int(table_cols)
    )
    var freqs = RopeFreqs(theta, factor, low_freq_factor, high_freq_factor, original_max_position)
    var q_heads = Int(q_heads_)
    var group = q_heads // lay.kv_heads
    var subs = group // GB
    var split = block_idx.x
    var kvh = block_idx.y // subs
    var h0 = kvh * group + (block_idx.y % subs) * GB
    var row = block_idx.z
    var splits = Int(splits_)
    var chunk = Int(chunk_)
    var tid = thread_idx.x
    var lane = tid % 32
    var warp = tid // 32
    var t = lane % TPK
    var i0 = t * W
    var stream = warp * KPW + lane // TPK
    var f = R * (t // DUP)
    var fu = f // GB
    var fg = f % GB
    var b = seq_of_row(row_offsets, Int(batch_), row)
    var pos = Int(cache_lengths[unsafe_offset=b]) + row - Int(row_offsets[unsafe_offset=b])

    var qv = _decode_queries[dtype, D, GB](
        q, row, Int(q_rs), Int(q_hs), h0, pos, freqs, scale_log2, i0, fg
    )

    var m = StaticTuple[Float32, R](fill=NEG_INF)
    var l = StaticTuple[Float32, R](fill=0)
    var acc = StaticTuple[F, GB](fill=0)
    var start = split * chunk
    var end = min(start + chunk, pos + 1)
    # Warp-uniform trip count (the shuffles need the whole warp); keys past the end are
    # masked out.
    var warp_j0 = start + warp * KPW * U
    var j0 = start + stream * U
    var v_off = lay.value_offset()
    var rows_of = lay.key_rows(b, kvh, i0)
    var last = rows_of.row(table, end - 1)  # end - 1 is a key: end >= 1, pos >= 0
    var at = rows_of.locate(j0)
    var kvn = _load_key_tile[dtype, U](
        blocks, _tile_rows[U](table, rows_of, at[0], at[1], j0, end, fu, last), v_off
    )
    while warp_j0 < end:
        var kv = kvn
        var nxt = rows_of.step(at[0], at[1], UInt32(STEP))
        kvn = _load_key_tile[dtype, U](
            blocks, _tile_rows[U](table, rows_of, nxt[0], nxt[1], j0 + STEP, end, fu, last), v_off
        )

        var s = StaticTuple[Float32, N](fill=0)
        comptime for u in range(U):
            var kf = kv[u].cast[DType.float32]()
            comptime for g in range(GB):
                var dot = qv[g][0] * kf[0]
                comptime for e in range(1, W):
                    dot = qv[g][e].fma(kf[e], dot)
                s[u * GB + g] = dot
        comptime for k in range(5):
            comptime h = N >> (k + 1)
            comptime mk = TPK >> (k + 1)
            comptime if h >= 1 and mk >= 1:
                comptime for e in range(h):
                    s[e] += shuffle_xor(s[e + h], UInt32(mk))
        comptime for k in range(5):
            comptime mk = DUP >> (k + 1)
            comptime if mk >= 1:
                comptime for r in range(R):
                    s[r] += shuffle_xor(s[r], UInt32(mk))
        if j0 + fu >= end:
            comptime for r in range(R):
                s[r] = NEG_INF

        var m_new = StaticTuple[Float32, R](fill=NEG_INF)
        var moved = False
        comptime for r in range(R):
            var mx = s[r]
            comptime for k in range(5):
                comptime mk = (TPK // U) << k
                comptime if mk < TPK:
                    mx = max(mx, shuffle_xor(mx, UInt32(mk)))
            m_new[r] = mx if mx > m[r] + LAZY_MAX else m[r]
            moved = moved or m_new[r] != m[r]
        if vote[DType.uint32](moved) != 0:
            var corr = StaticTuple[Float32, R](fill=0)
            comptime for r in range(R):
                corr[r] = _merge_scale(m[r], m_new[r])
                l[r] = l[r] * corr[r]
                m[r] = m_new[r]
            comptime for g in range(GB):
                comptime src = (g // R) * DUP
                var c = corr[g % R]
                comptime if src != 0:
                    c = shuffle_xor(c, UInt32(src))
                acc[g] = acc[g] * c
        var p = StaticTuple[Float32, R](fill=0)
        comptime for r in range(R):
            p[r] = Float32(0) if m[r] == NEG_INF else exp2(s[r] - m[r])
            l[r] += p[r]

        comptime for u in range(U):
            var vf = kv[U + u].cast[DType.float32]()
            comptime for g in range(GB):
                comptime e = u * GB + g
                comptime src = (e // R) * DUP
                var pe = p[e % R]
                comptime if src != 0:
                    pe = shuffle_xor(pe, UInt32(src))
                acc[g] = vf.fma(F(pe), acc[g])

        j0 += STEP
        warp_j0 += STEP
        at = nxt

    # l over the tile's key lanes; then m and l in the output's head order.
    comptime for r in range(R):
        comptime for k in range(5):
            comptime mk = (TPK // U) << k
            comptime if mk < TPK:
                l[r] += shuffle_xor(l[r], UInt32(mk))
    var m_h = StaticTuple[Float32, GB](fill=NEG_INF)
    var l_h = StaticTuple[Float32, GB](fill=0)
    comptime for g in range(GB):
        comptime src = (g // R) * DUP
        m_h[g] = m[g % R]
        l_h[g] = l[g % R]
        comptime if src != 0:
            m_h[g] = shuffle_xor(m_h[g], UInt32(src))
            l_h[g] = shuffle_xor(l_h[g], UInt32(src))

    _decode_write_partial[D, GB, W](
        m_h, l_h, acc, fg, m_part, l_part, acc_part, (row * q_heads + h0) * splits + split,
        splits,
    )


def _split_decode_launch[
    dtype: DType, D: Int, GB: Int, pipelined: Bool, tiled: Bool = False
](
    o: Pointer[Scalar[dtype], MutAnyOrigin],
    q: Pointer[Scalar[dtype], MutAnyOrigin],
    blocks: Pointer[Scalar[dtype], MutAnyOrigin],
    cache_lengths: U32Ptr,
    table: U32Ptr,
    row_offsets: U32Ptr,
    rows: Int,
    batch: Int,
    max_seq: Int,
    q_heads: Int,
    q_rs: Int,
    q_hs: Int,
    scale: Float32,
    lay: PagedLayout,
    freqs: RopeFreqs,
    ctx: DeviceContext,
) raises:
    """`_tiled_decode_gpu` with `tiled`, else `_split_decode_gpu[..., pipelined]`, then
    `_decode_combine_gpu`. Splits sized from max_seq, a bound on the longest sequence
    (cached + new: every row's keys lie below it; the host does not read the cache lengths);
    splits past a row's keys are empty. The tiled kernel's chunks are whole block steps
    (STREAMS x TILE_KEYS keys), so its tiles start at multiples of TILE_KEYS."""
    comptime W = 16 // size_of[dtype]()
    comptime BLOCK_STEP = DECODE_WARPS * (32 // (D // W)) * TILE_KEYS if tiled else 1
    var bound = max(1, max_seq)
    var blocks_per_split = rows * lay.kv_heads * (q_heads // lay.kv_heads // GB)
    var splits = max(
        1, min(ceildiv(bound, DECODE_MIN_CHUNK), ceildiv(DECODE_TARGET_BLOCKS, blocks_per_split))
    )
    var chunk = ceildiv(ceildiv(bound, splits), BLOCK_STEP) * BLOCK_STEP
    splits = ceildiv(bound, chunk)
    var m_part = ctx.enqueue_create_buffer[DType.float32](rows * q_heads * splits)
    var l_part = ctx.enqueue_create_buffer[DType.float32](rows * q_heads * splits)
    var acc_part = ctx.enqueue_create_buffer[DType.float32](rows * q_heads * splits * D)
    comptime kernel = _tiled_decode_gpu[dtype, D, GB] if tiled else _split_decode_gpu[dtype, D, GB, pipelined]
    ctx.enqueue_function[kernel](
        m_part.unsafe_ptr(), l_part.unsafe_ptr(), acc_part.unsafe_ptr(), q, blocks,
        cache_lengths, table, row_offsets, Int32(batch), Int32(q_heads), Int32(lay.page_size),
        Int32(lay.layers), Int32(lay.kv_heads), Int32(lay.layer), Int32(lay.table_cols),
        Int32(q_rs), Int32(q_hs), Int32(chunk), Int32(splits), scale * LOG2E,
        freqs.theta, freqs.factor, freqs.low_freq_factor, freqs.high_freq_factor,
        freqs.original_max_position,
        grid_dim=(splits, lay.kv_heads * (q_heads // lay.kv_heads // GB), rows),
        block_dim=DECODE_THREADS,
    )
    ctx.enqueue_function[_decode_combine_gpu[dtype]](
        o, m_part.unsafe_ptr(), l_part.unsafe_ptr(), acc_part.unsafe_ptr(),
        Int32(splits), Int32(D),
        grid_dim=rows * q_heads, block_dim=DECODE_THREADS,
    )
    # Frees are stream-ordered: the buffers outlive the kernels that use them.
    _ = m_part^
    _ = l_part^
    _ = acc_part^


def _split_decode_dispatch[
    dtype: DType, pipelined: Bool, tiled: Bool = False
](
    o: Pointer[Scalar[dtype], MutAnyOrigin],
    q: Pointer[Scalar[dtype], MutAnyOrigin],
    blocks: Pointer[Scalar[dtype], MutAnyOrigin],
    cache_lengths: U32Ptr,
    table: U32Ptr,
    row_offsets: U32Ptr,
    rows: Int,
    batch: Int,
    max_seq: Int,
    q_heads: Int,
    q_rs: Int,
    q_hs: Int,
    scale: Float32,
    lay: PagedLayout,
    freqs: RopeFreqs,
    ctx: DeviceContext,
) raises:
    """`_split_decode_launch` for the runtime head dim and heads per block; the caller
    checks `_split_decode_supported` first."""
    comptime if dtype == DType.bfloat16 or dtype == DType.float16:
        var gb = _decode_heads_per_block(q_heads // lay.kv_heads)
        comptime for D in [64, 128]:
            if lay.head_dim == D:
                comptime for GB in [1, 2, 4]:
                    if gb == GB:
                        _split_decode_launch[dtype, D, GB, pipelined, tiled](
                            o, q, blocks, cache_lengths, table, row_offsets, rows, batch,
                            max_seq, q_heads, q_rs, q_hs, scale, lay, freqs, ctx,
                        )
                        return
    raise Error("kt.paged_rope_attention: no decode kernel for this shape")


def _prefill_min_blocks(D: Int) -> Int:
    """`_prefill_gpu`'s MB: 2 at D 64 (128 registers, 70 KiB of shared memory: two blocks
    an SM overlap one's global loads with the other's arithmetic); 1 above (the
    accumulators need the registers)."""
    return 2 if D == 64 else 1


def _prefill_launch[
    dtype: DType, D: Int, MB: Int = _prefill_min_blocks(D)
](
    o: Pointer[Scalar[dtype], MutAnyOrigin],
    q: Pointer[Scalar[dtype], MutAnyOrigin],
    blocks: Pointer[Scalar[dtype], MutAnyOrigin],
    cache_lengths: U32Ptr,
    table: U32Ptr,
    row_offsets: U32Ptr,
    rows: Int,
    batch: Int,
    q_heads: Int,
    q_rs: Int,
    q_hs: Int,
    scale: Float32,
    lay: PagedLayout,
    freqs: RopeFreqs,
    ctx: DeviceContext,
) raises:
    """`_prefill_gpu[dtype, D, MB]` on its grid, the shared memory opted in past 48 KiB."""
    comptime SMEM = _prefill_smem_floats[D]() * size_of[Float32]()
    var group = q_heads // lay.kv_heads
    var gh = _prefill_heads_per_block(group)
    comptime W = 16 // size_of[dtype]()
    var vec = Int(blocks) % 16 == 0 and lay.head_dim % W == 0
    ctx.enqueue_function[_prefill_gpu[dtype, D, MB]](
        o, q, blocks, cache_lengths, table, row_offsets,
        Int32(batch), Int32(q_heads), Int32(lay.page_size), Int32(lay.layers),
        Int32(lay.kv_heads), Int32(lay.head_dim), Int32(lay.layer), Int32(lay.table_cols),
        Int32(q_rs), Int32(q_hs), Int32(gh), Int32(1 if vec else 0), scale * LOG2E,
        freqs.theta, freqs.factor, freqs.low_freq_factor, freqs.high_freq_factor,
        freqs.original_max_position,
        grid_dim=(_prefill_tiles(rows, batch, PREFILL_BM // gh), lay.kv_heads * (group // gh)),
        block_dim=PREFILL_THREADS,
        shared_mem_bytes=SMEM,
        func_attribute=FuncAttribute.MAX_DYNAMIC_SHARED_SIZE_BYTES(UInt32(SMEM)),
    )


def _prefill_dispatch[
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
    q_heads: Int,
    q_rs: Int,
    q_hs: Int,
    scale: Float32,
    lay: PagedLayout,
    freqs: RopeFreqs,
    ctx: DeviceContext,
) raises:
    """The tiled prefill kernel for the head dim padded to 64, 128 or 256."""
    var dp = _prefill_head_dim(lay.head_dim)
    comptime for D in [64, 128, 256]:
        if dp == D:
            _prefill_launch[dtype, D](
                o, q, blocks, cache_lengths, table, row_offsets, rows, batch, q_heads, q_rs,
                q_hs, scale, lay, freqs, ctx,
            )
            return
    raise Error("kt.paged_rope_attention: no prefill kernel for head dim ", lay.head_dim)


def _attention_gpu_launch[
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
    q_heads: Int,
    q_rs: Int,
    q_hs: Int,
    scale: Float32,
    lay: PagedLayout,
    freqs: RopeFreqs,
    ctx: DeviceContext,
) raises:
    """`_attention_gpu`, one block per (row, q head)."""
    ctx.enqueue_function[_attention_gpu[dtype]](
        o, q, blocks, cache_lengths, table, row_offsets,
        Int32(batch), Int32(q_heads), Int32(lay.page_size), Int32(lay.layers),
        Int32(lay.kv_heads), Int32(lay.head_dim), Int32(lay.layer), Int32(lay.table_cols),
        Int32(q_rs), Int32(q_hs), scale, freqs.theta, freqs.factor, freqs.low_freq_factor, freqs.high_freq_factor,
        freqs.original_max_position,
        grid_dim=rows * q_heads, block_dim=GPU_BLOCK,
    )


# The op's prefill takes the tiled kernel: on the H200 (2026-12-03) tests/mojo/gpu_launch.mojo
# --check matched it with `_attention_gpu` on 5 shapes x 3 dtypes and `kt verify
# paged_rope_attention --device gpu` passed with it through MAX (benchmarks/results/kernels_h200/).
# False puts the per-row kernel back in the op.
comptime TILED_PREFILL = True
# The split-KV decode with its key loads one step ahead (`_split_decode_gpu`'s `pipelined`): on
# the H200 (2026-12-03) it matched the per-row kernel on 6 decode batches (D 64/128, pages
# 7/16/128, GQA 1/4/8), passed `kt verify paged_rope_attention --device gpu` in bf16 and fp16,
# and took 0.68x the time of the loop before it at B 8 x 16k keys (D 128), 0.50x at B 32 x 4k
# (D 64) (benchmarks/results/kernels_h200/pipelined_decode_2026-12-03/). False puts the old
# loop back.
comptime PIPELINED_DECODE = True
# Prefill on MAX's paged flash attention behind kt's query rotation (`paged_max_prefill.mojo`),
# for the shapes it instantiates: on the H200 (2026-12-03) tests/mojo/gpu_launch.mojo --check
# matched it with `_attention_gpu` on 5 prefill batches in bf16 (MAX's FA3) and fp16 (its FA2),
# `kt verify paged_rope_attention --device gpu` passed with it through MAX, and it took 0.09-0.21x
# the tiled kernel's time (270 TFLOP/s on one 8k prompt; benchmarks/results/kernels_h200/
# paged_candidates_2026-12-03/). False puts the tiled kernel back.
comptime MAX_PREFILL = True
# The split-KV decode a tile of TILE_KEYS keys per lane group at a time (`_tiled_decode_gpu`): on
# the H200 (2026-12-03) it matched the per-row kernel on 6 decode batches per dtype (bf16, fp16),
# passed `kt verify paged_rope_attention --device gpu`, and took 0.56-0.73x the pipelined loop's
# time on 6 decode shapes (3.1 TB/s at B 8 x 16k keys, D 128; same folder). False puts
# `_split_decode_gpu` back.
comptime TILED_DECODE = True
# The host's maximum lengths (the op's max_prompt_length / max_cache_length) tighten the GPU
# kernels' bounds: MAX's prefill grid and q_max_seq_len, the decode's split sizing. Off until
# tests/mojo/gpu_launch.mojo --check ("exact lengths check: all PASS") and gpu_bench pick it on
# a GPU: with False the op ignores them and keeps the shape bounds it was verified with. On the
# H200 it checks, and gpu_bench gives it 0.56-0.99x the shipped time (0.89x at 8 x 1024
# prefill) but twice refused it on one shape where both paths do the same work (1.065 on
# 2026-12-04 at 1 x 8192 prefill, 1.053 later at B 8 x 4k decode: single non-interleaved
# means); it has not been through kt verify on the GPU with the flag on.
comptime EXACT_LENGTHS = False


def paged_rope_attention_gpu[
    dtype: DType,
    tiled_prefill: Bool = TILED_PREFILL,
    pipelined_decode: Bool = PIPELINED_DECODE,
    max_prefill: Bool = MAX_PREFILL,
    tiled_decode: Bool = TILED_DECODE,
    exact_lengths: Bool = EXACT_LENGTHS,
](
    o: Pointer[Scalar[dtype], MutAnyOrigin],
    q: Pointer[Scalar[dtype], MutAnyOrigin],
    blocks: Pointer[Scalar[dtype], MutAnyOrigin],
    cache_lengths: U32Ptr,
    table: U32Ptr,
    row_offsets: U32Ptr,
    rows: Int,
    batch: Int,
    max_prompt_length: Int,
    max_cache_length: Int,
    q_heads: Int,
    q_rs: Int,
    q_hs: Int,
    scale: Float32,
    lay: PagedLayout,
    pages: Int,
    freqs: RopeFreqs,
    ctx: DeviceContext,
) raises:
    """The op's GPU branch (arguments validated, scale resolved; pages: the cache's page
    count). max_prompt_length (the most new tokens of a sequence) and max_cache_length (the
    longest sequence, cached + new), the host's exact values or upper bounds, 0 where unknown,
    tighten, with `exact_lengths` (EXACT_LENGTHS), the bounds from shapes: the longest prompt <= rows, the longest sequence <= table
    columns x page size. Decode (one new token per sequence: rows == batch), 16-bit dtypes,
    D 64 or 128, a 16-byte aligned cache: the split-KV kernel (`_tiled_decode_gpu` with
    `tiled_decode`, TILED_DECODE, else `_split_decode_gpu`), its splits sized from the
    longest sequence, then `_decode_combine_gpu`. Other decode steps: `_attention_gpu`, one
    block per (row, q head). Prefill (rows > batch: some sequence has several new tokens;
    decided from shapes, the host never reads the row offsets): with `max_prefill`
    (MAX_PREFILL), 16-byte aligned o and cache and a shape `_max_prefill_supported` lists,
    kt's query rotation and MAX's paged flash attention (`_max_prefill_dispatch`), given
    both maximum lengths; else the tiled `_prefill_gpu` with `tiled_prefill` (TILED_PREFILL,
    on), else `_attention_gpu`."""
    if rows * q_heads == 0:
        return
    var max_prompt = rows
    var max_seq = lay.table_cols * lay.page_size
    comptime if exact_lengths:
        if max_prompt_length > 0:
            max_prompt = min(rows, max_prompt_length)
        if max_cache_length > 0:
            max_seq = min(max_seq, max_cache_length)
    var aligned = Int(blocks) % 16 == 0
    if rows == batch and aligned and _split_decode_supported[dtype](lay.head_dim):
        _split_decode_dispatch[dtype, pipelined_decode, tiled_decode](
            o, q, blocks, cache_lengths, table, row_offsets, rows, batch, max_seq, q_heads,
            q_rs, q_hs, scale, lay, freqs, ctx,
        )
        return
    comptime if max_prefill:
        if (
            rows > batch
            and aligned
            and Int(o) % 16 == 0
            and _max_prefill_supported[dtype](q_heads, lay)
        ):
            _max_prefill_dispatch[dtype](
                o, q, blocks, cache_lengths, table, row_offsets, rows, batch, max_prompt,
                max_seq, q_heads, q_rs, q_hs, scale, lay, pages, freqs, ctx,
            )
            return
    if tiled_prefill and rows > batch:
        _prefill_dispatch[dtype](
            o, q, blocks, cache_lengths, table, row_offsets, rows, batch, q_heads, q_rs, q_hs,
            scale, lay, freqs, ctx,
        )
        return
    _attention_gpu_launch[dtype](
        o, q, blocks, cache_lengths, table, row_offsets, rows, batch, q_heads, q_rs, q_hs,
        scale, lay, freqs, ctx,
    )


@extensibility.register("kt.paged_rope_attention")
struct PagedRopeAttention:
    @staticmethod
    def execute[
        dtype: DType, //, target: StaticString
    ](
        o: OutputTensor[dtype=dtype, rank=3, ...],
        q: InputTensor[dtype=dtype, rank=3, ...],
        blocks: MutableInputTensor[dtype=dtype, rank=6, ...],
        cache_lengths: InputTensor[dtype=DType.uint32, rank=1, ...],
        lookup_table: InputTensor[dtype=DType.uint32, rank=2, ...],
        row_offsets: InputTensor[dtype=DType.uint32, rank=1, ...],
        layer: Int32,
        max_prompt_length: Int32,
        max_cache_length: Int32,
        scale: Float32,
        theta: Float32,
        factor: Float32,
        low_freq_factor: Float32,
        high_freq_factor: Float32,
        original_max_position: Float32,
        ctx: DeviceContext,
    ) raises:
        var rows = q.dim_size(0)
        var q_heads = q.dim_size(1)
        var head_dim = q.dim_size(2)
        var kv_heads = blocks.dim_size(4)
        var batch = cache_lengths.dim_size(0)
        if blocks.dim_size(1) != 2 or blocks.dim_size(5) != head_dim:
            raise Error("kt.paged_rope_attention: blocks must be [pages, 2, layers, page, kv heads, head dim] of q's head dim")
        if kv_heads == 0 or q_heads % kv_heads != 0:
            raise Error("kt.paged_rope_attention: kv heads must divide q heads")
        if head_dim % 2 != 0 or head_dim > MAX_HEAD_DIM:
            raise Error("kt.paged_rope_attention: head_dim must be even and at most ", MAX_HEAD_DIM)
        if Int(layer) < 0 or Int(layer) >= blocks.dim_size(2):
            raise Error("kt.paged_rope_attention: layer out of range")
        if lookup_table.dim_size(0) != batch or row_offsets.dim_size(0) != batch + 1:
            raise Error("kt.paged_rope_attention: lookup_table and row_offsets must cover the batch of cache_lengths")
        if max_prompt_length < 0 or max_cache_length < 0:
            raise Error("kt.paged_rope_attention: the maximum lengths must be >= 0 (0: unknown)")
        var lay = PagedLayout(
            blocks.dim_size(3), blocks.dim_size(2), kv_heads, head_dim, Int(layer),
            lookup_table.dim_size(1),
        )
        # q may be a strided view (MAX's GPU graphs hand a slice of the QKV projection to its
        # consumer as a view): rows and heads are addressed through q's strides. o and the cache
        # must be dense.
        var q_rs = q.stride_length[0]()
        var q_hs = q.stride_length[1]()
        if q.stride_length[2]() != 1:
            raise Error("kt.paged_rope_attention: q's head dim must be contiguous")
        if o.stride_length[2]() != 1 or o.stride_length[1]() != head_dim or o.stride_length[0]() != q_heads * head_dim:
            raise Error("kt.paged_rope_attention: the output must be dense")
        if blocks.stride_length[5]() != 1 or blocks.stride_length[4]() != head_dim or blocks.stride_length[0]() != 2 * lay.layers * lay.page_size * kv_heads * head_dim:
            raise Error("kt.paged_rope_attention: the cache's pages must be dense (a padded page stride is not supported)")
        var sm_scale = scale if scale > 0 else Float32(1.0) / sqrt(Float32(head_dim))
        var freqs = RopeFreqs(theta, factor, low_freq_factor, high_freq_factor, original_max_position)
        var op = o.unsafe_ptr()
        var qp = q.unsafe_ptr()
        var bp = blocks.unsafe_ptr()
        var cl = cache_lengths.unsafe_ptr()
        var lt = lookup_table.unsafe_ptr()
        var ro = row_offsets.unsafe_ptr()
        comptime if is_cpu[target]():
            if batch == 0:
                return

            def attend(item: Int) {var op, var qp, var bp, var cl, var lt, var ro, var batch, var q_heads, var q_rs, var q_hs, var sm_scale, var lay, var freqs}:
                _attend_row[dtype](op, qp, bp, cl, lt, ro, batch, q_heads, item, q_rs, q_hs, sm_scale, lay, freqs)

            sync_parallelize(attend, rows * q_heads)
        else:
            paged_rope_attention_gpu[dtype](
                op, qp, bp, cl, lt, ro, rows, batch, Int(max_prompt_length),
                Int(max_cache_length), q_heads, q_rs, q_hs, sm_scale, lay, blocks.dim_size(0),
                freqs, ctx,
            )
