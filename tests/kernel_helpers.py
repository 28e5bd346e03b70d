"""Helpers shared by the per-kernel tests (imported by name: pytest puts this folder on
sys.path): inputs from a spec, an independent RoPE (complex rotation, scalar Llama 3
frequencies), the k x baseline rule applied to a planted bug, and the checks the paged
kernels share with stock MAX's paged KV cache."""

from __future__ import annotations

import dataclasses
import math

import torch

from harness.bench.engine import Settings, benchmark_families
from harness.bench.families import load_families
from harness.spec import Case, KernelSpec
from pykernels._common import freq_params

CPU = torch.device("cpu")
LLAMA3 = {"theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position": 8192.0}


def inputs_for(spec: KernelSpec, free, params, dtype=torch.float64, seed=0):
    """(full shape, full params, inputs) of `spec` on the CPU."""
    shape = spec.complete(free)
    params = spec.full_params(params)
    gen = torch.Generator().manual_seed(seed)
    return shape, params, spec.make_inputs(shape, params, dtype, CPU, gen)


def llama3_scalar(i: int, dim: int, theta, factor, low, high, orig) -> float:
    """inv_freq[i] by a scalar transcription of HF's `_compute_llama3_parameters`."""
    inv = 1.0 / theta ** (2 * i / dim)
    wavelen = 2 * math.pi / inv
    if wavelen < orig / high:
        return inv
    if wavelen > orig / low:
        return inv / factor
    smooth = (orig / wavelen - low) / (high - low)
    return (1 - smooth) * inv / factor + smooth * inv


def rope_complex(x: torch.Tensor, positions: torch.Tensor, params) -> torch.Tensor:
    """Half-rotation RoPE as complex multiplication: (x1 + i x2) e^(i pos inv_freq)."""
    d = x.shape[-1]
    inv = torch.tensor([llama3_scalar(i, d, *freq_params(params)) for i in range(d // 2)],
                       dtype=torch.float64)
    z = torch.complex(x[..., : d // 2], x[..., d // 2:])
    angle = positions.double()[..., None] * inv
    z = z * torch.polar(torch.ones_like(angle), angle)[:, :, None, :]
    return torch.cat((z.real, z.imag), dim=-1)


def fails_rule(spec: KernelSpec, case: Case, dtype, buggy) -> bool:
    """Would `buggy(inputs, params)` fail the k x baseline rule (or be non-finite)?"""
    params = spec.full_params(case.params)
    inp = spec.make_inputs(case.shape, params, dtype, CPU, torch.Generator().manual_seed(0))
    wide = {k: v.double() if v.is_floating_point() else v for k, v in inp.items()}
    truth = spec.reference(wide, params)
    base = spec.reference(inp, params)
    got = buggy(inp, params)
    for t, b, g in zip(truth, base, got):
        if not torch.isfinite(g).all():
            return True
        bound = spec.tolerance_k * (b.double() - t).abs().max() + \
            torch.finfo(dtype).eps * t.abs().max()
        if (g.double() - t).abs().max() > bound:
            return True
    return False


def golden_case(spec: KernelSpec, fragment: str) -> Case:
    """The one golden case whose `why` contains `fragment`."""
    (case,) = [c for c in spec.golden if fragment in c.why]
    return case


def assert_stock_max_paged_passes_the_gate(spec: KernelSpec) -> None:
    """kt's op and stock MAX's paged kernels, given the same cache, block table and ragged
    batch, both agree with the reference (a provider that disagreed would be WRONG). In fp32:
    on the CPU MAX's bf16 paged attention rounds beyond the k x baseline rule (errors of 4
    bf16 ulps where torch in bf16 makes 1-2), while in fp32 it matches the reference to 1e-6,
    which is what shows that both read the same cache the same way."""
    settings = Settings(warmup_ms=1, min_reps=3, max_reps=5, budget_s=0.05)
    fam = dataclasses.replace(load_families(spec)["cpu"], dtype="float32")
    rec = benchmark_families(spec, "cpu", [fam], ["kt_graph", "max_paged"], settings=settings)
    assert {(r["provider"], r["status"]) for r in rec["rows"]} == {("kt_graph", "ok"),
                                                                   ("max_paged", "ok")}, rec["rows"]


def assert_families_are_maxs_serving_cache(spec: KernelSpec) -> None:
    """The benchmark families use MAX's serving cache: 128-token pages, head dims up to 128 and
    more on the GPU, bf16."""
    fams = load_families(spec)
    gpu = [s for f in fams.values() if f.device == "gpu" for s, _ in f.cases]
    assert {s["page"] for s in gpu} == {128} and {s["D"] for s in gpu} >= {128}
    assert all(f.dtype == "bfloat16" for f in fams.values())
