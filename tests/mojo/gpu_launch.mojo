# Host-side launches of every GPU kernel in the kt package, for every dtype. CI cannot run
# them (no GPU), but building this program for a GPU target type-checks the kernels, lowers
# them to PTX and checks that every launch argument can cross to the device:
#   mojo build -I <repo> --target-accelerator=sm_90a tests/mojo/gpu_launch.mojo -o /dev/null
from max.gpu.host import DeviceContext

from kernels.fused_rope_attention import GPU_BLOCK as ATTN_BLOCK, _attention_gpu
from kernels.rms_norm import GPU_BLOCK as NORM_BLOCK, _rms_norm_gpu
from kernels.rope import GPU_BLOCK as ROPE_BLOCK, _rope_gpu


def launch_all[dtype: DType](ctx: DeviceContext) raises:
    var a = ctx.enqueue_create_buffer[dtype](64)
    var b = ctx.enqueue_create_buffer[dtype](64)
    var c = ctx.enqueue_create_buffer[dtype](64)
    var d = ctx.enqueue_create_buffer[dtype](64)
    var pos = ctx.enqueue_create_buffer[DType.int64](4)
    var f = Float32(1.0)
    ctx.enqueue_function[_rms_norm_gpu[dtype]](
        a.unsafe_ptr(), b.unsafe_ptr(), c.unsafe_ptr(), Int32(16), f,
        grid_dim=4, block_dim=NORM_BLOCK,
    )
    ctx.enqueue_function[_rope_gpu[dtype]](
        a.unsafe_ptr(), b.unsafe_ptr(), c.unsafe_ptr(), d.unsafe_ptr(), pos.unsafe_ptr(),
        Int32(1), Int32(1), Int32(16), f, f, f, f, f,
        grid_dim=4, block_dim=ROPE_BLOCK,
    )
    ctx.enqueue_function[_attention_gpu[dtype]](
        a.unsafe_ptr(), b.unsafe_ptr(), c.unsafe_ptr(), d.unsafe_ptr(),
        Int32(4), Int32(4), Int32(1), Int32(1), Int32(16), f, Int32(1), f, f, f, f, f,
        grid_dim=4, block_dim=ATTN_BLOCK,
    )


def main() raises:
    var ctx = DeviceContext()
    launch_all[DType.float32](ctx)
    launch_all[DType.bfloat16](ctx)
    launch_all[DType.float16](ctx)
    ctx.synchronize()
