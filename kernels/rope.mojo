"""Rotary position embedding (RoPE) on q and k, half-rotation convention.

Su et al., "RoFormer" (2021), in the GPT-NeoX / HF Llama layout: for i < D/2 the pair
(x[i], x[i + D/2]) is rotated by angle pos * inv_freq[i], inv_freq[i] = theta^(-2i/D),
optionally rescaled by Llama 3's frequency scaling (HF `_compute_llama3_parameters`).
factor = 1 leaves the frequencies unchanged. Frequencies are computed in fp64 and rounded
once; angles and the rotation run in fp32.
"""

import extensibility
from extensibility import InputTensor, OutputTensor
from max.algorithm import sync_parallelize
from max.gpu import MAX_THREADS_PER_BLOCK_METADATA, block_idx, grid_dim, thread_idx
from max.gpu.host import DeviceAttribute, DeviceContext
from max.gpu.host.info import is_cpu
from max.gpu.sync import barrier
from std.math import ceildiv, cos, floor, pi, sin
from std.memory import alloc, unsafe_stack_allocation
from std.sys import size_of
from std.utils import StaticTuple

comptime GPU_BLOCK = 128
comptime MAX_HALF_DIM = 256
# Positions below which the GPU kernels take `sincos_f32_fast` (within two fp32 ulps of the
# fp64-based `sincos_f32_accurate` for angles below 2^17: tests/mojo/sincos_check.mojo).
comptime FAST_SINCOS_POSITIONS = 131072
# Fast GPU kernel: threads per block and (q or k) heads handled by each thread, which
# computes cos/sin for its pairs once and reuses them for all of its heads. Measured on the
# H100 (tests/mojo/gpu_bench.mojo, 168M bf16 elements): 2 heads 2.09 TB/s, 8 heads 1.92,
# 4 heads 1.66, 1 head 1.45; sweeping whole token rows per block instead did not help.
comptime FAST_BLOCK = 256
comptime FAST_HEADS_PER_THREAD = 2
# Token-tile kernel (`_rope_tile_gpu`, the one the op launches): threads per block, heads
# whose loads one thread issues together (TILE_HEADS * 32 bytes in flight per thread with
# 16-byte vectors: 64 KiB per SM at 2 blocks), blocks per SM the grid is sized for (2 are
# resident at up to 128 registers per thread, so the grid is one wave and each block walks
# an equal share of the tokens) and the threads per SM below which heads split over grid.y.
comptime TILE_BLOCK = 256
comptime TILE_HEADS = 4
comptime TILE_BLOCKS_PER_SM = 2
comptime TILE_RESIDENT_THREADS = 2 * TILE_BLOCK
# The op's GPU launch enqueues `_rope_twin_gpu` (the Triton twin's structure, see there), not
# `_rope_tile_gpu`. On the H200 (2026-12-04, benchmarks/results/kernels_h200/session_2026-12-04):
# 0.61-0.85x the tile kernel's time in gpu_bench (3.83 TB/s at 32768 tokens 32q/8k D 128), and
# in kt microbench 0.90-1.01x the Triton twin's time, 3.0-3.9 TB/s; kt verify passed with it.
comptime ROPE_TWIN = True
# Twin kernel: threads per block, heads each thread rotates with one cos/sin vector (4: 8
# 16-byte loads, 128 bytes in flight per thread, as a thread of pykernels/rope.py's Triton
# program holds at D 128) and the blocks per SM its registers are capped for. ptxas -v
# (sm_90a, D 128, bf16): uncapped 111-128 registers (2 blocks of 256 resident); capped for 3
# blocks, 80 registers and 36 bytes of spills; for 4, 64 and 120 bytes. (`_rope_tile_gpu`
# takes 226: one block of 256 threads per SM, whatever grid it is launched on.)
comptime TWIN_BLOCK = 256
comptime TWIN_HEADS = 4
comptime TWIN_MIN_BLOCKS = 3


@fieldwise_init
struct RopeFreqs(TrivialRegisterPassable):
    """The frequency schedule: base theta plus Llama 3 scaling (factor 1 = none)."""

    var theta: Float32
    var factor: Float32
    var low_freq_factor: Float32
    var high_freq_factor: Float32
    var original_max_position: Float32

    def inv_freq(self, i: Int, head_dim: Int) -> Float32:
        """Frequency of rotation pair i for a head of size head_dim, computed in fp64 and
        rounded once, so the fp32 angle pos * inv_freq carries a single rounding."""
        var theta = Float64(self.theta)
        var factor = Float64(self.factor)
        var low = Float64(self.low_freq_factor)
        var high = Float64(self.high_freq_factor)
        var old_context = Float64(self.original_max_position)
        var inv = Float64(1.0) / (theta ** (Float64(2 * i) / Float64(head_dim)))
        var wavelen = 2.0 * pi / inv
        if wavelen > old_context / low:
            return Float32(inv / factor)
        if wavelen < old_context / high:
            return Float32(inv)
        var smooth = (old_context / wavelen - low) / (high - low)
        return Float32((1.0 - smooth) * inv / factor + smooth * inv)


def rotate_pair(x1: Float32, x2: Float32, c: Float32, s: Float32) -> Tuple[Float32, Float32]:
    """(x1, x2) rotated by the angle whose cosine and sine are c and s."""
    return (x1 * c - x2 * s, x2 * c + x1 * s)


