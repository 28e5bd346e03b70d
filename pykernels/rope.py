"""Rotary position embedding (RoPE) on q and k, half-rotation convention, Llama 3 scaling.

Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding" (2021), in the
GPT-NeoX / HF Llama layout (`rotate_half`), not the interleaved pairs of the paper and of
Meta's Llama code: for i < D/2 the pair (x1, x2) = (x[i], x[i + D/2]) becomes

    out[i] = x1 cos(a) - x2 sin(a),   out[i + D/2] = x2 cos(a) + x1 sin(a),
    a = pos * inv_freq[i],   inv_freq[i] = theta^(-2i/D),

with inv_freq rescaled as HF transformers `_compute_llama3_parameters` does (Llama 3.1):
wavelen = 2 pi / inv_freq; wavelen > L/low_freq_factor -> inv_freq / factor;
wavelen < L/high_freq_factor -> unchanged; in between, with s = (L/wavelen - low) / (high - low),
(1 - s) inv_freq / factor + s inv_freq (L = original_max_position). factor = 1 is plain RoPE.
Frequencies and angles are fp32 (fp64 for fp64 inputs), as in HF `LlamaRotaryEmbedding`.

The frequency math (`llama3_inv_freq`, `rope_cos_sin`, `apply_rope`, `triton_inv_freq`) is in
`pykernels/_common.py`, shared with `fused_rope_attention`.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import triton
import triton.language as tl

from harness.build import buffers_to_torch, max_dtype, max_model_bound
from harness.spec import (Axis, Bound, Case, KernelSpec, Param, Params, RatioTarget, Shape,
                          TensorArg, ThroughputTarget, Tensors)
from pykernels._common import (apply_rope, bf16_bits, bf16_rne, block_elems, copy_yardstick,
                               freq_param_decls, rope_cos_sin, triton_inv_freq)
from pykernels._flashinfer import rope_provider

# Largest position per `positions` choice: Llama 3's original 8k context and 3.1's 128k.
_POSITION_MAX = {"random": 8192, "long": 131072}


# fp16's largest finite value over sqrt(2), less 1 %: a rotated pair (x1, x2) keeps its norm,
# so pairs this large stay finite in fp16 whatever the angle.
_FP16_PAIR_MAX = 0.99 * 65504.0 / math.sqrt(2.0)


def _magnitude(x: torch.Tensor, regime: str, dtype: torch.dtype,
               gen: torch.Generator) -> torch.Tensor:
    """x ~ N(0, 1) (B, S, H, D) reshaped to `regime`'s magnitudes (see `make_inputs`)."""
    if regime == "outliers":
        d = x.shape[-1]
        dims = torch.randperm(d, generator=gen, device=gen.device)[: min(d, 3)]
        mag = 1e3 + 9e3 * torch.rand(*x.shape[:-1], len(dims), generator=gen, device=gen.device)
        x[..., dims] = mag * torch.where(x[..., dims] < 0, -1.0, 1.0)
    elif regime == "fp16_max":
        mag = _FP16_PAIR_MAX * (1.0 + torch.rand(x.shape, generator=gen, device=gen.device)) / 2
        x = mag * torch.where(x < 0, -1.0, 1.0)
    elif regime == "subnormal":
        tiny = torch.finfo(torch.float16).tiny
        x = torch.rand(x.shape, generator=gen, device=gen.device, dtype=torch.float64) * tiny * \
            torch.where(x < 0, -1.0, 1.0)
    return x


