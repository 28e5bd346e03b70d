"""RMSNorm over the last axis: y = x / sqrt(mean(x^2) + eps) * w.

Zhang & Sennrich, "Root Mean Square Layer Normalization" (NeurIPS 2019), as used by Llama
(HF transformers `LlamaRMSNorm`). The kernel (`kernels/rms_norm.mojo`) sums squares, scales
and multiplies by w in fp32 and rounds to the input dtype once, at the end.

Inputs span the magnitudes a model feeds RMSNorm (`make_inputs`): besides N(0, s) rows,
the "massive activations" of LLMs (Sun et al. 2024, "Massive Activations in Large Language
Models": a few channels of 1e3-1e4 in every token), values up to fp16's limit 65504, rows of
the dtype's subnormals, and all-zero rows (padding) among ordinary ones. Squared in fp16, an
activation above 256 overflows; HF squares and sums in fp32, and so does the reference.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from harness.build import max_dtype, max_model_bound
from harness.spec import (Axis, Bound, Case, KernelSpec, Param, Params, RatioTarget, Shape, TensorArg,
                          Tensors, ThroughputTarget)
from pykernels._common import bf16_bits, bf16_rne, block_elems, copy_yardstick, f32


# Largest finite fp16: the "fp16_max" inputs reach it in every dtype (bf16 and fp32 models
# see such values too, and their squares need fp32 whatever the dtype).
FP16_MAX = 65504.0


def make_inputs(shape: Shape, params: Params, dtype: torch.dtype, device: torch.device,
                gen: torch.Generator) -> Tensors:
    """x by `magnitude`, w ~ N(0, 1) (a weight indexed by the wrong axis shows):
    - "normal": x ~ input_scale * N(0, 1) (input_scale 0: all-zero rows, where only eps keeps
      0/0 away; 0.01: mean(x^2) ~ eps);
    - "outliers": the same, plus 1 to 3 channels (the same in every row) of magnitude
      log-uniform in 1e3..1e4 with random signs, LLMs' massive activations;
    - "fp16_max": |x| log-uniform in 1..65504, the largest element of each row 65504 (fp16's
      limit, rounded to the dtype);
    - "subnormal": |x| uniform below fp16's smallest normal 6.1e-5, random signs: fp16's
      subnormals, tiny activations in the other dtypes (mean(x^2) is far below eps:
      y = x / sqrt(eps) * w). fp32 and bf16 subnormals (< 1.2e-38) are not drawn: MAX's CPU
      runtime flushes them to zero, and no model produces them;
    - "zero_rows": "normal" with every third row all zero (padding tokens)."""
    m, n = shape["M"], shape["N"]
    regime = params["magnitude"]
    x = (torch.randn(m, n, generator=gen, device=gen.device) * params["input_scale"]).double()
    if regime == "outliers":
        k = int(torch.randint(1, 4, (), generator=gen, device=gen.device))
        cols = torch.randperm(n, generator=gen, device=gen.device)[:k]
        mag = 10.0 ** (3.0 + torch.rand(m, len(cols), generator=gen, device=gen.device,
                                        dtype=torch.float64))
        sign = torch.randint(0, 2, (m, len(cols)), generator=gen, device=gen.device) * 2 - 1
        x[:, cols] = mag * sign
    elif regime == "fp16_max":
        mag = FP16_MAX ** torch.rand(m, n, generator=gen, device=gen.device, dtype=torch.float64)
        mag[torch.arange(m), torch.randint(0, n, (m,), generator=gen, device=gen.device)] = FP16_MAX
        x = mag * x.sign().where(x != 0, torch.ones_like(x))
    elif regime == "subnormal":
        tiny = torch.finfo(torch.float16).tiny
        x = torch.rand(m, n, generator=gen, device=gen.device, dtype=torch.float64) * tiny * \
            x.sign().where(x != 0, torch.ones_like(x))
    elif regime == "zero_rows":
        x[::3] = 0.0
    w = torch.randn(n, generator=gen, device=gen.device)
    return {"x": x.to(device=device, dtype=dtype), "w": w.to(device=device, dtype=dtype)}


def reference(inputs: Tensors, params: Params) -> tuple[torch.Tensor]:
    """HF `LlamaRMSNorm.forward`: h = x in fp32 (or wider), y = h * rsqrt(mean(h^2, -1) + eps)
    cast back to the inputs' dtype, then times w in that dtype. Run on 16-bit inputs it is
    PyTorch in the kernel's precision as a model runs it: the statistics in fp32, as HF takes
    them, so squares of large activations do not overflow."""
    x, w = inputs["x"], inputs["w"]
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    ms = h.square().mean(dim=-1, keepdim=True)
    return (w * (h * torch.rsqrt(ms + f32(params["eps"]))).to(x.dtype),)


@triton.jit
def _rms_norm_kernel(X, W, Y, M, N, eps, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BF16_RNE: tl.constexpr):
    """BLOCK_M whole rows per program; fp32 sum of squares, one rounding at the store.
    BF16_RNE: see `pykernels._common.bf16_rne`."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    if BF16_RNE:  # X, W are bf16 bit patterns (int16): see `bf16_bits`
        x = (tl.load(X + offs, mask=mask, other=0).to(tl.int32) << 16).to(tl.float32, bitcast=True)
        w = (tl.load(W + cols, mask=cols < N, other=0).to(tl.int32) << 16).to(tl.float32,
                                                                             bitcast=True)
    else:
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
    y = x * rstd[:, None] * w[None, :]
    if BF16_RNE:
        y = y * 65537.0 - (y * 65537.0 - y)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


