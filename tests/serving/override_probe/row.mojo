import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from max.gpu.host.info import is_cpu


@extensibility.register("mo.reduce.row_mean_of_squares")
struct Fake:
    @staticmethod
    def execute[
        target: StaticString
    ](
        y: OutputTensor[dtype=DType.float32, rank=2, ...],
        x: InputTensor[dtype=DType.float32, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        var yp = y.unsafe_ptr()
        for i in range(y.dim_size(0)):
            yp[unsafe_offset=i] = Float32(7.0)
