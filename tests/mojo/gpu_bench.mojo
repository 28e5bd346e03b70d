# Raw kernel timings on a GPU, outside MAX graphs, for tuning the kernels' compile-time
# parameters (each variant is its own instantiation). Not part of CI (it needs a GPU):
#   mojo run -I <repo> tests/mojo/gpu_bench.mojo [EXACT_LENGTHS] [DENSE_TILED_DECODE]
#     [RMS_NORM_LEAN] [ROPE_TWIN] [DENSE_WAVE_DECODE]
# (the paged kernels come first: kt.paged_rope_attention's prefill and decode kernels at the
# serving shapes, and each candidate named on the command line beside the kernel it would
# replace, then "<candidate> faster: yes|no"; then, with
# DENSE_TILED_DECODE, kt.fused_rope_attention's decode beside its tiled kernel the same way (with
# DENSE_WAVE_DECODE, the tiled kernel beside the wave launch); with RMS_NORM_LEAN,
# kt.rms_norm's launch beside its lean row kernel (llama8b and llama70b shapes) the same way;
# with ROPE_TWIN, kt.rope's
# tile kernel beside the twin kernel the same way; then RoPE, RMSNorm and
# the dense decode variants).
# Each line: a kernel variant, its mean milliseconds over back-to-back launches (the host
# enqueues far faster than the GPU runs them, so launch overhead is hidden) and GB/s of the
# bytes it must move.
from max.gpu.host import DeviceAttribute, DeviceBuffer, DeviceContext
from std.math import ceildiv, exp, log
from std.sys import argv
from std.time import perf_counter_ns

from kernels.fused_rope_attention import (
    DECODE_THREADS,
    LOG2E,
    _decode_combine_gpu,
    _decode_partial_gpu,
    _fused_rope_attention_gpu,
)
from kernels.paged_kv import PagedLayout
from kernels.paged_max_prefill import _max_prefill_supported
from kernels.paged_rope_attention import (
    MAX_PREFILL,
    TILED_DECODE,
    _attention_gpu_launch,
    _prefill_min_blocks,
    paged_rope_attention_gpu,
)
from kernels.rms_norm import (
    GPU_BLOCK as NORM_BLOCK,
    ROWS_BLOCK,
    _rms_norm_gpu,
    _rms_norm_gpu_launch,
    _rms_norm_rows_gpu,
)
from kernels.rope import (
    FAST_BLOCK,
    TILE_BLOCK,
    RopeFreqs,
    _rope_fast_gpu,
    _rope_tile_gpu,
    _rope_tile_launch,
    _rope_twin_launch,
)

comptime BF16 = DType.bfloat16
comptime WARM = 3
comptime ITERS = 30


def fill(ctx: DeviceContext, buf: DeviceBuffer, n: Int) raises:
    var host = ctx.enqueue_create_host_buffer[buf.dtype](n)
    ctx.synchronize()
    for i in range(n):
        host[i] = Scalar[buf.dtype](Float32((i * 7919) % 1013) * 0.002 - 1.0)
    ctx.enqueue_copy(buf, host)
    ctx.synchronize()


def report(name: String, t0: Int, nbytes: Float64):
    var ms = Float64(perf_counter_ns() - t0) / Float64(ITERS) / 1e6
    print(name, "ms", ms, "GB/s", nbytes / ms / 1e6)


def rope_variant[per: Int](
    ctx: DeviceContext, qo: DeviceBuffer[BF16], ko: DeviceBuffer[BF16], q: DeviceBuffer[BF16],
    k: DeviceBuffer[BF16], pos: DeviceBuffer[DType.int64], tokens: Int, hq: Int, hk: Int,
    freqs: RopeFreqs,
) raises:
    var t0 = perf_counter_ns()
    for it in range(WARM + ITERS):
        if it == WARM:
            ctx.synchronize()
            t0 = perf_counter_ns()
        ctx.enqueue_function[_rope_fast_gpu[BF16, 8, False, per]](
            qo.unsafe_ptr(), ko.unsafe_ptr(), q.unsafe_ptr(), k.unsafe_ptr(), pos.unsafe_ptr(),
            Int32(tokens), Int32(tokens), Int32(tokens), Int32(tokens), Int32(0), Int32(0),
            Int32(hq), Int32(hk), Int32(128),
            freqs.theta, freqs.factor, freqs.low_freq_factor, freqs.high_freq_factor,
            freqs.original_max_position,
            grid_dim=(ceildiv(tokens * 8, FAST_BLOCK), ceildiv(hq, per) + ceildiv(hk, per)),
            block_dim=FAST_BLOCK,
        )
    ctx.synchronize()
    report(String("rope heads_per_thread=", per), t0,
           Float64(4 * tokens * (hq + hk) * 128))


