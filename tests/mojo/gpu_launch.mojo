# Host-side launches of every GPU kernel in the kt package, for every dtype. CI cannot run
# them (no GPU), but building this program for a GPU target type-checks the kernels, lowers
# them to PTX and checks that every launch argument can cross to the device:
#   mojo build -I <repo> --target-accelerator=sm_90a tests/mojo/gpu_launch.mojo -o /dev/null
# On a GPU, `--check` also compares kt.rms_norm's and kt.rope's vectorized kernels with the
# simple kernels `_rms_norm_gpu` and `_rope_gpu` (every dtype, awkward sizes), and the fused
# op's fast path (RoPE pre-pass + MAX flash attention) with the simple fused kernel
# `_attention_gpu` on random bf16 inputs, and kt.paged_rope_attention's tiled prefill kernel
# with its per-row kernel `_attention_gpu` (every dtype, ragged batches, cached prefixes), and
# its split-KV decode kernel, as in use and with the key loads one step ahead (PIPELINED_DECODE),
# with `_attention_gpu` on decode batches (16-bit dtypes), and its tiled split-KV decode
# (TILED_DECODE) the same way, and its prefill on MAX's paged flash attention behind kt's query
# rotation (MAX_PREFILL) with `_attention_gpu` on prefill batches (bf16 and fp16, every
# (Hq, Hk, D) it instantiates), and kt.fused_rope_attention's tiled dense decode
# (DENSE_TILED_DECODE) with `_attention_gpu` on decode batches (bf16 and fp16, D 64 and 128,
# GQA 1/2/4/8), its wave decode (DENSE_WAVE_DECODE) the same way (GQA 1/2/3/4/8, B 1 to 32),
# kt.rms_norm's lean row kernel (RMS_NORM_LEAN) with `_rms_norm_gpu` (every dtype, every N its
# rule takes in kind, odd M, and the edges it leaves to the shipped kernels),
# and kt.rope's candidate kernel (ROPE_TWIN) with `_rope_gpu` and the tile kernel (bf16 and
# fp16, D 64 and 128 among others, positions to 40000 and past 2^17):
#   mojo run -I <repo> tests/mojo/gpu_launch.mojo --check
from max.gpu.host import DeviceBuffer, DeviceContext
from std.math import ceildiv
from std.sys import argv, size_of

from kernels.fused_rope_attention import (
    GPU_BLOCK as ATTN_BLOCK,
    _attention_gpu,
    _decode_supported,
    _fast_path_supported,
    _fused_rope_attention_gpu,
)
from kernels.paged_kv import PagedLayout
from kernels.paged_max_prefill import MAX_PREFILL_PAGE, _max_prefill_supported
from kernels.paged_rope_attention import (
    EXACT_LENGTHS,
    PIPELINED_DECODE,
    TILED_DECODE,
    _attention_gpu_launch,
    paged_rope_attention_gpu,
)
from kernels.paged_rope_store import RowStrides, paged_rope_store_gpu
from kernels.rms_norm import GPU_BLOCK as NORM_BLOCK, _rms_norm_gpu, _rms_norm_gpu_launch
from kernels.rope import (
    GPU_BLOCK as ROPE_BLOCK,
    RopeFreqs,
    _rope_gpu,
    _rope_gpu_launch,
    _rope_tile_launch,
    _rope_twin_launch,
)


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
    # kt.rms_norm's GPU branch: warp-per-row, block-per-row (1, 2, 4, 8 vectors) and fallback.
    var big = ctx.enqueue_create_buffer[dtype](4 * 16384)
    var big_w = ctx.enqueue_create_buffer[dtype](16384)
    for n in [64, 2048, 4096, 8192, 16384, 15]:
        _rms_norm_gpu_launch[dtype](
            ctx, big.unsafe_ptr().as_unsafe_any_origin(), big.unsafe_ptr().as_unsafe_any_origin(),
            big_w.unsafe_ptr().as_unsafe_any_origin(), 3, n, f,
        )
    ctx.enqueue_function[_rope_gpu[dtype]](
        a.unsafe_ptr(), b.unsafe_ptr(), c.unsafe_ptr(), d.unsafe_ptr(), pos.unsafe_ptr(),
        Int32(1), Int32(1), Int32(16), f, f, f, f, f,
        grid_dim=4, block_dim=ROPE_BLOCK,
    )
    var freqs = RopeFreqs(f, f, f, f, f)
    # Exactly as kt.rope's GPU branch passes them (MutAnyOrigin pointers).
    _rope_gpu_launch[dtype, explicit_positions=True](
        ctx,
        a.unsafe_ptr().as_unsafe_any_origin(),
        b.unsafe_ptr().as_unsafe_any_origin(),
        c.unsafe_ptr().as_unsafe_any_origin(),
        d.unsafe_ptr().as_unsafe_any_origin(),
        pos.unsafe_ptr().as_unsafe_any_origin(),
        4, 4, 1, 1, 0, 0, 1, 1, 16, freqs,
    )
    # kt.rope's GPU branch (explicit positions; 16-byte and scalar variants).
    _rope_gpu_launch[dtype, explicit_positions=True](
        ctx, a.unsafe_ptr(), b.unsafe_ptr(), c.unsafe_ptr(), d.unsafe_ptr(), pos.unsafe_ptr(),
        4, 4, 1, 1, 0, 0, 1, 1, 16, freqs,
    )
    _rope_gpu_launch[dtype, explicit_positions=True](
        ctx, a.unsafe_ptr(), b.unsafe_ptr(), c.unsafe_ptr(), d.unsafe_ptr(), pos.unsafe_ptr(),
        4, 4, 1, 1, 0, 0, 1, 1, 6, freqs,
    )
    # Implicit positions (token % seq + offset), as the fused attention uses it.
    _rope_gpu_launch[dtype, explicit_positions=False](
        ctx, a.unsafe_ptr(), b.unsafe_ptr(), c.unsafe_ptr(), d.unsafe_ptr(), pos.unsafe_ptr(),
        2, 4, 2, 4, 2, 0, 1, 1, 16, freqs,
    )
    ctx.enqueue_function[_attention_gpu[dtype]](
        a.unsafe_ptr(), b.unsafe_ptr(), c.unsafe_ptr(), d.unsafe_ptr(),
        Int32(4), Int32(4), Int32(1), Int32(1), Int32(16), f, Int32(1), f, f, f, f, f,
        grid_dim=4, block_dim=ATTN_BLOCK,
    )


