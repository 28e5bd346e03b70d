"""Broken on purpose: the new keys are stored as they come, without RoPE (values as they should)."""

import extensibility
from extensibility import InputTensor
from extensibility.managed_tensor_slice import _MutableInputTensor as MutableInputTensor
from max.gpu.host import DeviceContext
from max.gpu.host.info import is_cpu

from .paged_kv import PagedLayout, seq_of_row


@extensibility.register("kt.paged_rope_store")
struct BrokenPagedRopeStore:
    @staticmethod
    def execute[
        dtype: DType, //, target: StaticString
    ](
        k: InputTensor[dtype=dtype, rank=3, ...],
        v: InputTensor[dtype=dtype, rank=3, ...],
        blocks: MutableInputTensor[dtype=dtype, rank=6, ...],
        cache_lengths: InputTensor[dtype=DType.uint32, rank=1, ...],
        lookup_table: InputTensor[dtype=DType.uint32, rank=2, ...],
        row_offsets: InputTensor[dtype=DType.uint32, rank=1, ...],
        layer: Int32,
        theta: Float32,
        factor: Float32,
        low_freq_factor: Float32,
        high_freq_factor: Float32,
        original_max_position: Float32,
        ctx: DeviceContext,
    ) raises:
        var lay = PagedLayout(
            blocks.dim_size(3), blocks.dim_size(2), k.dim_size(1), k.dim_size(2), Int(layer),
            lookup_table.dim_size(1),
        )
        var bp = blocks.unsafe_ptr()
        var kp = k.unsafe_ptr()
        var vp = v.unsafe_ptr()
        var ro = row_offsets.unsafe_ptr()
        var batch = cache_lengths.dim_size(0)
        comptime if is_cpu[target]():
            for row in range(k.dim_size(0)):
                var b = seq_of_row(ro, batch, row)
                var pos = Int(cache_lengths.unsafe_ptr()[b]) + row - Int(ro[b])
                for h in range(lay.kv_heads):
                    var src = (row * lay.kv_heads + h) * lay.head_dim
                    var kdst = lay.token_row(lookup_table.unsafe_ptr(), b, pos, 0, h)
                    var vdst = lay.token_row(lookup_table.unsafe_ptr(), b, pos, 1, h)
                    for i in range(lay.head_dim):
                        bp[unsafe_offset=kdst + i] = kp[unsafe_offset=src + i]
                        bp[unsafe_offset=vdst + i] = vp[unsafe_offset=src + i]
        else:
            raise Error("the planted broken kernel runs on CPU only")
