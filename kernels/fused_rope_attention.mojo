"""RoPE on q and k fused with scaled-dot-product attention, grouped-query, causal or not.

o[b, i, h] = softmax_j(scale * rope(q[b, i, h]) . rope(k[b, j, h // group])) v[b, j, h // group]

Layout BSHD. Keys sit at positions 0..Skv-1 and queries at the end, Skv-Sq+i (prefill
after a cache), so the causal mask is bottom-right aligned: query i sees keys
j <= Skv - Sq + i (the flash-attention >= 2.1 convention). scale <= 0 means 1/sqrt(D).
RoPE follows `rope.mojo` (half rotation, optional Llama 3 frequency scaling); the
softmax subtracts the running maximum and everything accumulates in fp32.
"""

import extensibility
from extensibility import InputTensor, OutputTensor
from max.algorithm import sync_parallelize
from max.gpu import MAX_THREADS_PER_BLOCK_METADATA, block_idx, thread_idx
from max.gpu.primitives.warp import shuffle_xor
from max.gpu.host import DeviceAttribute, DeviceContext
from max.gpu.host.info import is_cpu
from max.gpu.sync import barrier
from layout import Idx, TileTensor, row_major
from nn.attention.gpu.mha import flash_attention
from nn.attention.mha_mask import CausalMask, NullMask
from std.math import ceildiv, cos, exp, exp2, floor, inf, sin, sqrt
from std.memory import alloc, unsafe_stack_allocation
from std.sys import inlined_assembly, size_of
from std.sys.info import is_nvidia_gpu
from std.utils import StaticTuple

from .decode_tile import _merge_scale, tile_finish, tile_pick, tile_reduce_scatter, tile_softmax
from .rope import (
    RopeFreqs,
    _rope_gpu_launch,
    rotate_pair,
    sincos_f32_accurate,
    sincos_f32_fast,
)

comptime MAX_HEAD_DIM = 256
comptime GPU_BLOCK = 128

# Fast GPU path: (q heads, kv heads) pairs and head dims for which the op pre-rotates q
# and k and runs MAX's tensor-core flash attention. MAX's kernels need the head count
# and head dim at compile time and every (pair, dim, mask) is one more ~10-20 s kernel
# instantiation per dtype, so keep these short; other shapes take `_attention_gpu`.
comptime FAST_HEAD_CONFIGS = 2
comptime FAST_HEAD_DIMS = 1


def _fast_heads(i: Int) -> Tuple[Int, Int]:
    if i == 0:
        return (32, 32)
    return (32, 8)


def _fast_head_dim(i: Int) -> Int:
    return 128


def _rotated_row[
    dtype: DType
](
    dst: Pointer[Float32, MutUntrackedOrigin],
    src: Pointer[Scalar[dtype], _],
    head_dim: Int,
    pos: Int,
    freqs: RopeFreqs,
):
    """dst = rope(src) in fp32 for one head vector at position pos."""
    var half = head_dim // 2
    for i in range(half):
        var angle = Float32(pos) * freqs.inv_freq(i, head_dim)
        var r = rotate_pair(
            src[unsafe_offset=i].cast[DType.float32](),
            src[unsafe_offset=i + half].cast[DType.float32](),
            cos(angle),
            sin(angle),
        )
        dst[unsafe_offset=i] = r[0]
        dst[unsafe_offset=i + half] = r[1]