def fused_attention_all[dtype: DType](ctx: DeviceContext) raises:
    """The fused op's GPU branch exactly as `kt.fused_rope_attention` calls it: every
    fast-path (heads, head_dim, mask) instantiation plus the `_attention_gpu` fallback."""
    var freqs = RopeFreqs(10000.0, 1.0, 1.0, 4.0, 8192.0)
    var n = 2 * 8 * 32 * 256
    var o = ctx.enqueue_create_buffer[dtype](n)
    var q = ctx.enqueue_create_buffer[dtype](n)
    var k = ctx.enqueue_create_buffer[dtype](n)
    var v = ctx.enqueue_create_buffer[dtype](n)
    var scale = Float32(0.125)
    # The op passes `Pointer[Scalar[dtype], MutAnyOrigin]` (InputTensor.unsafe_ptr()).
    var op = o.unsafe_ptr().as_unsafe_any_origin()
    var qp = q.unsafe_ptr().as_unsafe_any_origin()
    var kp = k.unsafe_ptr().as_unsafe_any_origin()
    var vp = v.unsafe_ptr().as_unsafe_any_origin()
    _fused_rope_attention_gpu[dtype](op, qp, kp, vp, 1, 3, 5, 32, 8, 128, scale, 1, freqs, ctx)
    for causal in range(2):
        for hk in [32, 8]:
            for d in [64, 128, 256]:
                # batch 2, sq 4, skv 8: queries at the end of the keys.
                _fused_rope_attention_gpu[dtype](
                    o.unsafe_ptr(), q.unsafe_ptr(), k.unsafe_ptr(), v.unsafe_ptr(),
                    2, 4, 8, 32, hk, d, scale, Int32(causal), freqs, ctx,
                )
        # Fallback shapes: odd head count, unlisted head dim.
        _fused_rope_attention_gpu[dtype](
            o.unsafe_ptr(), q.unsafe_ptr(), k.unsafe_ptr(), v.unsafe_ptr(),
            2, 4, 8, 6, 2, 96, scale, Int32(causal), freqs, ctx,
        )
    # Decode (one query) with the tiled dense kernel (DENSE_TILED_DECODE): 1, 2 and 4 heads a
    # block at D 64 and 128 (16-bit dtypes; fp32 takes `_attention_gpu`).
    for heads in [(32, 32), (4, 2), (32, 8)]:
        for d in [64, 128]:
            _fused_rope_attention_gpu[dtype, dense_tiled_decode=True](
                o.unsafe_ptr(), q.unsafe_ptr(), k.unsafe_ptr(), v.unsafe_ptr(),
                2, 1, 8, heads[0], heads[1], d, scale, Int32(1), freqs, ctx,
            )
            # And over one wave of long blocks with L2 prefetch (DENSE_WAVE_DECODE).
            _fused_rope_attention_gpu[dtype, dense_wave_decode=True](
                o.unsafe_ptr(), q.unsafe_ptr(), k.unsafe_ptr(), v.unsafe_ptr(),
                2, 1, 8, heads[0], heads[1], d, scale, Int32(1), freqs, ctx,
            )


def _u32_buffer(ctx: DeviceContext, values: List[Int]) raises -> DeviceBuffer[DType.uint32]:
    var host = ctx.enqueue_create_host_buffer[DType.uint32](len(values))
    ctx.synchronize()
    for i in range(len(values)):
        host[i] = UInt32(values[i])
    var buf = ctx.enqueue_create_buffer[DType.uint32](len(values))
    ctx.enqueue_copy(buf, host)
    return buf


def paged_all[dtype: DType](ctx: DeviceContext) raises:
    """kt.paged_rope_store's and kt.paged_rope_attention's GPU branches, as the ops call them:
    two sequences (3 new tokens after 2 cached, 1 after 5) in pages of 4 of a 5-page cache,
    2 layers, 2 kv heads, 4 q heads, writing and reading layer 1; then a decode step (one
    token per sequence), which takes the split-KV kernel for 16-bit dtypes at D 64 and 128,
    as in use and tiled (TILED_DECODE).
    """
    var freqs = RopeFreqs(500000.0, 8.0, 1.0, 4.0, 8192.0)
    var cache_lengths = _u32_buffer(ctx, [2, 5])
    var table = _u32_buffer(ctx, [3, 1, 0, 4, 2, 0])
    var row_offsets = _u32_buffer(ctx, [0, 3, 4])
    var decode_offsets = _u32_buffer(ctx, [0, 1, 2])
    # The ops pass `Pointer[..., MutAnyOrigin]` (InputTensor.unsafe_ptr()).
    var cl = cache_lengths.unsafe_ptr().as_unsafe_any_origin()
    var lt = table.unsafe_ptr().as_unsafe_any_origin()
    var ro = row_offsets.unsafe_ptr().as_unsafe_any_origin()
    var dro = decode_offsets.unsafe_ptr().as_unsafe_any_origin()
    for d in [16, 64, 128]:
        var lay = PagedLayout(4, 2, 2, d, 1, 3)
        var blocks = ctx.enqueue_create_buffer[dtype](5 * 2 * 2 * 4 * 2 * d)
        # q, k and v as MAX's GPU graphs can hand them over: strided views of one QKV row
        # (4 q heads, 2 k heads, 2 v heads per token).
        var qkv = ctx.enqueue_create_buffer[dtype](4 * 8 * d)
        var o = ctx.enqueue_create_buffer[dtype](4 * 4 * d)
        var bp = blocks.unsafe_ptr().as_unsafe_any_origin()
        _fill_random(ctx, qkv, 4 * 8 * d, 1)
        var qp = qkv.unsafe_ptr().as_unsafe_any_origin()
        var st = RowStrides(8 * d, d, 8 * d, d)
        paged_rope_store_gpu[dtype](bp, qp + 4 * d, qp + 6 * d, cl, lt, ro, 4, 2, st, lay, freqs, ctx)
        # Longest prompt and sequence: 3 and 6 for the prefill, 1 and 6 (5 + 1) for the decode.
        paged_rope_attention_gpu[dtype](
            o.unsafe_ptr().as_unsafe_any_origin(), qp, bp, cl, lt, ro, 4, 2, 3, 6, 4, 8 * d, d,
            Float32(0.25), lay, 5, freqs, ctx,
        )
        paged_rope_attention_gpu[dtype](
            o.unsafe_ptr().as_unsafe_any_origin(), qp, bp, cl, lt, dro, 2, 2, 1, 6, 4, 8 * d, d,
            Float32(0.25), lay, 5, freqs, ctx,
        )
        paged_rope_attention_gpu[dtype, tiled_decode=True](
            o.unsafe_ptr().as_unsafe_any_origin(), qp, bp, cl, lt, dro, 2, 2, 1, 6, 4, 8 * d, d,
            Float32(0.25), lay, 5, freqs, ctx,
        )
        ctx.synchronize()
    _ = check_prefill[dtype](ctx, False)
    _ = check_max_prefill[dtype](ctx, False)