def make_inputs(shape: Shape, params: Params, dtype: torch.dtype, device: torch.device,
                gen: torch.Generator) -> Tensors:
    """q, k ~ N(0, 1); positions 0..S-1 per sequence ("arange") or uniform below 8192
    ("random") or 131072 ("long", Llama 3.1's context), different in every batch row. Then
    q and k by `magnitude`: "normal" leaves them; "outliers" sets 3 head dims (the same in
    every token and head) to 1e3-1e4 with random signs, as the massive activations of LLMs
    reach q and k; "fp16_max" draws |x| in 23000..46000, pairs whose norm comes near fp16's
    limit 65504; "subnormal" draws |x| below fp16's smallest normal 6.1e-5 (fp32 and bf16
    subnormals are not drawn: MAX's CPU runtime flushes them to zero). Magnitudes are
    uniform, not log-uniform: at fp32 and large positions the error is the angle's rounding
    times |x|, and a few dominant elements would make the max-error ratio to PyTorch a coin
    toss."""
    b, s, d = shape["B"], shape["S"], shape["D"]
    q = torch.randn(b, s, shape["Hq"], d, generator=gen, device=gen.device)
    k = torch.randn(b, s, shape["Hk"], d, generator=gen, device=gen.device)
    if params["positions"] == "arange":
        pos = torch.arange(s, device=gen.device).expand(b, s)
    else:
        pos = torch.randint(0, _POSITION_MAX[params["positions"]], (b, s), generator=gen,
                            device=gen.device)
    q, k = (_magnitude(x, params["magnitude"], dtype, gen) for x in (q, k))
    return {"q": q.to(device=device, dtype=dtype), "k": k.to(device=device, dtype=dtype),
            "positions": pos.to(device=device, dtype=torch.int64).contiguous()}


