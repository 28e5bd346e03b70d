"""A throwaway elementwise op, y = x * x + x, added by tests/test_new_kernel.py to a copy of
the repository to show what a new kernel touches. Computed in fp32, rounded once."""

import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu import block_idx, thread_idx
from max.gpu.host import DeviceContext
from max.gpu.host.info import is_cpu

comptime GPU_BLOCK = 256


def _square_plus_gpu[
    dtype: DType
](y: Pointer[Scalar[dtype], MutAnyOrigin], x: Pointer[Scalar[dtype], MutAnyOrigin], n: Int32):
    var i = block_idx.x * GPU_BLOCK + thread_idx.x
    if i < Int(n):
        var v = x[unsafe_offset=i].cast[DType.float32]()
        y[unsafe_offset=i] = (v * v + v).cast[dtype]()


@extensibility.register("kt.square_plus")
struct SquarePlus:
    @staticmethod
    def execute[
        dtype: DType, //, target: StaticString
    ](
        y: OutputTensor[dtype=dtype, rank=2, ...],
        x: InputTensor[dtype=dtype, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        var n = x.dim_size(0) * x.dim_size(1)  # dense: MAX graph inputs are contiguous
        var yp = y.unsafe_ptr()
        var xp = x.unsafe_ptr()
        comptime if is_cpu[target]():
            for i in range(n):
                var v = xp[unsafe_offset=i].cast[DType.float32]()
                yp[unsafe_offset=i] = (v * v + v).cast[dtype]()
        else:
            if n > 0:
                ctx.enqueue_function[_square_plus_gpu[dtype]](
                    yp, xp, Int32(n), grid_dim=(n + GPU_BLOCK - 1) // GPU_BLOCK,
                    block_dim=GPU_BLOCK,
                )
