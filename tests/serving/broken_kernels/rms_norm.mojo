"""Broken on purpose: y = x * w, without dividing by the root mean square."""

import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from max.gpu.host.info import is_cpu


@extensibility.register("kt.rms_norm")
struct BrokenRMSNorm:
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
            for i in range(m):
                for j in range(n):
                    var v = xp[unsafe_offset=i * n + j].cast[DType.float32]()
                    var g = wp[unsafe_offset=j].cast[DType.float32]()
                    yp[unsafe_offset=i * n + j] = (v * g).cast[dtype]()
        else:
            raise Error("the planted broken kernel runs on CPU only")
