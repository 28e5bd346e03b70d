"""RMSNorm over the last axis: y = x / sqrt(mean(x^2) + eps) * w.

Zhang & Sennrich, "Root Mean Square Layer Normalization" (2019), as used by Llama
(HF `LlamaRMSNorm`). The sum of squares, the scaling and the weight multiply all run in
fp32; the result is rounded to the input dtype once, at the end.
"""

import extensibility
from extensibility import InputTensor, OutputTensor
from max.algorithm import sync_parallelize
from max.gpu import MAX_THREADS_PER_BLOCK_METADATA, block_idx, thread_idx
from max.gpu.host import DeviceContext
from max.gpu.host.info import is_cpu
from max.gpu.primitives.warp import shuffle_xor
from max.gpu.sync import barrier
from std.math import ceildiv, rsqrt
from std.memory import bitcast, unsafe_stack_allocation
from std.sys import size_of
from std.utils import StaticTuple

comptime GPU_BLOCK = 256
comptime CPU_CHUNK = 64
# Vectorized kernel (`_rms_norm_rows_gpu`): threads per block, and the largest row (in
# 16-byte vectors per thread) it keeps in registers; longer rows take `_rms_norm_gpu`.
comptime ROWS_BLOCK = 256
comptime WARP = 32
# `_rms_norm_gpu_launch` takes aligned rows of more than 256 and at most 1024 16-byte vectors
# (bf16/fp16 N 2056..8192, fp32 N 1028..4096: Llama 8B's and 70B's hidden sizes) with
# `_rms_norm_rows_lean_gpu`. On since 2026-12-04: checked and verified through MAX on the H200,
# 0.87-0.89x the shipped kernel's time at N 8192 (4.0 TB/s at 16384 x 8192), 1.00x at N 4096
# (tests/mojo/gpu_bench.mojo).
comptime RMS_NORM_LEAN = True
# `_rms_norm_rows_lean_gpu`: 16-byte vectors per thread (threads per row: 128 or 256, the fewer
# that hold the row).
comptime LEAN_VECTORS = 4


def _lean_threads_per_sm[dtype: DType]() -> Int:
    """The threads per SM `_rms_norm_rows_lean_gpu` asks ptxas to keep resident (a cap of
    65536 / that registers a thread): 1280 (48 registers, 5 blocks of 256, 10 of 128) where
    the kernel fits without spills at 4 vectors (bf16, fp32: 47-48 registers with no cap);
    1024 for fp16 (64 registers: its widening is a real conversion, which LLVM keeps live in
    fp32 from the sum of squares to the stores, and at 48 registers ptxas spills)."""
    return 1024 if dtype == DType.float16 else 1280


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


@always_inline
def _row_vectors[
    dtype: DType, width: Int, threads: Int, vectors: Int
](p: Pointer[Scalar[dtype], MutAnyOrigin], base: Int, n: Int, tid: Int) -> StaticTuple[
    SIMD[dtype, width], vectors
]:
    """A thread's `vectors` 16-byte vectors of the row of n at p + base (vector v at
    (v * threads + tid) * width), zero past n. Loads past the row's end read its first
    vector instead and are zeroed after: no branch between the loads, which LLVM would
    otherwise fill with the casts of the vector just loaded (so that a thread waits for each
    load before it issues the next, as `_rms_norm_rows_gpu`'s PTX shows)."""
    comptime align = width * size_of[dtype]()
    var out = StaticTuple[SIMD[dtype, width], vectors](fill=0)
    comptime for v in range(vectors):
        var j = (v * threads + tid) * width
        var at = j if j < n else 0
        var xv = p.unsafe_load[width=width, alignment=align](base + at)
        out[v] = xv if j < n else SIMD[dtype, width](0)
    return out


