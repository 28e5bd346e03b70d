"""The checker on data whose verdict is known."""

import math

import torch

from harness.checking import compare, inputs_unchanged


def _data(dtype=torch.bfloat16, n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(n, generator=g)
    base = ref.to(dtype)  # PyTorch in the low dtype: ref rounded once
    return ref, base


def test_correctly_rounded_output_passes():
    ref, base = _data()
    c = compare("y", ref.to(torch.bfloat16), ref, base)
    assert c.passed and c.n_bad == 0 and c.nan_mismatch == 0
    assert c.max_abs_err <= c.tolerance


def test_tolerance_is_k_times_baseline_plus_one_ulp():
    ref, base = _data()
    c = compare("y", base, ref, base, k=2.0)
    expected = 2.0 * (base.double() - ref.double()).abs().max().item() + \
        torch.finfo(torch.bfloat16).eps * ref.abs().max().item()
    assert math.isclose(c.tolerance, expected, rel_tol=1e-12)


def test_error_beyond_k_times_baseline_fails_and_points_at_it():
    ref, base = _data()
    out = ref.clone()
    out[1234] += 0.5
    c = compare("y", out.to(torch.bfloat16), ref, base)
    assert not c.passed
    assert c.n_bad == 1 and math.isclose(c.share_bad, 1 / 4096)
    assert c.worst[0]["index"] == [1234]


def test_nan_where_reference_is_finite_is_a_mismatch():
    ref, base = _data()
    out = ref.to(torch.bfloat16).clone()
    out[7] = float("nan")
    c = compare("y", out, ref, base)
    assert not c.passed and c.nan_mismatch == 1
    assert c.worst[0]["index"] == [7]


def test_matching_infs_pass_and_opposite_signs_fail():
    ref, base = _data()
    ref[3] = float("inf")
    base = ref.to(torch.bfloat16)
    assert compare("y", ref.to(torch.bfloat16), ref, base).passed
    out = ref.to(torch.bfloat16).clone()
    out[3] = float("-inf")
    assert compare("y", out, ref, base).nan_mismatch == 1


def test_fp32_bound_is_tight():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(1000, dtype=torch.float64, generator=g)
    base = ref.float()
    off = ref.float() * (1 + 3e-5)  # ~250 fp32 ulps: far above rounding noise
    assert compare("y", base, ref, base).passed
    assert not compare("y", off, ref, base).passed


def test_shape_mismatch_fails():
    ref, base = _data()
    c = compare("y", ref[:10].to(torch.bfloat16), ref, base)
    assert not c.passed and "shape" in c.worst[0]["error"]


def test_inputs_unchanged_detects_writes_and_tolerates_nans():
    x = torch.tensor([1.0, float("nan"), 3.0])
    before = {"x": x.clone()}
    assert inputs_unchanged(before, {"x": x}) == []
    x[0] = 2.0
    assert inputs_unchanged(before, {"x": x}) == ["x"]
