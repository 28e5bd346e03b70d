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
from max.gpu.primitives.warp import shuffle_xor
from max.gpu.sync import barrier
from std.math import ceildiv, rsqrt
from std.memory import unsafe_stack_allocation
from std.sys import size_of
from std.utils import StaticTuple

comptime GPU_BLOCK = 256
comptime CPU_CHUNK = 64
# Vectorized kernel (`_rms_norm_rows_gpu`): threads per block, and the largest row (in
# 16-byte vectors per thread) it keeps in registers; longer rows take `_rms_norm_gpu`.
comptime ROWS_BLOCK = 256
comptime WARP = 32


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
    """One block per row: strided sum of squares, then a shared-memory tree reduction; x is
    read twice. The fallback for rows `_rms_norm_rows_gpu` does not take, and the reference
    tests/mojo/gpu_launch.mojo --check compares it with."""
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


def _rms_norm_rows_gpu[
    dtype: DType, width: Int, row_threads: Int, vectors: Int
](
    y: Pointer[Scalar[dtype], MutAnyOrigin],
    x: Pointer[Scalar[dtype], MutAnyOrigin],
    w: Pointer[Scalar[dtype], MutAnyOrigin],
    rows_: Int32,
    n_: Int32,
    eps: Float32,
):
    """RMSNorm of rows of at most row_threads * vectors * width elements (n a multiple of
    width, 16-byte aligned rows), one pass over global memory.

    `row_threads` threads per row (a warp, or the whole ROWS_BLOCK block) and
    ROWS_BLOCK / row_threads rows per block. Each thread issues all its `vectors` loads of x
    (and of w) up front, `width`-element (16-byte) accesses, keeps them in registers, sums
    squares in fp32, reduces across the warp with shuffles and across warps through shared
    memory (every thread adds the row's warp partials in the same order), then writes
    y = x * r * w from the registers: x is read from global memory once."""
    comptime rows_per_block = ROWS_BLOCK // row_threads
    comptime warps_per_row = row_threads // WARP
    comptime align = width * size_of[dtype]()
    var n = Int(n_)
    var tid = thread_idx.x
    var lane = tid % row_threads
    var row = block_idx.x * rows_per_block + tid // row_threads
    var valid = row < Int(rows_)
    var base = row * n
    var xs = StaticTuple[SIMD[dtype, width], vectors](fill=0)
    var ws = StaticTuple[SIMD[dtype, width], vectors](fill=0)
    comptime for v in range(vectors):
        var j = (v * row_threads + lane) * width
        if valid and j < n:
            xs[v] = x.unsafe_load[width=width, alignment=align](base + j)
            ws[v] = w.unsafe_load[width=width, alignment=align](j)
    var acc = SIMD[DType.float32, width](0)
    comptime for v in range(vectors):
        var f = xs[v].cast[DType.float32]()
        acc += f * f
    var total = acc.reduce_add()
    comptime for k in range(5):
        total += shuffle_xor(total, UInt32(16 >> k))
    comptime if warps_per_row > 1:
        var partial = unsafe_stack_allocation[ROWS_BLOCK // WARP, Float32, address_space=.SHARED]()
        if tid % WARP == 0:
            partial[unsafe_offset=tid // WARP] = total
        barrier()
        var first = (tid // row_threads) * warps_per_row
        total = partial[unsafe_offset=first]
        comptime for k in range(1, warps_per_row):
            total += partial[unsafe_offset=first + k]
    var r = rsqrt(total / Float32(n) + eps)
    comptime for v in range(vectors):
        var j = (v * row_threads + lane) * width
        if valid and j < n:
            var out = xs[v].cast[DType.float32]() * r * ws[v].cast[DType.float32]()
            y.unsafe_store[alignment=align](base + j, out.cast[dtype]())


def _rms_norm_gpu_launch[
    dtype: DType
](
    ctx: DeviceContext,
    y: Pointer[Scalar[dtype], _],
    x: Pointer[Scalar[dtype], _],
    w: Pointer[Scalar[dtype], _],
    m: Int,
    n: Int,
    eps: Float32,
) raises:
    """Enqueues RMSNorm of m contiguous rows of n: `_rms_norm_rows_gpu` with the smallest
    register footprint that holds the row (a warp per row up to 4 vectors per thread, else
    a block per row with 1, 2, 4 or 8 vectors per thread) when n is a multiple of the
    16-byte vector width and the pointers are 16-byte aligned; `_rms_norm_gpu` otherwise."""
    if m == 0 or n == 0:
        return
    comptime W = max(1, 16 // size_of[dtype]())
    var aligned = n % W == 0 and Int(y) % 16 == 0 and Int(x) % 16 == 0 and Int(w) % 16 == 0
    var rows = Int32(m)
    var cols = Int32(n)
    if aligned and n <= WARP * W * 4:
        ctx.enqueue_function[_rms_norm_rows_gpu[dtype, W, WARP, 4]](
            y, x, w, rows, cols, eps, grid_dim=ceildiv(m, ROWS_BLOCK // WARP), block_dim=ROWS_BLOCK
        )
    elif aligned and n <= ROWS_BLOCK * W:
        ctx.enqueue_function[_rms_norm_rows_gpu[dtype, W, ROWS_BLOCK, 1]](
            y, x, w, rows, cols, eps, grid_dim=m, block_dim=ROWS_BLOCK
        )
    elif aligned and n <= ROWS_BLOCK * W * 2:
        ctx.enqueue_function[_rms_norm_rows_gpu[dtype, W, ROWS_BLOCK, 2]](
            y, x, w, rows, cols, eps, grid_dim=m, block_dim=ROWS_BLOCK
        )
    elif aligned and n <= ROWS_BLOCK * W * 4:
        ctx.enqueue_function[_rms_norm_rows_gpu[dtype, W, ROWS_BLOCK, 4]](
            y, x, w, rows, cols, eps, grid_dim=m, block_dim=ROWS_BLOCK
        )
    elif aligned and n <= ROWS_BLOCK * W * 8:
        ctx.enqueue_function[_rms_norm_rows_gpu[dtype, W, ROWS_BLOCK, 8]](
            y, x, w, rows, cols, eps, grid_dim=m, block_dim=ROWS_BLOCK
        )
    else:
        ctx.enqueue_function[_rms_norm_gpu[dtype]](
            y, x, w, cols, eps, grid_dim=m, block_dim=GPU_BLOCK
        )


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
        # The kernels address dense rows; a strided view (a slice MAX hands over as a view)
        # is refused in one line rather than read wrong.
        if m > 0 and n > 0:
            if x.stride_length[1]() != 1 or (m > 1 and x.stride_length[0]() != n):
                raise Error("kt.rms_norm: x must be dense (got a strided view)")
            if y.stride_length[1]() != 1 or (m > 1 and y.stride_length[0]() != n):
                raise Error("kt.rms_norm: the output must be dense")
            if w.stride_length[0]() != 1:
                raise Error("kt.rms_norm: w must be dense")
        var yp = y.unsafe_ptr()
        var xp = x.unsafe_ptr()
        var wp = w.unsafe_ptr()
        comptime if is_cpu[target]():

            def row(i: Int) {var yp, var xp, var wp, var n, var eps}:
                _rms_norm_row[dtype](yp.unsafe_offset(i * n), xp.unsafe_offset(i * n), wp, n, eps)

            sync_parallelize(row, m)
        else:
            _rms_norm_gpu_launch[dtype](ctx, yp, xp, wp, m, n, eps)