def triton_rms_norm(inputs: Tensors, params: Params) -> tuple[torch.Tensor]:
    x, w = inputs["x"].contiguous(), inputs["w"].contiguous()
    m, n = x.shape
    y = torch.empty_like(x)
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(triton.next_power_of_2(m), block_elems() // block_n))
    num_warps = 8 if block_m * block_n >= 4096 else 4
    _rms_norm_kernel[(triton.cdiv(m, block_m),)](
        bf16_bits(x), bf16_bits(w), y, m, n, f32(params["eps"]), BLOCK_M=block_m, BLOCK_N=block_n,
        BF16_RNE=bf16_rne(x.dtype), num_warps=num_warps)
    return (y,)


def flops(shape: Shape, params: Params) -> float:
    """Square, sum, scale by rstd, multiply by w: 4 per element (the per-row rsqrt is noise)."""
    return 4.0 * shape["M"] * shape["N"]


def nbytes(shape: Shape, params: Params, dtype: torch.dtype) -> float:
    """x and w read once, y written once."""
    m, n = shape["M"], shape["N"]
    return float((2 * m * n + n) * dtype.itemsize)


# --- Other ways to compute the same op, timed by `kt microbench` ---
# Each provider is prepare(device, dtype) -> bind(inputs, params) -> Bound (harness/spec.py).
# MAX's Python modules are imported inside them, for start-up time.


def _hf_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """HF transformers `LlamaRMSNorm.forward`: fp32 statistics, cast back, then times w."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


_compiled_rms_norm = functools.cache(lambda: torch.compile(_hf_rms_norm, dynamic=True))


def _torch_provider(kind: str):
    """PyTorch: HF's module eager ("eager"), torch.compile'd ("compile"), or torch's own
    fused `torch.nn.functional.rms_norm` ("functional")."""

    def prepare(device: str, dtype: torch.dtype):
        def bind(inputs: Tensors, params: Params):
            x, w, eps = inputs["x"], inputs["w"], f32(params["eps"])
            if kind == "functional":
                return lambda: (torch.nn.functional.rms_norm(x, (x.shape[-1],), w, eps),)
            fn = _compiled_rms_norm() if kind == "compile" else _hf_rms_norm
            return lambda: (fn(x, w, eps),)

        return bind

    return prepare


def max_rms_norm(device: str, dtype: torch.dtype):
    """Stock MAX 26.7: `max.graph.ops.rms_norm` (Llama style), symbolic rows and width, one
    graph per (dtype, eps)."""
    models: dict = {}

    def build(eps: float):
        from max import driver, engine
        from max.graph import DeviceRef, Graph, TensorType, ops

        dev = DeviceRef.CPU() if device == "cpu" else DeviceRef.GPU(0)
        io = max_dtype(dtype)
        types = [TensorType(io, ["M", "N"], device=dev), TensorType(io, ["N"], device=dev)]
        with Graph("max_rms_norm", input_types=types) as g:
            x, w = (v.tensor for v in g.inputs)
            g.output(ops.rms_norm(x, w, epsilon=eps))
        mdev = driver.CPU() if device == "cpu" else driver.Accelerator(0)
        return engine.InferenceSession(devices=[mdev]).load(g), mdev

    def bind(inputs: Tensors, params: Params) -> Bound:
        from max import driver

        eps = f32(params["eps"])
        if eps not in models:
            models[eps] = build(eps)
        model, mdev = models[eps]
        keep = [inputs["x"].contiguous(), inputs["w"].contiguous()]
        args = [driver.Buffer.from_dlpack(t) for t in keep]

        return max_model_bound(model, mdev, args, keep, device)

    return bind


PROVIDERS = {
    "max_rms_norm": max_rms_norm,
    "torch_eager": _torch_provider("eager"),
    "torch_functional": _torch_provider("functional"),
    "torch_compile": _torch_provider("compile"),
    # a yardstick: the same bytes moved by a plain copy (the ceiling of the % of HBM target)
    "copy_alone": copy_yardstick("x"),
}


SPEC = KernelSpec(
    name="rms_norm",
    op="kt.rms_norm",
    summary="RMSNorm over the last axis (Zhang & Sennrich 2019), fp32 inside, one rounding",
    axes=(
        Axis("M", lo=1, hi=512, edges=(1, 2, 127, 128, 129, 509), ci_hi=129, doc="rows (tokens)"),
        Axis("N", lo=1, hi=8192, edges=(1, 2, 127, 128, 129, 4093, 4096, 8192), ci_hi=4096,
             doc="normalized size (hidden)"),
    ),
    derived={},
    params=(
        Param("eps", (1e-5, 1e-6), doc="added to mean(x^2) inside the square root"),
        Param("input_scale", (1.0, 4.0, 0.01, 0.0), kernel_arg=False,
              doc="std of x (normal, outliers, zero_rows); 0.01 makes eps matter, 0 gives zero rows"),
        Param("magnitude", ("normal", "outliers", "fp16_max", "subnormal", "zero_rows"),
              kernel_arg=False,
              doc="what x looks like (see make_inputs): N(0, input_scale), plus 1e3-1e4 outlier "
                  "channels, up to 65504, subnormals, every third row zero"),
    ),
    inputs=(TensorArg("x", ("M", "N")), TensorArg("w", ("N",))),
    outputs=(TensorArg("y", ("M", "N")),),
    make_inputs=make_inputs,
    reference=reference,
    triton=triton_rms_norm,
    flops=flops,
    bytes=nbytes,
    providers=PROVIDERS,
    # Issue 10: no slower than the best of the Triton twin, stock MAX and F.rms_norm at every
    # Llama 8B / 70B shape (each ratio with its interval), at least 85 % of HBM
    targets=tuple(RatioTarget("", peer, ("llama8b", "llama70b"), levels=((1.0, f"no slower than {peer}"),))
                  for peer in ("triton", "max_rms_norm", "torch_functional"))
    + (ThroughputTarget(("llama8b", "llama70b"), min_pct_peak=85.0),),
    golden=(
        Case({"M": 1, "N": 1}, {"eps": 1e-6, "input_scale": 1.0},
             "one element: y = w * x / sqrt(x^2 + eps), a mean over 1 divides by 1"),
        Case({"M": 3, "N": 129}, {"eps": 1e-5, "input_scale": 1.0},
             "N one past a power of two: the masked tail must not enter the sum"),
        Case({"M": 129, "N": 4096}, {"eps": 1e-5, "input_scale": 1.0},
             "Llama-3-8B hidden size, rows one past a power of two"),
        Case({"M": 2, "N": 8192}, {"eps": 1e-5, "input_scale": 4.0},
             "Llama-3-70B hidden size: a long fp32 reduction"),
        Case({"M": 7, "N": 127}, {"eps": 1e-5, "input_scale": 0.01},
             "mean(x^2) ~ 1e-4 is comparable to eps: eps outside the sqrt or dropped shows"),
        Case({"M": 5, "N": 128}, {"eps": 1e-6, "input_scale": 0.0},
             "all-zero rows: y must be 0, not 0/0 = NaN"),
        Case({"M": 9, "N": 4096}, {"eps": 1e-5, "input_scale": 1.0, "magnitude": "outliers"},
             "massive activations (1e3-1e4 in a few channels): squared in fp16 they overflow"),
        Case({"M": 4, "N": 8192}, {"eps": 1e-6, "input_scale": 1.0, "magnitude": "fp16_max"},
             "values up to 65504: the sum of squares reaches ~1e12, far past fp16's range"),
        Case({"M": 3, "N": 257}, {"eps": 1e-6, "input_scale": 1.0, "magnitude": "subnormal"},
             "x below 6.1e-5 (fp16 subnormals): y = x / sqrt(eps) * w (flushed to 0 it fails)"),
        Case({"M": 7, "N": 129}, {"eps": 1e-5, "input_scale": 4.0, "magnitude": "zero_rows"},
             "zero rows (padding) among ordinary ones: each row is normalized on its own"),
    ),
)