@__llvm_metadata(
    MAX_THREADS_PER_BLOCK_METADATA=StaticTuple[Int32, 1](Int32(threads)),
    `nvvm.minctasm`=SIMDLength(_lean_threads_per_sm[dtype]() // threads),
)
def _rms_norm_rows_lean_gpu[
    dtype: DType, width: Int, threads: Int, vectors: Int, exact: Bool
](
    y: Pointer[Scalar[dtype], MutAnyOrigin],
    x: Pointer[Scalar[dtype], MutAnyOrigin],
    w: Pointer[Scalar[dtype], MutAnyOrigin],
    n_: Int32,
    eps: Float32,
):
    """RMSNorm of one row of at most threads * vectors * width elements per block (n a
    multiple of width, 16-byte aligned rows): the Triton twin's launch (a block per row, the
    x loads issued back to back before any use, then w's, one pass over global memory) in
    fewer registers, so that more rows are in flight per SM.

    What limits `_rms_norm_rows_gpu` at N 8192 (256 threads, 4 vectors): its per-vector
    `if valid and j < n` branches let LLVM widen x and w to fp32 right after each load, and
    the fp32 copies (64 registers) stay live across the barrier to the stores: 82 registers
    (ptxas, sm_90a), 2 blocks of 256 per SM, 32 KB of x in flight per SM, and two of its w
    loads wait for the last vector's branch (its x data) before they issue. The twin (Triton
    3.9, 8 warps, 4 vectors) holds x in fp32 and w raw in 64 registers: 4 blocks per SM,
    64 KB. Here x and w stay raw (8 + 8 registers per vector pair at 4 vectors: 32) from the
    loads to the stores; the sum of squares widens each vector where it is used, and the
    stores widen x again (for bf16 through the bit pattern, so that LLVM cannot merge the two
    widenings and keep the fp32 copy live): 47-49 registers, and the launch bound
    (`_lean_threads_per_sm`) holds it to 48 without spills, 5 blocks of 256 per SM (80 KB of x
    in flight at N 8192) or 10 of 128 (80 KB at N 4096, where the twin's 256 threads of 2
    vectors in 40 registers keep 6 rows, 48 KB). No branch between the loads: with `exact`
    (n == threads * vectors * width, the Llama sizes) there is no mask at all; otherwise a
    load past the row's end reads the row's first vector and is zeroed after (`_row_vectors`).
    The warp partials go through shared memory with one barrier, every thread adding them in
    the same order."""
    comptime warps = threads // WARP
    comptime align = width * size_of[dtype]()
    var n = Int(n_)
    var tid = thread_idx.x
    var base = block_idx.x * n
    var xs: StaticTuple[SIMD[dtype, width], vectors]
    var ws: StaticTuple[SIMD[dtype, width], vectors]
    comptime if exact:
        xs = StaticTuple[SIMD[dtype, width], vectors](fill=0)
        ws = StaticTuple[SIMD[dtype, width], vectors](fill=0)
        comptime for v in range(vectors):
            xs[v] = x.unsafe_load[width=width, alignment=align](base + (v * threads + tid) * width)
        comptime for v in range(vectors):
            ws[v] = w.unsafe_load[width=width, alignment=align]((v * threads + tid) * width)
    else:
        xs = _row_vectors[dtype, width, threads, vectors](x, base, n, tid)
        ws = _row_vectors[dtype, width, threads, vectors](w, 0, n, tid)
    var acc = SIMD[DType.float32, width](0)
    comptime for v in range(vectors):
        var f = xs[v].cast[DType.float32]()
        acc += f * f
    var total = acc.reduce_add()
    comptime for k in range(5):
        total += shuffle_xor(total, UInt32(16 >> k))
    comptime if warps > 1:
        var partial = unsafe_stack_allocation[warps, Float32, address_space=.SHARED]()
        if tid % WARP == 0:
            partial[unsafe_offset=tid // WARP] = total
        barrier()
        total = partial[unsafe_offset=0]
        comptime for k in range(1, warps):
            total += partial[unsafe_offset=k]
    var r = rsqrt(total / Float32(n) + eps)
    comptime for v in range(vectors):
        var j = (v * threads + tid) * width
        var out = _widen_again(xs[v]) * r * ws[v].cast[DType.float32]()
        comptime if exact:
            y.unsafe_store[alignment=align](base + j, out.cast[dtype]())
        else:
            if j < n:
                y.unsafe_store[alignment=align](base + j, out.cast[dtype]())


@always_inline
def _widen_again[dtype: DType, width: Int](v: SIMD[dtype, width]) -> SIMD[DType.float32, width]:
    """v in fp32 as `cast` gives it, for bf16 through the bit pattern (bf16 is fp32's upper
    half): a widening LLVM does not recognize as the `cast` of the sum of squares, so it keeps
    the raw vector live across the reduction instead of its fp32 copy (twice the registers)."""
    comptime if dtype == DType.bfloat16:
        var bits = bitcast[DType.uint16, width](v).cast[DType.uint32]() << 16
        return bitcast[DType.float32, width](bits)
    else:
        return v.cast[DType.float32]()


def _rms_norm_lean_launch[
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
    """Enqueues `_rms_norm_rows_lean_gpu` on m blocks of 128 threads when the row fits in 128
    * LEAN_VECTORS 16-byte vectors (N 4096 bf16: the raw sweep's best block, 4.10 vs 3.99 TB/s
    for 256 threads of 2 vectors with the shipped kernel), else 256 (N 8192 bf16: the twin's
    block), without masks when the row fills the block exactly. The caller checked n and the
    alignment (n a multiple of the width, at most 256 * LEAN_VECTORS vectors)."""
    comptime W = max(1, 16 // size_of[dtype]())
    if n <= 128 * LEAN_VECTORS * W:
        _rms_norm_lean_enqueue[dtype, 128](ctx, y, x, w, m, n, eps)
    else:
        _rms_norm_lean_enqueue[dtype, 256](ctx, y, x, w, m, n, eps)


def _rms_norm_lean_enqueue[
    dtype: DType, threads: Int
](
    ctx: DeviceContext,
    y: Pointer[Scalar[dtype], _],
    x: Pointer[Scalar[dtype], _],
    w: Pointer[Scalar[dtype], _],
    m: Int,
    n: Int,
    eps: Float32,
) raises:
    """Enqueues `_rms_norm_rows_lean_gpu` with `threads` per row on m blocks: its unmasked
    instantiation when the row fills the block's LEAN_VECTORS vectors a thread exactly."""
    comptime W = max(1, 16 // size_of[dtype]())
    if n == threads * LEAN_VECTORS * W:
        ctx.enqueue_function[_rms_norm_rows_lean_gpu[dtype, W, threads, LEAN_VECTORS, True]](
            y, x, w, Int32(n), eps, grid_dim=m, block_dim=threads
        )
    else:
        ctx.enqueue_function[_rms_norm_rows_lean_gpu[dtype, W, threads, LEAN_VECTORS, False]](
            y, x, w, Int32(n), eps, grid_dim=m, block_dim=threads
        )


def _rms_norm_gpu_launch[
    dtype: DType, lean: Bool = RMS_NORM_LEAN
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
    16-byte vector width and the pointers are 16-byte aligned; `_rms_norm_gpu` otherwise.
    With lean (RMS_NORM_LEAN as shipped), aligned rows of more than 64 * LEAN_VECTORS and at
    most 256 * LEAN_VECTORS vectors take `_rms_norm_rows_lean_gpu`."""
    if m == 0 or n == 0:
        return
    comptime W = max(1, 16 // size_of[dtype]())
    var aligned = n % W == 0 and Int(y) % 16 == 0 and Int(x) % 16 == 0 and Int(w) % 16 == 0
    comptime if lean:
        if aligned and n > 64 * LEAN_VECTORS * W and n <= 256 * LEAN_VECTORS * W:
            _rms_norm_lean_launch[dtype](ctx, y, x, w, m, n, eps)
            return
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