def _attention_gpu[
    dtype: DType
](
    o: Pointer[Scalar[dtype], MutAnyOrigin],
    q: Pointer[Scalar[dtype], MutAnyOrigin],
    k: Pointer[Scalar[dtype], MutAnyOrigin],
    v: Pointer[Scalar[dtype], MutAnyOrigin],
    sq_: Int32,
    skv_: Int32,
    hq_: Int32,
    hk_: Int32,
    head_dim_: Int32,
    scale: Float32,
    causal: Int32,
    theta: Float32,
    factor: Float32,
    low_freq_factor: Float32,
    high_freq_factor: Float32,
    original_max_position: Float32,
):
    """One block per (batch, query, head) row; keys stream in tiles of GPU_BLOCK, one per
    thread, with an online softmax; each thread owns head dims tid and tid + GPU_BLOCK."""
    var sq, skv, hq, hk, head_dim = Int(sq_), Int(skv_), Int(hq_), Int(hk_), Int(head_dim_)
    var freqs = RopeFreqs(theta, factor, low_freq_factor, high_freq_factor, original_max_position)
    var row = block_idx.x
    var tid = thread_idx.x
    var h = row % hq
    var i = (row // hq) % sq
    var b = row // (hq * sq)
    var kvh = h // (hq // hk)
    var half = head_dim // 2
    var q_pos = skv - sq + i
    var last_key = q_pos if causal != 0 else skv - 1

    var q_s = unsafe_stack_allocation[MAX_HEAD_DIM, Float32, address_space=.SHARED]()
    var inv_s = unsafe_stack_allocation[MAX_HEAD_DIM // 2, Float32, address_space=.SHARED]()
    var p_s = unsafe_stack_allocation[GPU_BLOCK, Float32, address_space=.SHARED]()
    var red_s = unsafe_stack_allocation[GPU_BLOCK, Float32, address_space=.SHARED]()

    var q_row = q.unsafe_offset(((b * sq + i) * hq + h) * head_dim)
    for d in range(tid, half, GPU_BLOCK):
        var inv = freqs.inv_freq(d, head_dim)
        inv_s[unsafe_offset=d] = inv
        var angle = Float32(q_pos) * inv
        # Accurate fp32 sin/cos: std.math's lower to sin/cos.approx on NVIDIA GPUs.
        var sc = sincos_f32_accurate(SIMD[DType.float32, 1](angle))
        var r = rotate_pair(
            q_row[unsafe_offset=d].cast[DType.float32](),
            q_row[unsafe_offset=d + half].cast[DType.float32](),
            sc[1][0],
            sc[0][0],
        )
        q_s[unsafe_offset=d] = r[0] * scale
        q_s[unsafe_offset=d + half] = r[1] * scale
    barrier()

    var m = -inf[DType.float32]()
    var l = Float32(0)
    var acc0 = Float32(0)
    var acc1 = Float32(0)
    var tile = 0
    while tile <= last_key:
        var j = tile + tid
        var s = -inf[DType.float32]()
        if j <= last_key:
            var k_row = k.unsafe_offset(((b * skv + j) * hk + kvh) * head_dim)
            var dot = Float32(0)
            for d in range(half):
                var angle = Float32(j) * inv_s[unsafe_offset=d]
                var sc = sincos_f32_accurate(SIMD[DType.float32, 1](angle))
                var r = rotate_pair(
                    k_row[unsafe_offset=d].cast[DType.float32](),
                    k_row[unsafe_offset=d + half].cast[DType.float32](),
                    sc[1][0],
                    sc[0][0],
                )
                dot += q_s[unsafe_offset=d] * r[0] + q_s[unsafe_offset=d + half] * r[1]
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
        var p = exp(s - m_new) if j <= last_key else Float32(0)
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
        var n = min(GPU_BLOCK, last_key + 1 - tile)
        for t in range(n):
            var v_row = v.unsafe_offset(((b * skv + tile + t) * hk + kvh) * head_dim)
            var pt = p_s[unsafe_offset=t]
            if tid < head_dim:
                acc0 += pt * v_row[unsafe_offset=tid].cast[DType.float32]()
            if tid + GPU_BLOCK < head_dim:
                acc1 += pt * v_row[unsafe_offset=tid + GPU_BLOCK].cast[DType.float32]()
        m = m_new
        tile += GPU_BLOCK
        barrier()

    var o_row = o.unsafe_offset(((b * sq + i) * hq + h) * head_dim)
    if tid < head_dim:
        o_row[unsafe_offset=tid] = (acc0 / l).cast[dtype]()
    if tid + GPU_BLOCK < head_dim:
        o_row[unsafe_offset=tid + GPU_BLOCK] = (acc1 / l).cast[dtype]()


# Decode path (one query per sequence, 16-bit dtypes): split-KV flash decoding with RoPE
# applied to each key as it streams through registers, so rotated keys never touch memory.
comptime DECODE_WARPS = 4
comptime DECODE_THREADS = DECODE_WARPS * 32
comptime DECODE_UNROLL = 2
# Keys per split at least this many; splits at most enough for this many blocks in all.
comptime DECODE_MIN_CHUNK = 256
comptime DECODE_TARGET_BLOCKS = 1024
comptime LOG2E = Float32(1.4426950408889634)
# Keys a lane group of `_dense_tiled_decode_gpu` takes per step (a lane holds four 16-byte
# slices of a key and its value, twice the paged kernel's two: half its TILE_KEYS keeps as many
# bytes in flight a lane).
comptime DENSE_TILE_KEYS = 2
# The dense decode a tile of DENSE_TILE_KEYS keys per lane group at a time
# (`_dense_tiled_decode_gpu`) in the op, in place of `_decode_partial_gpu`: on the H200
# (2026-12-04) "dense tiled decode check: all PASS", 0.56-0.69x its time in gpu_bench (3.36 TB/s
# at B 8, Skv 32768, D 128, against 1.88), and kt verify passed with it.
comptime DENSE_TILED_DECODE = True
# `_dense_wave_decode_gpu`'s L2 prefetch distance (block steps ahead) and a block's fixed cost
# in keys streamed (`_wave_chunk`).
comptime DENSE_WAVE_PREFETCH = 3
comptime DENSE_WAVE_BLOCK_KEYS = 128
# The dense decode over about one wave of long blocks with L2 prefetch
# (`_dense_wave_decode_launch`) in place of the tiled kernel's launch. On since 2026-12-04:
# checked and verified through MAX on the H200, 0.68x the tiled kernel's time at B 8 Skv 4k,
# 0.83x at 16k, 0.88x at 32k, 0.82x at B 32 D 64 4k (tests/mojo/gpu_bench.mojo; 2.89, 3.63 and
# 3.79 TB/s at B 8: 60, 76 and 79 % of HBM). Static
# numbers (sm_90a, bf16, D 128, GB 4): 255 registers, so 2 blocks (8 warps) an SM; the tiled
# loop is ~740 SASS instructions a warp step of 8 keys (~92 a key: 128 FMAs a key-lane for the
# 4 heads' dots and values, ~80 for the keys' sincos), so 100 % of HBM would need ~3.3
# instructions a clock an SM: long contexts are near the loop's issue ceiling; what this
# variant removes is the short-context cost of 4 waves of short blocks (1024 at 16 splits)
# and the one-step lead of the register loads.
comptime DENSE_WAVE_DECODE = True


def _decode_heads_per_block(group: Int) -> Int:
    """q heads of one kv group handled by one block (4 at most: registers)."""
    if group % 4 == 0:
        return 4
    if group % 2 == 0:
        return 2
    return 1


def _decode_supported[dtype: DType](head_dim: Int) -> Bool:
    """Whether `_decode_partial_gpu` has an instantiation for this dtype and head dim."""
    comptime if dtype != DType.bfloat16 and dtype != DType.float16:
        return False
    return head_dim == 64 or head_dim == 128


def _sincos_hw[
    width: SIMDLength, //
](x: SIMD[DType.float32, width]) -> Tuple[SIMD[DType.float32, width], SIMD[DType.float32, width]]:
    """(sin(x), cos(x)) for the decode kernel's keys, cheap: x reduced exactly to [-pi, pi]
    by 2 pi in three fp32 parts with fused multiply-adds (as `sincos_f32_fast`), then the
    GPU's sin/cos instructions (std.math lowers to sin.approx / cos.approx), whose absolute
    error on [-pi, pi] is below 4e-7. Only for the 16-bit outputs the decode kernel serves
    (an fp16 ulp at 1 is 1e-3); |x| < 2^17 (positions below 131072)."""
    comptime F = SIMD[DType.float32, width]
    var kf = floor(x * 0.15915493667125701904296875 + 0.5)
    var r = (-kf).fma(F(6.2831854820251464844), x)
    r = (-kf).fma(F(-1.7484555314695172e-07), r)
    r = (-kf).fma(F(-6.8604980400235275e-15), r)
    return (sin(r), cos(r))


def _decode_partial_gpu[
    dtype: DType, D: Int, GB: Int, unroll: Int = DECODE_UNROLL, warps: Int = DECODE_WARPS
](
    m_part: Pointer[Float32, MutAnyOrigin],
    l_part: Pointer[Float32, MutAnyOrigin],
    acc_part: Pointer[Float32, MutAnyOrigin],
    q: Pointer[Scalar[dtype], MutAnyOrigin],
    k: Pointer[Scalar[dtype], MutAnyOrigin],
    v: Pointer[Scalar[dtype], MutAnyOrigin],
    skv_: Int32,
    hq_: Int32,
    hk_: Int32,
    chunk_: Int32,
    scale_log2: Float32,
    theta: Float32,
    factor: Float32,
    low_freq_factor: Float32,
    high_freq_factor: Float32,
    original_max_position: Float32,
):
    """One block per (split of the keys, kv head and GB of its q heads, batch row):
    grid = (splits, hk * group / GB, batch), 32 * warps threads.

    The query sits at position skv - 1 and sees every key (the causal mask is moot).
    A key's head vector is read by TPK = D / 2 / W threads, each holding W-element
    (16-byte) slices of both halves, so the RoPE pair (i, i + D/2) lives in one thread:
    it rotates its slices in registers (fp32 angle = pos * inv_freq, `sincos_f32_fast`),
    dots them with its slices of the GB rotated queries (pre-scaled by scale * log2 e),
    and a TPK-lane butterfly sums the dot. Each group of TPK lanes keeps its own online
    softmax (base-2) over the keys it visits; at the end the groups merge through warp
    shuffles and shared memory, and the block writes its running max m, sum l and
    unnormalized output acc (fp32) for `_decode_combine_gpu`.
    """
    comptime W = 16 // size_of[dtype]()
    comptime HALF = D // 2
    comptime TPK = HALF // W
    comptime KPW = 32 // TPK
    comptime STREAMS = warps * KPW
    comptime F = SIMD[DType.float32, W]
    comptime NEG_INF = -inf[DType.float32]()
    comptime align = 16

    var skv, hq, hk, chunk = Int(skv_), Int(hq_), Int(hk_), Int(chunk_)
    var group = hq // hk
    var subs = group // GB
    var split = block_idx.x
    var kvh = block_idx.y // subs
    var h0 = kvh * group + (block_idx.y % subs) * GB
    var b = block_idx.z
    var splits = Int(ceildiv(skv, chunk))
    var tid = thread_idx.x
    var lane = tid % 32
    var warp = tid // 32
    var i0 = (lane % TPK) * W
    var stream = warp * KPW + lane // TPK

    var freqs = RopeFreqs(theta, factor, low_freq_factor, high_freq_factor, original_max_position)
    var inv_s = unsafe_stack_allocation[HALF, Float32, address_space=.SHARED]()
    for i in range(tid, HALF, warps * 32):
        inv_s[unsafe_offset=i] = freqs.inv_freq(i, D)
    barrier()
    var inv = F()
    comptime for e in range(W):
        inv[e] = inv_s[unsafe_offset=i0 + e]

    # The GB queries, rotated at position skv - 1 and pre-scaled.
    var q_lo = StaticTuple[F, GB](fill=0)
    var q_hi = StaticTuple[F, GB](fill=0)
    var qsc = sincos_f32_fast(Float32(skv - 1) * inv)
    comptime for g in range(GB):
        var row = (b * hq + h0 + g) * D + i0
        var x1 = q.unsafe_load[width=W, alignment=align](row).cast[DType.float32]()
        var x2 = q.unsafe_load[width=W, alignment=align](row + HALF).cast[DType.float32]()
        q_lo[g] = (x1 * qsc[1] - x2 * qsc[0]) * scale_log2
        q_hi[g] = (x2 * qsc[1] + x1 * qsc[0]) * scale_log2

    var m = StaticTuple[Float32, GB](fill=NEG_INF)
    var l = StaticTuple[Float32, GB](fill=0)
    var acc_lo = StaticTuple[F, GB](fill=0)
    var acc_hi = StaticTuple[F, GB](fill=0)
    var start = split * chunk
    var end = min(start + chunk, skv)
    var kv_stride = hk * D
    var base = start + stream
    # Warp-uniform trip count: every lane runs every iteration (the butterflies need the
    # whole warp); a lane past the end masks its key out.
    var warp_first = start + warp * KPW
    while warp_first < end:
        var k1s = StaticTuple[SIMD[dtype, W], unroll](fill=0)
        var k2s = StaticTuple[SIMD[dtype, W], unroll](fill=0)
        var v1s = StaticTuple[SIMD[dtype, W], unroll](fill=0)
        var v2s = StaticTuple[SIMD[dtype, W], unroll](fill=0)
        # Every load of the step first, to keep more bytes in flight.
        comptime for u in range(unroll):
            var j = base + u * STREAMS
            if j < end:
                var row = (b * skv + j) * kv_stride + kvh * D + i0
                k1s[u] = k.unsafe_load[width=W, alignment=align](row)
                k2s[u] = k.unsafe_load[width=W, alignment=align](row + HALF)
                v1s[u] = v.unsafe_load[width=W, alignment=align](row)
                v2s[u] = v.unsafe_load[width=W, alignment=align](row + HALF)
        # Scores of the step's keys (-inf past the end), then one softmax update per head
        # for all of them: one rescale of acc per unroll keys.
        var scores = StaticTuple[Float32, unroll * GB](fill=NEG_INF)
        var v1f = StaticTuple[F, unroll](fill=0)
        var v2f = StaticTuple[F, unroll](fill=0)
        comptime for u in range(unroll):
            var j = base + u * STREAMS
            var sc = _sincos_hw(Float32(j) * inv)
            var k1 = k1s[u].cast[DType.float32]()
            var k2 = k2s[u].cast[DType.float32]()
            var kr1 = k1 * sc[1] - k2 * sc[0]
            var kr2 = k2 * sc[1] + k1 * sc[0]
            v1f[u] = v1s[u].cast[DType.float32]()
            v2f[u] = v2s[u].cast[DType.float32]()
            comptime for g in range(GB):
                var dot = (q_lo[g] * kr1 + q_hi[g] * kr2).reduce_add()
                comptime for step in range(5):
                    comptime off = TPK >> (step + 1)
                    comptime if off > 0:
                        dot += shuffle_xor(dot, UInt32(off))
                if j < end:
                    scores[u * GB + g] = dot
        comptime for g in range(GB):
            var m_new = m[g]
            comptime for u in range(unroll):
                m_new = max(m_new, scores[u * GB + g])
            if m_new != NEG_INF:
                var corr = _merge_scale(m[g], m_new)
                var l_new = l[g] * corr
                var a1 = acc_lo[g] * corr
                var a2 = acc_hi[g] * corr
                comptime for u in range(unroll):
                    var p = exp2(scores[u * GB + g] - m_new)  # 0 for a masked key
                    l_new += p
                    a1 = v1f[u].fma(F(p), a1)
                    a2 = v2f[u].fma(F(p), a2)
                l[g] = l_new
                acc_lo[g] = a1
                acc_hi[g] = a2
                m[g] = m_new
        base += unroll * STREAMS
        warp_first += unroll * STREAMS

    # Merge the KPW streams of each warp (lanes with the same slice, xor over the stream bits).
    comptime for step in range(5):
        comptime off = TPK << step
        comptime if off < 32:
            comptime for g in range(GB):
                var m_o = shuffle_xor(m[g], UInt32(off))
                var l_o = shuffle_xor(l[g], UInt32(off))
                var m_new = max(m[g], m_o)
                var a = _merge_scale(m[g], m_new)
                var c = _merge_scale(m_o, m_new)
                l[g] = l[g] * a + l_o * c
                comptime for e in range(W):
                    acc_lo[g][e] = acc_lo[g][e] * a + shuffle_xor(acc_lo[g][e], UInt32(off)) * c
                    acc_hi[g][e] = acc_hi[g][e] * a + shuffle_xor(acc_hi[g][e], UInt32(off)) * c
                m[g] = m_new

    # Then the warps, through shared memory.
    var m_s = unsafe_stack_allocation[warps * GB, Float32, address_space=.SHARED]()
    var l_s = unsafe_stack_allocation[warps * GB, Float32, address_space=.SHARED]()
    var acc_s = unsafe_stack_allocation[warps * GB * D, Float32, address_space=.SHARED]()
    if lane < TPK:
        comptime for g in range(GB):
            var at = (warp * GB + g) * D + i0
            comptime for e in range(W):
                acc_s[unsafe_offset=at + e] = acc_lo[g][e]
                acc_s[unsafe_offset=at + HALF + e] = acc_hi[g][e]
            if lane == 0:
                m_s[unsafe_offset=warp * GB + g] = m[g]
                l_s[unsafe_offset=warp * GB + g] = l[g]
    barrier()
    for idx in range(tid, GB * D, warps * 32):
        var g = idx // D
        var d = idx % D
        var m_all = NEG_INF
        comptime for w in range(warps):
            m_all = max(m_all, m_s[unsafe_offset=w * GB + g])
        var l_all = Float32(0)
        var a_all = Float32(0)
        comptime for w in range(warps):
            var c = _merge_scale(m_s[unsafe_offset=w * GB + g], m_all)
            l_all += l_s[unsafe_offset=w * GB + g] * c
            a_all += acc_s[unsafe_offset=(w * GB + g) * D + d] * c
        var part = (b * hq + h0 + g) * splits + split
        acc_part[unsafe_offset=part * D + d] = a_all
        if d == 0:
            m_part[unsafe_offset=part] = m_all
            l_part[unsafe_offset=part] = l_all


@always_inline
def _decode_write_partial[
    D: Int, GB: Int, W: Int
](
    m_in: StaticTuple[Float32, GB],
    l_in: StaticTuple[Float32, GB],
    acc_in: StaticTuple[SIMD[DType.float32, W], GB],
    hx: Int,
    m_part: Pointer[Float32, MutAnyOrigin],
    l_part: Pointer[Float32, MutAnyOrigin],
    acc_part: Pointer[Float32, MutAnyOrigin],
    part0: Int,
    splits: Int,
):
    """The block's epilogue (the whole block calls it). Each group of TPK = D / W lanes
    holds, in entry g, the online softmax state (base 2) of head h0 + (g ^ hx) over the keys
    it visited: m and l (the same in the group's lanes) and the lane's slice i0 .. i0 + W - 1
    of the unnormalized output. The groups of a warp merge through xor shuffles over the
    group bits of the lane (hx must agree across them), the warps through shared memory,
    and the block writes head h0 + g's state to part part0 + g * splits of m_part, l_part
    and acc_part."""
    comptime TPK = D // W
    comptime NEG_INF = -inf[DType.float32]()
    var m = m_in
    var l = l_in
    var acc = acc_in
    var tid = thread_idx.x
    var lane = tid % 32
    var warp = tid // 32
    var i0 = (lane % TPK) * W
    comptime for step in range(5):
        comptime off = TPK << step
        comptime if off < 32:
            comptime for g in range(GB):
                var m_o = shuffle_xor(m[g], UInt32(off))
                var l_o = shuffle_xor(l[g], UInt32(off))
                var m_new = max(m[g], m_o)
                var a = _merge_scale(m[g], m_new)
                var c = _merge_scale(m_o, m_new)
                l[g] = l[g] * a + l_o * c
                comptime for e in range(W):
                    acc[g][e] = acc[g][e] * a + shuffle_xor(acc[g][e], UInt32(off)) * c
                m[g] = m_new

    var m_s = unsafe_stack_allocation[DECODE_WARPS * GB, Float32, address_space=.SHARED]()
    var l_s = unsafe_stack_allocation[DECODE_WARPS * GB, Float32, address_space=.SHARED]()
    var acc_s = unsafe_stack_allocation[DECODE_WARPS * GB * D, Float32, address_space=.SHARED]()
    if lane < TPK:
        comptime for g in range(GB):
            var slot = warp * GB + (g ^ hx)
            comptime for e in range(W):
                acc_s[unsafe_offset=slot * D + i0 + e] = acc[g][e]
            if lane == 0:
                m_s[unsafe_offset=slot] = m[g]
                l_s[unsafe_offset=slot] = l[g]
    barrier()
    for idx in range(tid, GB * D, DECODE_THREADS):
        var g = idx // D
        var d = idx % D
        var m_all = NEG_INF
        comptime for w in range(DECODE_WARPS):
            m_all = max(m_all, m_s[unsafe_offset=w * GB + g])
        var l_all = Float32(0)
        var a_all = Float32(0)
        comptime for w in range(DECODE_WARPS):
            var c = _merge_scale(m_s[unsafe_offset=w * GB + g], m_all)
            l_all += l_s[unsafe_offset=w * GB + g] * c
            a_all += acc_s[unsafe_offset=(w * GB + g) * D + d] * c
        var part = part0 + g * splits
        acc_part[unsafe_offset=part * D + d] = a_all
        if d == 0:
            m_part[unsafe_offset=part] = m_all
            l_part[unsafe_offset=part] = l_all


@always_inline
def _dense_load_tile[
    dtype: DType, D: Int, U: Int
](
    k: Pointer[Scalar[dtype], MutAnyOrigin],
    v: Pointer[Scalar[dtype], MutAnyOrigin],
    k_at: Int,
    v_at: Int,
    kv_stride: Int,
    j0: Int,
    end: Int,
    ux: Int,
) -> StaticTuple[SIMD[dtype, 16 // size_of[dtype]()], 4 * U]:
    """This lane's 16-byte slices of keys j0 + (u ^ ux), u < U (element k_at of key 0 its
    first): entry u the key's at k_at, U + u its partner half of each RoPE pair at
    k_at + D / 2, 2U + u and 3U + u the value's at v_at and v_at + W. A key at or past `end`
    reads key end - 1 instead (no branch; its score is masked and its p is 0)."""
    comptime W = 16 // size_of[dtype]()
    var kv = StaticTuple[SIMD[dtype, W], 4 * U](fill=0)
    comptime for u in range(U):
        var row = min(j0 + (u ^ ux), end - 1) * kv_stride
        kv[u] = k.unsafe_load[width=W, alignment=16](k_at + row)
        kv[U + u] = k.unsafe_load[width=W, alignment=16](k_at + row + D // 2)
    comptime for u in range(U):
        var row = min(j0 + (u ^ ux), end - 1) * kv_stride
        kv[2 * U + u] = v.unsafe_load[width=W, alignment=16](v_at + row)
        kv[3 * U + u] = v.unsafe_load[width=W, alignment=16](v_at + row + W)
    return kv


@__llvm_metadata(
    MAX_THREADS_PER_BLOCK_METADATA=StaticTuple[Int32, 1](Int32(DECODE_THREADS)),
)
def _dense_tiled_decode_gpu[
    dtype: DType, D: Int, GB: Int, U: Int = DENSE_TILE_KEYS
](
    m_part: Pointer[Float32, MutAnyOrigin],
    l_part: Pointer[Float32, MutAnyOrigin],
    acc_part: Pointer[Float32, MutAnyOrigin],
    q: Pointer[Scalar[dtype], MutAnyOrigin],
    k: Pointer[Scalar[dtype], MutAnyOrigin],
    v: Pointer[Scalar[dtype], MutAnyOrigin],
    skv_: Int32,
    hq_: Int32,
    hk_: Int32,
    chunk_: Int32,
    scale_log2: Float32,
    theta: Float32,
    factor: Float32,
    low_freq_factor: Float32,
    high_freq_factor: Float32,
    original_max_position: Float32,
):
    """`_decode_partial_gpu`'s grid (DECODE_WARPS warps), queries and output, a tile of U
    keys per lane group at a time as `paged_rope_attention._tiled_decode_gpu`.

    A key is read by TPK = D / 2 / W lanes; lane t = lane % TPK holds, as in
    `_decode_partial_gpu`, the slices i0 .. i0 + W - 1 and i0 + D / 2 .. (i0 = W t) of the
    key, so both halves of each of its RoPE pairs: it rotates them in registers exactly as
    `_decode_partial_gpu` does (`_sincos_hw` of fp32 j * inv_freq, then
    (k1 c - k2 s, k2 c + k1 s)). Its value slice is dims 2 W t .. 2 W t + 2 W - 1 instead
    (values need no pairing), so its accumulator is one 2W-wide slice per head, as
    `_decode_write_partial` takes it. The stream s = warp * KPW + lane / TPK takes tiles
    j0 = start + (n STREAMS + s) U, n = 0, 1, ..., its next tile's K and V loaded before the
    current one is used. Scores, softmax and values as in `decode_tile.mojo` (N = U GB scores
    a tile, f = R (t / DUP): the lane's entry u is key j0 + (u ^ f / GB), its query entry g
    head h0 + (g ^ f % GB)); keys past the split's end are masked out."""
    comptime W = 16 // size_of[dtype]()
    comptime HALF = D // 2
    comptime TPK = HALF // W
    comptime KPW = 32 // TPK
    comptime STREAMS = DECODE_WARPS * KPW
    comptime N = U * GB
    comptime R = max(1, N // TPK)
    comptime DUP = max(1, TPK // N)
    comptime F = SIMD[DType.float32, W]
    comptime F2 = SIMD[DType.float32, 2 * W]
    comptime NEG_INF = -inf[DType.float32]()
    comptime STEP = STREAMS * U
    comptime assert U <= TPK and R <= GB, "a tile's scores must fit the lanes of a key"

    var skv, hq, hk, chunk = Int(skv_), Int(hq_), Int(hk_), Int(chunk_)
    var group = hq // hk
    var subs = group // GB
    var split = block_idx.x
    var kvh = block_idx.y // subs
    var h0 = kvh * group + (block_idx.y % subs) * GB
    var b = block_idx.z
    var splits = Int(ceildiv(skv, chunk))
    var tid = thread_idx.x
    var lane = tid % 32
    var warp = tid // 32
    var t = lane % TPK
    var i0 = t * W
    var stream = warp * KPW + lane // TPK
    var f = R * (t // DUP)
    var fu = f // GB
    var fg = f % GB

    var freqs = RopeFreqs(theta, factor, low_freq_factor, high_freq_factor, original_max_position)
    var inv_s = unsafe_stack_allocation[HALF, Float32, address_space=.SHARED]()
    for i in range(tid, HALF, DECODE_THREADS):
        inv_s[unsafe_offset=i] = freqs.inv_freq(i, D)
    barrier()
    var inv = F()
    comptime for e in range(W):
        inv[e] = inv_s[unsafe_offset=i0 + e]

    # The GB queries (entry g: head h0 + (g ^ fg)), rotated at position skv - 1, pre-scaled.
    var q_lo = StaticTuple[F, GB](fill=0)
    var q_hi = StaticTuple[F, GB](fill=0)
    var qsc = sincos_f32_fast(Float32(skv - 1) * inv)
    comptime for g in range(GB):
        var row = (b * hq + h0 + (g ^ fg)) * D + i0
        var x1 = q.unsafe_load[width=W, alignment=16](row).cast[DType.float32]()
        var x2 = q.unsafe_load[width=W, alignment=16](row + HALF).cast[DType.float32]()
        q_lo[g] = (x1 * qsc[1] - x2 * qsc[0]) * scale_log2
        q_hi[g] = (x2 * qsc[1] + x1 * qsc[0]) * scale_log2

    var m = StaticTuple[Float32, R](fill=NEG_INF)
    var l = StaticTuple[Float32, R](fill=0)
    var acc = StaticTuple[F2, GB](fill=0)
    var start = split * chunk
    var end = min(start + chunk, skv)
    var kv_stride = hk * D
    var k_at = b * skv * kv_stride + kvh * D + i0
    var v_at = b * skv * kv_stride + kvh * D + 2 * i0
    # Warp-uniform trip count (the shuffles need the whole warp).
    var warp_j0 = start + warp * KPW * U
    var j0 = start + stream * U
    var kvn = _dense_load_tile[dtype, D, U](k, v, k_at, v_at, kv_stride, j0, end, fu)
    while warp_j0 < end:
        var kv = kvn
        kvn = _dense_load_tile[dtype, D, U](k, v, k_at, v_at, kv_stride, j0 + STEP, end, fu)

        var s = StaticTuple[Float32, N](fill=0)
        comptime for u in range(U):
            var sc = _sincos_hw(Float32(min(j0 + (u ^ fu), end - 1)) * inv)
            var k1 = kv[u].cast[DType.float32]()
            var k2 = kv[U + u].cast[DType.float32]()
            var kr1 = k1 * sc[1] - k2 * sc[0]
            var kr2 = k2 * sc[1] + k1 * sc[0]
            comptime for g in range(GB):
                var dot = q_lo[g][0] * kr1[0]
                comptime for e in range(1, W):
                    dot = q_lo[g][e].fma(kr1[e], dot)
                comptime for e in range(W):
                    dot = q_hi[g][e].fma(kr2[e], dot)
                s[u * GB + g] = dot
        tile_reduce_scatter[N, TPK](s)
        if j0 + fu >= end:
            comptime for r in range(R):
                s[r] = NEG_INF

        var sm = tile_softmax[N, TPK, U, R](s, m, l)
        if sm[0]:
            comptime for g in range(GB):
                acc[g] = acc[g] * tile_pick[R, DUP, g](sm[1])

        comptime for u in range(U):
            var vf = kv[2 * U + u].join(kv[3 * U + u]).cast[DType.float32]()
            comptime for g in range(GB):
                acc[g] = vf.fma(F2(tile_pick[R, DUP, u * GB + g](sm[2])), acc[g])

        j0 += STEP
        warp_j0 += STEP

    var ml = tile_finish[TPK, U, R, DUP, GB](m, l)
    _decode_write_partial[D, GB, 2 * W](
        ml[0], ml[1], acc, fg, m_part, l_part, acc_part, (b * hq + h0) * splits + split, splits
    )


@always_inline
def _prefetch_l2[dtype: DType](p: Pointer[Scalar[dtype], MutAnyOrigin]):
    """Asks L2 for the 128-byte line holding p and returns at once, no register waiting on it
    (`prefetch.global.L2`, one a lane; sm_90's bulk prefetch takes a warp-uniform address, so
    per-lane addresses would loop over the lanes). Nothing on other GPUs."""
    comptime if is_nvidia_gpu():
        inlined_assembly[
            "prefetch.global.L2 [$0];", NoneType, constraints="l", has_side_effect=True
        ](p)


@always_inline
def _dense_prefetch_tile[
    dtype: DType, D: Int, U: Int
](
    k: Pointer[Scalar[dtype], MutAnyOrigin],
    v: Pointer[Scalar[dtype], MutAnyOrigin],
    kv_row0: Int,
    kv_stride: Int,
    j0: Int,
    end: Int,
    t: Int,
):
    """Lane t of a lane group (TPK = D / 2 / W lanes) prefetches into L2 its share of the
    128-byte lines of the tile at j0 (K rows of keys j0 .. j0 + U - 1, then their V rows;
    element kv_row0 of key 0 a row's first): lines t, t + TPK, ... of them; none for keys at or
    past end."""
    comptime W = 16 // size_of[dtype]()
    comptime TPK = D // 2 // W
    comptime ROW_LINES = max(1, D * size_of[dtype]() // 128)
    comptime LINE = 128 // size_of[dtype]()
    comptime TILE_LINES = 2 * U * ROW_LINES
    comptime for p in range(ceildiv(TILE_LINES, TPK)):
        var line = t + p * TPK
        var j = j0 + (line // ROW_LINES) % U
        if line < TILE_LINES and j < end:
            var at = kv_row0 + j * kv_stride + (line % ROW_LINES) * LINE
            _prefetch_l2[dtype]((v if line >= U * ROW_LINES else k).unsafe_offset(at))


@always_inline
def _decode_write_merged[
    dtype: DType, D: Int, GB: Int, W: Int
](
    m_in: StaticTuple[Float32, GB],
    l_in: StaticTuple[Float32, GB],
    acc_in: StaticTuple[SIMD[DType.float32, W], GB],
    hx: Int,
    o: Pointer[Scalar[dtype], MutAnyOrigin],
    m_part: Pointer[Float32, MutAnyOrigin],
    l_part: Pointer[Float32, MutAnyOrigin],
    acc_part: Pointer[Float32, MutAnyOrigin],
    row0: Int,
    split: Int,
    splits: Int,
):
    """`_decode_write_partial` (the same merges), for q heads row0 .. row0 + GB - 1 (rows of
    o, b * hq + h): with one split the block's state is the whole softmax, and head row0 + g's
    output acc / l goes to o's row; with more, the state goes to part (row0 + g) * splits +
    split of m_part, l_part and acc_part for `_decode_combine_gpu`."""
    comptime TPK = D // W
    comptime NEG_INF = -inf[DType.float32]()
    var m = m_in
    var l = l_in
    var acc = acc_in
    var tid = thread_idx.x
    var lane = tid % 32
    var warp = tid // 32
    var i0 = (lane % TPK) * W
    comptime for step in range(5):
        comptime off = TPK << step
        comptime if off < 32:
            comptime for g in range(GB):
                var m_o = shuffle_xor(m[g], UInt32(off))
                var l_o = shuffle_xor(l[g], UInt32(off))
                var m_new = max(m[g], m_o)
                var a = _merge_scale(m[g], m_new)
                var c = _merge_scale(m_o, m_new)
                l[g] = l[g] * a + l_o * c
                comptime for e in range(W):
                    acc[g][e] = acc[g][e] * a + shuffle_xor(acc[g][e], UInt32(off)) * c
                m[g] = m_new

    var m_s = unsafe_stack_allocation[DECODE_WARPS * GB, Float32, address_space=.SHARED]()
    var l_s = unsafe_stack_allocation[DECODE_WARPS * GB, Float32, address_space=.SHARED]()
    var acc_s = unsafe_stack_allocation[DECODE_WARPS * GB * D, Float32, address_space=.SHARED]()
    if lane < TPK:
        comptime for g in range(GB):
            var slot = warp * GB + (g ^ hx)
            comptime for e in range(W):
                acc_s[unsafe_offset=slot * D + i0 + e] = acc[g][e]
            if lane == 0:
                m_s[unsafe_offset=slot] = m[g]
                l_s[unsafe_offset=slot] = l[g]
    barrier()
    for idx in range(tid, GB * D, DECODE_THREADS):
        var g = idx // D
        var d = idx % D
        var m_all = NEG_INF
        comptime for w in range(DECODE_WARPS):
            m_all = max(m_all, m_s[unsafe_offset=w * GB + g])
        var l_all = Float32(0)
        var a_all = Float32(0)
        comptime for w in range(DECODE_WARPS):
            var c = _merge_scale(m_s[unsafe_offset=w * GB + g], m_all)
            l_all += l_s[unsafe_offset=w * GB + g] * c
            a_all += acc_s[unsafe_offset=(w * GB + g) * D + d] * c
        if splits == 1:
            o[unsafe_offset=(row0 + g) * D + d] = (a_all / l_all).cast[dtype]()
        else:
            var part = (row0 + g) * splits + split
            acc_part[unsafe_offset=part * D + d] = a_all
            if d == 0:
                m_part[unsafe_offset=part] = m_all
                l_part[unsafe_offset=part] = l_all


@__llvm_metadata(
    MAX_THREADS_PER_BLOCK_METADATA=StaticTuple[Int32, 1](Int32(DECODE_THREADS)),
)
def _dense_wave_decode_gpu[
    dtype: DType, D: Int, GB: Int, U: Int = DENSE_TILE_KEYS, PF: Int = DENSE_WAVE_PREFETCH
](
    o: Pointer[Scalar[dtype], MutAnyOrigin],
    m_part: Pointer[Float32, MutAnyOrigin],
    l_part: Pointer[Float32, MutAnyOrigin],
    acc_part: Pointer[Float32, MutAnyOrigin],
    q: Pointer[Scalar[dtype], MutAnyOrigin],
    k: Pointer[Scalar[dtype], MutAnyOrigin],
    v: Pointer[Scalar[dtype], MutAnyOrigin],
    skv_: Int32,
    hq_: Int32,
    hk_: Int32,
    chunk_: Int32,
    scale_log2: Float32,
    theta: Float32,
    factor: Float32,
    low_freq_factor: Float32,
    high_freq_factor: Float32,
    original_max_position: Float32,
):
    """`_dense_tiled_decode_gpu` (the same grid, lanes, tiles, scores, softmax and values) with
    two changes for the long chunks of `_dense_wave_decode_launch`'s one wave of blocks:

    - L2 prefetch PF block steps ahead: while a lane group works on its tile at j0, its
      lanes ask L2 for the lines of its tile at j0 + PF STEP (`_dense_prefetch_tile`: one
      128-byte line a lane at D 64 and 128, 16-bit). The
      kernel holds 255 registers at GB 4, so 2 blocks an SM and one tile a lane (16 KB a
      block) loaded ahead in registers: about one loop step (~0.6 us) of lead, less than
      HBM's loaded latency. The prefetches take no registers, so the register loads of each
      step mostly hit L2.
    - With one split the block writes o itself (`_decode_write_merged`): no partials and no
      `_decode_combine_gpu`."""
    comptime W = 16 // size_of[dtype]()
    comptime HALF = D // 2
    comptime TPK = HALF // W
    comptime KPW = 32 // TPK
    comptime STREAMS = DECODE_WARPS * KPW
    comptime N = U * GB
    comptime R = max(1, N // TPK)
    comptime DUP = max(1, TPK // N)
    comptime F = SIMD[DType.float32, W]
    comptime F2 = SIMD[DType.float32, 2 * W]
    comptime NEG_INF = -inf[DType.float32]()
    comptime STEP = STREAMS * U
    comptime assert U <= TPK and R <= GB, "a tile's scores must fit the lanes of a key"

    var skv, hq, hk, chunk = Int(skv_), Int(hq_), Int(hk_), Int(chunk_)
    var group = hq // hk
    var subs = group // GB
    var split = block_idx.x
    var kvh = block_idx.y // subs
    var h0 = kvh * group + (block_idx.y % subs) * GB
    var b = block_idx.z
    var splits = Int(ceildiv(skv, chunk))
    var tid = thread_idx.x
    var lane = tid % 32
    var warp = tid // 32
    var t = lane % TPK
    var i0 = t * W
    var stream = warp * KPW + lane // TPK
    var f = R * (t // DUP)
    var fu = f // GB
    var fg = f % GB

    var start = split * chunk
    var end = min(start + chunk, skv)
    var kv_stride = hk * D
    var kv_row0 = b * skv * kv_stride + kvh * D
    var k_at = kv_row0 + i0
    var v_at = kv_row0 + 2 * i0
    var j0 = start + stream * U
    # The first tile's loads, then the prefetches of the next PF - 1 steps, before the prologue.
    var kvn = _dense_load_tile[dtype, D, U](k, v, k_at, v_at, kv_stride, j0, end, fu)
    comptime for n in range(1, PF):
        _dense_prefetch_tile[dtype, D, U](k, v, kv_row0, kv_stride, j0 + n * STEP, end, t)

    var freqs = RopeFreqs(theta, factor, low_freq_factor, high_freq_factor, original_max_position)
    var inv_s = unsafe_stack_allocation[HALF, Float32, address_space=.SHARED]()
    for i in range(tid, HALF, DECODE_THREADS):
        inv_s[unsafe_offset=i] = freqs.inv_freq(i, D)
    barrier()
    var inv = F()
    comptime for e in range(W):
        inv[e] = inv_s[unsafe_offset=i0 + e]

    # The GB queries (entry g: head h0 + (g ^ fg)), rotated at position skv - 1, pre-scaled.
    var q_lo = StaticTuple[F, GB](fill=0)
    var q_hi = StaticTuple[F, GB](fill=0)
    var qsc = sincos_f32_fast(Float32(skv - 1) * inv)
    comptime for g in range(GB):
        var row = (b * hq + h0 + (g ^ fg)) * D + i0
        var x1 = q.unsafe_load[width=W, alignment=16](row).cast[DType.float32]()
        var x2 = q.unsafe_load[width=W, alignment=16](row + HALF).cast[DType.float32]()
        q_lo[g] = (x1 * qsc[1] - x2 * qsc[0]) * scale_log2
        q_hi[g] = (x2 * qsc[1] + x1 * qsc[0]) * scale_log2

    var m = StaticTuple[Float32, R](fill=NEG_INF)
    var l = StaticTuple[Float32, R](fill=0)
    var acc = StaticTuple[F2, GB](fill=0)
    # Warp-uniform trip count (the shuffles need the whole warp).
    var warp_j0 = start + warp * KPW * U
    while warp_j0 < end:
        var kv = kvn
        kvn = _dense_load_tile[dtype, D, U](k, v, k_at, v_at, kv_stride, j0 + STEP, end, fu)
        comptime if PF > 1:
            _dense_prefetch_tile[dtype, D, U](k, v, kv_row0, kv_stride, j0 + PF * STEP, end, t)

        var s = StaticTuple[Float32, N](fill=0)
        comptime for u in range(U):
            var sc = _sincos_hw(Float32(min(j0 + (u ^ fu), end - 1)) * inv)
            var k1 = kv[u].cast[DType.float32]()
            var k2 = kv[U + u].cast[DType.float32]()
            var kr1 = k1 * sc[1] - k2 * sc[0]
            var kr2 = k2 * sc[1] + k1 * sc[0]
            comptime for g in range(GB):
                var dot = q_lo[g][0] * kr1[0]
                comptime for e in range(1, W):
                    dot = q_lo[g][e].fma(kr1[e], dot)
                comptime for e in range(W):
                    dot = q_hi[g][e].fma(kr2[e], dot)
                s[u * GB + g] = dot
        tile_reduce_scatter[N, TPK](s)
        if j0 + fu >= end:
            comptime for r in range(R):
                s[r] = NEG_INF

        var sm = tile_softmax[N, TPK, U, R](s, m, l)
        if sm[0]:
            comptime for g in range(GB):
                acc[g] = acc[g] * tile_pick[R, DUP, g](sm[1])

        comptime for u in range(U):
            var vf = kv[2 * U + u].join(kv[3 * U + u]).cast[DType.float32]()
            comptime for g in range(GB):
                acc[g] = vf.fma(F2(tile_pick[R, DUP, u * GB + g](sm[2])), acc[g])

        j0 += STEP
        warp_j0 += STEP

    var ml = tile_finish[TPK, U, R, DUP, GB](m, l)
    _decode_write_merged[dtype, D, GB, 2 * W](
        ml[0], ml[1], acc, fg, o, m_part, l_part, acc_part, b * hq + h0, split, splits
    )


def _decode_combine_gpu[
    dtype: DType
](
    o: Pointer[Scalar[dtype], MutAnyOrigin],
    m_part: Pointer[Float32, MutAnyOrigin],
    l_part: Pointer[Float32, MutAnyOrigin],
    acc_part: Pointer[Float32, MutAnyOrigin],
    splits_: Int32,
    head_dim_: Int32,
):
    """o[row] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s over the splits of one
    (batch, q head) row; grid = batch * hq rows, DECODE_THREADS threads."""
    var splits, head_dim = Int(splits_), Int(head_dim_)
    var row = block_idx.x
    var m_all = -inf[DType.float32]()
    for s in range(splits):
        m_all = max(m_all, m_part[unsafe_offset=row * splits + s])
    var l_all = Float32(0)
    for s in range(splits):
        l_all += l_part[unsafe_offset=row * splits + s] * _merge_scale(
            m_part[unsafe_offset=row * splits + s], m_all
        )
    for d in range(thread_idx.x, head_dim, DECODE_THREADS):
        var a = Float32(0)
        for s in range(splits):
            a += acc_part[unsafe_offset=(row * splits + s) * head_dim + d] * _merge_scale(
                m_part[unsafe_offset=row * splits + s], m_all
            )
        o[unsafe_offset=row * head_dim + d] = (a / l_all).cast[dtype]()


def _decode_launch_static[
    dtype: DType, D: Int, GB: Int, tiled: Bool = False, U: Int = DENSE_TILE_KEYS
](
    o: Pointer[Scalar[dtype], MutAnyOrigin],
    q: Pointer[Scalar[dtype], MutAnyOrigin],
    k: Pointer[Scalar[dtype], MutAnyOrigin],
    v: Pointer[Scalar[dtype], MutAnyOrigin],
    batch: Int,
    skv: Int,
    hq: Int,
    hk: Int,
    sm_scale: Float32,
    freqs: RopeFreqs,
    ctx: DeviceContext,
) raises:
    """`_dense_tiled_decode_gpu[..., U]` with `tiled`, else `_decode_partial_gpu`, then
    `_decode_combine_gpu`. The tiled kernel's chunks are whole block steps (STREAMS x U keys)
    so that no warp idles in a split's last step but the row's last."""
    comptime TPK = D // 2 // (16 // size_of[dtype]())
    comptime BLOCK_STEP = DECODE_WARPS * (32 // TPK) * U if tiled else 1
    var blocks_per_split = batch * hk * (hq // hk // GB)
    var splits = max(
        1, min(ceildiv(skv, DECODE_MIN_CHUNK), ceildiv(DECODE_TARGET_BLOCKS, blocks_per_split))
    )
    var chunk = ceildiv(ceildiv(skv, splits), BLOCK_STEP) * BLOCK_STEP
    splits = ceildiv(skv, chunk)
    var m_part = ctx.enqueue_create_buffer[DType.float32](batch * hq * splits)
    var l_part = ctx.enqueue_create_buffer[DType.float32](batch * hq * splits)
    var acc_part = ctx.enqueue_create_buffer[DType.float32](batch * hq * splits * D)
    comptime kernel = (
        _dense_tiled_decode_gpu[dtype, D, GB, U] if tiled else _decode_partial_gpu[dtype, D, GB]
    )
    ctx.enqueue_function[kernel](
        m_part.unsafe_ptr(), l_part.unsafe_ptr(), acc_part.unsafe_ptr(), q, k, v,
        Int32(skv), Int32(hq), Int32(hk), Int32(chunk), sm_scale * LOG2E,
        freqs.theta, freqs.factor, freqs.low_freq_factor, freqs.high_freq_factor,
        freqs.original_max_position,
        grid_dim=(splits, hk * (hq // hk // GB), batch), block_dim=DECODE_THREADS,
    )
    ctx.enqueue_function[_decode_combine_gpu[dtype]](
        o, m_part.unsafe_ptr(), l_part.unsafe_ptr(), acc_part.unsafe_ptr(),
        Int32(splits), Int32(D),
        grid_dim=batch * hq, block_dim=DECODE_THREADS,
    )
    # Frees are stream-ordered: the buffers outlive the kernels that use them.
    _ = m_part^
    _ = l_part^
    _ = acc_part^


def _wave_blocks_per_sm(GB: Int) -> Int:
    """Blocks of `_dense_wave_decode_gpu[_, D, GB]` an SM holds (128 threads; ptxas for sm_90a,
    D 64 and 128, bf16 and fp16: 124-127 registers at GB 1, 4 blocks; 237-255 at GB 2 and 4
    but for D 64's GB 2, 168 (3 blocks, at the edge: counted as 2), 2 blocks)."""
    return 4 if GB == 1 else 2


def _wave_chunk(units: Int, skv: Int, slots: Int, block_step: Int) -> Int:
    """Keys per split for `_dense_wave_decode_launch`: units blocks a split (batch x kv heads x
    q-head groups), slots blocks resident on the GPU at once. A split count s makes
    ceil(units s / slots) waves of blocks of `chunk` keys (whole block steps); the chunk kept
    is the one of least waves x (chunk + DENSE_WAVE_BLOCK_KEYS) (a block's prologue, epilogue
    and first loads cost about that many keys' streaming), the fewest splits on a tie, with
    at least DECODE_MIN_CHUNK keys a split."""
    var most = max(1, ceildiv(skv, DECODE_MIN_CHUNK))
    var best = ceildiv(skv, block_step) * block_step
    var best_cost = ceildiv(units, slots) * (best + DENSE_WAVE_BLOCK_KEYS)
    for s in range(2, most + 1):
        var chunk = ceildiv(ceildiv(skv, s), block_step) * block_step
        var cost = ceildiv(units * ceildiv(skv, chunk), slots) * (chunk + DENSE_WAVE_BLOCK_KEYS)
        if cost < best_cost:
            best = chunk
            best_cost = cost
    return best


def _dense_wave_decode_launch[
    dtype: DType, D: Int, GB: Int
](
    o: Pointer[Scalar[dtype], MutAnyOrigin],
    q: Pointer[Scalar[dtype], MutAnyOrigin],
    k: Pointer[Scalar[dtype], MutAnyOrigin],
    v: Pointer[Scalar[dtype], MutAnyOrigin],
    batch: Int,
    skv: Int,
    hq: Int,
    hk: Int,
    sm_scale: Float32,
    freqs: RopeFreqs,
    ctx: DeviceContext,
) raises:
    """`_dense_wave_decode_gpu` over the splits of `_wave_chunk` (about one wave of blocks,
    `_wave_blocks_per_sm` an SM), then, with more than one split, `_decode_combine_gpu`;
    the partials (m, l, acc) in one scratch buffer."""
    comptime W = 16 // size_of[dtype]()
    comptime BLOCK_STEP = DECODE_WARPS * (32 // (D // 2 // W)) * DENSE_TILE_KEYS
    var units = batch * hk * (hq // hk // GB)
    var sms = ctx.get_attribute(DeviceAttribute.MULTIPROCESSOR_COUNT)
    var chunk = _wave_chunk(units, skv, sms * _wave_blocks_per_sm(GB), BLOCK_STEP)
    var splits = ceildiv(skv, chunk)
    var rows = batch * hq * splits
    comptime kernel = _dense_wave_decode_gpu[dtype, D, GB]
    if splits == 1:
        var none = Pointer[Float32, MutAnyOrigin].unsafe_dangling()
        ctx.enqueue_function[kernel](
            o, none, none, none, q, k, v,
            Int32(skv), Int32(hq), Int32(hk), Int32(chunk), sm_scale * LOG2E,
            freqs.theta, freqs.factor, freqs.low_freq_factor, freqs.high_freq_factor,
            freqs.original_max_position,
            grid_dim=(1, hk * (hq // hk // GB), batch), block_dim=DECODE_THREADS,
        )
        return
    var part = ctx.enqueue_create_buffer[DType.float32](rows * (D + 2))
    var m_part = part.unsafe_ptr().as_unsafe_any_origin()
    var l_part = m_part.unsafe_offset(rows)
    var acc_part = m_part.unsafe_offset(2 * rows)
    ctx.enqueue_function[kernel](
        o, m_part, l_part, acc_part, q, k, v,
        Int32(skv), Int32(hq), Int32(hk), Int32(chunk), sm_scale * LOG2E,
        freqs.theta, freqs.factor, freqs.low_freq_factor, freqs.high_freq_factor,
        freqs.original_max_position,
        grid_dim=(splits, hk * (hq // hk // GB), batch), block_dim=DECODE_THREADS,
    )
    ctx.enqueue_function[_decode_combine_gpu[dtype]](
        o, m_part, l_part, acc_part, Int32(splits), Int32(D),
        grid_dim=batch * hq, block_dim=DECODE_THREADS,
    )
    # Frees are stream-ordered: the buffer outlives the kernels that use it.
    _ = part^


def _decode_dispatch[
    dtype: DType, tiled: Bool = False, wave: Bool = False
](
    o: Pointer[Scalar[dtype], MutAnyOrigin],
    q: Pointer[Scalar[dtype], MutAnyOrigin],
    k: Pointer[Scalar[dtype], MutAnyOrigin],
    v: Pointer[Scalar[dtype], MutAnyOrigin],
    batch: Int,
    skv: Int,
    hq: Int,
    hk: Int,
    head_dim: Int,
    sm_scale: Float32,
    freqs: RopeFreqs,
    ctx: DeviceContext,
) raises:
    """`_decode_launch_static` (`_dense_wave_decode_launch` with `wave`) for the runtime head
    dim and heads per block; the caller checks `_decode_supported` first."""
    comptime if dtype == DType.bfloat16 or dtype == DType.float16:
        var gb = _decode_heads_per_block(hq // hk)
        comptime for D in [64, 128]:
            if head_dim == D:
                comptime for GB in [1, 2, 4]:
                    if gb == GB:
                        comptime if wave:
                            _dense_wave_decode_launch[dtype, D, GB](
                                o, q, k, v, batch, skv, hq, hk, sm_scale, freqs, ctx
                            )
                        else:
                            _decode_launch_static[dtype, D, GB, tiled](
                                o, q, k, v, batch, skv, hq, hk, sm_scale, freqs, ctx
                            )
                        return
    raise Error("kt.fused_rope_attention: no decode kernel for this shape")


def _flash_attention_static[
    dtype: DType, hq: Int, hk: Int, depth: Int, causal: Bool
](
    o: Pointer[Scalar[dtype], MutAnyOrigin],
    q: Pointer[Scalar[dtype], MutAnyOrigin],
    k: Pointer[Scalar[dtype], MutAnyOrigin],
    v: Pointer[Scalar[dtype], MutAnyOrigin],
    batch: Int,
    sq: Int,
    skv: Int,
    scale: Float32,
    ctx: DeviceContext,
) raises:
    """MAX's flash attention (FA3 on H100) on BSHD q [batch, sq, hq, depth] and
    k, v [batch, skv, hk, depth]. With dense inputs MAX puts the queries at the end of
    the keys (start_pos = skv - sq), so CausalMask is bottom-right aligned."""
    var ot = TileTensor(o, row_major(batch, sq, Idx[hq], Idx[depth]))
    var qt = TileTensor(q, row_major(batch, sq, Idx[hq], Idx[depth]))
    var kt = TileTensor(k, row_major(batch, skv, Idx[hk], Idx[depth]))
    var vt = TileTensor(v, row_major(batch, skv, Idx[hk], Idx[depth]))
    comptime if causal:
        flash_attention(ot, qt.as_imm(), kt.as_imm(), vt.as_imm(), CausalMask(), scale, ctx)
    else:
        flash_attention(ot, qt.as_imm(), kt.as_imm(), vt.as_imm(), NullMask(), scale, ctx)


def _fast_path_supported[dtype: DType](hq: Int, hk: Int, head_dim: Int) -> Bool:
    """Whether `_fused_rope_attention_gpu` runs MAX's flash attention for this shape."""
    # bf16 only: fp32 keeps the exact fp32 kernel, and MAX 26.7's H100 kernel does not
    # build for fp16 (a wgmma constraint in the P @ V step fails to instantiate).
    comptime if dtype != DType.bfloat16:
        return False
    var heads_ok = False
    comptime for i in range(FAST_HEAD_CONFIGS):
        comptime heads = _fast_heads(i)
        if hq == heads[0] and hk == heads[1]:
            heads_ok = True
    var dim_ok = False
    comptime for i in range(FAST_HEAD_DIMS):
        if head_dim == _fast_head_dim(i):
            dim_ok = True
    return heads_ok and dim_ok


def _flash_attention_dispatch[
    dtype: DType
](
    o: Pointer[Scalar[dtype], MutAnyOrigin],
    q: Pointer[Scalar[dtype], MutAnyOrigin],
    k: Pointer[Scalar[dtype], MutAnyOrigin],
    v: Pointer[Scalar[dtype], MutAnyOrigin],
    batch: Int,
    sq: Int,
    skv: Int,
    hq: Int,
    hk: Int,
    head_dim: Int,
    scale: Float32,
    causal: Bool,
    ctx: DeviceContext,
) raises:
    """Runs `_flash_attention_static` for the runtime shape; the caller checks
    `_fast_path_supported` first."""
    comptime if dtype == DType.bfloat16:
        comptime for i in range(FAST_HEAD_CONFIGS):
            comptime HQ = _fast_heads(i)[0]
            comptime HK = _fast_heads(i)[1]
            if hq == HQ and hk == HK:
                comptime for j in range(FAST_HEAD_DIMS):
                    comptime D = _fast_head_dim(j)
                    if head_dim == D:
                        if causal:
                            _flash_attention_static[dtype, HQ, HK, D, True](
                                o, q, k, v, batch, sq, skv, scale, ctx
                            )
                        else:
                            _flash_attention_static[dtype, HQ, HK, D, False](
                                o, q, k, v, batch, sq, skv, scale, ctx
                            )
                        return
    raise Error("kt.fused_rope_attention: no flash-attention kernel for this shape")


def _fused_rope_attention_gpu[
    dtype: DType,
    dense_tiled_decode: Bool = DENSE_TILED_DECODE,
    dense_wave_decode: Bool = DENSE_WAVE_DECODE,
](
    o: Pointer[Scalar[dtype], _],
    q: Pointer[Scalar[dtype], _],
    k: Pointer[Scalar[dtype], _],
    v: Pointer[Scalar[dtype], _],
    batch: Int,
    sq: Int,
    skv: Int,
    hq: Int,
    hk: Int,
    head_dim: Int,
    sm_scale: Float32,
    causal: Int32,
    freqs: RopeFreqs,
    ctx: DeviceContext,
) raises:
    """The op's GPU branch (arguments already validated, sm_scale resolved).

    Decode (sq = 1, bf16 or fp16, head_dim 64 or 128, 16-byte aligned tensors): a split-KV
    kernel that rotates each key in registers as it streams (`_dense_tiled_decode_gpu` with
    `dense_tiled_decode`, DENSE_TILED_DECODE, else `_decode_partial_gpu`), then
    `_decode_combine_gpu`; with `dense_wave_decode` (DENSE_WAVE_DECODE)
    `_dense_wave_decode_launch` instead.
    Fast path (`_fast_path_supported`: bf16 and a listed (hq, hk, head_dim)):
    rotate q (positions skv - sq + i) and k (positions j) into scratch buffers of dtype
    with the vectorized RoPE kernel, then MAX's flash attention on (q_rot, k_rot, v).
    Otherwise the simple fused kernel `_attention_gpu`.
    """
    if batch * sq * hq == 0:
        return
    var op = o.unsafe_mut_cast[True]().as_unsafe_any_origin()
    var vp = v.unsafe_mut_cast[True]().as_unsafe_any_origin()
    var aligned = Int(q) % 16 == 0 and Int(k) % 16 == 0 and Int(v) % 16 == 0
    if sq == 1 and skv <= 131072 and aligned and _decode_supported[dtype](head_dim):
        _decode_dispatch[dtype, dense_tiled_decode, dense_wave_decode](
            op,
            q.unsafe_mut_cast[True]().as_unsafe_any_origin(),
            k.unsafe_mut_cast[True]().as_unsafe_any_origin(),
            vp,
            batch, skv, hq, hk, head_dim, sm_scale, freqs, ctx,
        )
    elif _fast_path_supported[dtype](hq, hk, head_dim):
        var q_rot = ctx.enqueue_create_buffer[dtype](batch * sq * hq * head_dim)
        var k_rot = ctx.enqueue_create_buffer[dtype](batch * skv * hk * head_dim)
        _rope_gpu_launch[dtype, explicit_positions=False](
            ctx,
            q_rot.unsafe_ptr(),
            k_rot.unsafe_ptr(),
            q,
            k,
            Pointer[Int64, MutAnyOrigin].unsafe_dangling(),
            batch * sq,
            batch * skv,
            sq,
            skv,
            skv - sq,
            0,
            hq,
            hk,
            head_dim,
            freqs,
        )
        _flash_attention_dispatch[dtype](
            op,
            q_rot.unsafe_ptr().as_unsafe_any_origin(),
            k_rot.unsafe_ptr().as_unsafe_any_origin(),
            vp,
            batch, sq, skv, hq, hk, head_dim, sm_scale, causal != 0, ctx,
        )
        # Frees are stream-ordered: the buffers outlive the kernels that use them.
        _ = q_rot^
        _ = k_rot^
    else:
        ctx.enqueue_function[_attention_gpu[dtype]](
            o, q, k, v, Int32(sq), Int32(skv), Int32(hq), Int32(hk), Int32(head_dim),
            sm_scale, causal,
            freqs.theta, freqs.factor, freqs.low_freq_factor, freqs.high_freq_factor,
            freqs.original_max_position,
            grid_dim=batch * sq * hq, block_dim=GPU_BLOCK,
        )


@extensibility.register("kt.fused_rope_attention")
struct FusedRopeAttention:
    @staticmethod
    def execute[
        dtype: DType, //, target: StaticString
    ](
        o: OutputTensor[dtype=dtype, rank=4, ...],
        q: InputTensor[dtype=dtype, rank=4, ...],
        k: InputTensor[dtype=dtype, rank=4, ...],
        v: InputTensor[dtype=dtype, rank=4, ...],
        scale: Float32,
        causal: Int32,
        theta: Float32,
        factor: Float32,
        low_freq_factor: Float32,
        high_freq_factor: Float32,
        original_max_position: Float32,
        ctx: DeviceContext,
    ) raises:
        var batch = q.dim_size(0)
        var sq = q.dim_size(1)
        var hq = q.dim_size(2)
        var head_dim = q.dim_size(3)
        var skv = k.dim_size(1)
        var hk = k.dim_size(2)
        if head_dim % 2 != 0 or head_dim > MAX_HEAD_DIM:
            raise Error("kt.fused_rope_attention: head_dim must be even and at most ", MAX_HEAD_DIM)
        if hk == 0 or hq % hk != 0:
            raise Error("kt.fused_rope_attention: kv heads must divide q heads")
        if sq > skv:
            raise Error("kt.fused_rope_attention: q_len must not exceed kv_len")
        var sm_scale = scale if scale > 0 else Float32(1.0) / sqrt(Float32(head_dim))
        var freqs = RopeFreqs(
            theta, factor, low_freq_factor, high_freq_factor, original_max_position
        )
        var op = o.unsafe_ptr()
        var qp = q.unsafe_ptr()
        var kp = k.unsafe_ptr()
        var vp = v.unsafe_ptr()
        comptime if is_cpu[target]():
            # Rotate every key once into fp32 scratch [B, Hk, Skv, D], then one work item
            # per (batch, head, query) row: scores, max-subtracted softmax, weighted sum.
            var k_rot = alloc[Float32](batch * hk * skv * head_dim)

            def rotate_keys(bh: Int) {var k_rot, var kp, var skv, var hk, var head_dim, var freqs}:
                var b = bh // hk
                var kvh = bh % hk
                for j in range(skv):
                    _rotated_row(
                        k_rot.unsafe_offset((bh * skv + j) * head_dim),
                        kp.unsafe_offset(((b * skv + j) * hk + kvh) * head_dim),
                        head_dim,
                        j,
                        freqs,
                    )

            sync_parallelize(rotate_keys, batch * hk)

            def attend_row(r: Int) {var op, var qp, var vp, var k_rot, var sq, var skv, var hq, var hk, var head_dim, var sm_scale, var causal, var freqs}:
                var h = r % hq
                var i = (r // hq) % sq
                var b = r // (hq * sq)
                var kvh = h // (hq // hk)
                var q_pos = skv - sq + i
                var n_keys = q_pos + 1 if causal != 0 else skv
                var q_rot = alloc[Float32](head_dim)
                var acc = alloc[Float32](head_dim)
                var scores = alloc[Float32](n_keys)
                _rotated_row(q_rot, qp.unsafe_offset(r * head_dim), head_dim, q_pos, freqs)
                var keys = k_rot.unsafe_offset((b * hk + kvh) * skv * head_dim)
                var m = -inf[DType.float32]()
                for j in range(n_keys):
                    var dot = Float32(0)
                    for d in range(head_dim):
                        dot += q_rot[unsafe_offset=d] * keys[unsafe_offset=j * head_dim + d]
                    var s = dot * sm_scale
                    scores[unsafe_offset=j] = s
                    m = max(m, s)
                for d in range(head_dim):
                    acc[unsafe_offset=d] = 0
                var l = Float32(0)
                for j in range(n_keys):
                    var p = exp(scores[unsafe_offset=j] - m)
                    l += p
                    var v_row = vp.unsafe_offset(((b * skv + j) * hk + kvh) * head_dim)
                    for d in range(head_dim):
                        acc[unsafe_offset=d] += p * v_row[unsafe_offset=d].cast[DType.float32]()
                var o_row = op.unsafe_offset(r * head_dim)
                for d in range(head_dim):
                    o_row[unsafe_offset=d] = (acc[unsafe_offset=d] / l).cast[dtype]()
                q_rot.unsafe_free()
                acc.unsafe_free()
                scores.unsafe_free()

            sync_parallelize(attend_row, batch * sq * hq)
            k_rot.unsafe_free()
        else:
            _fused_rope_attention_gpu[dtype](
                op, qp, kp, vp, batch, sq, skv, hq, hk, head_dim, sm_scale, causal, freqs, ctx
            )