def rope_tile_variant[group: Int](
    ctx: DeviceContext, qo: DeviceBuffer[BF16], ko: DeviceBuffer[BF16], q: DeviceBuffer[BF16],
    k: DeviceBuffer[BF16], pos: DeviceBuffer[DType.int64], tokens: Int, hq: Int, hk: Int,
    freqs: RopeFreqs, blocks_per_sm: Int,
) raises:
    """The op's token-tile kernel at D 128 (16 threads' worth of slots: 32 tokens a block)
    with `group` heads per load batch on a grid of blocks_per_sm blocks per SM."""
    var sms = ctx.get_attribute(DeviceAttribute.MULTIPROCESSOR_COUNT)
    var blocks = min(ceildiv(tokens, TILE_BLOCK // 8), sms * blocks_per_sm)
    var t0 = perf_counter_ns()
    for it in range(WARM + ITERS):
        if it == WARM:
            ctx.synchronize()
            t0 = perf_counter_ns()
        ctx.enqueue_function[_rope_tile_gpu[BF16, 8, False, group]](
            qo.unsafe_ptr(), ko.unsafe_ptr(), q.unsafe_ptr(), k.unsafe_ptr(), pos.unsafe_ptr(),
            Int32(tokens), Int32(tokens), Int32(tokens), Int32(tokens), Int32(0), Int32(0),
            Int32(hq), Int32(hk), Int32(128), Int32(1),
            freqs.theta, freqs.factor, freqs.low_freq_factor, freqs.high_freq_factor,
            freqs.original_max_position,
            grid_dim=(blocks, 1),
            block_dim=TILE_BLOCK,
        )
    ctx.synchronize()
    report(String("rope tile heads_per_batch=", group, " blocks_per_sm=", blocks_per_sm), t0,
           Float64(4 * tokens * (hq + hk) * 128))


def rms_rows_variant[row_threads: Int, vectors: Int](
    ctx: DeviceContext, y: DeviceBuffer[BF16], x: DeviceBuffer[BF16], w: DeviceBuffer[BF16],
    m: Int, n: Int,
) raises:
    var t0 = perf_counter_ns()
    for it in range(WARM + ITERS):
        if it == WARM:
            ctx.synchronize()
            t0 = perf_counter_ns()
        ctx.enqueue_function[_rms_norm_rows_gpu[BF16, 8, row_threads, vectors]](
            y.unsafe_ptr(), x.unsafe_ptr(), w.unsafe_ptr(), Int32(m), Int32(n), Float32(1e-5),
            grid_dim=ceildiv(m, ROWS_BLOCK // row_threads), block_dim=ROWS_BLOCK,
        )
    ctx.synchronize()
    report(String("rms_norm N=", n, " threads_per_row=", row_threads, " vectors=", vectors), t0,
           Float64(2 * m * n * 2))


def same(ctx: DeviceContext, a: DeviceBuffer[BF16], b: DeviceBuffer[BF16], n: Int) raises -> Bool:
    var ha = ctx.enqueue_create_host_buffer[BF16](n)
    var hb = ctx.enqueue_create_host_buffer[BF16](n)
    ctx.enqueue_copy(ha, a)
    ctx.enqueue_copy(hb, b)
    ctx.synchronize()
    for i in range(n):
        if ha[i] != hb[i]:
            return False
    return True


def decode_variant[unroll: Int, warps: Int](
    ctx: DeviceContext, o: DeviceBuffer[BF16], q: DeviceBuffer[BF16], k: DeviceBuffer[BF16],
    v: DeviceBuffer[BF16], batch: Int, skv: Int, hq: Int, hk: Int, splits: Int,
    freqs: RopeFreqs,
) raises:
    var chunk = ceildiv(skv, splits)
    var n_split = ceildiv(skv, chunk)
    var m_part = ctx.enqueue_create_buffer[DType.float32](batch * hq * n_split)
    var l_part = ctx.enqueue_create_buffer[DType.float32](batch * hq * n_split)
    var acc_part = ctx.enqueue_create_buffer[DType.float32](batch * hq * n_split * 128)
    var scale = Float32(1.0) / Float32(128) ** 0.5 * LOG2E
    var t0 = perf_counter_ns()
    for it in range(WARM + ITERS):
        if it == WARM:
            ctx.synchronize()
            t0 = perf_counter_ns()
        ctx.enqueue_function[_decode_partial_gpu[BF16, 128, 4, unroll, warps]](
            m_part.unsafe_ptr(), l_part.unsafe_ptr(), acc_part.unsafe_ptr(),
            q.unsafe_ptr(), k.unsafe_ptr(), v.unsafe_ptr(),
            Int32(skv), Int32(hq), Int32(hk), Int32(chunk), scale,
            freqs.theta, freqs.factor, freqs.low_freq_factor, freqs.high_freq_factor,
            freqs.original_max_position,
            grid_dim=(n_split, hk * (hq // hk // 4), batch), block_dim=warps * 32,
        )
        ctx.enqueue_function[_decode_combine_gpu[BF16]](
            o.unsafe_ptr(), m_part.unsafe_ptr(), l_part.unsafe_ptr(), acc_part.unsafe_ptr(),
            Int32(n_split), Int32(128), grid_dim=batch * hq, block_dim=DECODE_THREADS,
        )
    ctx.synchronize()
    report(String("decode skv=", skv, " unroll=", unroll, " warps=", warps, " splits=", n_split),
           t0, Float64(2 * batch * skv * hk * 128 * 2))


def dense_decode[wave: Bool = False](
    ctx: DeviceContext, batch: Int, skv: Int, hq: Int, hk: Int, d: Int, freqs: RopeFreqs
) raises -> Float64:
    """kt.fused_rope_attention's decode (one query, keys rotated as they stream) with
    `_decode_partial_gpu`, then with `_dense_tiled_decode_gpu` (DENSE_TILED_DECODE); returns the
    tiled kernel's time over the first's. With `wave`: with `_dense_tiled_decode_gpu` (the op
    as shipped), then with `_dense_wave_decode_launch` (DENSE_WAVE_DECODE), its time over the
    tiled kernel's. GB/s: the keys and values read once."""
    var nq = batch * hq * d
    var nkv = batch * skv * hk * d
    var q = ctx.enqueue_create_buffer[BF16](nq)
    var k = ctx.enqueue_create_buffer[BF16](nkv)
    var v = ctx.enqueue_create_buffer[BF16](nkv)
    var o = ctx.enqueue_create_buffer[BF16](nq)
    fill(ctx, q, nq)
    fill(ctx, k, nkv)
    fill(ctx, v, nkv)
    var scale = Float32(1.0) / Float32(d) ** 0.5
    var nbytes = Float64(2 * nkv * 2)
    var first_ms = Float64(0)
    var ratio = Float64(0)
    for variant in range(2):
        var t0 = perf_counter_ns()
        for it in range(WARM + ITERS):
            if it == WARM:
                ctx.synchronize()
                t0 = perf_counter_ns()
            if variant == 0:
                _fused_rope_attention_gpu[
                    BF16, dense_tiled_decode=wave, dense_wave_decode=False
                ](
                    o.unsafe_ptr(), q.unsafe_ptr(), k.unsafe_ptr(), v.unsafe_ptr(),
                    batch, 1, skv, hq, hk, d, scale, Int32(1), freqs, ctx,
                )
            else:
                _fused_rope_attention_gpu[BF16, dense_tiled_decode=True, dense_wave_decode=wave](
                    o.unsafe_ptr(), q.unsafe_ptr(), k.unsafe_ptr(), v.unsafe_ptr(),
                    batch, 1, skv, hq, hk, d, scale, Int32(1), freqs, ctx,
                )
        ctx.synchronize()
        var ms = Float64(perf_counter_ns() - t0) / Float64(ITERS) / 1e6
        var name: String
        if variant == 0:
            first_ms = ms
            name = "tiled (as shipped)" if wave else "op (default)"
        else:
            ratio = ms / first_ms
            if wave:
                name = String("dense wave (DENSE_WAVE_DECODE) vs tiled ", ratio)
            else:
                name = String("dense tiled (DENSE_TILED_DECODE) vs op ", ratio)
        print(
            String("decode skv=", skv, " B ", batch, " Hq ", hq, " Hk ", hk, " D ", d), name,
            "ms", ms, "GB/s", nbytes / ms / 1e6,
        )
    return ratio


def rms_norm_lean(ctx: DeviceContext, m: Int, n: Int) raises -> Float64:
    """kt.rms_norm's GPU launch with lean off, then with
    `_rms_norm_rows_lean_gpu` (RMS_NORM_LEAN) on m rows of n (bf16); returns lean's time over
    the shipped launch's. GB/s: x read and y written once."""
    var x = ctx.enqueue_create_buffer[BF16](m * n)
    var y = ctx.enqueue_create_buffer[BF16](m * n)
    var w = ctx.enqueue_create_buffer[BF16](n)
    fill(ctx, x, m * n)
    fill(ctx, w, n)
    var nbytes = Float64(2 * m * n * 2)
    var first_ms = Float64(0)
    var ratio = Float64(0)
    for variant in range(2):
        var t0 = perf_counter_ns()
        for it in range(WARM + ITERS):
            if it == WARM:
                ctx.synchronize()
                t0 = perf_counter_ns()
            if variant == 0:
                _rms_norm_gpu_launch[BF16, lean=False](
                    ctx, y.unsafe_ptr(), x.unsafe_ptr(), w.unsafe_ptr(), m, n, Float32(1e-5)
                )
            else:
                _rms_norm_gpu_launch[BF16, lean=True](
                    ctx, y.unsafe_ptr(), x.unsafe_ptr(), w.unsafe_ptr(), m, n, Float32(1e-5)
                )
        ctx.synchronize()
        var ms = Float64(perf_counter_ns() - t0) / Float64(ITERS) / 1e6
        var name: String
        if variant == 0:
            first_ms = ms
            name = "op (default)"
        else:
            ratio = ms / first_ms
            name = String("lean (RMS_NORM_LEAN) vs op ", ratio)
        print(String("rms_norm M=", m, " N=", n), name, "ms", ms, "GB/s", nbytes / ms / 1e6)
    return ratio


def paged_attention[d: Int](
    ctx: DeviceContext, batch: Int, cached: Int, new: Int, hq: Int, hk: Int, freqs: RopeFreqs,
    candidate: Bool,
) raises -> Float64:
    """kt.paged_rope_attention on a batch (each sequence: new rows after cached tokens; pages
    of 128, a 2-layer cache, layer 1 read, the block table padded as MAX Serve's): the op as
    shipped, the kernel its flag replaced (prefill: the tiled kernel, MAX_PREFILL off; decode:
    the pipelined split-KV loop, TILED_DECODE off), the per-row `_attention_gpu` (fewer
    launches: it is slow), and with `candidate` the op using the exact longest prompt (new)
    and sequence (cached + new) it is given (EXACT_LENGTHS).
    Returns the candidate's time over the op's (0 without a candidate). TFLOP/s counts
    the causal work, 4 D flops per visible (query, key) pair; GB/s the keys and values read
    once."""
    comptime page = 128
    comptime MB = _prefill_min_blocks(d)
    var rows = batch * new
    var used = ceildiv(cached + new, page)
    # The block table laid out as MAX Serve's (columns rounded up to 8 plus 16, the padding on
    # a valid page), as MAX's kernel may read past a row's pages.
    var cols = ceildiv(used, 8) * 8 + 16
    var pages = batch * used
    var nb = pages * 2 * 2 * page * hk * d
    var blocks = ctx.enqueue_create_buffer[BF16](nb)
    var qkv = ctx.enqueue_create_buffer[BF16](rows * (hq + 2 * hk) * d)
    var o = ctx.enqueue_create_buffer[BF16](rows * hq * d)
    fill(ctx, blocks, nb)
    fill(ctx, qkv, rows * (hq + 2 * hk) * d)
    var host_cl = ctx.enqueue_create_host_buffer[DType.uint32](batch)
    var host_lt = ctx.enqueue_create_host_buffer[DType.uint32](batch * cols)
    var host_ro = ctx.enqueue_create_host_buffer[DType.uint32](batch + 1)
    ctx.synchronize()
    for b in range(batch):
        host_cl[b] = UInt32(cached)
        host_ro[b] = UInt32(b * new)
        for c in range(cols):
            var i = b * used + c
            host_lt[b * cols + c] = UInt32((i * (pages - 1) + 5) % pages if c < used else 0)
    host_ro[batch] = UInt32(rows)
    var cl = ctx.enqueue_create_buffer[DType.uint32](batch)
    var lt = ctx.enqueue_create_buffer[DType.uint32](batch * cols)
    var ro = ctx.enqueue_create_buffer[DType.uint32](batch + 1)
    ctx.enqueue_copy(cl, host_cl)
    ctx.enqueue_copy(lt, host_lt)
    ctx.enqueue_copy(ro, host_ro)
    ctx.synchronize()
    var lay = PagedLayout(page, 2, hk, d, 1, cols)
    var op = o.unsafe_ptr().as_unsafe_any_origin()
    var qp = qkv.unsafe_ptr().as_unsafe_any_origin()
    var bp = blocks.unsafe_ptr().as_unsafe_any_origin()
    var clp = cl.unsafe_ptr().as_unsafe_any_origin()
    var ltp = lt.unsafe_ptr().as_unsafe_any_origin()
    var rop = ro.unsafe_ptr().as_unsafe_any_origin()
    var scale = Float32(1.0) / Float32(d) ** 0.5
    var q_rs = (hq + 2 * hk) * d
    var flops = Float64(4 * batch * hq * d) * Float64(new * cached + new * (new + 1) // 2)
    var decode = new == 1
    var first_ms = Float64(0)
    var ratio = Float64(0)
    for variant in range(4):
        if variant == 3 and not candidate:
            continue
        var iters = 3 if variant == 2 else ITERS
        var t0 = perf_counter_ns()
        for it in range(WARM + iters):
            if it == WARM:
                ctx.synchronize()
                t0 = perf_counter_ns()
            if variant == 0:
                paged_rope_attention_gpu[BF16, exact_lengths=False](
                    op, qp, bp, clp, ltp, rop, rows, batch, new, cached + new, hq, q_rs, d, scale, lay,
                    pages, freqs, ctx,
                )
            elif variant == 1 and decode:
                paged_rope_attention_gpu[BF16, pipelined_decode=True, tiled_decode=False, exact_lengths=False](
                    op, qp, bp, clp, ltp, rop, rows, batch, new, cached + new, hq, q_rs, d, scale, lay,
                    pages, freqs, ctx,
                )
            elif variant == 1:
                paged_rope_attention_gpu[BF16, tiled_prefill=True, max_prefill=False, exact_lengths=False](
                    op, qp, bp, clp, ltp, rop, rows, batch, new, cached + new, hq, q_rs, d, scale, lay,
                    pages, freqs, ctx,
                )
            elif variant == 2:
                _attention_gpu_launch[BF16](
                    op, qp, bp, clp, ltp, rop, rows, batch, hq, q_rs, d, scale, lay, freqs, ctx
                )
            else:
                paged_rope_attention_gpu[BF16, exact_lengths=True](
                    op, qp, bp, clp, ltp, rop, rows, batch, new, cached + new, hq, q_rs, d, scale, lay,
                    pages, freqs, ctx,
                )
        ctx.synchronize()
        var ms = Float64(perf_counter_ns() - t0) / Float64(iters) / 1e6
        var name: String
        if variant == 0:
            name = String("op (tiled decode=", TILED_DECODE, ")") if decode else String(
                "op (MAX prefill=", MAX_PREFILL and _max_prefill_supported[BF16](hq, lay), ")"
            )
            first_ms = ms
        elif variant == 1:
            name = "split-KV pipelined (replaced)" if decode else String("tiled MB=", MB, " (replaced)")
        elif variant == 2:
            name = "per-row _attention_gpu"
        else:
            ratio = ms / first_ms
            name = "op, exact lengths (EXACT_LENGTHS)"
        var kv_bytes = Float64(2 * batch * (cached + new) * hk * d * 2)
        print(
            "paged decode" if decode else "paged prefill", name,
            "B", batch, "cached", cached, "new", new, "Hq", hq, "Hk", hk, "D", d,
            "ms", ms, "TFLOP/s", flops / ms / 1e9, "GB/s", kv_bytes / ms / 1e6,
            String("vs op ", ratio) if variant == 3 else String(""),
        )
    return ratio


def rope_twin_shape(
    ctx: DeviceContext, tokens: Int, hq: Int, hk: Int, d: Int, freqs: RopeFreqs
) raises -> Float64:
    """kt.rope's GPU kernels on one bf16 shape (explicit positions below 32768, as the op
    passes them): the tile kernel (`_rope_tile_launch`, the op's default), then ROPE_TWIN's
    `_rope_twin_launch` on the same inputs; returns twin time over tile time."""
    var nq = tokens * hq * d
    var nk = tokens * hk * d
    var q = ctx.enqueue_create_buffer[BF16](nq)
    var k = ctx.enqueue_create_buffer[BF16](nk)
    var qo = ctx.enqueue_create_buffer[BF16](nq)
    var ko = ctx.enqueue_create_buffer[BF16](nk)
    var pos = ctx.enqueue_create_buffer[DType.int64](tokens)
    fill(ctx, q, nq)
    fill(ctx, k, nk)
    var hp = ctx.enqueue_create_host_buffer[DType.int64](tokens)
    ctx.synchronize()
    for t in range(tokens):
        hp[t] = Int64((t * 7919) % 32768)
    ctx.enqueue_copy(pos, hp)
    ctx.synchronize()
    var nbytes = Float64(2 * (nq + nk) * 2 + 8 * tokens)
    var first_ms = Float64(0)
    var ratio = Float64(1)
    for variant in range(2):
        var t0 = perf_counter_ns()
        for it in range(WARM + ITERS):
            if it == WARM:
                ctx.synchronize()
                t0 = perf_counter_ns()
            if variant == 0:
                _rope_tile_launch[BF16, explicit_positions=True](
                    ctx, qo.unsafe_ptr(), ko.unsafe_ptr(), q.unsafe_ptr(), k.unsafe_ptr(),
                    pos.unsafe_ptr(), tokens, tokens, 1, 1, 0, 0, hq, hk, d, freqs,
                )
            else:
                _rope_twin_launch[BF16, explicit_positions=True](
                    ctx, qo.unsafe_ptr(), ko.unsafe_ptr(), q.unsafe_ptr(), k.unsafe_ptr(),
                    pos.unsafe_ptr(), tokens, tokens, 1, 1, 0, 0, hq, hk, d, freqs,
                )
        ctx.synchronize()
        var ms = Float64(perf_counter_ns() - t0) / Float64(ITERS) / 1e6
        var name = String("op (tile)")
        if variant == 0:
            first_ms = ms
        else:
            ratio = ms / first_ms
            name = "twin (ROPE_TWIN)"
        print(
            "rope", name, "tokens", tokens, "Hq", hq, "Hk", hk, "D", d, "ms", ms,
            "GB/s", nbytes / ms / 1e6, String("vs op ", ratio) if variant == 1 else String(""),
        )
    return ratio


def verdict(label: String, ratios: List[Float64]) raises:
    """"<label> faster: yes" when the candidate's time over the kernel it would replace is below
    0.97 in geometric mean and below 1.05 at every shape timed (no shape it slows down)."""
    if len(ratios) == 0:
        return
    var log_sum = Float64(0)
    var worst = Float64(0)
    for r in ratios:
        log_sum += log(r)
        worst = max(worst, r)
    var geo = exp(log_sum / Float64(len(ratios)))
    print(label, "faster:", "yes" if geo < 0.97 and worst < 1.05 else "no",
          "(time over the kernel it replaces: geometric mean", geo, "worst", worst, ")")


def main() raises:
    var ctx = DeviceContext()
    var freqs = RopeFreqs(500000.0, 8.0, 1.0, 4.0, 8192.0)

    var exact_lengths = False
    var dense_tiled_decode = False
    var rms_norm_lean_on = False
    var rope_twin = False
    var dense_wave_decode = False
    for arg in argv():
        if arg == "EXACT_LENGTHS":
            exact_lengths = True
        elif arg == "DENSE_TILED_DECODE":
            dense_tiled_decode = True
        elif arg == "RMS_NORM_LEAN":
            rms_norm_lean_on = True
        elif arg == "ROPE_TWIN":
            rope_twin = True
        elif arg == "DENSE_WAVE_DECODE":
            dense_wave_decode = True

    # Paged prefill at max+kt's serving shape (Llama 3.2 1B: 32 q / 8 kv heads, D 64, bf16,
    # pages of 128): 8 prompts of 1024 tokens; then D 128 (Llama 3.1 8B), 1024 new tokens
    # after 3072 cached (chunked prefill), and one 8192-token prompt (MAX's row bound exact).
    var prefill = List[Float64]()
    prefill.append(paged_attention[64](ctx, 8, 0, 1024, 32, 8, freqs, exact_lengths))
    prefill.append(paged_attention[128](ctx, 8, 0, 1024, 32, 8, freqs, exact_lengths))
    prefill.append(paged_attention[64](ctx, 8, 3072, 1024, 32, 8, freqs, exact_lengths))
    prefill.append(paged_attention[64](ctx, 1, 0, 8192, 32, 8, freqs, exact_lengths))

    # Paged decode: the microbench's decode (D 128, B 8) and decode_1b (D 64, B 32) shapes, short
    # contexts at D 128, and max+kt's serving shape (Llama 3.2 1B, 128 sequences of 1k tokens).
    var decode = List[Float64]()
    decode.append(paged_attention[128](ctx, 8, 16383, 1, 32, 8, freqs, exact_lengths))
    decode.append(paged_attention[128](ctx, 8, 4095, 1, 32, 8, freqs, exact_lengths))
    decode.append(paged_attention[64](ctx, 32, 4095, 1, 32, 8, freqs, exact_lengths))
    decode.append(paged_attention[128](ctx, 8, 1023, 1, 32, 8, freqs, exact_lengths))
    decode.append(paged_attention[64](ctx, 128, 1023, 1, 32, 8, freqs, exact_lengths))
    decode.append(paged_attention[64](ctx, 32, 1087, 1, 32, 8, freqs, exact_lengths))
    if exact_lengths:
        prefill.extend(decode^)
        verdict("exact lengths", prefill)
    # Dense decode (kt.fused_rope_attention): the op's decode shapes below (B 8, 32 q / 8 kv
    # heads, D 128, 4k and 32k keys) and decode_1b's (B 32, D 64, 4k keys).
    if dense_tiled_decode:
        var dense = List[Float64]()
        dense.append(dense_decode(ctx, 8, 4096, 32, 8, 128, freqs))
        dense.append(dense_decode(ctx, 8, 32768, 32, 8, 128, freqs))
        dense.append(dense_decode(ctx, 32, 4096, 32, 8, 64, freqs))
        verdict("dense tiled decode", dense)
    # The same shapes and 16k keys with DENSE_WAVE_DECODE, beside the tiled kernel as shipped.
    if dense_wave_decode:
        var wave = List[Float64]()
        wave.append(dense_decode[True](ctx, 8, 4096, 32, 8, 128, freqs))
        wave.append(dense_decode[True](ctx, 8, 16384, 32, 8, 128, freqs))
        wave.append(dense_decode[True](ctx, 8, 32768, 32, 8, 128, freqs))
        wave.append(dense_decode[True](ctx, 32, 4096, 32, 8, 64, freqs))
        verdict("dense wave decode", wave)
    # The microbench's llama8b (N 4096, 4k..32k rows) and llama70b (N 8192, 2k..16k rows)
    # families, every one of them a shape the lean rule takes.
    if rms_norm_lean_on:
        var lean = List[Float64]()
        for mn in [
            (32768, 4096), (16384, 4096), (8192, 4096), (4096, 4096),
            (16384, 8192), (8192, 8192), (4096, 8192), (2048, 8192),
        ]:
            lean.append(rms_norm_lean(ctx, mn[0], mn[1]))
        verdict("rms norm lean", lean)
    # kt.rope alone (bf16, explicit positions): B1 S32768 at Llama 3 8B's heads (32 q / 8 k,
    # D 128; the shape of the RoPE variants below), the same at Llama 3.2 1B's D 64, 8192
    # tokens of MHA 32 / 32, and a short prefill of 512 tokens.
    if rope_twin:
        var rope = List[Float64]()
        rope.append(rope_twin_shape(ctx, 32768, 32, 8, 128, freqs))
        rope.append(rope_twin_shape(ctx, 32768, 32, 8, 64, freqs))
        rope.append(rope_twin_shape(ctx, 8192, 32, 32, 128, freqs))
        rope.append(rope_twin_shape(ctx, 512, 32, 8, 128, freqs))
        verdict("rope twin", rope)

    # RoPE alone: 32768 tokens, 32 q heads, 8 k heads, D 128 (168M elements).
    var tokens = 32768
    var q = ctx.enqueue_create_buffer[BF16](tokens * 32 * 128)
    var k = ctx.enqueue_create_buffer[BF16](tokens * 8 * 128)
    var qo = ctx.enqueue_create_buffer[BF16](tokens * 32 * 128)
    var ko = ctx.enqueue_create_buffer[BF16](tokens * 8 * 128)
    var pos = ctx.enqueue_create_buffer[DType.int64](tokens)
    fill(ctx, q, tokens * 32 * 128)
    fill(ctx, k, tokens * 8 * 128)
    var qo2 = ctx.enqueue_create_buffer[BF16](tokens * 32 * 128)
    var ko2 = ctx.enqueue_create_buffer[BF16](tokens * 8 * 128)
    rope_variant[8](ctx, qo, ko, q, k, pos, tokens, 32, 8, freqs)
    comptime for per in [4, 2, 1]:
        rope_variant[per](ctx, qo2, ko2, q, k, pos, tokens, 32, 8, freqs)
        print("  same output as 8 heads per thread:",
              same(ctx, qo, qo2, tokens * 32 * 128) and same(ctx, ko, ko2, tokens * 8 * 128))
    # The op's kernel (`_rope_tile_gpu`; the op uses 4 heads per batch, 2 blocks per SM).
    comptime for group in [2, 4, 8]:
        for bps in [1, 2, 4, 8]:
            rope_tile_variant[group](ctx, qo2, ko2, q, k, pos, tokens, 32, 8, freqs, bps)
        print("  same output as 8 heads per thread:",
              same(ctx, qo, qo2, tokens * 32 * 128) and same(ctx, ko, ko2, tokens * 8 * 128))

    # RMSNorm: 32768 x 4096 and 16384 x 8192 (bf16, 256 MiB in, 256 MiB out).
    for n in [4096, 8192]:
        var m = 32768 * 4096 // n
        var x = ctx.enqueue_create_buffer[BF16](m * n)
        var y = ctx.enqueue_create_buffer[BF16](m * n)
        var w = ctx.enqueue_create_buffer[BF16](n)
        fill(ctx, x, m * n)
        fill(ctx, w, n)
        var t0 = perf_counter_ns()
        for it in range(WARM + ITERS):
            if it == WARM:
                ctx.synchronize()
                t0 = perf_counter_ns()
            _rms_norm_gpu_launch[BF16](
                ctx, y.unsafe_ptr(), x.unsafe_ptr(), w.unsafe_ptr(), m, n, Float32(1e-5)
            )
        ctx.synchronize()
        report(String("rms_norm N=", n, " op (default)"), t0, Float64(2 * m * n * 2))
        t0 = perf_counter_ns()
        for it in range(WARM + ITERS):
            if it == WARM:
                ctx.synchronize()
                t0 = perf_counter_ns()
            ctx.enqueue_function[_rms_norm_gpu[BF16]](
                y.unsafe_ptr(), x.unsafe_ptr(), w.unsafe_ptr(), Int32(n), Float32(1e-5),
                grid_dim=m, block_dim=NORM_BLOCK,
            )
        ctx.synchronize()
        report(String("rms_norm N=", n, " scalar two-pass"), t0, Float64(2 * m * n * 2))
        if n == 4096:
            rms_rows_variant[256, 2](ctx, y, x, w, m, n)
            rms_rows_variant[128, 4](ctx, y, x, w, m, n)
            rms_rows_variant[64, 8](ctx, y, x, w, m, n)
            rms_rows_variant[32, 16](ctx, y, x, w, m, n)
        else:
            rms_rows_variant[256, 4](ctx, y, x, w, m, n)
            rms_rows_variant[128, 8](ctx, y, x, w, m, n)

    # Decode: batch 8, 32 q heads on 8 kv heads, D 128.
    var batch = 8
    for skv in [4096, 32768]:
        var qd = ctx.enqueue_create_buffer[BF16](batch * 32 * 128)
        var kd = ctx.enqueue_create_buffer[BF16](batch * skv * 8 * 128)
        var vd = ctx.enqueue_create_buffer[BF16](batch * skv * 8 * 128)
        var od = ctx.enqueue_create_buffer[BF16](batch * 32 * 128)
        fill(ctx, qd, batch * 32 * 128)
        fill(ctx, kd, batch * skv * 8 * 128)
        fill(ctx, vd, batch * skv * 8 * 128)
        for splits in [16, 32, 64]:
            decode_variant[2, 4](ctx, od, qd, kd, vd, batch, skv, 32, 8, splits, freqs)
        decode_variant[1, 4](ctx, od, qd, kd, vd, batch, skv, 32, 8, 16, freqs)
        decode_variant[4, 4](ctx, od, qd, kd, vd, batch, skv, 32, 8, 16, freqs)
        decode_variant[2, 8](ctx, od, qd, kd, vd, batch, skv, 32, 8, 16, freqs)
        decode_variant[4, 2](ctx, od, qd, kd, vd, batch, skv, 32, 8, 16, freqs)
        decode_variant[2, 2](ctx, od, qd, kd, vd, batch, skv, 32, 8, 32, freqs)
        # The op's own decode branch (its split choice, scratch allocated per call).
        var t0 = perf_counter_ns()
        for it in range(WARM + ITERS):
            if it == WARM:
                ctx.synchronize()
                t0 = perf_counter_ns()
            _fused_rope_attention_gpu[BF16](
                od.unsafe_ptr(), qd.unsafe_ptr(), kd.unsafe_ptr(), vd.unsafe_ptr(),
                batch, 1, skv, 32, 8, 128, Float32(0.088), Int32(1), freqs, ctx,
            )
        ctx.synchronize()
        report(String("decode skv=", skv, " op (default)"), t0, Float64(2 * batch * skv * 8 * 128 * 2))
