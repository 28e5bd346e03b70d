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
from max.gpu import block_idx, thread_idx
from max.gpu.host import DeviceContext
from max.gpu.host.info import is_cpu
from max.gpu.sync import barrier
from std.math import cos, pi, sin
from std.memory import alloc, unsafe_stack_allocation

comptime GPU_BLOCK = 128
comptime MAX_HALF_DIM = 256


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
    rotates every (head, pair) of q and k for that token."""
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
        cos_t[unsafe_offset=i] = cos(angle)
        sin_t[unsafe_offset=i] = sin(angle)
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
            if tokens > 0:
                ctx.enqueue_function[_rope_gpu[dtype]](
                    qo, ko, qp, kp, pp, Int32(hq), Int32(hk), Int32(head_dim),
                    theta, factor, low_freq_factor, high_freq_factor, original_max_position,
                    grid_dim=tokens, block_dim=GPU_BLOCK,
                )
