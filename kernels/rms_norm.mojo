"""RMSNorm over the last axis: y = x / sqrt(mean(x^2) + eps) * w.

Zhang & Sennrich, "Root Mean Square Layer Normalization" (2019), as used by Llama
(HF `LlamaRMSNorm`). The sum of squares, the scaling and the weight multiply all run in
fp32; the result is rounded to the input dtype once, at the end.
"""

import extensibility
from extensibility import InputTensor, OutputTensor
from max.algorithm import sync_parallelize
from max.gpu import block_idx, thread_idx
from max.gpu.host import DeviceContext
from max.gpu.host.info import is_cpu
from max.gpu.sync import barrier
from std.math import rsqrt
from std.memory import unsafe_stack_allocation

comptime GPU_BLOCK = 256
comptime CPU_CHUNK = 64


def _sum_squares[dtype: DType](x: Pointer[Scalar[dtype], MutAnyOrigin], n: Int) -> Float32:
    """Sum of x^2 in fp32, accumulated per chunk and then across chunks, so the rounding
    error grows like CPU_CHUNK + n / CPU_CHUNK rather than n."""
    var total = Float32(0)
    var start = 0
    while start < n:
        var end = min(start + CPU_CHUNK, n)
        var chunk = Float32(0)
        for j in range(start, end):
            var v = x[unsafe_offset=j].cast[DType.float32]()
            chunk += v * v
        total += chunk
        start = end
    return total


def _rms_norm_row[
    dtype: DType
](
    y: Pointer[Scalar[dtype], MutAnyOrigin],
    x: Pointer[Scalar[dtype], MutAnyOrigin],
    w: Pointer[Scalar[dtype], MutAnyOrigin],
    n: Int,
    eps: Float32,
):
    var r = rsqrt(_sum_squares[dtype](x, n) / Float32(n) + eps)
    for j in range(n):
        var v = x[unsafe_offset=j].cast[DType.float32]()
        y[unsafe_offset=j] = (v * r * w[unsafe_offset=j].cast[DType.float32]()).cast[dtype]()


def _rms_norm_gpu[
    dtype: DType
](
    y: Pointer[Scalar[dtype], MutAnyOrigin],
    x: Pointer[Scalar[dtype], MutAnyOrigin],
    w: Pointer[Scalar[dtype], MutAnyOrigin],
    n_: Int32,
    eps: Float32,
):
    """One block per row: strided sum of squares, then a shared-memory tree reduction."""
    var n = Int(n_)
    var row = block_idx.x
    var tid = thread_idx.x
    var xr = x.unsafe_offset(row * n)
    var yr = y.unsafe_offset(row * n)
    var partial = unsafe_stack_allocation[GPU_BLOCK, Float32, address_space=.SHARED]()
    var acc = Float32(0)
    for j in range(tid, n, GPU_BLOCK):
        var v = xr[unsafe_offset=j].cast[DType.float32]()
        acc += v * v
    partial[unsafe_offset=tid] = acc
    barrier()
    var stride = GPU_BLOCK // 2
    while stride > 0:
        if tid < stride:
            partial[unsafe_offset=tid] += partial[unsafe_offset=tid + stride]
        barrier()
        stride //= 2
    var r = rsqrt(partial[unsafe_offset=0] / Float32(n) + eps)
    for j in range(tid, n, GPU_BLOCK):
        var v = xr[unsafe_offset=j].cast[DType.float32]()
        yr[unsafe_offset=j] = (v * r * w[unsafe_offset=j].cast[DType.float32]()).cast[dtype]()


@extensibility.register("kt.rms_norm")
struct RMSNorm:
    @staticmethod
    def execute[
        dtype: DType, //, target: StaticString
    ](
        y: OutputTensor[dtype=dtype, rank=2, ...],
        x: InputTensor[dtype=dtype, rank=2, ...],
        w: InputTensor[dtype=dtype, rank=1, ...],
        eps: Float32,
        ctx: DeviceContext,
    ) raises:
        var m = x.dim_size(0)
        var n = x.dim_size(1)
        var yp = y.unsafe_ptr()
        var xp = x.unsafe_ptr()
        var wp = w.unsafe_ptr()
        comptime if is_cpu[target]():

            def row(i: Int) {var yp, var xp, var wp, var n, var eps}:
                _rms_norm_row[dtype](yp.unsafe_offset(i * n), xp.unsafe_offset(i * n), wp, n, eps)

            sync_parallelize(row, m)
        else:
            if m > 0:
                ctx.enqueue_function[_rms_norm_gpu[dtype]](
                    yp, xp, wp, Int32(n), eps, grid_dim=m, block_dim=GPU_BLOCK
                )