def paged_case[
    dtype: DType,
    pipelined: Bool = PIPELINED_DECODE,
    tiled: Bool = TILED_DECODE,
    max_prefill: Bool = False,
    exact: Bool = EXACT_LENGTHS,
](
    ctx: DeviceContext, d: Int, hq: Int, hk: Int, page: Int, cached: List[Int], new: List[Int],
    check: Bool, known_lengths: Bool = True,
) raises -> Bool:
    """The GPU branch of kt.paged_rope_attention on a batch (sequence b: new[b] rows after
    cached[b] cached tokens): a prefill batch takes the tiled `_prefill_gpu`, or with
    max_prefill kt's query rotation and MAX's paged flash attention, a decode batch (one new row
    each) the split-KV decode, `_tiled_decode_gpu` with `tiled`, else `_split_decode_gpu` with
    its key loads one step ahead with `pipelined`; with check, compared with `_attention_gpu`
    (one block per row and q head) on the same inputs. A random cache of 2 layers (layer 1
    read), pages handed out in a scrambled order, q a strided view of a QKV row. With
    max_prefill the block table is laid out as MAX Serve's: its columns rounded up to 8 plus
    16, the padding pointing at one extra page (MAX's null page). The op is given the longest
    prompt and sequence with known_lengths, else 0 (unknown); it uses them with `exact`
    (EXACT_LENGTHS), and then the table is padded as MAX Serve's too (so the lengths, not the
    table, bound the work)."""
    var batch = len(new)
    var freqs = RopeFreqs(500000.0, 8.0, 1.0, 4.0, 8192.0)
    var offsets = List[Int]()
    offsets.append(0)
    var used = 1
    var max_prompt = 0
    var max_cache = 0
    for b in range(batch):
        offsets.append(offsets[b] + new[b])
        used = max(used, ceildiv(cached[b] + new[b], page))
        max_prompt = max(max_prompt, new[b])
        max_cache = max(max_cache, cached[b] + new[b])
    if not known_lengths:
        max_prompt = 0
        max_cache = 0
    var rows = offsets[batch]
    var padded = max_prefill or exact
    var cols = ceildiv(used, 8) * 8 + 16 if padded else used
    var owned = batch * used
    var pages = owned + 1 if padded else owned
    var table = List[Int]()
    for b in range(batch):
        for c in range(cols):
            var i = b * used + c
            # a permutation of the owned pages: owned - 1 is prime to owned
            table.append((i * (owned - 1) + 3) % owned if c < used else owned)
    var lay = PagedLayout(page, 2, hk, d, 1, cols)
    var qkv_row = (hq + 2 * hk) * d
    var nb = pages * 2 * 2 * page * hk * d
    var blocks = ctx.enqueue_create_buffer[dtype](nb)
    var qkv = ctx.enqueue_create_buffer[dtype](rows * qkv_row)
    var o_fast = ctx.enqueue_create_buffer[dtype](rows * hq * d)
    var o_ref = ctx.enqueue_create_buffer[dtype](rows * hq * d)
    _fill_random(ctx, blocks, nb, 31 + d)
    _fill_random(ctx, qkv, rows * qkv_row, 32 + d)
    var cl = _u32_buffer(ctx, cached)
    var lt = _u32_buffer(ctx, table)
    var ro = _u32_buffer(ctx, offsets)
    var args = (
        blocks.unsafe_ptr().as_unsafe_any_origin(),
        cl.unsafe_ptr().as_unsafe_any_origin(),
        lt.unsafe_ptr().as_unsafe_any_origin(),
        ro.unsafe_ptr().as_unsafe_any_origin(),
    )
    var scale = Float32(1.0) / Float32(d) ** 0.5
    paged_rope_attention_gpu[
        dtype, tiled_prefill=True, pipelined_decode=pipelined, tiled_decode=tiled,
        max_prefill=max_prefill, exact_lengths=exact,
    ](
        o_fast.unsafe_ptr().as_unsafe_any_origin(), qkv.unsafe_ptr().as_unsafe_any_origin(),
        args[0], args[1], args[2], args[3], rows, batch, max_prompt, max_cache, hq, qkv_row, d,
        scale, lay, pages, freqs, ctx,
    )
    if not check:
        ctx.synchronize()
        return True
    _attention_gpu_launch[dtype](
        o_ref.unsafe_ptr().as_unsafe_any_origin(), qkv.unsafe_ptr().as_unsafe_any_origin(),
        args[0], args[1], args[2], args[3], rows, batch, hq, qkv_row, d, scale, lay, freqs, ctx,
    )
    # MAX's kernel takes the rotated queries and the probabilities in dtype (the reference
    # keeps them in fp32): a few more ulps.
    var res = _compare[dtype](ctx, o_fast, o_ref, rows * hq * d, Float32(4) if max_prefill else Float32(1))
    var kind = String("paged decode pipelined=", pipelined)
    if rows > batch:
        kind = "paged prefill"
    elif tiled:
        kind = "tiled decode"
    if max_prefill:
        var on_max = rows > batch and _max_prefill_supported[dtype](hq, lay)
        kind = String("max prefill (MAX kernel)") if on_max else String("max prefill (NOT on MAX's kernel)")
        res = (res[0] and on_max, res[1])
    print(
        kind, dtype, "D", d, "Hq", hq, "Hk", hk, "page", page, "rows", rows,
        "batch", batch, "lengths", "exact" if known_lengths else "unknown", "max|diff|", res[1],
        "PASS" if res[0] else "FAIL",
    )
    return res[0]


def check_prefill[dtype: DType](ctx: DeviceContext, check: Bool) raises -> Bool:
    """Several row tiles per sequence, sequence boundaries inside a tile's worth of rows,
    prefill after a cached prefix, a one-row sequence, pages not a multiple of the key tile;
    GQA 4 at D 64 and 128, GQA 3 (one head a block) at D 96 (padded to 128), MHA at D 256,
    GQA 8 at D 18 (element-wise loads)."""
    var ok = paged_case[dtype](ctx, 64, 8, 2, 24, [0, 19, 130], [37, 70, 5], check)
    ok = paged_case[dtype](ctx, 128, 8, 2, 16, [3, 0, 40], [100, 1, 17], check) and ok
    ok = paged_case[dtype](ctx, 96, 6, 2, 7, [0, 11], [130, 66], check) and ok
    ok = paged_case[dtype](ctx, 256, 4, 4, 128, [0], [150], check) and ok
    ok = paged_case[dtype](ctx, 18, 16, 2, 5, [2, 0], [9, 33], check) and ok
    return ok


def check_prefill_all(ctx: DeviceContext) raises:
    var ok = check_prefill[DType.bfloat16](ctx, True)
    ok = check_prefill[DType.float16](ctx, True) and ok
    ok = check_prefill[DType.float32](ctx, True) and ok
    if not ok:
        raise Error("paged prefill check failed")
    print("paged prefill check: all PASS")


