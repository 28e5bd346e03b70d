"""`kt verify`'s engine: Hypothesis-drawn cases, each run through the Mojo op, the fp32
reference, PyTorch in the kernel's dtype and the Triton twin, then checked.

A *case* is everything needed to rebuild one example bit for bit: the free axes, the
params, the dtype, the input layout (dense, or strided views into a wider buffer, as when q
is sliced out of a fused qkv projection) and a data seed. Cases print as JSON, which is what
`kt verify --replay` takes.

Per (kernel, device) one Hypothesis run draws cases over every requested dtype (one MAX
compile per dtype). Golden cases run first; Hypothesis stops at the first failure and
shrinks it to a minimal case. Beyond numerics each run checks that inputs are not mutated,
that results do not depend on stale state (a NaN-poisoned run, then fresh inputs) and that
repeated runs agree bit for bit.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hseed
from hypothesis import strategies as st
from hypothesis.errors import Flaky

from harness.build import compile_op
from harness.checking import Check, check_outputs, inputs_unchanged, reference_and_baseline
from harness.spec import DTYPES, KernelSpec

LAYOUTS = ("dense", "strided")


@dataclass(frozen=True)
class Profile:
    """How hard Hypothesis tries. `ci` is derandomized and capped by the axes' `ci_hi`;
    `max_flops` caps one example's work (by the spec's FLOP formula) so a CPU run stays
    interactive."""

    name: str
    examples: int
    derandomize: bool
    capped: bool
    max_flops: float


PROFILES = {
    "ci": Profile("ci", examples=25, derandomize=True, capped=True, max_flops=1e8),
    "local": Profile("local", examples=200, derandomize=False, capped=False, max_flops=5e8),
}

# Triton's interpreter runs each program instance in numpy: on the CPU the twin only sees
# examples up to this much work, and the report counts how many it saw.
INTERPRETER_MAX_FLOPS = 3e7

# The time limit of one case (every implementation on it, or the integrity runs) when
# --case-timeout does not set one: a floor for first calls (CUDA context, Triton's JIT) plus
# the case's FLOPs at a pessimistic 10 MFLOP/s, the pace of Triton's interpreter.
CASE_LIMIT_FLOOR_S = 120.0
CASE_LIMIT_FLOPS_PER_S = 1e7


def case_limit_s(spec: KernelSpec, case: dict, override: float | None = None) -> float:
    """Seconds one case may take before kt stops the child and reports a HANG."""
    if override is not None:
        return float(override)
    flops = spec.flops(spec.complete(case["shape"]), spec.full_params(case["params"]))
    return round(CASE_LIMIT_FLOOR_S + flops / CASE_LIMIT_FLOPS_PER_S, 1)


CASE_KEYS = ("data_seed", "dtype", "layout", "params", "shape")
SEED_MAX = 2**31 - 1


def case_json(case: dict) -> str:
    return json.dumps(case, sort_keys=True, separators=(",", ":"))


def case_problem(spec: KernelSpec, case: Any) -> str | None:
    """Why `case` (a `--replay` argument, parsed JSON) is not a case of `spec` that kt verify
    could have printed, or None: every key present and nothing else, a dtype the spec runs,
    a known layout, an integer data seed in the drawn range, the shape and params the spec
    accepts (a kernel argument a number of its type, or a rule among its choices that the spec
    resolves from the inputs; a param that only shapes the data one of its choices, which
    `make_inputs` knows)."""
    if not isinstance(case, dict):
        return f"a case is a JSON object with keys {', '.join(CASE_KEYS)}"
    missing = [k for k in CASE_KEYS if k not in case]
    if missing:
        return f"the case lacks {', '.join(missing)} (a case has {', '.join(CASE_KEYS)})"
    unknown = sorted(set(case) - set(CASE_KEYS))
    if unknown:
        return f"unknown keys {', '.join(map(str, unknown))} (a case has {', '.join(CASE_KEYS)})"
    if case["dtype"] not in spec.dtypes:
        return f"dtype must be one of {', '.join(spec.dtypes)} for {spec.name}, got {case['dtype']!r}"
    if case["layout"] not in LAYOUTS:
        return f"layout must be one of {', '.join(LAYOUTS)}, got {case['layout']!r}"
    seed = case["data_seed"]
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= SEED_MAX:
        return f"data_seed must be an integer in 0..{SEED_MAX}, got {seed!r}"
    for key in ("shape", "params"):
        if not isinstance(case[key], dict):
            return f"{key} must be a JSON object, got {case[key]!r}"
    for p in spec.params:
        if p.name not in case["params"]:
            continue
        v = case["params"][p.name]
        if not p.kernel_arg:
            if v not in p.choices or isinstance(v, bool) != any(isinstance(c, bool) for c in p.choices):
                return f"param {p.name} must be one of {', '.join(map(repr, p.choices))}, got {v!r}"
            continue
        if isinstance(v, str) and p.resolve is not None and v in p.choices:
            continue  # a rule the spec resolves from the inputs ("exact")
        kinds = (int,) if p.dtype == "int32" else (int, float)
        if not isinstance(v, kinds) or isinstance(v, bool):
            kind = "an integer" if p.dtype == "int32" else "a number"
            return f"param {p.name} is a kernel argument ({p.dtype}): {kind}, got {v!r}"
    return spec.validate(case["shape"], case["params"])


def case_strategy(spec: KernelSpec, dtypes: list[str], profile: Profile):
    """Cases derived from the spec: axes (awkward edges first), params, dtype, layout, seed."""
    def axis(a):
        hi = a.draw_hi if a.draw_hi is not None else a.hi
        hi = min(hi, a.ci_hi) if profile.capped and a.ci_hi is not None else hi
        if a.choices:
            opts = [c for c in a.choices if c <= hi] or [min(a.choices)]
            return st.sampled_from(sorted(opts))
        span = st.integers(0, max(0, (hi - a.lo) // a.step)).map(lambda k, a=a: a.lo + a.step * k)
        edges = [e for e in a.edges if a.allowed(e) and e <= hi]
        return st.one_of(st.sampled_from(edges), span) if edges else span

    shape = st.fixed_dictionaries({a.name: axis(a) for a in spec.axes})
    params = st.fixed_dictionaries({p.name: st.sampled_from(p.choices) for p in spec.params})
    case = st.fixed_dictionaries({
        "dtype": st.sampled_from(dtypes),
        "shape": shape,
        "params": params,
        "layout": st.sampled_from(LAYOUTS),
        "data_seed": st.integers(0, 2**31 - 1),
    })
    def admissible(c):
        shape = spec.complete(c["shape"])
        params = spec.full_params(c["params"])
        if spec.constraint is not None and not spec.constraint(shape, params):
            return False
        return spec.flops(shape, params) <= profile.max_flops

    return case.filter(admissible)


def _strided(x: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view: rows padded inside a wider buffer."""
    if x.ndim == 0 or not x.dtype.is_floating_point:
        return x
    pad = torch.full((*x.shape[:-1], x.shape[-1] + 3), float("nan"), dtype=x.dtype, device=x.device)
    view = pad[..., : x.shape[-1]]
    view.copy_(x)
    return view


