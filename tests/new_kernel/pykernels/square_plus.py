"""A throwaway elementwise op, y = x * x + x, added by tests/test_new_kernel.py to a copy of
the repository to show what a new kernel touches (nothing beyond its own files)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from harness.spec import Axis, Case, KernelSpec, Params, Shape, TensorArg, Tensors
from pykernels._common import bf16_rne, block_elems


def make_inputs(shape: Shape, params: Params, dtype: torch.dtype, device: torch.device,
                gen: torch.Generator) -> Tensors:
    x = torch.randn(shape["M"], shape["N"], generator=gen, device=gen.device)
    return {"x": x.to(device=device, dtype=dtype)}


def reference(inputs: Tensors, params: Params) -> tuple[torch.Tensor]:
    """x * x + x, every step in the inputs' dtype."""
    x = inputs["x"]
    return (x * x + x,)


@triton.jit
def _square_plus_kernel(X, Y, N, BLOCK: tl.constexpr, BF16_RNE: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + i, mask=i < N, other=0.0).to(tl.float32)
    y = x * x + x
    if BF16_RNE:
        y = y * 65537.0 - (y * 65537.0 - y)
    tl.store(Y + i, y.to(Y.dtype.element_ty), mask=i < N)


def triton_square_plus(inputs: Tensors, params: Params) -> tuple[torch.Tensor]:
    x = inputs["x"].contiguous()
    y = torch.empty_like(x)
    block = min(block_elems(), triton.next_power_of_2(max(1, x.numel())))
    _square_plus_kernel[(triton.cdiv(x.numel(), block),)](x, y, x.numel(), BLOCK=block,
                                                           BF16_RNE=bf16_rne(x.dtype))
    return (y,)


def _torch_eager(device: str, dtype: torch.dtype):
    def bind(inputs: Tensors, params: Params):
        x = inputs["x"]
        return lambda: (x * x + x,)

    return bind


SPEC = KernelSpec(
    name="square_plus",
    op="kt.square_plus",
    summary="y = x * x + x (a throwaway kernel)",
    axes=(Axis("M", lo=1, hi=64, edges=(1, 3), ci_hi=16, doc="rows"),
          Axis("N", lo=1, hi=4096, edges=(1, 127, 128, 129), ci_hi=1024, doc="columns")),
    derived={},
    params=(),
    inputs=(TensorArg("x", ("M", "N")),),
    outputs=(TensorArg("y", ("M", "N")),),
    make_inputs=make_inputs,
    reference=reference,
    triton=triton_square_plus,
    flops=lambda shape, params: 2.0 * shape["M"] * shape["N"],
    bytes=lambda shape, params, dtype: float(2 * shape["M"] * shape["N"] * dtype.itemsize),
    providers={"torch_eager": _torch_eager},
    golden=(Case({"M": 1, "N": 1}, {}, "one element"),
            Case({"M": 3, "N": 129}, {}, "one past a power of two: the masked tail")),
)