def check_max_prefill[dtype: DType](ctx: DeviceContext, check: Bool) raises -> Bool:
    """Prefill batches on MAX's paged flash attention (16-bit dtypes; pages of
    MAX_PREFILL_PAGE): both (Hq, Hk, D) instantiated (GQA 4 at D 128 and 64),
    ragged rows, cached prefixes ending mid-page, sequences of 1 or 2 rows beside long ones,
    row counts off every tile size; the first batch again with the maximum lengths unknown."""
    comptime if dtype != DType.bfloat16 and dtype != DType.float16:
        return True
    comptime page = MAX_PREFILL_PAGE
    var ok = paged_case[dtype, max_prefill=True](ctx, 128, 32, 8, page, [0, 130, 7], [300, 77, 129], check)
    ok = paged_case[dtype, max_prefill=True](ctx, 64, 32, 8, page, [0, 1000, 5], [1024, 33, 1], check) and ok
    ok = paged_case[dtype, max_prefill=True](ctx, 128, 32, 8, page, [128, 0], [100, 45], check) and ok
    ok = paged_case[dtype, max_prefill=True](ctx, 128, 32, 8, page, [250, 0], [200, 2], check) and ok
    ok = paged_case[dtype, max_prefill=True](ctx, 64, 32, 8, page, [3, 0, 129], [61, 257, 2], check) and ok
    ok = paged_case[dtype, max_prefill=True](ctx, 128, 32, 8, page, [0, 130, 7], [300, 77, 129], check, False) and ok
    return ok


def check_max_prefill_all(ctx: DeviceContext) raises:
    var ok = check_max_prefill[DType.bfloat16](ctx, True)
    ok = check_max_prefill[DType.float16](ctx, True) and ok
    if not ok:
        raise Error("max prefill check failed")
    print("max prefill check: all PASS")


def check_decode[dtype: DType, pipelined: Bool, tiled: Bool = False](ctx: DeviceContext) raises -> Bool:
    """Decode batches (one new row per sequence) through the split-KV kernel: the 8B and 1B
    models' GQA 4 at D 128 and 64 with MAX's 128-token pages, an empty cache, keys ending on
    a page boundary, pages of 7 and 16, MHA, GQA 8, the 1B batch again with the maximum
    lengths unknown; the tiled kernel also GQA 2 (two heads a block) with pages of 3 (tiles
    of TILE_KEYS keys across pages)."""
    var ok = paged_case[dtype, pipelined, tiled](ctx, 128, 32, 8, 128, [1023, 4095, 0, 127], [1, 1, 1, 1], True)
    ok = paged_case[dtype, pipelined, tiled](ctx, 64, 32, 8, 16, [37, 1, 500], [1, 1, 1], True) and ok
    ok = paged_case[dtype, pipelined, tiled](ctx, 128, 8, 8, 7, [100, 3], [1, 1], True) and ok
    ok = paged_case[dtype, pipelined, tiled](ctx, 64, 16, 2, 128, [2000], [1], True) and ok
    ok = paged_case[dtype, pipelined, tiled](ctx, 64, 32, 8, 16, [37, 1, 500], [1, 1, 1], True, False) and ok
    comptime if tiled:
        ok = paged_case[dtype, pipelined, tiled](ctx, 64, 16, 8, 3, [5, 0, 70, 11], [1, 1, 1, 1], True) and ok
        ok = paged_case[dtype, pipelined, tiled](ctx, 128, 16, 8, 3, [300, 2], [1, 1], True) and ok
    return ok


def check_decode_all(ctx: DeviceContext) raises:
    var ok = check_decode[DType.bfloat16, False](ctx)
    ok = check_decode[DType.bfloat16, True](ctx) and ok
    ok = check_decode[DType.float16, False](ctx) and ok
    ok = check_decode[DType.float16, True](ctx) and ok
    if not ok:
        raise Error("paged decode check failed")
    print("paged decode check: all PASS")


def check_tiled_decode_all(ctx: DeviceContext) raises:
    var ok = check_decode[DType.bfloat16, True, True](ctx)
    ok = check_decode[DType.float16, True, True](ctx) and ok
    if not ok:
        raise Error("tiled decode check failed")
    print("tiled decode check: all PASS")


def check_exact_lengths[dtype: DType](ctx: DeviceContext) raises -> Bool:
    """The op with EXACT_LENGTHS on a table padded as MAX Serve's: MAX's prefill given the
    longest prompt and sequence (2 batches) and without them, the tiled decode's splits sized
    from the longest sequence (2 batches) and without it."""
    comptime page = MAX_PREFILL_PAGE
    var ok = paged_case[dtype, max_prefill=True, exact=True](ctx, 128, 32, 8, page, [0, 130, 7], [300, 77, 129], True)
    ok = paged_case[dtype, max_prefill=True, exact=True](ctx, 64, 32, 8, page, [0, 1000, 5], [1024, 33, 1], True) and ok
    ok = paged_case[dtype, max_prefill=True, exact=True](ctx, 64, 32, 8, page, [3, 0, 129], [61, 257, 2], True, False) and ok
    ok = paged_case[dtype, True, True, exact=True](ctx, 128, 32, 8, 128, [1023, 4095, 0, 127], [1, 1, 1, 1], True) and ok
    ok = paged_case[dtype, True, True, exact=True](ctx, 64, 32, 8, 16, [37, 1, 500], [1, 1, 1], True) and ok
    ok = paged_case[dtype, True, True, exact=True](ctx, 64, 32, 8, 16, [37, 1, 500], [1, 1, 1], True, False) and ok
    return ok


def check_exact_lengths_all(ctx: DeviceContext) raises:
    var ok = check_exact_lengths[DType.bfloat16](ctx)
    ok = check_exact_lengths[DType.float16](ctx) and ok
    if not ok:
        raise Error("exact lengths check failed")
    print("exact lengths check: all PASS")


def _fill_random(ctx: DeviceContext, buf: DeviceBuffer, n: Int, seed: Int) raises:
    var host = ctx.enqueue_create_host_buffer[buf.dtype](n)
    ctx.synchronize()
    var state = UInt64(seed) * 6364136223846793005 + 1442695040888963407
    for i in range(n):
        state = state * 6364136223846793005 + 1442695040888963407
        var u = Float32(Int((state >> 40) & 0xFFFFFF)) / Float32(0x1000000)
        host[i] = Scalar[buf.dtype](2.0 * u - 1.0)
    ctx.enqueue_copy(buf, host)


def _tolerance[dtype: DType]() -> Float32:
    """Relative bound for two fp32 computations rounded to dtype: a couple of dtype ulps."""
    comptime if dtype == DType.bfloat16:
        return Float32(0.0078125)
    elif dtype == DType.float16:
        return Float32(0.0009765625)
    else:
        return 1e-5


def _compare[dtype: DType](
    ctx: DeviceContext, fast: DeviceBuffer[dtype], reference: DeviceBuffer[dtype], n: Int,
    slack: Float32 = 1,
) raises -> Tuple[Bool, Float32]:
    """(every element within slack x tolerance and finite, max |diff|)."""
    var hf = ctx.enqueue_create_host_buffer[dtype](n)
    var hr = ctx.enqueue_create_host_buffer[dtype](n)
    ctx.enqueue_copy(hf, fast)
    ctx.enqueue_copy(hr, reference)
    ctx.synchronize()
    var ok = True
    var max_err = Float32(0)
    var tol = _tolerance[dtype]() * slack
    for i in range(n):
        var a = hf[i].cast[DType.float32]()
        var b = hr[i].cast[DType.float32]()
        var err = abs(a - b)
        if a != a or b != b or err > tol * (abs(b) + 0.0625):
            ok = False
        max_err = max(max_err, err)
    return (ok, max_err)