def make_inputs(spec: KernelSpec, case: dict, device: str) -> dict[str, torch.Tensor]:
    shape = spec.complete(case["shape"])
    gen = torch.Generator(device="cpu").manual_seed(int(case["data_seed"]))
    dtype = DTYPES[case["dtype"]]
    inputs = spec.make_inputs(shape, spec.full_params(case["params"]), dtype, torch.device("cpu"), gen)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    if case.get("layout") == "strided":
        inputs = {k: _strided(v) for k, v in inputs.items()}
    return inputs


@dataclass
class CaseResult:
    case: dict
    mojo: list[Check]
    triton: list[Check] | None
    triton_error: str | None = None
    mutated: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        ok = all(c.passed for c in self.mojo) and not self.mutated
        if self.triton is not None:
            ok = ok and all(c.passed for c in self.triton)
        return ok and self.triton_error is None

    def what_failed(self) -> str:
        parts = []
        if not all(c.passed for c in self.mojo):
            parts.append("mojo")
        if self.mutated:
            parts.append("mutated inputs " + ",".join(self.mutated))
        if self.triton is not None and not all(c.passed for c in self.triton):
            parts.append("triton")
        if self.triton_error:
            parts.append("triton error")
        return " + ".join(parts)


def run_case(spec: KernelSpec, ops: dict[str, Callable], case: dict, device: str,
             triton: bool) -> CaseResult:
    """Run one case through every implementation and check each against the reference."""
    params = spec.full_params(case["params"])
    inputs = make_inputs(spec, case, device)
    before = {k: v.clone() for k, v in inputs.items()}
    ref, base = reference_and_baseline(spec, inputs, params)
    mojo = check_outputs(spec, ops[case["dtype"]](inputs, params), ref, base)
    twin, twin_error = None, None
    if triton:
        try:
            twin = check_outputs(spec, spec.triton(inputs, params), ref, base)
        except Exception as e:  # a broken twin is reported, not fatal
            twin_error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    # mutated inputs too: the op and the twin update copies of them (CompiledOp.__call__)
    return CaseResult(case, mojo, twin, twin_error, inputs_unchanged(before, inputs))


def check_integrity(spec: KernelSpec, op: Callable, case: dict, device: str) -> dict[str, Any]:
    """Stale state and determinism: a NaN-poisoned run, then fresh inputs, then a repeat."""
    params = spec.full_params(case["params"])
    poison = {k: torch.full_like(v, float("nan")) if v.dtype.is_floating_point else v
              for k, v in make_inputs(spec, case, device).items()}
    op(poison, params)
    fresh_case = dict(case, data_seed=(case["data_seed"] + 1) % 2**31)
    fresh = make_inputs(spec, fresh_case, device)
    first = op(fresh, params)
    after_poison = all(c.passed for c in check_outputs(spec, first, *reference_and_baseline(
        spec, fresh, params)))
    again = op(fresh, params)
    deterministic = all(torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)) for a, b in zip(first, again))
    return {"case": fresh_case, "no_stale_state": after_poison, "deterministic": deterministic}


