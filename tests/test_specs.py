"""The contracts every spec rests on, checked for each discovered kernel (a new kernel is
covered with no edit here): its five files exist under its name, its golden cases are valid
and its formulas count what moves, and its same-precision baseline really is low precision."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import pykernels
from harness.bench.providers import providers_of
from harness.spec import DTYPES, RatioTarget, ThroughputTarget

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
SPECS = sorted(pykernels.discover())


@pytest.mark.parametrize("name", SPECS)
def test_a_kernel_is_its_files_under_one_name(name):
    """kernels/x.mojo registers kt.x, pykernels/x.py holds its spec, benchmarks/x.toml its
    families, tests/test_x.py its own tests, tests/mojo/gpu_launch.mojo launches its GPU code."""
    spec = pykernels.get(name)
    assert spec.op == f"kt.{name}"
    assert (REPO / "pykernels" / f"{name}.py").exists()
    mojo = (REPO / "kernels" / f"{name}.mojo").read_text()
    assert re.search(rf'@extensibility\.register\("kt\.{name}"\)', mojo)
    assert (REPO / "benchmarks" / f"{name}.toml").exists()
    assert (REPO / "tests" / f"test_{name}.py").exists()
    assert f"from kernels.{name} import" in (REPO / "tests" / "mojo" / "gpu_launch.mojo").read_text()


@pytest.mark.parametrize("name", SPECS)
def test_targets_and_providers_name_what_exists(name):
    spec = pykernels.get(name)
    providers = providers_of(spec)
    assert not set(spec.providers) & {"kt_graph", "kt_bridge", "triton"}
    for t in spec.targets:
        assert isinstance(t, (RatioTarget, ThroughputTarget))
        if isinstance(t, RatioTarget):
            assert t.provider in providers and t.families
            # loosest first: 'goal met, moonshot within noise'
            assert [lv for lv, _ in t.levels] == sorted((lv for lv, _ in t.levels), reverse=True)
        else:
            assert (t.min_pct_peak is None) != (t.min_tb_s is None)


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_golden_cases_are_valid_and_bytes_count_every_tensor_once(name, dtype):
    spec = pykernels.get(name)
    assert spec.golden
    for case in spec.golden:
        assert spec.validate(case.shape, case.params) is None, case.why
        params = spec.full_params(case.params)
        assert set(params) == {p.name for p in spec.params}
        inp = spec.make_inputs(case.shape, params, DTYPES[dtype], CPU,
                               torch.Generator().manual_seed(0))
        for arg in spec.inputs:
            assert tuple(inp[arg.name].shape) == arg.concrete_shape(case.shape)
            assert inp[arg.name].dtype == arg.torch_dtype(DTYPES[dtype])
        out = spec.reference(inp, params)
        for arg, o in zip(spec.checked, out, strict=True):
            assert tuple(o.shape) == arg.concrete_shape(case.shape)
            assert o.dtype == arg.torch_dtype(DTYPES[dtype])
        every = [(arg, inp[arg.name]) for arg in spec.inputs] + list(zip(spec.checked, out))
        moved = sum(t.numel() * t.element_size() for arg, t in every if not arg.partial)
        whole = sum(t.numel() * t.element_size() for _, t in every)
        # a tensor the op touches in part (a paged cache) counts for what it touches
        assert moved <= spec.bytes(case.shape, params, DTYPES[dtype]) <= whole
        if not any(arg.partial for arg, _ in every):
            assert spec.bytes(case.shape, params, DTYPES[dtype]) == moved
        assert spec.flops(case.shape, params) > 0


@pytest.mark.parametrize("name", SPECS)
def test_same_precision_baseline_is_not_fp32_in_disguise(name):
    """Run on bf16 the reference keeps bf16 intermediates: it differs from the fp32 reference
    rounded once to bf16 (a silent upcast would make the two agree)."""
    spec = pykernels.get(name)
    case = max(spec.golden, key=lambda c: spec.numel(c.shape))
    params = spec.full_params(case.params)
    inp = spec.make_inputs(case.shape, params, torch.bfloat16, CPU,
                           torch.Generator().manual_seed(0))
    low = spec.reference(inp, params)
    once = spec.reference({k: v.float() if v.is_floating_point() else v
                           for k, v in inp.items()}, params)
    assert any(not torch.equal(a, b.to(torch.bfloat16)) for a, b in zip(low, once))