def check_rms_norm_case[dtype: DType](ctx: DeviceContext, m: Int, n: Int) raises -> Bool:
    """The kt.rms_norm GPU launch vs the scalar two-pass `_rms_norm_gpu` on one shape."""
    var x = ctx.enqueue_create_buffer[dtype](m * n)
    var w = ctx.enqueue_create_buffer[dtype](n)
    var y_fast = ctx.enqueue_create_buffer[dtype](m * n)
    var y_ref = ctx.enqueue_create_buffer[dtype](m * n)
    _fill_random(ctx, x, m * n, 11 + n)
    _fill_random(ctx, w, n, 12 + n)
    var eps = Float32(1e-5)
    _rms_norm_gpu_launch[dtype](ctx, y_fast.unsafe_ptr(), x.unsafe_ptr(), w.unsafe_ptr(), m, n, eps)
    ctx.enqueue_function[_rms_norm_gpu[dtype]](
        y_ref.unsafe_ptr(), x.unsafe_ptr(), w.unsafe_ptr(), Int32(n), eps,
        grid_dim=m, block_dim=NORM_BLOCK,
    )
    var res = _compare[dtype](ctx, y_fast, y_ref, m * n)
    print("rms_norm", dtype, "M", m, "N", n, "max|diff|", res[1], "PASS" if res[0] else "FAIL")
    return res[0]


def check_rope_case[dtype: DType](
    ctx: DeviceContext, tokens: Int, hq: Int, hk: Int, d: Int, max_pos: Int
) raises -> Bool:
    """The kt.rope GPU launch vs the one-block-per-token `_rope_gpu` (fp64-based cos/sin) on
    one shape, positions pseudo-random in [0, max_pos)."""
    var freqs = RopeFreqs(500000.0, 8.0, 1.0, 4.0, 8192.0)
    var nq = max(1, tokens * hq * d)
    var nk = max(1, tokens * hk * d)
    var q = ctx.enqueue_create_buffer[dtype](nq)
    var k = ctx.enqueue_create_buffer[dtype](nk)
    var qo_fast = ctx.enqueue_create_buffer[dtype](nq)
    var ko_fast = ctx.enqueue_create_buffer[dtype](nk)
    var qo_ref = ctx.enqueue_create_buffer[dtype](nq)
    var ko_ref = ctx.enqueue_create_buffer[dtype](nk)
    _fill_random(ctx, q, nq, 21 + d)
    _fill_random(ctx, k, nk, 22 + d)
    _fill_random(ctx, qo_fast, nq, 23)
    _fill_random(ctx, ko_fast, nk, 24)
    _fill_random(ctx, qo_ref, nq, 23)
    _fill_random(ctx, ko_ref, nk, 24)
    var pos = ctx.enqueue_create_buffer[DType.int64](max(1, tokens))
    _fill_positions(ctx, pos, max(1, tokens), max_pos, tokens * 977 + d)
    _rope_gpu_launch[dtype, explicit_positions=True](
        ctx, qo_fast.unsafe_ptr(), ko_fast.unsafe_ptr(), q.unsafe_ptr(), k.unsafe_ptr(),
        pos.unsafe_ptr(), tokens, tokens, 1, 1, 0, 0, hq, hk, d, freqs,
    )
    if tokens > 0:
        ctx.enqueue_function[_rope_gpu[dtype]](
            qo_ref.unsafe_ptr(), ko_ref.unsafe_ptr(), q.unsafe_ptr(), k.unsafe_ptr(),
            pos.unsafe_ptr(), Int32(hq), Int32(hk), Int32(d),
            freqs.theta, freqs.factor, freqs.low_freq_factor, freqs.high_freq_factor,
            freqs.original_max_position,
            grid_dim=tokens, block_dim=ROPE_BLOCK,
        )
    var rq = _compare[dtype](ctx, qo_fast, qo_ref, nq)
    var rk = _compare[dtype](ctx, ko_fast, ko_ref, nk)
    var ok = rq[0] and rk[0]
    print(
        "rope", dtype, "tokens", tokens, "Hq", hq, "Hk", hk, "D", d, "max_pos", max_pos,
        "max|diff| q", rq[1], "k", rk[1], "PASS" if ok else "FAIL",
    )
    return ok


def check_norm_and_rope[dtype: DType](ctx: DeviceContext) raises -> Bool:
    var ok = True
    # Warp per row (N <= 4 vectors per lane), block per row with 1/2/4/8 vectors per thread,
    # ragged last vectors, rows past the last block's, and the scalar fallback (odd N, N
    # past 8 vectors per thread).
    for mn in [
        (1, 8), (9, 24), (17, 1000), (5, 1024), (3, 1032), (2, 2048), (3, 2056), (4, 4096),
        (2, 4104), (3, 8192), (2, 8200), (2, 16384), (2, 16392), (4, 13), (3, 4095),
        (2, 32768), (300, 128),
    ]:
        ok = check_rms_norm_case[dtype](ctx, mn[0], mn[1]) and ok
    # 16-byte and scalar variants, GQA and MHA, q only, tails of token tiles, positions
    # past 2^17 (the fp64-based cos/sin), head_dim up to 512.
    for shape in [
        (1, 32, 8, 128), (129, 32, 8, 128), (77, 5, 1, 64), (300, 4, 4, 256), (33, 3, 2, 6),
        (65, 2, 1, 96), (40, 3, 0, 128), (17, 1, 1, 512), (5, 2, 2, 2), (1000, 8, 2, 64),
    ]:
        ok = check_rope_case[dtype](ctx, shape[0], shape[1], shape[2], shape[3], 131072) and ok
    ok = check_rope_case[dtype](ctx, 257, 8, 2, 128, 1 << 20) and ok
    return ok


def check_norm_and_rope_all(ctx: DeviceContext) raises:
    var ok = check_norm_and_rope[DType.bfloat16](ctx)
    ok = check_norm_and_rope[DType.float16](ctx) and ok
    ok = check_norm_and_rope[DType.float32](ctx) and ok
    if not ok:
        raise Error("rms_norm / rope check failed")
    print("rms_norm / rope check: all PASS")