def _rotate_heads[
    dtype: DType
](
    dst: Pointer[Scalar[dtype], MutAnyOrigin],
    src: Pointer[Scalar[dtype], MutAnyOrigin],
    heads: Int,
    head_dim: Int,
    cos_t: Pointer[Float32, _],
    sin_t: Pointer[Float32, _],
):
    var half = head_dim // 2
    for h in range(heads):
        var base = h * head_dim
        for i in range(half):
            var x1 = src[unsafe_offset=base + i].cast[DType.float32]()
            var x2 = src[unsafe_offset=base + i + half].cast[DType.float32]()
            var r = rotate_pair(x1, x2, cos_t[unsafe_offset=i], sin_t[unsafe_offset=i])
            dst[unsafe_offset=base + i] = r[0].cast[dtype]()
            dst[unsafe_offset=base + i + half] = r[1].cast[dtype]()


def _rope_gpu[
    dtype: DType
](
    q_out: Pointer[Scalar[dtype], MutAnyOrigin],
    k_out: Pointer[Scalar[dtype], MutAnyOrigin],
    q: Pointer[Scalar[dtype], MutAnyOrigin],
    k: Pointer[Scalar[dtype], MutAnyOrigin],
    positions: Pointer[Int64, MutAnyOrigin],
    hq_: Int32,
    hk_: Int32,
    head_dim_: Int32,
    theta: Float32,
    factor: Float32,
    low_freq_factor: Float32,
    high_freq_factor: Float32,
    original_max_position: Float32,
):
    """One block per token: the block fills a cos/sin table in shared memory, then
    rotates every (head, pair) of q and k for that token. The original reference design,
    no longer launched by the op (see `_rope_tile_gpu`); tests/mojo/gpu_launch.mojo --check
    compares the op's GPU path against it."""
    var hq, hk, head_dim = Int(hq_), Int(hk_), Int(head_dim_)
    var freqs = RopeFreqs(theta, factor, low_freq_factor, high_freq_factor, original_max_position)
    var token = block_idx.x
    var tid = thread_idx.x
    var half = head_dim // 2
    var cos_t = unsafe_stack_allocation[MAX_HALF_DIM, Float32, address_space=.SHARED]()
    var sin_t = unsafe_stack_allocation[MAX_HALF_DIM, Float32, address_space=.SHARED]()
    var pos = Float32(positions[unsafe_offset=token])
    for i in range(tid, half, GPU_BLOCK):
        var angle = pos * freqs.inv_freq(i, head_dim)
        # Accurate fp32 sin/cos: std.math's lower to sin/cos.approx on NVIDIA GPUs.
        var sc = sincos_f32_accurate(SIMD[DType.float32, 1](angle))
        cos_t[unsafe_offset=i] = sc[1][0]
        sin_t[unsafe_offset=i] = sc[0][0]
    barrier()
    for e in range(tid, (hq + hk) * half, GPU_BLOCK):
        var h = e // half
        var i = e % half
        var src = q
        var dst = q_out
        var row = (token * hq + h) * head_dim
        if h >= hq:
            src = k
            dst = k_out
            row = (token * hk + h - hq) * head_dim
        var x1 = src[unsafe_offset=row + i].cast[DType.float32]()
        var x2 = src[unsafe_offset=row + i + half].cast[DType.float32]()
        var r = rotate_pair(x1, x2, cos_t[unsafe_offset=i], sin_t[unsafe_offset=i])
        dst[unsafe_offset=row + i] = r[0].cast[dtype]()
        dst[unsafe_offset=row + i + half] = r[1].cast[dtype]()


def _by_quadrant[
    dtype: DType, width: SIMDLength, //
](q: SIMD[DType.int32, width], sin_r: SIMD[dtype, width], cos_r: SIMD[dtype, width]) -> Tuple[
    SIMD[dtype, width], SIMD[dtype, width]
]:
    """(sin(x), cos(x)) from sin and cos of r = x - q pi/2 on [-pi/4, pi/4], q in 0..3."""
    var odd = (q & 1).eq(1)
    var s = odd.select(cos_r, sin_r)
    var c = odd.select(sin_r, cos_r)
    s = (q & 2).eq(2).select(-s, s)
    c = ((q + 1) & 2).eq(2).select(-c, c)
    return (s, c)


def sincos_f32_accurate[
    width: SIMDLength, //
](x: SIMD[DType.float32, width]) -> Tuple[SIMD[DType.float32, width], SIMD[DType.float32, width]]:
    """(sin(x), cos(x)) rounded to fp32 from an fp64 evaluation, for GPU code.

    On NVIDIA GPUs `std.math.sin`/`cos` of fp32 lower to `sin.approx`/`cos.approx`,
    whose absolute error grows with |x| (about 1e-3 at 16k rad, i.e. at RoPE
    positions of 16k), and fp64 `cos` is not available. This reduces x by pi/2 in fp64
    (Cody-Waite, three-part pi/2 as in fdlibm; exact products for |x| < 2^20 * pi/2)
    and evaluates fdlibm's sin/cos kernels on [-pi/4, pi/4] in fp64, so the result is
    the correctly rounded fp32 value except in rare near-ties, like a good libm cosf.
    """
    comptime F = SIMD[DType.float64, width]
    var xd = x.cast[DType.float64]()
    var kf = floor(xd * 6.36619772367581382433e-01 + 0.5)
    var r = xd - kf * 1.57079632673412561417e00
    r = r - kf * 6.07710050630396597660e-11
    r = r - kf * 2.02226624879595063154e-21
    var z = r * r
    var sp = F(1.58969099521155010221e-10)
    sp = sp * z + -2.50507602534068634195e-08
    sp = sp * z + 2.75573137070700676789e-06
    sp = sp * z + -1.98412698298579493134e-04
    sp = sp * z + 8.33333333332248946124e-03
    sp = sp * z + -1.66666666666666324348e-01
    var sin_r = r + r * z * sp
    var cp = F(-1.13596475577881948265e-11)
    cp = cp * z + 2.08757232129817482790e-09
    cp = cp * z + -2.75573143513906633035e-07
    cp = cp * z + 2.48015872894767294178e-05
    cp = cp * z + -1.38888888888741095749e-03
    cp = cp * z + 4.16666666666666019037e-02
    var cos_r = (1.0 - 0.5 * z) + z * z * cp
    var sc = _by_quadrant((kf.cast[DType.int64]() & 3).cast[DType.int32](), sin_r, cos_r)
    return (sc[0].cast[DType.float32](), sc[1].cast[DType.float32]())


