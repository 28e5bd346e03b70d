"""The numerical verdict: a kernel output against the reference, relative to PyTorch.

The rule (flash-attention's tests, k = 2): the kernel's worst error against the reference
may be at most k times the worst error of PyTorch running the same math in the kernel's own
dtype, plus a rounding-noise atol. The spec's fp32 reference math is evaluated in fp64 for
every dtype: torch's fp32 `1 / theta**e` is an ulp off in a quarter of RoPE's frequencies,
which at position 1e5 moves angles by far more than fp16 rounding, so an fp32 truth would
fail kernels that compute their frequencies better than torch does. The atol is one ulp of
the kernel's dtype at the reference's largest magnitude (at least at the dtype's smallest
normal, so outputs of subnormal size are still checked: an all-zero reference lets through
no more than one subnormal ulp); for fp32, 16 ulps (~2e-6 relative), because two correct
fp32 sums of a few hundred terms taken in different orders differ by about that much, and
PyTorch's blocked reductions are often the luckier order.
NaN/Inf must appear exactly where the reference has them.

`reference_and_baseline` and `check_outputs` are the rule applied to a spec's outputs: what
`kt verify` and `kt microbench`'s correctness gate both run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from harness.spec import KernelSpec, Params, Tensors

ATOL_ULPS = {torch.float32: 16}


def reference_dtype(kernel_dtype: torch.dtype) -> torch.dtype:
    """The precision the reference is evaluated in (see the module docstring)."""
    return torch.float64


@dataclass
class Check:
    """One output tensor's comparison; JSON-ready through `as_dict`."""

    name: str
    passed: bool
    max_abs_err: float
    rel_err: float  # max|out - ref| / max|ref|
    tolerance: float
    baseline_err: float
    atol: float
    n_bad: int
    numel: int
    nan_mismatch: int
    worst: list[dict] = field(default_factory=list)

    @property
    def share_bad(self) -> float:
        return self.n_bad / self.numel if self.numel else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["share_bad"] = self.share_bad
        return d


def _finite_max(x: torch.Tensor) -> float:
    x = x[torch.isfinite(x)]
    return float(x.max()) if x.numel() else 0.0


def compare(name: str, out: torch.Tensor, ref: torch.Tensor, baseline: torch.Tensor,
            k: float = 2.0, n_worst: int = 5) -> Check:
    """Check `out` (kernel dtype) against `ref` given the same-precision `baseline`."""
    if out.shape != ref.shape:
        return Check(name, False, math.inf, math.inf, 0.0, 0.0, 0.0, ref.numel(), ref.numel(), 0,
                     [{"error": f"shape {tuple(out.shape)} != expected {tuple(ref.shape)}"}])
    eps = torch.finfo(out.dtype).eps * ATOL_ULPS.get(out.dtype, 1)
    o = out.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    b = baseline.detach().to("cpu", torch.float64)

    special = ~torch.isfinite(o) | ~torch.isfinite(r)
    same_special = (torch.isnan(o) & torch.isnan(r)) | (torch.isinf(o) & torch.isinf(r) & (o.sign() == r.sign()))
    nan_mismatch = special & ~same_special
    both_finite = ~special

    err = torch.where(both_finite, (o - r).abs(), torch.zeros_like(o))
    base_err = torch.where(torch.isfinite(b) & torch.isfinite(r), (b - r).abs(), torch.zeros_like(b))
    ref_scale = _finite_max(r.abs())
    atol = eps * max(ref_scale, torch.finfo(out.dtype).tiny)
    baseline_err = _finite_max(base_err)
    tolerance = k * baseline_err + atol
    bad = (err > tolerance) | nan_mismatch
    n_bad = int(bad.sum())

    score = torch.where(nan_mismatch, torch.full_like(err, math.inf), err).flatten()
    top = torch.topk(score, min(n_worst, score.numel())).indices if score.numel() else []
    worst = []
    for flat in top:
        idx = tuple(int(i) for i in torch.unravel_index(flat, o.shape))
        worst.append({"index": list(idx), "out": float(o[idx]), "ref": float(r[idx]),
                      "abs_err": float(score[flat])})
    max_err = _finite_max(err)
    return Check(
        name=name,
        passed=n_bad == 0,
        max_abs_err=max_err,
        rel_err=max_err / ref_scale if ref_scale > 0 else (0.0 if max_err == 0 else math.inf),
        tolerance=tolerance,
        baseline_err=baseline_err,
        atol=atol,
        n_bad=n_bad,
        numel=o.numel(),
        nan_mismatch=int(nan_mismatch.sum()),
        worst=worst,
    )


def inputs_unchanged(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    """Names of inputs whose contents changed (bitwise, NaN-aware) while the kernel ran."""
    changed = []
    for name, x in before.items():
        y = after[name]
        if x.dtype.is_floating_point:
            same = torch.equal(torch.nan_to_num(x, nan=1.25), torch.nan_to_num(y, nan=1.25)) and \
                torch.equal(torch.isnan(x), torch.isnan(y))
        else:
            same = torch.equal(x, y)
        if not same:
            changed.append(name)
    return changed


def upcast(inputs: Tensors, dtype: torch.dtype) -> Tensors:
    """`inputs` with every floating-point tensor converted to `dtype`."""
    return {k: v.to(dtype) if v.dtype.is_floating_point else v for k, v in inputs.items()}


def reference_and_baseline(spec: KernelSpec, inputs: Tensors, params: Params
                           ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """The spec's reference on `inputs` evaluated in `reference_dtype` (the truth) and in the
    inputs' own dtype (PyTorch in the kernel's precision, the baseline of the rule)."""
    io = next(inputs[t.name].dtype for t in spec.inputs if t.dtype == "io")
    with torch.no_grad():
        ref = spec.reference(upcast(inputs, reference_dtype(io)), params)
        base = spec.reference(inputs, params)
    return ref, base


def check_outputs(spec: KernelSpec, outputs, ref, base) -> list[Check]:
    """One `Check` per output of `spec` (and per input it mutates), by the rule with the
    spec's k."""
    return [compare(t.name, o, r, b, spec.tolerance_k)
            for t, o, r, b in zip(spec.checked, outputs, ref, base)]