def check_rms_norm_lean_case[dtype: DType](ctx: DeviceContext, m: Int, n: Int) raises -> Bool:
    """kt.rms_norm's GPU launch with RMS_NORM_LEAN on (`_rms_norm_rows_lean_gpu` where its
    rule takes the row, the shipped kernels elsewhere) vs the scalar two-pass `_rms_norm_gpu`
    on one shape, the output filled with garbage first (a vector the kernel never writes
    shows)."""
    var x = ctx.enqueue_create_buffer[dtype](m * n)
    var w = ctx.enqueue_create_buffer[dtype](n)
    var y_lean = ctx.enqueue_create_buffer[dtype](m * n)
    var y_ref = ctx.enqueue_create_buffer[dtype](m * n)
    _fill_random(ctx, x, m * n, 41 + n + m)
    _fill_random(ctx, w, n, 42 + n)
    _fill_random(ctx, y_lean, m * n, 43)
    var eps = Float32(1e-5)
    _rms_norm_gpu_launch[dtype, lean=True](
        ctx, y_lean.unsafe_ptr(), x.unsafe_ptr(), w.unsafe_ptr(), m, n, eps
    )
    ctx.enqueue_function[_rms_norm_gpu[dtype]](
        y_ref.unsafe_ptr(), x.unsafe_ptr(), w.unsafe_ptr(), Int32(n), eps,
        grid_dim=m, block_dim=NORM_BLOCK,
    )
    var res = _compare[dtype](ctx, y_lean, y_ref, m * n)
    print(
        "rms_norm lean", dtype, "M", m, "N", n, "max|diff|", res[1], "PASS" if res[0] else "FAIL",
    )
    return res[0]


