"""The correctness gate of `kt microbench`: the spec's reference (evaluated in
`checking.reference_dtype`, on the device) and the same-precision baseline, computed once per
case, against which every provider's outputs are checked by `harness.checking`'s rule."""

from __future__ import annotations

import math

import torch

from harness.checking import Check, compare, reference_and_baseline
from harness.spec import KernelSpec, Params, Shape, Tensors

# Outputs are compared on at most this many elements (an even stride through each tensor).
CHECK_ELEMENTS = 1 << 19


def thin(x: torch.Tensor, n: int) -> torch.Tensor:
    """At most about `n` elements of `x`, an even stride through it."""
    flat = x.reshape(-1)
    step = max(1, math.ceil(flat.numel() / n))
    return flat[::step]


class Gate:
    """The reference outputs of one (shape, params, inputs), computed once, against which
    every provider is checked. Where the spec has `bench_views`, only those slices of the
    outputs are computed and checked (attention's O(S^2) reference does not fit at 16k)."""

    def __init__(self, spec: KernelSpec, shape: Shape, params: Params, inputs: Tensors):
        self.spec, self.params = spec, params
        self.shapes = [t.concrete_shape(shape) for t in spec.checked]
        self.views = spec.bench_views(shape) if spec.bench_views else None
        self.ref: list[list[torch.Tensor]] = [[] for _ in spec.checked]
        self.base: list[list[torch.Tensor]] = [[] for _ in spec.checked]
        self.per_view = CHECK_ELEMENTS // max(1, len(self.views or [None]))
        for view in self.views or [None]:
            sub = {k: (v if view is None else v[view[k]]) for k, v in inputs.items()}
            ref, base = reference_and_baseline(spec, sub, params)
            for i in range(len(spec.checked)):
                self.ref[i].append(thin(ref[i], self.per_view).cpu())
                self.base[i].append(thin(base[i], self.per_view).cpu())
            del ref, base

    def check(self, outputs: tuple[torch.Tensor, ...]) -> list[Check]:
        """One `Check` per output (compared where the reference was)."""
        checks = []
        for i, t in enumerate(self.spec.checked):
            out = outputs[i]
            ref, base = torch.cat(self.ref[i]), torch.cat(self.base[i])
            if tuple(out.shape) != self.shapes[i]:
                checks.append(compare(t.name, out.reshape(-1)[:1], ref, base))
                continue
            pieces = [out] if self.views is None else [out[v[t.name]] for v in self.views]
            got = torch.cat([thin(p, self.per_view).cpu() for p in pieces])
            checks.append(compare(t.name, got, ref, base, k=self.spec.tolerance_k))
        return checks
