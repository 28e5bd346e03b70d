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
from max.gpu import block_idx, thread_idx
from max.gpu.host import DeviceContext
from max.gpu.host.info import is_cpu
from max.gpu.sync import barrier
from layout import Idx, TileTensor, row_major
from nn.attention.gpu.mha import flash_attention
from nn.attention.mha_mask import CausalMask, NullMask
from std.math import cos, exp, inf, sin, sqrt
from std.memory import alloc, unsafe_stack_allocation

from .rope import RopeFreqs, _rope_gpu_launch, rotate_pair, sincos_f32_accurate

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
    dtype: DType
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

    Fast path (`_fast_path_supported`: bf16 and a listed (hq, hk, head_dim)):
    rotate q (positions skv - sq + i) and k (positions j) into scratch buffers of dtype
    with the vectorized RoPE kernel, then MAX's flash attention on (q_rot, k_rot, v).
    Otherwise the simple fused kernel `_attention_gpu`.
    """
    if batch * sq * hq == 0:
        return
    var op = o.unsafe_mut_cast[True]().as_unsafe_any_origin()
    var vp = v.unsafe_mut_cast[True]().as_unsafe_any_origin()
    if _fast_path_supported[dtype](hq, hk, head_dim):
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