def check_rms_norm_lean[dtype: DType](ctx: DeviceContext) raises -> Bool:
    """Every N the lean rule sends to `_rms_norm_rows_lean_gpu` in kind: 128 threads and 256
    threads per row, each with the row filling the block (no masks: N 4096 and 8192 in 16-bit
    dtypes, 2048 and 4096 in fp32) and ragged (the last vectors past the row's end), the
    smallest row it takes (one vector past 64 threads' worth) and the largest, at odd and small
    M (a single row, 3, 37, 129 rows); then the edges it leaves to the shipped kernels (one
    vector under its smallest row, one past its largest, N not a multiple of the vector
    width)."""
    comptime W = max(1, 16 // size_of[dtype]())
    var ok = True
    for m in [1, 3, 37, 129]:
        for vecs in [512, 1024, 257, 300, 513, 1000, 1023]:
            ok = check_rms_norm_lean_case[dtype](ctx, m, vecs * W) and ok
    ok = check_rms_norm_lean_case[dtype](ctx, 1000, 1024 * W) and ok
    ok = check_rms_norm_lean_case[dtype](ctx, 777, 512 * W) and ok
    for vecs in [256, 1025]:
        ok = check_rms_norm_lean_case[dtype](ctx, 37, vecs * W) and ok
    ok = check_rms_norm_lean_case[dtype](ctx, 37, 1024 * W - 1) and ok
    ok = check_rms_norm_lean_case[dtype](ctx, 5, 512 * W + 1) and ok
    return ok


def check_rms_norm_lean_all(ctx: DeviceContext) raises:
    var ok = check_rms_norm_lean[DType.bfloat16](ctx)
    ok = check_rms_norm_lean[DType.float16](ctx) and ok
    ok = check_rms_norm_lean[DType.float32](ctx) and ok
    if not ok:
        raise Error("rms norm lean check failed")
    print("rms norm lean check: all PASS")


def _fill_positions(
    ctx: DeviceContext, pos: DeviceBuffer[DType.int64], n: Int, max_pos: Int, seed: Int
) raises:
    """n pseudo-random positions in [0, max_pos) from `seed` (a 64-bit LCG), copied to pos."""
    var hp = ctx.enqueue_create_host_buffer[DType.int64](n)
    ctx.synchronize()
    var state = UInt64(seed)
    for t in range(n):
        state = state * 6364136223846793005 + 1442695040888963407
        hp[t] = Int64(Int((state >> 33) % UInt64(max_pos)))
    ctx.enqueue_copy(pos, hp)


def rope_twin_case[dtype: DType](
    ctx: DeviceContext, tokens: Int, hq: Int, hk: Int, d: Int, max_pos: Int, factor: Float32
) raises -> Bool:
    """ROPE_TWIN's kernel (`_rope_twin_launch`) vs the one-block-per-token `_rope_gpu`
    (fp64-based cos/sin) with explicit positions pseudo-random in [0, max_pos), and vs the
    tile kernel (`_rope_tile_launch`) with implicit ones (token % seq + offset, q and k
    apart, as the fused attention calls it)."""
    var freqs = RopeFreqs(500000.0, factor, 1.0, 4.0, 8192.0)
    var nq = max(1, tokens * hq * d)
    var nk = max(1, tokens * hk * d)
    var q = ctx.enqueue_create_buffer[dtype](nq)
    var k = ctx.enqueue_create_buffer[dtype](nk)
    var qo_twin = ctx.enqueue_create_buffer[dtype](nq)
    var ko_twin = ctx.enqueue_create_buffer[dtype](nk)
    var qo_ref = ctx.enqueue_create_buffer[dtype](nq)
    var ko_ref = ctx.enqueue_create_buffer[dtype](nk)
    _fill_random(ctx, q, nq, 31 + d)
    _fill_random(ctx, k, nk, 32 + d)
    _fill_random(ctx, qo_twin, nq, 33)
    _fill_random(ctx, ko_twin, nk, 34)
    _fill_random(ctx, qo_ref, nq, 33)
    _fill_random(ctx, ko_ref, nk, 34)
    var pos = ctx.enqueue_create_buffer[DType.int64](max(1, tokens))
    _fill_positions(ctx, pos, max(1, tokens), max_pos, tokens * 131 + d)
    _rope_twin_launch[dtype, explicit_positions=True](
        ctx, qo_twin.unsafe_ptr(), ko_twin.unsafe_ptr(), q.unsafe_ptr(), k.unsafe_ptr(),
        pos.unsafe_ptr(), tokens, tokens, 1, 1, 0, 0, hq, hk, d, freqs,
    )
    if tokens > 0:
        ctx.enqueue_function[_rope_gpu[dtype]](
            qo_ref.unsafe_ptr(), ko_ref.unsafe_ptr(), q.unsafe_ptr(), k.unsafe_ptr(),
            pos.unsafe_ptr(), Int32(hq), Int32(hk), Int32(d),
            freqs.theta, freqs.factor, freqs.low_freq_factor, freqs.high_freq_factor,
            freqs.original_max_position,
            grid_dim=tokens, block_dim=ROPE_BLOCK,
        )
    var rq = _compare[dtype](ctx, qo_twin, qo_ref, nq)
    var rk = _compare[dtype](ctx, ko_twin, ko_ref, nk)
    var ok = rq[0] and rk[0]
    # Implicit positions: q's tokens = tokens, k's fewer (or more), seq and offsets apart.
    var k_tokens = max(1, tokens // 2 + 3)
    var seq = max(1, tokens // 3 + 1)
    var off = max_pos // 2
    var nk2 = max(1, k_tokens * hk * d)
    var k2 = ctx.enqueue_create_buffer[dtype](nk2)
    var ko2_twin = ctx.enqueue_create_buffer[dtype](nk2)
    var ko2_ref = ctx.enqueue_create_buffer[dtype](nk2)
    _fill_random(ctx, k2, nk2, 35 + d)
    _fill_random(ctx, ko2_twin, nk2, 36)
    _fill_random(ctx, ko2_ref, nk2, 36)
    _fill_random(ctx, qo_twin, nq, 37)
    _fill_random(ctx, qo_ref, nq, 37)
    _rope_twin_launch[dtype, explicit_positions=False](
        ctx, qo_twin.unsafe_ptr(), ko2_twin.unsafe_ptr(), q.unsafe_ptr(), k2.unsafe_ptr(),
        pos.unsafe_ptr(), tokens, k_tokens, seq, k_tokens, off, 7, hq, hk, d, freqs,
    )
    _rope_tile_launch[dtype, explicit_positions=False](
        ctx, qo_ref.unsafe_ptr(), ko2_ref.unsafe_ptr(), q.unsafe_ptr(), k2.unsafe_ptr(),
        pos.unsafe_ptr(), tokens, k_tokens, seq, k_tokens, off, 7, hq, hk, d, freqs,
    )
    var iq = _compare[dtype](ctx, qo_twin, qo_ref, nq)
    var ik = _compare[dtype](ctx, ko2_twin, ko2_ref, nk2)
    ok = ok and iq[0] and ik[0]
    print(
        "rope twin", dtype, "tokens", tokens, "Hq", hq, "Hk", hk, "D", d, "max_pos", max_pos,
        "factor", factor, "max|diff| q", rq[1], "k", rk[1], "implicit q", iq[1], "k", ik[1],
        "PASS" if ok else "FAIL",
    )
    return ok


def check_rope_twin[dtype: DType](ctx: DeviceContext) raises -> Bool:
    """Odd token counts, GQA and MHA, q only, D 64 and 128 (compile-time head sizes) and
    96 / 6 / 256 (runtime and scalar variants), positions up to ~40000 (fp32 cos/sin) and
    past 2^17 (fp64-based), Llama 3 scaling factor 8 and none."""
    var ok = True
    for factor in [Float32(8.0), Float32(1.0)]:
        for shape in [
            (1, 32, 8, 128), (129, 32, 8, 128), (77, 5, 1, 64), (1001, 32, 8, 64),
            (333, 8, 8, 128), (65, 3, 2, 96), (33, 3, 2, 6), (40, 3, 0, 128), (17, 4, 4, 256),
            (4097, 32, 8, 128),
        ]:
            ok = rope_twin_case[dtype](
                ctx, shape[0], shape[1], shape[2], shape[3], 40000, factor
            ) and ok
        ok = rope_twin_case[dtype](ctx, 257, 8, 2, 128, 1 << 20, factor) and ok
    return ok


def check_rope_twin_all(ctx: DeviceContext) raises:
    var ok = check_rope_twin[DType.bfloat16](ctx)
    ok = check_rope_twin[DType.float16](ctx) and ok
    if not ok:
        raise Error("rope twin check failed")
    print("rope twin check: all PASS")


def check_fast_case(
    ctx: DeviceContext, batch: Int, sq: Int, skv: Int, hq: Int, hk: Int, d: Int, causal: Int
) raises -> Bool:
    """Fast path or decode kernel vs `_attention_gpu` (fp32 RoPE and dot products) on one
    bf16 shape."""
    comptime dtype = DType.bfloat16
    if not (_fast_path_supported[dtype](hq, hk, d) or (sq == 1 and _decode_supported[dtype](d))):
        print("skip: B", batch, "Sq", sq, "Hq", hq, "Hk", hk, "D", d, "takes no fast path")
        return True
    var freqs = RopeFreqs(500000.0, 8.0, 1.0, 4.0, 8192.0)
    var scale = Float32(1.0) / Float32(d) ** 0.5
    var nq = batch * sq * hq * d
    var nkv = batch * skv * hk * d
    var q = ctx.enqueue_create_buffer[dtype](nq)
    var k = ctx.enqueue_create_buffer[dtype](nkv)
    var v = ctx.enqueue_create_buffer[dtype](nkv)
    var o_fast = ctx.enqueue_create_buffer[dtype](nq)
    var o_ref = ctx.enqueue_create_buffer[dtype](nq)
    _fill_random(ctx, q, nq, 1 + d + hk)
    _fill_random(ctx, k, nkv, 2 + d + hk)
    _fill_random(ctx, v, nkv, 3 + d + hk)
    _fused_rope_attention_gpu[dtype](
        o_fast.unsafe_ptr(), q.unsafe_ptr(), k.unsafe_ptr(), v.unsafe_ptr(),
        batch, sq, skv, hq, hk, d, scale, Int32(causal), freqs, ctx,
    )
    ctx.enqueue_function[_attention_gpu[dtype]](
        o_ref.unsafe_ptr(), q.unsafe_ptr(), k.unsafe_ptr(), v.unsafe_ptr(),
        Int32(sq), Int32(skv), Int32(hq), Int32(hk), Int32(d), scale, Int32(causal),
        freqs.theta, freqs.factor, freqs.low_freq_factor, freqs.high_freq_factor,
        freqs.original_max_position,
        grid_dim=batch * sq * hq, block_dim=ATTN_BLOCK,
    )
    var hf = ctx.enqueue_create_host_buffer[dtype](nq)
    var hr = ctx.enqueue_create_host_buffer[dtype](nq)
    ctx.enqueue_copy(hf, o_fast)
    ctx.enqueue_copy(hr, o_ref)
    ctx.synchronize()
    var max_err = Float32(0)
    var max_ref = Float32(0)
    var finite = True
    for i in range(nq):
        var a = hf[i].cast[DType.float32]()
        var b = hr[i].cast[DType.float32]()
        if a != a:
            finite = False
        max_err = max(max_err, abs(a - b))
        max_ref = max(max_ref, abs(b))
    # bf16 q_rot / k_rot / P in the fast path vs fp32 in the reference kernel.
    var ok = finite and max_err <= Float32(2e-2)
    print(
        "fast path B", batch, "Sq", sq, "Skv", skv, "Hq", hq, "Hk", hk, "D", d,
        "causal", causal, "max|diff|", max_err, "max|ref|", max_ref,
        "PASS" if ok else "FAIL",
    )
    return ok


def check_fast_path(ctx: DeviceContext) raises:
    var ok = True
    for hk in [32, 8]:
        for d in [64, 128, 256]:
            for causal in range(2):
                ok = check_fast_case(ctx, 2, 200, 333, 32, hk, d, causal) and ok
            ok = check_fast_case(ctx, 1, 256, 256, 32, hk, d, 1) and ok
            ok = check_fast_case(ctx, 2, 1, 300, 32, hk, d, 1) and ok
    # The decode kernel: 4 q heads per block over two blocks, one per block, many splits.
    ok = check_fast_case(ctx, 2, 1, 1500, 16, 2, 64, 1) and ok
    ok = check_fast_case(ctx, 1, 1, 77, 3, 1, 128, 0) and ok
    ok = check_fast_case(ctx, 8, 1, 4096, 32, 8, 128, 1) and ok
    if not ok:
        raise Error("fast path check failed")
    print("fast path check: all PASS")


def dense_decode_case[dtype: DType, wave: Bool = False](
    ctx: DeviceContext, batch: Int, skv: Int, hq: Int, hk: Int, d: Int
) raises -> Bool:
    """kt.fused_rope_attention's decode (one query at position skv - 1, keys rotated as they
    stream) with `_dense_tiled_decode_gpu` (with `wave`, `_dense_wave_decode_launch`) vs the
    simple fused kernel `_attention_gpu` (fp32 RoPE and dot products) on random inputs."""
    var freqs = RopeFreqs(500000.0, 8.0, 1.0, 4.0, 8192.0)
    var scale = Float32(1.0) / Float32(d) ** 0.5
    var nq = batch * hq * d
    var nkv = batch * skv * hk * d
    var q = ctx.enqueue_create_buffer[dtype](nq)
    var k = ctx.enqueue_create_buffer[dtype](nkv)
    var v = ctx.enqueue_create_buffer[dtype](nkv)
    var o_fast = ctx.enqueue_create_buffer[dtype](nq)
    var o_ref = ctx.enqueue_create_buffer[dtype](nq)
    _fill_random(ctx, q, nq, 41 + d + hk)
    _fill_random(ctx, k, nkv, 42 + d + hk)
    _fill_random(ctx, v, nkv, 43 + d + hk)
    _fused_rope_attention_gpu[dtype, dense_tiled_decode=True, dense_wave_decode=wave](
        o_fast.unsafe_ptr(), q.unsafe_ptr(), k.unsafe_ptr(), v.unsafe_ptr(),
        batch, 1, skv, hq, hk, d, scale, Int32(1), freqs, ctx,
    )
    ctx.enqueue_function[_attention_gpu[dtype]](
        o_ref.unsafe_ptr(), q.unsafe_ptr(), k.unsafe_ptr(), v.unsafe_ptr(),
        Int32(1), Int32(skv), Int32(hq), Int32(hk), Int32(d), scale, Int32(1),
        freqs.theta, freqs.factor, freqs.low_freq_factor, freqs.high_freq_factor,
        freqs.original_max_position,
        grid_dim=batch * hq, block_dim=ATTN_BLOCK,
    )
    var res = _compare[dtype](ctx, o_fast, o_ref, nq)
    print(
        "dense wave decode" if wave else "dense tiled decode", dtype, "B", batch, "Skv", skv,
        "Hq", hq, "Hk", hk, "D", d,
        "max|diff|", res[1], "PASS" if res[0] else "FAIL",
    )
    return res[0]


def check_dense_tiled_decode[dtype: DType](ctx: DeviceContext) raises -> Bool:
    """GQA 1, 4 and 8 (1 and 4 heads a block, 4 over two blocks a kv head) and GQA 2, at D 64
    and 128; key counts of one key, shorter than a block step, one short of a split's, and past
    16k by an odd few (splits and tiles with keys past the end)."""
    var ok = True
    for d in [64, 128]:
        for heads in [(4, 4), (8, 2), (16, 2)]:
            for skv in [1, 37, 4095, 16384 + 5]:
                ok = dense_decode_case[dtype](ctx, 2, skv, heads[0], heads[1], d) and ok
        ok = dense_decode_case[dtype](ctx, 3, 1000 + 3, 4, 2, d) and ok
    return ok


def check_dense_tiled_decode_all(ctx: DeviceContext) raises:
    var ok = check_dense_tiled_decode[DType.bfloat16](ctx)
    ok = check_dense_tiled_decode[DType.float16](ctx) and ok
    if not ok:
        raise Error("dense tiled decode check failed")
    print("dense tiled decode check: all PASS")


def check_dense_wave_decode[dtype: DType](ctx: DeviceContext) raises -> Bool:
    """`_dense_wave_decode_launch` at D 64 and 128: GQA 1, 3 (one head a block), 4 and 8 (4
    over two blocks a kv head) and 2; one key, shorter than a block step, one short of 4k and
    past 16k by an odd few (tiles and prefetches past a split's end); batches of 1 (many
    splits), 3, 8 (4 splits at 4k) and 32 (one split: the blocks write o, no combine)."""
    var ok = True
    for d in [64, 128]:
        for heads in [(4, 4), (6, 2), (8, 2), (16, 2)]:
            for skv in [1, 37, 4095, 16384 + 5]:
                ok = dense_decode_case[dtype, True](ctx, 2, skv, heads[0], heads[1], d) and ok
        ok = dense_decode_case[dtype, True](ctx, 3, 1000 + 3, 4, 2, d) and ok
        ok = dense_decode_case[dtype, True](ctx, 1, 32768 + 3, 32, 8, d) and ok
        ok = dense_decode_case[dtype, True](ctx, 8, 4096, 32, 8, d) and ok
        ok = dense_decode_case[dtype, True](ctx, 32, 4096 - 7, 32, 8, d) and ok
    return ok


def check_dense_wave_decode_all(ctx: DeviceContext) raises:
    var ok = check_dense_wave_decode[DType.bfloat16](ctx)
    ok = check_dense_wave_decode[DType.float16](ctx) and ok
    if not ok:
        raise Error("dense wave decode check failed")
    print("dense wave decode check: all PASS")


def main() raises:
    var ctx = DeviceContext()
    launch_all[DType.float32](ctx)
    launch_all[DType.bfloat16](ctx)
    launch_all[DType.float16](ctx)
    fused_attention_all[DType.float32](ctx)
    fused_attention_all[DType.bfloat16](ctx)
    fused_attention_all[DType.float16](ctx)
    paged_all[DType.float32](ctx)
    paged_all[DType.bfloat16](ctx)
    paged_all[DType.float16](ctx)
    ctx.synchronize()
    for arg in argv():
        if arg == "--check":
            # Each check prints its own verdict line; a failed one does not hide the others'
            # (a candidate's line is what turns it on), and the program fails at the end.
            var failed = List[String]()
            try:
                check_norm_and_rope_all(ctx)
            except e:
                failed.append(String(e))
            try:
                check_fast_path(ctx)
            except e:
                failed.append(String(e))
            try:
                check_prefill_all(ctx)
            except e:
                failed.append(String(e))
            try:
                check_decode_all(ctx)
            except e:
                failed.append(String(e))
            try:
                check_max_prefill_all(ctx)
            except e:
                failed.append(String(e))
            try:
                check_tiled_decode_all(ctx)
            except e:
                failed.append(String(e))
            try:
                check_dense_tiled_decode_all(ctx)
            except e:
                failed.append(String(e))
            try:
                check_dense_wave_decode_all(ctx)
            except e:
                failed.append(String(e))
            try:
                check_exact_lengths_all(ctx)
            except e:
                failed.append(String(e))
            try:
                check_rms_norm_lean_all(ctx)
            except e:
                failed.append(String(e))
            try:
                check_rope_twin_all(ctx)
            except e:
                failed.append(String(e))
            if len(failed) > 0:
                var msg = String("checks failed:")
                for f in failed:
                    msg += String(" [", f, "]")
                raise Error(msg)