@dataclass
class Stats:
    """Worst observed errors per (dtype, implementation) over all examples."""

    examples: int = 0
    triton_examples: int = 0
    worst: dict[str, dict] = field(default_factory=dict)

    def add(self, impl: str, checks: list[Check]) -> None:
        for c in checks:
            key = f"{impl}:{c.name}"
            cur = self.worst.get(key)
            if cur is None or c.max_abs_err > cur["max_abs_err"] or (c.n_bad and not cur["n_bad"]):
                self.worst[key] = c.as_dict()


def verify_kernel(spec: KernelSpec, dtypes: list[str], device: str, package: str | None,
                  examples: int, seed: int | None, profile: Profile, replay: dict | None,
                  triton: bool, emit: Callable[[dict], None],
                  case_timeout: float | None = None) -> dict:
    """Compile, run golden cases and Hypothesis cases, shrink a failure; returns the result
    dict and emits progress events (`compiling`, `compiled`, `case` and `integrity` with the
    case's time limit `limit_s`, `example`)."""
    torch_device = "cpu" if device == "cpu" else "cuda"
    ops: dict[str, Callable] = {}
    compile_s: dict[str, float] = {}
    if replay is not None:
        dtypes = [replay["dtype"]]
    for dt in dtypes:
        emit({"event": "compiling", "dtype": dt})
        op = compile_op(spec, DTYPES[dt], torch_device, package)
        ops[dt], compile_s[dt] = op, op.compile_seconds
        emit({"event": "compiled", "dtype": dt, "seconds": round(op.compile_seconds, 2)})

    stats = {dt: Stats() for dt in dtypes}
    state: dict[str, Any] = {"failure": None, "count": 0}
    started = time.perf_counter()

    def execute(case: dict) -> CaseResult:
        emit({"event": "case", "case": case, "limit_s": case_limit_s(spec, case, case_timeout)})
        twin = triton and (device != "cpu" or spec.flops(
            spec.complete(case["shape"]), spec.full_params(case["params"])) <= INTERPRETER_MAX_FLOPS)
        res = run_case(spec, ops, case, torch_device, twin)
        st_ = stats[case["dtype"]]
        st_.examples += 1
        st_.add("mojo", res.mojo)
        if res.triton is not None:
            st_.triton_examples += 1
            st_.add("triton", res.triton)
        state["count"] += 1
        emit({"event": "example", "n": state["count"], "passed": res.passed, "dtype": case["dtype"]})
        return res

    def record(res: CaseResult) -> None:
        state["failure"] = {
            "case": res.case,
            "what": res.what_failed(),
            "mojo": [c.as_dict() for c in res.mojo],
            "triton": [c.as_dict() for c in res.triton] if res.triton is not None else None,
            "triton_error": res.triton_error,
            "mutated": res.mutated,
        }

    if replay is not None:
        res = execute(replay)
        if not res.passed:
            record(res)
    else:
        golden = [
            {"dtype": dt, "shape": {a.name: g.shape[a.name] for a in spec.axes},
             "params": spec.full_params(g.params), "layout": "dense", "data_seed": i}
            for dt in dtypes for i, g in enumerate(spec.golden)
        ]
        for case in golden:
            res = execute(case)
            if not res.passed:
                record(res)
                break
        if state["failure"] is None:
            @settings(max_examples=examples, deadline=None, database=None,
                      derandomize=profile.derandomize and seed is None,
                      phases=(Phase.generate, Phase.shrink), print_blob=False,
                      suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
            @given(case_strategy(spec, dtypes, profile))
            def prop(case):
                res = execute(case)
                if not res.passed:
                    record(res)
                    raise AssertionError(res.what_failed())

            if seed is not None:
                prop = hseed(seed)(prop)
            try:
                prop()
            except AssertionError:
                pass
            except Flaky as e:
                state["flaky"] = str(e).splitlines()[0]

    checks: dict[str, Any] = {}
    if state["failure"] is None:
        base_case = golden[0] if replay is None and spec.golden else (replay or None)
        if base_case is not None:
            for dt in dtypes:
                case = dict(base_case, dtype=dt)
                emit({"event": "integrity", "case": case,
                      "limit_s": 3 * case_limit_s(spec, case, case_timeout)})
                checks[dt] = check_integrity(spec, ops[dt], case, torch_device)

    return {
        "kernel": spec.name,
        "op": spec.op,
        "device": device,
        "dtypes": dtypes,
        "examples": state["count"],
        "compile_seconds": compile_s,
        "run_seconds": round(time.perf_counter() - started, 3),
        "stats": {dt: {"examples": s.examples, "triton_examples": s.triton_examples, "worst": s.worst}
                  for dt, s in stats.items()},
        "failure": state["failure"],
        "flaky": state.get("flaky"),
        "integrity": checks,
        "notes": ["strided (non-contiguous) inputs go to the reference, PyTorch and Triton as "
                  "views; MAX graph inputs are dense, so kt makes them contiguous for the Mojo op"],
    }