def sincos_f32_fast[
    width: SIMDLength, //
](x: SIMD[DType.float32, width]) -> Tuple[SIMD[DType.float32, width], SIMD[DType.float32, width]]:
    """(sin(x), cos(x)) in fp32 arithmetic, within a few fp32 ulps for |x| < 2^17, for GPU
    inner loops where `sincos_f32_accurate`'s fp64 would cost too much (callers use that
    one beyond 2^17).

    x is reduced by pi/2 split into three fp32 parts, each product subtracted with one fused
    multiply-add (the product is exact inside it), so r = x - k pi/2 carries an error of
    about one ulp of r; then degree-7 and degree-8 polynomials on [-pi/4, pi/4] (Cephes'
    sinf/cosf coefficients) and the quadrant of k pick and sign them.
    """
    comptime F = SIMD[DType.float32, width]
    var kf = floor(x * 0.636619746685028076171875 + 0.5)
    var r = (-kf).fma(F(1.57079637050628662109375), x)
    r = (-kf).fma(F(-4.37113882867379300296e-08), r)
    r = (-kf).fma(F(-1.71512451000588188e-15), r)
    var z = r * r
    var sp = z.fma(F(-1.9515295891e-4), F(8.3321608736e-3))
    sp = z.fma(sp, F(-1.6666654611e-1))
    var sin_r = (r * z).fma(sp, r)
    var cp = z.fma(F(2.443315711809948e-5), F(-1.388731625493765e-3))
    cp = z.fma(cp, F(4.166664568298827e-2))
    var cos_r = (z * z).fma(cp, z.fma(F(-0.5), F(1.0)))
    return _by_quadrant(kf.cast[DType.int32]() & 3, sin_r, cos_r)