def reference(inputs: Tensors, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """(rope(q), rope(k)); the rotation runs in the inputs' dtype (HF `apply_rotary_pos_emb`)."""
    q, k = inputs["q"], inputs["k"]
    cos, sin = rope_cos_sin(inputs["positions"], q.shape[-1], params, q.dtype)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


@triton.jit
def _rope_kernel(X, OUT, POS, INV_FREQ, T, H, HALF: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_H: tl.constexpr, HALF_P: tl.constexpr, BF16_RNE: tl.constexpr):
    """A (BLOCK_T tokens, BLOCK_H heads, HALF_P pairs) tile of a contiguous (T, H, 2*HALF)
    tensor; cos/sin are computed once per (token, pair) and broadcast over heads. BF16_RNE:
    see `bf16_rne`."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, HALF_P)
    inv = tl.load(INV_FREQ + i, mask=i < HALF, other=0.0)
    pos = tl.load(POS + t, mask=t < T, other=0).to(tl.float32)
    angle = pos[:, None] * inv[None, :]
    c = tl.cos(angle)[:, None, :]
    s = tl.sin(angle)[:, None, :]
    offs = (t[:, None, None].to(tl.int64) * H + h[None, :, None]) * (2 * HALF) + i[None, None, :]
    mask = (t[:, None, None] < T) & (h[None, :, None] < H) & (i[None, None, :] < HALF)
    if BF16_RNE:  # X holds bf16 bit patterns (int16): see `bf16_bits`
        x1 = (tl.load(X + offs, mask=mask, other=0).to(tl.int32) << 16).to(tl.float32,
                                                                          bitcast=True)
        x2 = (tl.load(X + offs + HALF, mask=mask, other=0).to(tl.int32) << 16).to(tl.float32,
                                                                                 bitcast=True)
    else:
        x1 = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
    if BF16_RNE:  # OUT too: the fp32 bits rounded to nearest even at bit 16, subnormals included
        b1, b2 = o1.to(tl.int32, bitcast=True), o2.to(tl.int32, bitcast=True)
        b1 = (b1 + 0x7FFF + ((b1 >> 16) & 1)) >> 16
        b2 = (b2 + 0x7FFF + ((b2 >> 16) & 1)) >> 16
        tl.store(OUT + offs, b1.to(tl.int16), mask=mask)
        tl.store(OUT + offs + HALF, b2.to(tl.int16), mask=mask)
    else:
        tl.store(OUT + offs, o1.to(OUT.dtype.element_ty), mask=mask)
        tl.store(OUT + offs + HALF, o2.to(OUT.dtype.element_ty), mask=mask)


def _rope_launch(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    b, s, h, d = x.shape
    x = x.contiguous()
    out = torch.empty_like(x)
    half = d // 2
    half_p = triton.next_power_of_2(half)
    elems = block_elems()
    block_h = min(triton.next_power_of_2(h), max(1, elems // half_p))
    block_t = min(triton.next_power_of_2(b * s), max(1, elems // (block_h * half_p)))
    grid = (triton.cdiv(b * s, block_t), triton.cdiv(h, block_h))
    _rope_kernel[grid](bf16_bits(x), bf16_bits(out), positions, inv_freq, b * s, h, HALF=half, BLOCK_T=block_t,
                       BLOCK_H=block_h, HALF_P=half_p, BF16_RNE=bf16_rne(x.dtype))
    return out


def triton_rope(inputs: Tensors, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, pos = inputs["q"], inputs["k"], inputs["positions"].contiguous()
    inv = triton_inv_freq(q.shape[-1], params, q.device)
    return _rope_launch(q, pos, inv), _rope_launch(k, pos, inv)


def flops(shape: Shape, params: Params) -> float:
    """3 per element of q and k (a pair costs 4 multiplies and 2 adds); the per-(token, pair)
    angle, sin and cos are not counted."""
    return 3.0 * shape["B"] * shape["S"] * (shape["Hq"] + shape["Hk"]) * shape["D"]


def nbytes(shape: Shape, params: Params, dtype: torch.dtype) -> float:
    """q, k read and q_out, k_out written once; positions (int64) read once."""
    b, s = shape["B"], shape["S"]
    qk = b * s * (shape["Hq"] + shape["Hk"]) * shape["D"]
    return float(2 * qk * dtype.itemsize + 8 * b * s)


def _case(b, s, hk, group, d, why, **params) -> Case:
    full = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position": 8192.0,
            **params}
    return Case({"B": b, "S": s, "Hk": hk, "group": group, "D": d, "Hq": hk * group}, full, why)


# --- Other ways to compute the same op, timed by `kt microbench` ---
# Each provider is prepare(device, dtype) -> bind(inputs, params) -> Bound (harness/spec.py).
# MAX's Python modules are imported inside them, for start-up time.


def hf_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """HF Llama's rotary embedding: fp32 angles from inv_freq, cos/sin cast to the
    activations' dtype. A model computes them once per forward pass and every layer reuses
    them, so the PyTorch providers build them before the timed call."""
    angle = positions.to(torch.float32)[..., None] * inv_freq
    return angle.cos().to(dtype), angle.sin().to(dtype)


def _torch_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF Llama's `apply_rotary_pos_emb`: rotate_half in the activations' dtype."""
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


_compiled_rope = functools.cache(lambda: torch.compile(_torch_rope, dynamic=True))


def _torch_provider(compiled: bool):
    """PyTorch RoPE as HF transformers runs it, eager or torch.compile'd (dynamic shapes):
    the timed call rotates q and k with cos/sin tables built beforehand, as a model's
    layers do. (Building the tables inside the compiled function made Inductor recompute
    cos and sin for every head: 0.47 TB/s on the H100.)"""

    def prepare(device: str, dtype: torch.dtype):
        fn = _compiled_rope() if compiled else _torch_rope

        def bind(inputs: Tensors, params: Params):
            q, k, pos = inputs["q"], inputs["k"], inputs["positions"]
            cos, sin = hf_cos_sin(pos, triton_inv_freq(q.shape[-1], params, q.device), q.dtype)
            return lambda: fn(q, k, cos, sin)

        return bind

    return prepare


def _max_rope(wrapper: bool):
    """Stock MAX 26.7's RoPE kernel (`mo.rope.ragged.with_position_id`, non-interleaved) on q
    and on k, with a fp32 (cos, sin) table as MAX's `RotaryEmbedding.freqs_cis` builds it; one
    graph per (dtype, D), tokens, heads and table length symbolic.

    `max_rope` calls the kernel with every input a device buffer made at bind time, so
    `execute` only enqueues, as kt_graph's does. `max_rope_wrapper` goes through MAX's Python
    wrapper `rope_ragged_with_position_ids`, which builds the kernel's row offsets inside the
    graph from the input's shape: a host value copied to the device in every call, a copy
    that waits for the stream, so the call waits for the GPU; its row is timed
    host-synchronized and kept out of ratios (it shows what that costs)."""

    def prepare(device: str, dtype: torch.dtype):
        return _max_rope_bind(device, dtype, wrapper)

    return prepare


def max_rope_graph(dtype: torch.dtype, d: int, dev, wrapper: bool):
    """The graph of `max_rope` (`wrapper` False) or `max_rope_wrapper` on MAX device `dev`."""
    from max.dtype import DType
    from max.graph import Graph, TensorType, ops
    from max.nn.kernels import rope_ragged_with_position_ids

    io = max_dtype(dtype)
    types = [TensorType(io, ["T", "Hq", d], device=dev), TensorType(io, ["T", "Hk", d], device=dev),
             TensorType(DType.float32, ["P", d], device=dev),
             TensorType(DType.uint32, [1, "T"], device=dev),
             TensorType(DType.uint32, [2], device=dev), TensorType(DType.uint32, [1], device=dev)]
    with Graph(f"max_rope_{d}{'_wrapper' if wrapper else ''}", input_types=types) as g:
        q, k, freqs, pos, offsets, start = (x.tensor for x in g.inputs)

        def rope(x):
            if wrapper:
                return rope_ragged_with_position_ids(x, freqs, pos, interleaved=False)
            return ops.custom("mo.rope.ragged.with_position_id", device=dev,
                              values=[x, offsets, start, freqs, pos],
                              out_types=[TensorType(x.dtype, x.shape, device=dev)],
                              parameters={"interleaved": False})[0].tensor

        g.output(rope(q), rope(k))
    return g


def _max_rope_bind(device: str, dtype: torch.dtype, wrapper: bool):
    models: dict = {}

    def build(d: int):
        from max import driver, engine
        from max.graph import DeviceRef

        dev = DeviceRef.CPU() if device == "cpu" else DeviceRef.GPU(0)
        mdev = driver.CPU() if device == "cpu" else driver.Accelerator(0)
        graph = max_rope_graph(dtype, d, dev, wrapper)
        return engine.InferenceSession(devices=[mdev]).load(graph), mdev

    def bind(inputs: Tensors, params: Params) -> Bound:
        from max import driver

        q, k, pos = inputs["q"], inputs["k"], inputs["positions"]
        b, s, hq, d = q.shape
        if d not in models:
            models[d] = build(d)
        model, mdev = models[d]
        table = int(pos.max()) + 1
        angle = torch.arange(table, device=q.device, dtype=torch.float32)[:, None] * \
            triton_inv_freq(d, params, q.device)
        freqs = torch.stack((angle.cos(), angle.sin()), dim=-1).reshape(table, d).contiguous()
        keep = [q.reshape(b * s, hq, d).contiguous(), k.reshape(b * s, -1, d).contiguous(), freqs]
        args = [driver.Buffer.from_dlpack(x) for x in keep]
        # the kernel's ragged view: one "sequence" of all B*S tokens, starting at position 0,
        # with each token's own position from `positions`
        host = [pos.reshape(1, -1).cpu().numpy().astype(np.uint32),
                np.array([0, b * s], dtype=np.uint32), np.zeros(1, dtype=np.uint32)]
        args += [driver.Buffer.from_numpy(a).to(mdev) for a in host]

        def to_torch(bufs):
            qo, ko = buffers_to_torch(bufs, device)
            return qo.reshape(q.shape), ko.reshape(k.shape)

        return max_model_bound(model, mdev, args, keep, device, to_torch)

    return bind


PROVIDERS = {
    "max_rope": _max_rope(wrapper=False),
    "max_rope_wrapper": _max_rope(wrapper=True),
    "torch_eager": _torch_provider(compiled=False),
    "torch_compile": _torch_provider(compiled=True),
    # FlashInfer's standalone RoPE (its Llama 3.1 variant where factor != 1)
    "flashinfer": rope_provider,
    # a yardstick: the same bytes moved by a plain copy (the ceiling of the % of HBM target)
    "copy_alone": copy_yardstick("q", "k"),
}


SPEC = KernelSpec(
    name="rope",
    op="kt.rope",
    summary="RoPE on q and k (half rotation, GPT-NeoX/HF layout) with Llama 3 frequency scaling",
    axes=(
        Axis("B", lo=1, hi=4, edges=(1, 3), ci_hi=3, doc="batch"),
        Axis("S", lo=1, hi=300, edges=(1, 2, 127, 128, 129, 257), ci_hi=129,
             doc="tokens per sequence"),
        Axis("Hk", lo=1, hi=8, edges=(1, 8), ci_hi=4, doc="k heads"),
        Axis("group", lo=1, hi=8, edges=(1, 3, 4), ci_hi=4, doc="q heads per k head (GQA)"),
        Axis("D", lo=2, hi=256, step=2, edges=(2, 6, 64, 80, 96, 128, 256), doc="head dim, even"),
    ),
    derived={"Hq": lambda s: s["Hk"] * s["group"]},
    params=freq_param_decls() + (
        Param("positions", ("arange", "random", "long"), kernel_arg=False,
              doc="arange: 0..S-1; random: uniform < 8192; long: uniform < 131072 (fp32 angle "
                  "rounding reaches ~8e-3 rad there)"),
        Param("magnitude", ("normal", "outliers", "fp16_max", "subnormal"), kernel_arg=False,
              doc="q and k: N(0, 1), with 1e3-1e4 outlier dims, up to 46000 (pairs near "
                  "fp16's limit), or subnormal (see make_inputs)"),
    ),
    inputs=(TensorArg("q", ("B", "S", "Hq", "D")), TensorArg("k", ("B", "S", "Hk", "D")),
            TensorArg("positions", ("B", "S"), dtype="int64")),
    outputs=(TensorArg("q_out", ("B", "S", "Hq", "D")), TensorArg("k_out", ("B", "S", "Hk", "D"))),
    make_inputs=make_inputs,
    reference=reference,
    triton=triton_rope,
    flops=flops,
    bytes=nbytes,
    providers=PROVIDERS,
    # RoPE alone on a GPU: at least 85 % of the HBM datasheet bandwidth and no slower than its
    # Triton twin (issue 10); kt_graph's time over FlashInfer's, stated
    targets=(ThroughputTarget(min_pct_peak=85.0),
             RatioTarget("", "triton", ("prefill", "prefill_mha"), levels=((1.0, "no slower than the Triton twin"),)),
             RatioTarget("", "flashinfer", ("prefill", "prefill_mha"))),
    golden=(
        _case(1, 1, 1, 1, 2, "one pair, one token at position 0: the identity rotation",
              positions="arange", theta=10000.0, factor=1.0),
        _case(2, 5, 1, 1, 2, "one pair (D/2 = 1): inv_freq is 1 and x[i + D/2] is x[1]",
              positions="random", theta=10000.0, factor=1.0),
        _case(1, 127, 2, 1, 64, "plain RoPE (Llama 2 base, no scaling), S one below a power of two",
              positions="arange", theta=10000.0, factor=1.0),
        _case(1, 129, 8, 4, 128, "Llama 3 8B heads (32 q on 8 k): GQA and all three scaling bands",
              positions="arange", theta=500000.0, factor=8.0),
        _case(3, 17, 2, 3, 80, "D/2 = 40 is not a power of two: the pair axis needs masking",
              positions="random", theta=500000.0, factor=8.0),
        _case(2, 33, 1, 2, 96, "D = 96 and per-batch positions (indexing them by s alone fails)",
              positions="random", theta=10000.0, factor=8.0),
        _case(1, 64, 2, 2, 256, "D = 256 at positions up to 128k: fp32 angle rounding ~ 8e-3 rad",
              positions="long", theta=500000.0, factor=8.0),
        _case(2, 1, 4, 1, 6, "decode step (S = 1) at a random position with 3 pairs",
              positions="random", theta=10000.0, factor=1.0),
        _case(1, 65, 2, 4, 128, "outlier dims of 1e3-1e4 in q and k at positions up to 128k: "
              "the rotation must keep their magnitude", positions="long", theta=500000.0,
              factor=8.0, magnitude="outliers"),
        _case(2, 9, 1, 2, 64, "|q|, |k| of 23000-46000: rotated pairs come near fp16's limit "
              "65504 and must not overflow", positions="random", theta=500000.0, factor=8.0,
              magnitude="fp16_max"),
        _case(1, 7, 1, 1, 32, "q and k below 6.1e-5 (fp16 subnormals): rotated, fp16 keeps them "
              "subnormal (flushing them to 0 fails)", positions="arange", theta=10000.0, factor=1.0,
              magnitude="subnormal"),
    ),
)
