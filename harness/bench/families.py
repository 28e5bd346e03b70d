"""A kernel's benchmark file, `benchmarks/<kernel>.toml`: its named shape families and what
`kt microbench` and `benchmarks/gpu_run.sh` need besides.

    kernel = "rope"                 # must name the spec the file belongs to
    baseline = "torch_cudnn"        # optional: the default --baseline on a GPU
    time_limit_s = 85               # gpu_run.sh's limit for timing every GPU family
    warm = ["torch_compile"]        # providers gpu_run.sh compiles ahead, besides kt_graph,
                                    #   kt_bridge and triton (one job each)
    warm_split = { max_flash = ["Hk", "causal"] }   # one job per distinct value of these
                                    #   axes/params (one compile each, run in parallel)
    [families.NAME]                 # doc, device (gpu|cpu), dtype, bound (compute|memory),
                                    #   x (plotted axis), params, sweep, shapes (free axes),
                                    #   providers (optional: only these run on it)

Each family lists `shapes` (free axes) and `params` (defaults for every shape); `sweep` maps a
param to several values and multiplies the shapes by them. `providers` keeps a family to a few
providers, for cases that exist to compare those (plain RoPE, which FlashInfer's fused RoPE
computes, beside the Llama 3 families every provider runs).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from harness.bench import MicrobenchError
from harness.bench.providers import KT_COMPILED, providers_of
from harness.spec import KernelSpec, Params, Shape, canonical_dtype

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
TOP_KEYS = {"kernel", "baseline", "time_limit_s", "warm", "warm_split", "families"}
DEFAULT_TIME_LIMIT_S = 85.0


@dataclass
class Family:
    """Named benchmark shapes of one kernel: cases are (full shape, full params)."""

    name: str
    doc: str
    device: str  # "gpu" or "cpu": where it is run by default
    dtype: str
    bound: str  # "compute" or "memory": which peak "% of peak" refers to
    x: str  # the axis plotted on the x axis (sequence length)
    cases: list[tuple[Shape, Params]]
    providers: tuple[str, ...] = ()  # empty: every provider

    def runs(self, names: list[str]) -> list[str]:
        """The providers of `names` that run on this family, in `names`' order."""
        return [n for n in names if not self.providers or n in self.providers]


@dataclass
class BenchFile:
    """What `benchmarks/<kernel>.toml` says (see the module docstring)."""

    kernel: str
    families: dict[str, Family]
    baseline: str | None = None
    time_limit_s: float = DEFAULT_TIME_LIMIT_S
    warm: tuple[str, ...] = ()
    warm_split: dict[str, tuple[str, ...]] = field(default_factory=dict)


def family_file(kernel: str) -> Path:
    return BENCH_DIR / f"{kernel}.toml"


def validate_bench_shape(spec: KernelSpec, shape: dict, params: dict) -> str | None:
    """`spec.validate` without the axes' upper bounds, which bound what Hypothesis draws in
    `kt verify`, not what the kernel accepts: benchmark shapes are far larger. Names, steps,
    `choices`, lower bounds, derived axes, params and the spec's constraint still apply."""
    axes = tuple(a if a.choices or a.name not in shape or not isinstance(shape[a.name], int)
                 else dataclasses.replace(a, hi=max(a.hi, shape[a.name])) for a in spec.axes)
    return dataclasses.replace(spec, axes=axes).validate(shape, params)


def _family(spec: KernelSpec, name: str, f: dict, where: str) -> Family:
    try:
        dtype = canonical_dtype(f.get("dtype", "bfloat16"))
    except ValueError as e:
        raise MicrobenchError(f"{where}: {e}") from None
    if f.get("bound") not in ("compute", "memory"):
        raise MicrobenchError(f"{where}: bound must be 'compute' or 'memory'")
    if f.get("device", "gpu") not in ("cpu", "gpu"):
        raise MicrobenchError(f"{where}: device must be 'cpu' or 'gpu'")
    sweep = f.get("sweep", {})
    cases = []
    for free in f.get("shapes", []):
        for values in itertools.product(*sweep.values()):
            params = {**f.get("params", {}), **dict(zip(sweep, values))}
            problem = validate_bench_shape(spec, free, params)
            if problem:
                raise MicrobenchError(f"{where}: shape {free}: {problem}")
            full = spec.complete({a.name: free[a.name] for a in spec.axes})
            cases.append((full, spec.full_params(params)))
    if not cases:
        raise MicrobenchError(f"{where}: no shapes")
    x = f.get("x", spec.axes[0].name)
    if x not in cases[0][0]:
        raise MicrobenchError(f"{where}: x = {x!r} is not an axis of {spec.name}")
    providers = f.get("providers", [])
    if not isinstance(providers, list) or not all(isinstance(p, str) for p in providers):
        raise MicrobenchError(f"{where}: providers must be a list of provider names")
    return Family(name, f.get("doc", ""), f.get("device", "gpu"), dtype, f["bound"], x, cases,
                  tuple(providers))