def _rope_fast_gpu[
    dtype: DType, width: Int, explicit_positions: Bool, per_thread: Int = FAST_HEADS_PER_THREAD
](
    q_out: Pointer[Scalar[dtype], MutAnyOrigin],
    k_out: Pointer[Scalar[dtype], MutAnyOrigin],
    q: Pointer[Scalar[dtype], MutAnyOrigin],
    k: Pointer[Scalar[dtype], MutAnyOrigin],
    positions: Pointer[Int64, MutAnyOrigin],
    q_tokens_: Int32,
    k_tokens_: Int32,
    q_seq_: Int32,
    k_seq_: Int32,
    q_pos_offset_: Int32,
    k_pos_offset_: Int32,
    hq_: Int32,
    hk_: Int32,
    head_dim_: Int32,
    theta: Float32,
    factor: Float32,
    low_freq_factor: Float32,
    high_freq_factor: Float32,
    original_max_position: Float32,
):
    """Vectorized RoPE of q and k in one launch, one (token, pair chunk, head group) per
    thread: the op's previous GPU kernel, kept for tests/mojo/gpu_bench.mojo's comparison
    (the op launches `_rope_tile_gpu`).

    grid = (ceildiv(max(q_tokens, k_tokens) * chunks, FAST_BLOCK), q_groups + k_groups)
    where chunks = head_dim / 2 / width and a group is `per_thread` heads:
    blocks with block_idx.y < q_groups rotate q, the others k. A thread owns `width`
    consecutive pairs (one `width`-element load from each half of the head, 16 bytes
    when width = 16 / size_of[dtype]) of one token, computes their cos/sin once and
    rotates them in every head of its group. The token's position is positions[token]
    when explicit_positions, else token % seq + pos_offset (the fused attention's
    query / key positions). Same rounding as the CPU path: angle = Float32(pos) *
    inv_freq (fp64 schedule rounded once to fp32), fp32 cos/sin (`sincos_f32_fast`,
    within 2 fp32 ulps of correctly rounded, below position 2^17) and rotation, one
    rounding to dtype. The loads are issued before cos/sin are computed, so the two overlap.
    """
    var q_tokens, k_tokens = Int(q_tokens_), Int(k_tokens_)
    var hq, hk, head_dim = Int(hq_), Int(hk_), Int(head_dim_)
    var freqs = RopeFreqs(theta, factor, low_freq_factor, high_freq_factor, original_max_position)
    var half = head_dim // 2
    var chunks = half // width
    var tid = thread_idx.x
    var inv_s = unsafe_stack_allocation[MAX_HALF_DIM, Float32, address_space=.SHARED]()
    for i in range(tid, half, FAST_BLOCK):
        inv_s[unsafe_offset=i] = freqs.inv_freq(i, head_dim)
    barrier()

    var q_groups = ceildiv(hq, per_thread) if q_tokens > 0 else 0
    var k_groups = ceildiv(hk, per_thread) if k_tokens > 0 else 0
    var group = block_idx.y
    var idx = UInt32(block_idx.x * FAST_BLOCK + tid)
    var src = q
    var dst = q_out
    var heads = hq
    var tokens = q_tokens
    var seq = Int(q_seq_)
    var pos_offset = Int(q_pos_offset_)
    if group >= q_groups:
        group -= q_groups
        src = k
        dst = k_out
        heads = hk
        tokens = k_tokens
        seq = Int(k_seq_)
        pos_offset = Int(k_pos_offset_)
    var token = Int(idx // UInt32(chunks))
    if token >= tokens:
        return
    var i0 = Int(idx % UInt32(chunks)) * width
    var pos: Int
    comptime if explicit_positions:
        pos = Int(positions[unsafe_offset=token])
    else:
        pos = Int(UInt32(token) % UInt32(seq)) + pos_offset

    var h0 = group * per_thread
    var base = (token * heads + h0) * head_dim + i0
    comptime align = width * size_of[dtype]()
    # Issue every load of the group before the first store: the compiler cannot prove
    # that src and dst do not alias, so it would not hoist loads above stores itself.
    var x1s = StaticTuple[SIMD[dtype, width], per_thread](fill=0)
    var x2s = StaticTuple[SIMD[dtype, width], per_thread](fill=0)
    comptime for j in range(per_thread):
        if h0 + j < heads:
            var row = base + j * head_dim
            x1s[j] = src.unsafe_load[width=width, alignment=align](row)
            x2s[j] = src.unsafe_load[width=width, alignment=align](row + half)
    # cos/sin while the loads are in flight: fp32 arithmetic below 2^17 (every angle is
    # at most the position), the fp64-based one beyond.
    var angle = Float32(pos) * inv_s.unsafe_load[width=width](i0)
    var sc = sincos_f32_fast(angle) if pos < FAST_SINCOS_POSITIONS else sincos_f32_accurate(angle)
    var s = sc[0]
    var c = sc[1]
    comptime for j in range(per_thread):
        if h0 + j < heads:
            var row = base + j * head_dim
            var x1 = x1s[j].cast[DType.float32]()
            var x2 = x2s[j].cast[DType.float32]()
            dst.unsafe_store[alignment=align](row, (x1 * c - x2 * s).cast[dtype]())
            dst.unsafe_store[alignment=align](row + half, (x2 * c + x1 * s).cast[dtype]())


def _rotate_token_heads[
    dtype: DType, width: Int, group: Int
](
    dst: Pointer[Scalar[dtype], MutAnyOrigin],
    src: Pointer[Scalar[dtype], MutAnyOrigin],
    base: Int,
    h_begin: Int,
    h_end: Int,
    head_dim: Int,
    c: SIMD[DType.float32, width],
    s: SIMD[DType.float32, width],
):
    """Rotates pairs [i0, i0 + width) of heads [h_begin, h_end) of one token, base = the
    token's first element + i0, with one cos/sin vector held in registers. Heads go in
    batches of `group`:
    all loads of a batch are issued before its first store (the compiler cannot prove that
    src and dst do not alias, so it would not hoist loads above stores itself)."""
    var half = head_dim // 2
    comptime align = width * size_of[dtype]()
    var h0 = h_begin
    while h0 < h_end:
        var x1s = StaticTuple[SIMD[dtype, width], group](fill=0)
        var x2s = StaticTuple[SIMD[dtype, width], group](fill=0)
        comptime for j in range(group):
            if h0 + j < h_end:
                var row = base + (h0 + j) * head_dim
                x1s[j] = src.unsafe_load[width=width, alignment=align](row)
                x2s[j] = src.unsafe_load[width=width, alignment=align](row + half)
        comptime for j in range(group):
            if h0 + j < h_end:
                var row = base + (h0 + j) * head_dim
                var x1 = x1s[j].cast[DType.float32]()
                var x2 = x2s[j].cast[DType.float32]()
                dst.unsafe_store[alignment=align](row, (x1 * c - x2 * s).cast[dtype]())
                dst.unsafe_store[alignment=align](row + half, (x2 * c + x1 * s).cast[dtype]())
        h0 += group


def _rope_tile_gpu[
    dtype: DType, width: Int, explicit_positions: Bool, group: Int = TILE_HEADS
](
    q_out: Pointer[Scalar[dtype], MutAnyOrigin],
    k_out: Pointer[Scalar[dtype], MutAnyOrigin],
    q: Pointer[Scalar[dtype], MutAnyOrigin],
    k: Pointer[Scalar[dtype], MutAnyOrigin],
    positions: Pointer[Int64, MutAnyOrigin],
    q_tokens_: Int32,
    k_tokens_: Int32,
    q_seq_: Int32,
    k_seq_: Int32,
    q_pos_offset_: Int32,
    k_pos_offset_: Int32,
    hq_: Int32,
    hk_: Int32,
    head_dim_: Int32,
    parts_: Int32,
    theta: Float32,
    factor: Float32,
    low_freq_factor: Float32,
    high_freq_factor: Float32,
    original_max_position: Float32,
):
    """Vectorized RoPE of q and k in one launch, token tiles over a grid sized to the GPU;
    memory bound.

    A block's TILE_BLOCK threads split into slots = TILE_BLOCK / chunks token slots of
    chunks = head_dim / 2 / width threads; a thread owns `width` consecutive pairs of its
    slot's token (one `width`-element load from each half of a head: 16 bytes when width =
    16 / size_of[dtype]). The block computes the inv_freq schedule (fp64, rounded once) into
    shared memory once; then every thread walks tokens with a grid stride, computes its
    pairs' cos/sin once per token in fp32 and rotates them in all q heads and all k heads
    of that token from registers; with grid.y = parts > 1 (few tokens: more threads to
    fill the GPU), block row p takes the p-th of `parts` equal runs of the q heads and of
    the k heads instead. The position is positions[token] when
    explicit_positions (q and k share it), else token % seq + pos_offset for q and k
    separately (the fused attention's query / key positions, q_tokens != k_tokens). Same
    rounding as the CPU path: angle = Float32(pos) * inv_freq, fp32 cos/sin
    (`sincos_f32_fast`, within 2 fp32 ulps of correctly rounded, below position 2^17;
    `sincos_f32_accurate` beyond) and rotation, one rounding to dtype.
    """
    var q_tokens, k_tokens = Int(q_tokens_), Int(k_tokens_)
    var hq, hk, head_dim = Int(hq_), Int(hk_), Int(head_dim_)
    var freqs = RopeFreqs(theta, factor, low_freq_factor, high_freq_factor, original_max_position)
    var half = head_dim // 2
    var chunks = half // width
    var slots = TILE_BLOCK // chunks
    var tid = thread_idx.x
    var inv_s = unsafe_stack_allocation[MAX_HALF_DIM, Float32, address_space=.SHARED]()
    for i in range(tid, half, TILE_BLOCK):
        inv_s[unsafe_offset=i] = freqs.inv_freq(i, head_dim)
    barrier()

    var slot = tid // chunks
    if slot >= slots:
        return
    var i0 = (tid % chunks) * width
    var inv = inv_s.unsafe_load[width=width](i0)
    var tokens = max(q_tokens if hq > 0 else 0, k_tokens if hk > 0 else 0)
    var parts = Int(parts_)
    var part = block_idx.y
    var q_run = ceildiv(hq, parts)
    var k_run = ceildiv(hk, parts)
    var q_h0 = min(hq, part * q_run)
    var q_h1 = min(hq, q_h0 + q_run)
    var k_h0 = min(hk, part * k_run)
    var k_h1 = min(hk, k_h0 + k_run)
    var t = block_idx.x * slots + slot
    var stride = grid_dim.x * slots
    while t < tokens:
        var q_pos: Int
        var k_pos: Int
        comptime if explicit_positions:
            q_pos = Int(positions[unsafe_offset=t])
            k_pos = q_pos
        else:
            q_pos = t % Int(q_seq_) + Int(q_pos_offset_)
            k_pos = t % Int(k_seq_) + Int(k_pos_offset_)
        var angle = Float32(q_pos) * inv
        var sc = sincos_f32_fast(angle) if q_pos < FAST_SINCOS_POSITIONS else sincos_f32_accurate(angle)
        if t < q_tokens:
            _rotate_token_heads[dtype, width, group](
                q_out, q, t * hq * head_dim + i0, q_h0, q_h1, head_dim, sc[1], sc[0]
            )
        if t < k_tokens:
            comptime if not explicit_positions:
                if k_pos != q_pos:
                    angle = Float32(k_pos) * inv
                    sc = sincos_f32_fast(angle) if k_pos < FAST_SINCOS_POSITIONS else sincos_f32_accurate(angle)
            _rotate_token_heads[dtype, width, group](
                k_out, k, t * hk * head_dim + i0, k_h0, k_h1, head_dim, sc[1], sc[0]
            )
        t += stride


@__llvm_metadata(
    MAX_THREADS_PER_BLOCK_METADATA=StaticTuple[Int32, 1](Int32(TWIN_BLOCK)),
    `nvvm.minctasm`=SIMDLength(TWIN_MIN_BLOCKS),
)
def _rope_twin_gpu[
    dtype: DType,
    width: Int,
    explicit_positions: Bool,
    dim: Int = 0,
    heads_per_thread: Int = TWIN_HEADS,
](
    q_out: Pointer[Scalar[dtype], MutAnyOrigin],
    k_out: Pointer[Scalar[dtype], MutAnyOrigin],
    q: Pointer[Scalar[dtype], MutAnyOrigin],
    k: Pointer[Scalar[dtype], MutAnyOrigin],
    positions: Pointer[Int64, MutAnyOrigin],
    q_tokens_: Int32,
    k_tokens_: Int32,
    q_seq_: Int32,
    k_seq_: Int32,
    q_pos_offset_: Int32,
    k_pos_offset_: Int32,
    hq_: Int32,
    hk_: Int32,
    head_dim_: Int32,
    theta: Float32,
    factor: Float32,
    low_freq_factor: Float32,
    high_freq_factor: Float32,
    original_max_position: Float32,
):
    """Vectorized RoPE of q and k in one launch, shaped like the Triton twin
    (pykernels/rope.py `_rope_kernel`): no grid-stride loop, one short-lived block per tile
    of (token, head group) units, every q/k load of a thread issued before its first store.

    A unit is `heads_per_thread` consecutive heads of one token of q or of k; units are
    numbered q first (token-major: q_tokens * q_groups of them), then k, so consecutive
    units are consecutive memory and GQA's k needs no second launch. A block's TWIN_BLOCK
    threads are TWIN_BLOCK / chunks units of chunks = head_dim / 2 / width threads; a thread
    owns `width` consecutive pairs of its unit (16-byte loads when width = 16 /
    size_of[dtype]). The block computes the inv_freq schedule (fp64, rounded once:
    `RopeFreqs.inv_freq`) into shared memory while the positions load; each thread then
    computes its pairs' cos/sin once (fp32, as Triton's tl.cos/tl.sin: `sincos_f32_fast`
    below position 2^17, `sincos_f32_accurate` beyond), loads all of its heads and rotates
    them with it. Unlike `_rope_tile_gpu`, whose threads walk tokens with 4 heads' loads in
    flight at a time and whose 226 registers leave one block per SM, the bytes in flight
    here scale with the TWIN_MIN_BLOCKS blocks an SM holds (registers capped for them), as
    with Triton's grid of many small programs. `dim` > 0 fixes head_dim at compile time.
    Positions and rounding are exactly `_rope_tile_gpu`'s: positions[token] when
    explicit_positions, else token % seq + pos_offset for q and k separately; angle =
    Float32(pos) * inv_freq; one rounding to dtype.
    """
    comptime H = heads_per_thread
    var hq, hk = Int(hq_), Int(hk_)
    var head_dim: Int
    comptime if dim > 0:
        head_dim = dim
    else:
        head_dim = Int(head_dim_)
    var freqs = RopeFreqs(theta, factor, low_freq_factor, high_freq_factor, original_max_position)
    var half = head_dim // 2
    var chunks = UInt32(half // width)
    var per_block = UInt32(TWIN_BLOCK) // chunks
    var tid = thread_idx.x
    var slot = UInt32(tid) // chunks
    var i0 = Int(UInt32(tid) % chunks) * width
    var q_groups = UInt32(ceildiv(hq, H))
    var k_groups = UInt32(ceildiv(hk, H))
    var q_units = UInt32(q_tokens_) * q_groups
    var units = q_units + UInt32(k_tokens_) * k_groups
    var u = UInt32(block_idx.x) * per_block + slot
    var active = slot < per_block and u < units

    var src = q
    var dst = q_out
    var heads = hq
    var groups = q_groups
    var seq = UInt32(q_seq_)
    var pos_offset = Int(q_pos_offset_)
    if u >= q_units:
        u -= q_units
        src = k
        dst = k_out
        heads = hk
        groups = k_groups
        seq = UInt32(k_seq_)
        pos_offset = Int(k_pos_offset_)
    groups = max(groups, 1)
    var token = u // groups
    var h0 = Int(u % groups) * H
    var base = (Int(token) * heads + h0) * head_dim + i0
    comptime align = width * size_of[dtype]()
    var pos = 0
    if active:
        comptime if explicit_positions:
            pos = Int(positions[unsafe_offset=Int(token)])
        else:
            pos = Int(token % max(seq, 1)) + pos_offset
    # The fp64 schedule while the position's load is in flight; cos/sin before the q/k loads,
    # so that neither the fp64 pow nor the fp64 sincos shares the registers of 8 loads.
    var inv_s = unsafe_stack_allocation[MAX_HALF_DIM, Float32, address_space=.SHARED]()
    for i in range(tid, half, TWIN_BLOCK):
        inv_s[unsafe_offset=i] = freqs.inv_freq(i, head_dim)
    barrier()
    if not active:
        return
    var angle = Float32(pos) * inv_s.unsafe_load[width=width](i0)
    var sc = sincos_f32_fast(angle) if pos < FAST_SINCOS_POSITIONS else sincos_f32_accurate(angle)
    var s = sc[0]
    var c = sc[1]
    # Every load before the first store: the compiler cannot prove that src and dst do not
    # alias, so it would not hoist loads above stores itself.
    var x1s = StaticTuple[SIMD[dtype, width], H](fill=0)
    var x2s = StaticTuple[SIMD[dtype, width], H](fill=0)
    comptime for j in range(H):
        if h0 + j < heads:
            var row = base + j * head_dim
            x1s[j] = src.unsafe_load[width=width, alignment=align](row)
            x2s[j] = src.unsafe_load[width=width, alignment=align](row + half)
    comptime for j in range(H):
        if h0 + j < heads:
            var row = base + j * head_dim
            var x1 = x1s[j].cast[DType.float32]()
            var x2 = x2s[j].cast[DType.float32]()
            dst.unsafe_store[alignment=align](row, (x1 * c - x2 * s).cast[dtype]())
            dst.unsafe_store[alignment=align](row + half, (x2 * c + x1 * s).cast[dtype]())


def _rope_vector_width[dtype: DType]() -> Int:
    """Elements per 16-byte access."""
    return max(1, 16 // size_of[dtype]())


def _rope_gpu_launch[
    dtype: DType, explicit_positions: Bool
](
    ctx: DeviceContext,
    q_out: Pointer[Scalar[dtype], _],
    k_out: Pointer[Scalar[dtype], _],
    q: Pointer[Scalar[dtype], _],
    k: Pointer[Scalar[dtype], _],
    positions: Pointer[Int64, _],
    q_tokens: Int,
    k_tokens: Int,
    q_seq: Int,
    k_seq: Int,
    q_pos_offset: Int,
    k_pos_offset: Int,
    hq: Int,
    hk: Int,
    head_dim: Int,
    freqs: RopeFreqs,
) raises:
    """Enqueues the op's GPU kernel: `_rope_twin_gpu` when ROPE_TWIN, else `_rope_tile_gpu`
    (see `_rope_tile_launch` for the layout and limits both accept)."""
    comptime if ROPE_TWIN:
        _rope_twin_launch[dtype, explicit_positions](
            ctx, q_out, k_out, q, k, positions, q_tokens, k_tokens, q_seq, k_seq,
            q_pos_offset, k_pos_offset, hq, hk, head_dim, freqs,
        )
    else:
        _rope_tile_launch[dtype, explicit_positions](
            ctx, q_out, k_out, q, k, positions, q_tokens, k_tokens, q_seq, k_seq,
            q_pos_offset, k_pos_offset, hq, hk, head_dim, freqs,
        )


def _rope_tile_launch[
    dtype: DType, explicit_positions: Bool
](
    ctx: DeviceContext,
    q_out: Pointer[Scalar[dtype], _],
    k_out: Pointer[Scalar[dtype], _],
    q: Pointer[Scalar[dtype], _],
    k: Pointer[Scalar[dtype], _],
    positions: Pointer[Int64, _],
    q_tokens: Int,
    k_tokens: Int,
    q_seq: Int,
    k_seq: Int,
    q_pos_offset: Int,
    k_pos_offset: Int,
    hq: Int,
    hk: Int,
    head_dim: Int,
    freqs: RopeFreqs,
) raises:
    """Enqueues `_rope_tile_gpu` (16-byte accesses when head_dim / 2 is a multiple of
    the vector width and every pointer is 16-byte aligned, scalar ones otherwise) on a grid
    of at most TILE_BLOCKS_PER_SM blocks per SM. Tokens are rows of heads * head_dim
    contiguous elements (BSHD flattened over B, S); k_tokens = 0 or hk = 0 rotates q only.
    head_dim must be even, at most 2 * MAX_HALF_DIM."""
    var max_tokens = max(q_tokens if hq > 0 else 0, k_tokens if hk > 0 else 0)
    if max_tokens == 0 or head_dim == 0:
        return
    var half = head_dim // 2
    comptime W = _rope_vector_width[dtype]()
    var aligned = (
        half % W == 0
        and Int(q_out) % 16 == 0
        and Int(k_out) % 16 == 0
        and Int(q) % 16 == 0
        and Int(k) % 16 == 0
    )
    var width = W if aligned else 1
    var chunks = half // width
    var slots = TILE_BLOCK // chunks
    var sms = ctx.get_attribute(DeviceAttribute.MULTIPROCESSOR_COUNT)
    # Split the heads over grid.y only when the tokens alone leave SMs short of threads.
    var parts = max(1, (sms * TILE_RESIDENT_THREADS) // (max_tokens * chunks))
    parts = min(parts, max(1, max(hq, hk) // TILE_HEADS))
    var blocks = max(1, min(ceildiv(max_tokens, slots), (sms * TILE_BLOCKS_PER_SM) // parts))
    if aligned:
        ctx.enqueue_function[_rope_tile_gpu[dtype, W, explicit_positions]](
            q_out, k_out, q, k, positions,
            Int32(q_tokens), Int32(k_tokens), Int32(max(q_seq, 1)), Int32(max(k_seq, 1)),
            Int32(q_pos_offset), Int32(k_pos_offset), Int32(hq), Int32(hk), Int32(head_dim),
            Int32(parts),
            freqs.theta, freqs.factor, freqs.low_freq_factor, freqs.high_freq_factor,
            freqs.original_max_position,
            grid_dim=(blocks, parts),
            block_dim=TILE_BLOCK,
        )
    else:
        ctx.enqueue_function[_rope_tile_gpu[dtype, 1, explicit_positions]](
            q_out, k_out, q, k, positions,
            Int32(q_tokens), Int32(k_tokens), Int32(max(q_seq, 1)), Int32(max(k_seq, 1)),
            Int32(q_pos_offset), Int32(k_pos_offset), Int32(hq), Int32(hk), Int32(head_dim),
            Int32(parts),
            freqs.theta, freqs.factor, freqs.low_freq_factor, freqs.high_freq_factor,
            freqs.original_max_position,
            grid_dim=(blocks, parts),
            block_dim=TILE_BLOCK,
        )


def _rope_twin_launch[
    dtype: DType, explicit_positions: Bool
](
    ctx: DeviceContext,
    q_out: Pointer[Scalar[dtype], _],
    k_out: Pointer[Scalar[dtype], _],
    q: Pointer[Scalar[dtype], _],
    k: Pointer[Scalar[dtype], _],
    positions: Pointer[Int64, _],
    q_tokens: Int,
    k_tokens: Int,
    q_seq: Int,
    k_seq: Int,
    q_pos_offset: Int,
    k_pos_offset: Int,
    hq: Int,
    hk: Int,
    head_dim: Int,
    freqs: RopeFreqs,
) raises:
    """Enqueues `_rope_twin_gpu` (16-byte accesses under the same conditions as
    `_rope_tile_launch`, scalar ones otherwise): one block per TWIN_BLOCK / chunks units of
    TWIN_HEADS heads, q's units then k's, however many blocks that makes."""
    var q_units = q_tokens * ceildiv(hq, TWIN_HEADS) if hq > 0 else 0
    var k_units = k_tokens * ceildiv(hk, TWIN_HEADS) if hk > 0 else 0
    if q_units + k_units == 0 or head_dim == 0:
        return
    var half = head_dim // 2
    comptime W = _rope_vector_width[dtype]()
    var aligned = (
        half % W == 0
        and Int(q_out) % 16 == 0
        and Int(k_out) % 16 == 0
        and Int(q) % 16 == 0
        and Int(k) % 16 == 0
    )
    var width = W if aligned else 1
    var blocks = ceildiv(q_units + k_units, TWIN_BLOCK // (half // width))
    # Llama's head sizes get their own instantiation, as the Triton twin's HALF is a
    # compile-time constant: a thread's 8 loads and 8 stores then share two base addresses
    # with immediate offsets (with a runtime head_dim each is its own 64-bit register,
    # which pushed the kernel past 64 registers) and the index math divides by constants.
    if aligned and head_dim == 128:
        _rope_twin_enqueue[dtype, W, explicit_positions, 128](
            ctx, q_out, k_out, q, k, positions, q_tokens, k_tokens, q_seq, k_seq,
            q_pos_offset, k_pos_offset, hq, hk, head_dim, freqs, blocks,
        )
    elif aligned and head_dim == 64:
        _rope_twin_enqueue[dtype, W, explicit_positions, 64](
            ctx, q_out, k_out, q, k, positions, q_tokens, k_tokens, q_seq, k_seq,
            q_pos_offset, k_pos_offset, hq, hk, head_dim, freqs, blocks,
        )
    elif aligned:
        _rope_twin_enqueue[dtype, W, explicit_positions, 0](
            ctx, q_out, k_out, q, k, positions, q_tokens, k_tokens, q_seq, k_seq,
            q_pos_offset, k_pos_offset, hq, hk, head_dim, freqs, blocks,
        )
    else:
        _rope_twin_enqueue[dtype, 1, explicit_positions, 0](
            ctx, q_out, k_out, q, k, positions, q_tokens, k_tokens, q_seq, k_seq,
            q_pos_offset, k_pos_offset, hq, hk, head_dim, freqs, blocks,
        )


def _rope_twin_enqueue[
    dtype: DType, width: Int, explicit_positions: Bool, dim: Int
](
    ctx: DeviceContext,
    q_out: Pointer[Scalar[dtype], _],
    k_out: Pointer[Scalar[dtype], _],
    q: Pointer[Scalar[dtype], _],
    k: Pointer[Scalar[dtype], _],
    positions: Pointer[Int64, _],
    q_tokens: Int,
    k_tokens: Int,
    q_seq: Int,
    k_seq: Int,
    q_pos_offset: Int,
    k_pos_offset: Int,
    hq: Int,
    hk: Int,
    head_dim: Int,
    freqs: RopeFreqs,
    blocks: Int,
) raises:
    """Enqueues one instantiation of `_rope_twin_gpu` (dim 0: head_dim at run time) on
    `blocks` blocks of TWIN_BLOCK threads, with the arguments `_rope_twin_launch` takes."""
    ctx.enqueue_function[_rope_twin_gpu[dtype, width, explicit_positions, dim]](
        q_out, k_out, q, k, positions,
        Int32(q_tokens if hq > 0 else 0), Int32(k_tokens if hk > 0 else 0),
        Int32(max(q_seq, 1)), Int32(max(k_seq, 1)),
        Int32(q_pos_offset), Int32(k_pos_offset), Int32(hq), Int32(hk), Int32(head_dim),
        freqs.theta, freqs.factor, freqs.low_freq_factor, freqs.high_freq_factor,
        freqs.original_max_position,
        grid_dim=blocks,
        block_dim=TWIN_BLOCK,
    )


@extensibility.register("kt.rope")
struct Rope:
    @staticmethod
    def execute[
        dtype: DType, //, target: StaticString
    ](
        q_out: OutputTensor[dtype=dtype, rank=4, ...],
        k_out: OutputTensor[dtype=dtype, rank=4, ...],
        q: InputTensor[dtype=dtype, rank=4, ...],
        k: InputTensor[dtype=dtype, rank=4, ...],
        positions: InputTensor[dtype=DType.int64, rank=2, ...],
        theta: Float32,
        factor: Float32,
        low_freq_factor: Float32,
        high_freq_factor: Float32,
        original_max_position: Float32,
        ctx: DeviceContext,
    ) raises:
        var tokens = q.dim_size(0) * q.dim_size(1)
        var hq = q.dim_size(2)
        var hk = k.dim_size(2)
        var head_dim = q.dim_size(3)
        if head_dim % 2 != 0 or head_dim > 2 * MAX_HALF_DIM:
            raise Error("kt.rope: head_dim must be even and at most ", 2 * MAX_HALF_DIM)
        var freqs = RopeFreqs(
            theta, factor, low_freq_factor, high_freq_factor, original_max_position
        )
        var qo = q_out.unsafe_ptr()
        var ko = k_out.unsafe_ptr()
        var qp = q.unsafe_ptr()
        var kp = k.unsafe_ptr()
        var pp = positions.unsafe_ptr()
        comptime if is_cpu[target]():

            def token_body(t: Int) {var qo, var ko, var qp, var kp, var pp, var hq, var hk, var head_dim, var freqs}:
                var half = head_dim // 2
                var cos_t = alloc[Float32](half)
                var sin_t = alloc[Float32](half)
                var pos = Float32(pp[unsafe_offset=t])
                for i in range(half):
                    var angle = pos * freqs.inv_freq(i, head_dim)
                    cos_t[unsafe_offset=i] = cos(angle)
                    sin_t[unsafe_offset=i] = sin(angle)
                _rotate_heads[dtype](
                    qo.unsafe_offset(t * hq * head_dim), qp.unsafe_offset(t * hq * head_dim),
                    hq, head_dim, cos_t, sin_t,
                )
                _rotate_heads[dtype](
                    ko.unsafe_offset(t * hk * head_dim), kp.unsafe_offset(t * hk * head_dim),
                    hk, head_dim, cos_t, sin_t,
                )
                cos_t.unsafe_free()
                sin_t.unsafe_free()

            sync_parallelize(token_body, tokens)
        else:
            _rope_gpu_launch[dtype, explicit_positions=True](
                ctx, qo, ko, qp, kp, pp, tokens, tokens, 1, 1, 0, 0, hq, hk, head_dim, freqs
            )
