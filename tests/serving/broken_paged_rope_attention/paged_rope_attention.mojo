"""Broken on purpose: causal attention over the paged cache with the queries left unrotated."""

import extensibility
from extensibility import InputTensor, OutputTensor
from extensibility.managed_tensor_slice import _MutableInputTensor as MutableInputTensor
from max.gpu.host import DeviceContext
from max.gpu.host.info import is_cpu
from std.math import exp, inf

from .paged_kv import PagedLayout, seq_of_row


@extensibility.register("kt.paged_rope_attention")
struct BrokenPagedRopeAttention:
    @staticmethod
    def execute[
        dtype: DType, //, target: StaticString
    ](
        o: OutputTensor[dtype=dtype, rank=3, ...],
        q: InputTensor[dtype=dtype, rank=3, ...],
        blocks: MutableInputTensor[dtype=dtype, rank=6, ...],
        cache_lengths: InputTensor[dtype=DType.uint32, rank=1, ...],
        lookup_table: InputTensor[dtype=DType.uint32, rank=2, ...],
        row_offsets: InputTensor[dtype=DType.uint32, rank=1, ...],
        layer: Int32,
        max_prompt_length: Int32,
        max_cache_length: Int32,
        scale: Float32,
        theta: Float32,
        factor: Float32,
        low_freq_factor: Float32,
        high_freq_factor: Float32,
        original_max_position: Float32,
        ctx: DeviceContext,
    ) raises:
        var q_heads = q.dim_size(1)
        var lay = PagedLayout(
            blocks.dim_size(3), blocks.dim_size(2), blocks.dim_size(4), q.dim_size(2), Int(layer),
            lookup_table.dim_size(1),
        )
        var d = lay.head_dim
        var op = o.unsafe_ptr()
        var qp = q.unsafe_ptr()
        var bp = blocks.unsafe_ptr()
        var lt = lookup_table.unsafe_ptr()
        var ro = row_offsets.unsafe_ptr()
        var batch = cache_lengths.dim_size(0)
        comptime if is_cpu[target]():
            for row in range(q.dim_size(0)):
                var b = seq_of_row(ro, batch, row)
                var pos = Int(cache_lengths.unsafe_ptr()[b]) + row - Int(ro[b])
                for h in range(q_heads):
                    var kvh = h // (q_heads // lay.kv_heads)
                    var m = -inf[DType.float32]()
                    for j in range(pos + 1):
                        var key = lay.token_row(lt, b, j, 0, kvh)
                        var dot = Float32(0)
                        for i in range(d):
                            dot += qp[unsafe_offset=(row * q_heads + h) * d + i].cast[DType.float32]() * bp[unsafe_offset=key + i].cast[DType.float32]()
                        m = max(m, dot * scale)
                    var l = Float32(0)
                    for i in range(d):
                        op[unsafe_offset=(row * q_heads + h) * d + i] = 0
                    for j in range(pos + 1):
                        var key = lay.token_row(lt, b, j, 0, kvh)
                        var dot = Float32(0)
                        for i in range(d):
                            dot += qp[unsafe_offset=(row * q_heads + h) * d + i].cast[DType.float32]() * bp[unsafe_offset=key + i].cast[DType.float32]()
                        l += exp(dot * scale - m)
                    for j in range(pos + 1):
                        var key = lay.token_row(lt, b, j, 0, kvh)
                        var val = lay.token_row(lt, b, j, 1, kvh)
                        var dot = Float32(0)
                        for i in range(d):
                            dot += qp[unsafe_offset=(row * q_heads + h) * d + i].cast[DType.float32]() * bp[unsafe_offset=key + i].cast[DType.float32]()
                        var p = exp(dot * scale - m) / l
                        for i in range(d):
                            var at = (row * q_heads + h) * d + i
                            op[unsafe_offset=at] = (op[unsafe_offset=at].cast[DType.float32]() + p * bp[unsafe_offset=val + i].cast[DType.float32]()).cast[dtype]()
        else:
            raise Error("the planted broken kernel runs on CPU only")