def load_bench_file(spec: KernelSpec, path: Path | None = None) -> BenchFile:
    """`benchmarks/<kernel>.toml` (or `path`), checked against `spec`; MicrobenchError says
    what is wrong with it in one line."""
    path = path or family_file(spec.name)
    if not path.exists():
        raise MicrobenchError(f"no shape families for {spec.name}: {path} does not exist")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise MicrobenchError(f"{path}: {e}") from None
    unknown = sorted(set(doc) - TOP_KEYS)
    if unknown:
        raise MicrobenchError(f"{path.name}: unknown keys {', '.join(unknown)} "
                              f"(known: {', '.join(sorted(TOP_KEYS))})")
    if doc.get("kernel", spec.name) != spec.name:
        raise MicrobenchError(f"{path.name}: kernel = {doc['kernel']!r}, but the file belongs "
                              f"to {spec.name!r}")
    families = {name: _family(spec, name, f, f"{path.name} [families.{name}]")
                for name, f in doc.get("families", {}).items()}
    if not families:
        raise MicrobenchError(f"{path}: no [families.*] tables")
    split = {p: tuple(keys) for p, keys in doc.get("warm_split", {}).items()}
    known = providers_of(spec)
    named = [doc["baseline"]] if "baseline" in doc else []
    named += list(doc.get("warm", [])) + list(split)
    named += [p for f in families.values() for p in f.providers]
    bad = [p for p in named if p not in known]
    if bad:
        raise MicrobenchError(f"{path.name}: unknown provider {', '.join(bad)} "
                              f"(providers: {', '.join(known)})")
    return BenchFile(spec.name, families, doc.get("baseline"),
                     float(doc.get("time_limit_s", DEFAULT_TIME_LIMIT_S)),
                     tuple(doc.get("warm", ())), split)


def load_families(spec: KernelSpec, path: Path | None = None) -> dict[str, Family]:
    """The families of `benchmarks/<kernel>.toml` (or `path`); MicrobenchError on a bad file."""
    return load_bench_file(spec, path).families


def select_families(spec: KernelSpec, families: dict[str, Family], requested: list[str],
                    device_kind: str) -> list[Family]:
    """The families named in `requested` (repeatable, comma-separated), or every family of
    `device_kind` when none is named."""
    names = [n for item in requested for n in item.split(",") if n]
    if not names:
        chosen = [f for f in families.values() if f.device == device_kind]
        if not chosen:
            raise MicrobenchError(f"{spec.name} has no {device_kind} family "
                                  f"(families: {', '.join(families)})")
        return chosen
    unknown = [n for n in names if n not in families]
    if unknown:
        raise MicrobenchError(f"unknown shape family {', '.join(unknown)} for {spec.name} "
                              f"(families: {', '.join(families)})")
    return [families[n] for n in names]


def with_providers(families: list[Family], names: list[str]) -> list[Family]:
    """The families on which at least one of the providers `names` runs (`Family.providers`)."""
    return [f for f in families if f.runs(names)]


def cases_where(family: Family, conditions: list[str]) -> Family:
    """`family` with only the cases whose param or axis `name` is `value` for every
    "name=value" of `conditions`."""
    pairs = [c.split("=", 1) for c in conditions]
    if any(len(p) != 2 for p in pairs):
        raise MicrobenchError(f"--where takes name=value, not {conditions}")

    def value(case, name):
        shape, params = case
        return params[name] if name in params else shape.get(name)

    cases = [c for c in family.cases if all(str(value(c, k)) == v for k, v in pairs)]
    return dataclasses.replace(family, cases=cases)


def warm_jobs(spec: KernelSpec, bench: BenchFile, device_kind: str) -> list[list[str]]:
    """The jobs benchmarks/gpu_run.sh runs in parallel before timing, to fill the compile
    caches: [provider, "--where", "name=value", ...] for kt's compiled providers and the
    file's `warm` ones, split by `warm_split` into one job per distinct value among the
    device's families."""
    jobs: list[list[str]] = []
    cases = [c for f in bench.families.values() if f.device == device_kind for c in f.cases]
    for provider in dict.fromkeys(KT_COMPILED + bench.warm + tuple(bench.warm_split)):
        keys = bench.warm_split.get(provider, ())
        if not keys:
            jobs.append([provider])
            continue
        combos = dict.fromkeys(tuple(c[1][k] if k in c[1] else c[0][k] for k in keys)
                               for c in cases)
        for combo in combos:
            where = [arg for k, v in zip(keys, combo) for arg in ("--where", f"{k}={v}")]
            jobs.append([provider, *where])
    return jobs
