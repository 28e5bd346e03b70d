"""The declarative kernel spec that every module in `pykernels/` exports as `SPEC`.

A spec says everything the harness needs to compile, feed, check and time one Mojo op:
its symbolic axes (from which Hypothesis strategies are derived), its dtypes, the op name
it registers, its tensor arguments, its runtime scalar parameters, a plain fp32 PyTorch
reference, a Triton twin, FLOP and byte formulas and golden edge cases.

Conventions shared by every spec:
- A *shape* is a dict mapping every axis name (free and derived) to an int.
- A *params* dict maps every `Param` name to a value; `Param.kernel_arg` params are passed
  to the Mojo op as scalars, in declaration order, after the tensor inputs.
- `reference(inputs, params)` is dtype-generic plain math: run on fp32 (or fp64) copies it is
  the reference, run on the kernel-dtype inputs it is "PyTorch in the kernel's own precision".
- `triton(inputs, params)` runs the Triton twin on the inputs' device (under
  TRITON_INTERPRET=1 on CPU) and returns outputs in the kernel dtype.
- Both return a tuple of tensors in `checked` order: the outputs, then the final contents
  of the inputs the op mutates in place (`TensorArg.mutable`, e.g. a KV cache it writes).

The provider contract (`kt microbench`): a spec's `providers` maps a name to
`prepare(device, dtype)`, which returns `bind(inputs, params)`, which returns a `Bound` (or a
zero-argument callable giving the outputs). `prepare` or `bind` raises `Unavailable` for a
provider that cannot run there: its row says "n/a", never a crash. Speed targets (`targets`)
are stated by `kt microbench`'s summary from one run's rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

Shape = dict[str, int]
Params = dict[str, Any]
Tensors = dict[str, torch.Tensor]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16",
                 "f16": "float16", "half": "float16"}


def canonical_dtype(name: str) -> str:
    """'bf16' -> 'bfloat16'; raises ValueError on an unknown name."""
    key = DTYPE_ALIASES.get(name.lower(), name.lower())
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r} (known: {', '.join(DTYPES)})")
    return key


@dataclass(frozen=True)
class Axis:
    """A symbolic size. Values are `lo + step*k` up to `hi`, or one of `choices`.

    `edges` are the awkward sizes Hypothesis always tries (1, 127/128/129, primes, ...);
    `ci_hi` caps the range under the CI profile so a 2-core machine stays fast; `draw_hi`
    caps what Hypothesis draws under any profile, for an axis whose largest values
    (a model's whole context) only golden cases and `--replay` reach.
    """

    name: str
    lo: int = 1
    hi: int = 1
    step: int = 1
    choices: tuple[int, ...] = ()
    edges: tuple[int, ...] = ()
    ci_hi: int | None = None
    draw_hi: int | None = None
    doc: str = ""

    def allowed(self, value: int) -> bool:
        if self.choices:
            return value in self.choices
        return self.lo <= value <= self.hi and (value - self.lo) % self.step == 0


@dataclass(frozen=True)
class Param:
    """A scalar parameter drawn from `choices`. `kernel_arg` params are passed to the op
    (as `dtype` scalars); the others only shape the data (e.g. input magnitude).

    `resolve(value, inputs)`, for a kernel argument that a caller computes from the data
    (the longest sequence of a batch): the number the op gets for a drawn value, which may
    name a rule (a string among `choices`, such as "exact") rather than be a number."""

    name: str
    choices: tuple[Any, ...]
    dtype: str = "float32"  # float32 | int32
    kernel_arg: bool = True
    doc: str = ""
    resolve: Callable[[Any, Tensors], Any] | None = None

    def op_value(self, params: Params, inputs: Tensors) -> Any:
        """What the op is passed for this param, given the case's params and inputs."""
        value = params[self.name]
        return self.resolve(value, inputs) if self.resolve is not None else value


@dataclass(frozen=True)
class TensorArg:
    """A tensor argument. `dims` name axes; `dtype` is 'io' (the kernel's dtype) or a fixed one.

    `mutable`: an input the op updates in place (a MAX buffer: `ops.inplace_custom`); its
    contents after the op are checked like an output. `partial`: the op touches only part of
    it (a paged cache), so the byte formula counts that part, not the whole tensor."""

    name: str
    dims: tuple[str, ...]
    dtype: str = "io"
    mutable: bool = False
    partial: bool = False

    def concrete_shape(self, shape: Shape) -> tuple[int, ...]:
        return tuple(shape[d] for d in self.dims)

    def torch_dtype(self, io: torch.dtype) -> torch.dtype:
        return io if self.dtype == "io" else getattr(torch, self.dtype)


@dataclass(frozen=True)
class Case:
    """A golden edge case: a full shape plus params; `why` says what it guards against."""

    shape: Shape
    params: Params
    why: str


class Unavailable(Exception):
    """This provider cannot run here (device, dtype, shape); str() says why."""


@dataclass
class Bound:
    """A provider bound to one set of inputs. `run()` is the timed call; `to_torch(result)`
    turns its result into the output tensors (outside the timed region). `stream` is the
    native stream the work is enqueued on when it is not torch's current one (MAX), and
    `sync` waits for the device. `note` ends up in the row."""

    run: Callable[[], Any]
    to_torch: Callable[[Any], tuple[torch.Tensor, ...]] = lambda r: tuple(r)
    stream: int | None = None
    sync: Callable[[], None] | None = None
    note: str = ""
    # Set (to what it computes) for a yardstick: a different computation timed beside the
    # op as a reference point (attention without RoPE). It skips the correctness gate, its
    # row says so, and it is never the baseline of speedups.
    yardstick: str = ""


Provider = Callable[[str, torch.dtype], Callable[[Tensors, Params], Any]]


def interval_verdict(at_most: float, lo: float, hi: float) -> str:
    """A ratio target `at_most` against a ratio's interval [lo, hi]: "met" only when the
    interval lies below it, "missed" when it lies above, else "within noise"."""
    if hi < at_most:
        return "met"
    if lo > at_most:
        return "missed"
    return "within noise"


@dataclass(frozen=True)
class RatioTarget:
    """kt_graph's time over `provider`'s, per case of `families` timed in one run's
    interleaved rounds (below 1: kt is faster), as a median with a 95 % interval. `levels`
    are (ratio at most, name), e.g. ((1.0, "goal"), (0.95, "moonshot")): each is met, missed
    or within noise (`interval_verdict`); without levels the ratio is stated alone."""

    name: str
    provider: str
    families: tuple[str, ...]
    levels: tuple[tuple[float, str], ...] = ()

    def verdict(self, lo: float, hi: float) -> str:
        """Every level's standing, e.g. "goal met, moonshot within noise"."""
        return ", ".join(f"{name} {interval_verdict(at_most, lo, hi)}"
                         for at_most, name in self.levels)


@dataclass(frozen=True)
class ThroughputTarget:
    """kt_graph's memory throughput on a GPU, per case of `families` (every family when
    empty): at least `min_pct_peak` % of the datasheet HBM bandwidth, or `min_tb_s` TB/s."""

    families: tuple[str, ...] = ()
    min_pct_peak: float | None = None
    min_tb_s: float | None = None


@dataclass
class KernelSpec:
    name: str
    op: str
    summary: str
    axes: tuple[Axis, ...]
    derived: Mapping[str, Callable[[Shape], int]]
    params: tuple[Param, ...]
    inputs: tuple[TensorArg, ...]
    outputs: tuple[TensorArg, ...]
    make_inputs: Callable[[Shape, Params, torch.dtype, torch.device, torch.Generator], Tensors]
    reference: Callable[[Tensors, Params], tuple[torch.Tensor, ...]]
    triton: Callable[[Tensors, Params], tuple[torch.Tensor, ...]]
    flops: Callable[[Shape, Params], float]
    bytes: Callable[[Shape, Params, torch.dtype], float]
    golden: tuple[Case, ...] = ()
    dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")
    tolerance_k: float = 2.0
    constraint: Callable[[Shape, Params], bool] | None = None
    providers: Mapping[str, Provider] = field(default_factory=dict)
    # `kt microbench` checks only these slices of huge outputs: shape -> [{tensor name: index}]
    # (attention's O(S^2) reference does not fit at S = 16k).
    bench_views: Callable[[Shape], list[dict]] | None = None
    targets: tuple[RatioTarget | ThroughputTarget, ...] = ()

    def axis(self, name: str) -> Axis:
        for a in self.axes:
            if a.name == name:
                return a
        raise KeyError(name)

    def complete(self, free: Mapping[str, int]) -> Shape:
        """Free axis values -> full shape with the derived axes filled in."""
        shape = dict(free)
        for name, fn in self.derived.items():
            shape[name] = int(fn(shape))
        return shape

    def validate(self, shape: Mapping[str, int], params: Mapping[str, Any]) -> str | None:
        """Why a user-given (shape, params) is invalid, or None."""
        known = {a.name for a in self.axes} | set(self.derived)
        missing = [a.name for a in self.axes if a.name not in shape]
        if missing:
            return f"shape is missing axes {', '.join(missing)} (axes: {', '.join(known)})"
        unknown = sorted(set(shape) - known)
        if unknown:
            return f"unknown axes {', '.join(unknown)} (axes: {', '.join(sorted(known))})"
        for a in self.axes:
            v = shape[a.name]
            if not isinstance(v, int) or isinstance(v, bool) or not a.allowed(v):
                span = f"one of {a.choices}" if a.choices else f"{a.lo}..{a.hi} step {a.step}"
                return f"axis {a.name} must be an int in {span}, got {v!r}"
        full = self.complete({a.name: shape[a.name] for a in self.axes})
        for name in self.derived:
            if name in shape and shape[name] != full[name]:
                return f"axis {name} is derived ({full[name]} for this shape), got {shape[name]}"
        pnames = {p.name for p in self.params}
        unknown_p = sorted(set(params) - pnames)
        if unknown_p:
            return f"unknown params {', '.join(unknown_p)} (params: {', '.join(sorted(pnames))})"
        if self.constraint is not None and not self.constraint(full, self.full_params(params)):
            return f"shape {full} violates the constraints of {self.name}"
        return None

    def full_params(self, params: Mapping[str, Any]) -> Params:
        out = {p.name: p.choices[0] for p in self.params}
        out.update(params)
        return out

    @property
    def checked(self) -> tuple[TensorArg, ...]:
        """What the reference returns and the rule checks: the outputs, then the mutated
        inputs (their contents after the op)."""
        return self.outputs + tuple(t for t in self.inputs if t.mutable)

    def kernel_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.kernel_arg)

    def numel(self, shape: Shape) -> int:
        return sum(math.prod(t.concrete_shape(shape)) for t in self.inputs + self.outputs)
