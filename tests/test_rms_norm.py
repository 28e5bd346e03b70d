"""RMSNorm: the reference against `torch.nn.functional.rms_norm`, the golden cases against
the bugs they guard against, the Mojo op's scalar order, planted Mojo bugs and the Triton
twin on extra cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pykernels
import twins
from harness.spec import Case
from kernel_helpers import fails_rule, golden_case, inputs_for
from plants import Plant, assert_caught

SPEC = pykernels.get("rms_norm")


def test_kernel_params_in_op_order():
    """The Mojo op takes its scalars in exactly this order."""
    assert [p.name for p in SPEC.kernel_params()] == ["eps"]


@pytest.mark.parametrize("m,n", [(1, 1), (3, 129), (16, 4096), (5, 127)])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
@pytest.mark.parametrize("input_scale", [1.0, 0.01])
def test_rms_norm_matches_torch(m, n, eps, input_scale):
    spec = pykernels.get("rms_norm")
    _, params, inp = inputs_for(spec, {"M": m, "N": n}, {"eps": eps, "input_scale": input_scale})
    (y,) = spec.reference(inp, params)
    eps32 = torch.tensor(eps, dtype=torch.float32).item()
    torch.testing.assert_close(y, F.rms_norm(inp["x"], (n,), inp["w"], eps32), rtol=1e-12,
                               atol=1e-12)


def test_rms_norm_zero_rows_give_zero():
    spec = pykernels.get("rms_norm")
    _, params, inp = inputs_for(spec, {"M": 4, "N": 64}, {"input_scale": 0.0}, torch.float16)
    (y,) = spec.reference(inp, params)
    assert torch.equal(y, torch.zeros_like(y))


def test_golden_catches_eps_outside_the_square_root_and_missing_eps():
    spec = pykernels.get("rms_norm")

    def eps_outside(inp, params):
        x, w = inp["x"].float(), inp["w"].float()
        rms = x.square().mean(-1, keepdim=True).sqrt() + params["eps"]
        return ((x / rms * w).to(inp["x"].dtype),)

    def no_eps(inp, params):
        x, w = inp["x"].float(), inp["w"].float()
        return ((x * torch.rsqrt(x.square().mean(-1, keepdim=True)) * w).to(inp["x"].dtype),)

    assert fails_rule(spec, golden_case(spec, "eps outside"), torch.float32, eps_outside)
    assert fails_rule(spec, golden_case(spec, "all-zero rows"), torch.bfloat16, no_eps)


def _squares_in_input_dtype(inp, params):
    """The kernel with x^2 taken in x's dtype (summed in fp32): fp16 overflows above 256."""
    x, w = inp["x"], inp["w"].float()
    ms = (x * x).float().mean(-1, keepdim=True)
    return ((x.float() * torch.rsqrt(ms + params["eps"]) * w).to(x.dtype),)


def test_only_real_magnitudes_catch_squares_in_fp16():
    """Inputs of N(0, 4) at most, kt's largest before real-model magnitudes, let x^2 in fp16
    pass; massive activations and values near 65504 overflow it."""
    spec = pykernels.get("rms_norm")
    for small in ("Llama-3-70B hidden size", "Llama-3-8B hidden size", "masked tail"):
        assert not fails_rule(spec, golden_case(spec, small), torch.float16,
                              _squares_in_input_dtype)
    for large in ("massive activations", "values up to 65504"):
        assert fails_rule(spec, golden_case(spec, large), torch.float16, _squares_in_input_dtype)


def test_fp16_baseline_takes_statistics_in_fp32_as_hf_does():
    """The same-precision baseline is HF's module run in fp16: finite on massive activations
    (a sum of squares in fp16 would be inf and y 0), equal to `_hf_rms_norm`."""
    from pykernels.rms_norm import _hf_rms_norm

    spec = pykernels.get("rms_norm")
    case = golden_case(spec, "massive activations")
    _, params, inp = inputs_for(spec, case.shape, case.params, torch.float16)
    assert inp["x"].abs().max() > 1000 and (inp["x"].float() ** 2).max() > 65504
    (y,) = spec.reference(inp, params)
    assert y.dtype == torch.float16 and torch.isfinite(y).all() and y.abs().max() > 1
    assert torch.equal(y, _hf_rms_norm(inp["x"], inp["w"], torch.tensor(params["eps"]).float().item()))


@pytest.mark.parametrize("magnitude", ["outliers", "fp16_max", "subnormal", "zero_rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_magnitudes_are_what_they_say(magnitude, dtype):
    spec = pykernels.get("rms_norm")
    _, _, inp = inputs_for(spec, {"M": 6, "N": 300}, {"magnitude": magnitude}, dtype)
    x = inp["x"].double().abs()
    if magnitude == "outliers":
        big = (x > 999).all(0)
        assert 1 <= int(big.sum()) <= 3 and x[:, ~big].max() < 10 and x.max() <= 1.01e4
    elif magnitude == "fp16_max":
        assert torch.isfinite(x).all() and (x.max(1).values >= 65504).all() and x.min() >= 0.99
    elif magnitude == "subnormal":
        assert (x <= torch.finfo(torch.float16).tiny).all() and (x > 0).float().mean() > 0.9
    else:
        assert (x[::3] == 0).all() and (x[1::3] > 0).any()


PLANTS = [
    Plant("rms_norm_eps_outside_sqrt", "rms_norm", "rms_norm.mojo",
          "var r = rsqrt(_sum_squares[dtype](x, n) / Float32(n) + eps)",
          "var r = rsqrt(_sum_squares[dtype](x, n) / Float32(n)) + eps"),
    Plant("rms_norm_forgets_weight", "rms_norm", "rms_norm.mojo",
          "y[unsafe_offset=j] = (v * r * w[unsafe_offset=j].cast[DType.float32]()).cast[dtype]()",
          "y[unsafe_offset=j] = (v * r).cast[dtype]()"),
    # correct for the inputs kt drew before real-model magnitudes (|x| < 256)
    Plant("rms_norm_squares_in_fp16", "rms_norm", "rms_norm.mojo",
          "            var v = x[unsafe_offset=j].cast[DType.float32]()\n            chunk += v * v",
          "            var v = x[unsafe_offset=j]\n            chunk += (v * v).cast[DType.float32]()",
          dtype="float16"),
]


@pytest.mark.slow
@pytest.mark.parametrize("p", PLANTS, ids=[p.name for p in PLANTS])
def test_planted_bug_is_caught(kt, tmp_path, p):
    assert_caught(kt, tmp_path, p)


TWIN_EXTRA, test_twin_interpreted, test_twin_cuda = twins.extra_cases("rms_norm", [
    Case({"M": 509, "N": 1000}, {"input_scale": 4.0}, "many rows per program, prime M"),
])

