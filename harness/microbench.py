"""`kt microbench`: every way to compute one kernel's op, checked, then timed, on named shapes.

Shapes come in *families* from `benchmarks/<kernel>.toml` (one realistic dtype each, bf16 on
GPUs). Per (family, shape) every *provider* gets the same inputs; its output is checked against
the spec's reference (evaluated in `checking.reference_dtype`, on the device) with
`harness.checking.compare`, the k x PyTorch-in-the-same-dtype rule; a provider that fails is
reported WRONG and never timed. The others are timed by `harness.timing.bench` (the one
timing function) and reported as p10/p50/p90 ms, TFLOP/s and GB/s from the spec's `flops` and
`bytes` formulas, % of the device's datasheet peak (tensor TFLOP/s for compute-bound
families, HBM bandwidth for memory-bound ones) and speedup against a baseline provider.

Providers every kernel has: `kt_graph` (the Mojo op in a MAX graph with symbolic dims, run on
device buffers: no host copies in the timed call), `kt_bridge` (the same op called with torch
tensors through `max.experimental.torch.graph_op`; its overhead over `kt_graph` is reported),
`triton` (the spec's Triton twin; on the CPU it runs in Triton's interpreter). A spec adds
its own in `SPEC.providers`: name -> `prepare(device, dtype)` returning `bind(inputs, params)`,
which returns a `Bound` (or a zero-argument callable giving the outputs). `prepare` or `bind`
raises `Unavailable` for a provider that cannot run there (a row "n/a", never a crash).

MAX runs its work on its own stream; MAX providers are timed with torch events recorded on
that stream (`Bound.stream`, made torch's current stream, so `timing`'s flush and spin land
there too). Each is cross-checked once with the host clock: the events must see at least
half of the time the device stays busy after a call returns (`_tail_ms`, a lower bound of
its GPU time that leaves the host's enqueue time out, so a host-bound op whose hidden-launch
GPU time is far below its wall time passes); else the events were on a stream the work did
not run on, and the row is timed host-synchronized instead, said in its note. A call whose
work is all done before it returns cannot be checked this way; such a miss shows as a
throughput above the datasheet peak, which the row's note flags. GPU timing uses CUDA
events; ROCm (torch's HIP build keeps the `cuda` event API) and Apple Metal (`torch.mps`
events) take the same path through `timing`'s backend table, but no kt machine has one, so
those numbers are labelled untested. On the CPU the timer is `perf_counter`, labelled as
such: CPU numbers are not comparable with GPU numbers.

A provider may be a *yardstick* (`Bound.yardstick` says what it computes): a different
computation timed beside the op as a reference point, such as attention without RoPE for
the fused op. Its output is not the op's, so it skips the correctness gate; its row says
`"yardstick": true` and "not checked", and it is never the baseline of speedups. `summary`
states the issue's targets as ratios against it.

`compare_records` matches rows by (kernel, provider, shape, params, dtype, device name) and
flags a regression when new p50 > old p50 x (1 + max(2 x combined relative noise, 5%)),
relative noise being (p90 - p10) / p50 and the two runs' noises combined in quadrature.
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from harness.spec import DTYPES, KernelSpec, Params, Shape, Tensors, canonical_dtype

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "benchmarks"
KT_PROVIDERS = ("kt_graph", "kt_bridge")
CPU_TIMER_LABEL = "CPU timing (perf_counter), not comparable with GPU"
UNTESTED_BACKENDS = ("rocm", "metal")
# Outputs are compared on at most this many elements (an even stride through each tensor).
CHECK_ELEMENTS = 1 << 19
REGRESSION_FLOOR = 0.05


class Unavailable(Exception):
    """This provider cannot run here (device, dtype, shape); str() says why."""


class MicrobenchError(Exception):
    """A user-facing problem (unknown family, provider, bad family file); one line."""


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


# --- shape families --------------------------------------------------------------------

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


def family_file(kernel: str) -> Path:
    return BENCH_DIR / f"{kernel}.toml"


def validate_bench_shape(spec: KernelSpec, shape: dict, params: dict) -> str | None:
    """`spec.validate` without the axes' upper bounds, which bound what Hypothesis draws in
    `kt verify`, not what the kernel accepts: benchmark shapes are far larger. Names, steps,
    `choices`, lower bounds, derived axes, params and the spec's constraint still apply."""
    import dataclasses

    axes = tuple(a if a.choices or a.name not in shape or not isinstance(shape[a.name], int)
                 else dataclasses.replace(a, hi=max(a.hi, shape[a.name])) for a in spec.axes)
    return dataclasses.replace(spec, axes=axes).validate(shape, params)


def load_families(spec: KernelSpec, path: Path | None = None) -> dict[str, Family]:
    """The families of `benchmarks/<kernel>.toml`; MicrobenchError on a bad file. Each family
    lists `shapes` (free axes) and `params` (defaults for every shape); `sweep` maps a param
    to several values and multiplies the shapes by them."""
    path = path or family_file(spec.name)
    if not path.exists():
        raise MicrobenchError(f"no shape families for {spec.name}: {path} does not exist")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise MicrobenchError(f"{path}: {e}") from None
    families = {}
    for name, f in doc.get("families", {}).items():
        where = f"{path.name} [families.{name}]"
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
        families[name] = Family(name, f.get("doc", ""), f.get("device", "gpu"), dtype,
                                f["bound"], x, cases)
    if not families:
        raise MicrobenchError(f"{path}: no [families.*] tables")
    return families


def default_baseline(spec: KernelSpec, path: Path | None = None) -> str | None:
    """The file's `baseline` provider (used on GPUs), if it names one."""
    path = path or family_file(spec.name)
    return tomllib.loads(path.read_text()).get("baseline") if path.exists() else None


# --- providers every kernel has ----------------------------------------------------------

def _buffers_to_torch(buffers, device: str) -> tuple[torch.Tensor, ...]:
    from max import driver

    out = []
    for b in buffers:
        try:
            out.append(torch.from_dlpack(b))
        except Exception:  # a MAX build without device DLPack export: copy through the host
            out.append(torch.from_dlpack(b.to(driver.CPU())).to(device))
    return tuple(out)


def max_model_bound(model, max_device, args: list, keep: list, device: str,
                    to_torch: Callable[[Any], tuple[torch.Tensor, ...]] | None = None) -> Bound:
    """A compiled MAX model bound to its argument buffers, as the stock-MAX providers run
    it: the timed call is `model.execute(*args)` on `max_device`'s stream, `keep` holds the
    torch tensors the buffers alias, and the results come back through DLPack (then
    `to_torch`, when given, reshapes them)."""

    def run():
        return model.execute(*args)

    run.keep_alive = keep
    stream = None if device == "cpu" else int(max_device.default_queue.native_stream_handle)
    return Bound(run, to_torch or (lambda bufs: _buffers_to_torch(bufs, device)), stream,
                 max_device.synchronize)


def kt_graph(spec: KernelSpec, device: str, dtype: torch.dtype, package):
    """The Mojo op in a MAX graph with symbolic dims (one compile per dtype), run on device
    buffers: the timed call is `model.execute`, nothing else."""
    from harness.build import compile_op

    op = compile_op(spec, dtype, "cpu" if device == "cpu" else "gpu", package)

    def bind(inputs: Tensors, params: Params) -> Bound:
        run = op.bind(inputs, params)
        return Bound(run, lambda bufs: _buffers_to_torch(bufs, device), op.stream_handle(),
                     op.synchronize, f"compiled in {op.compile_seconds:.1f} s")

    return bind


_BRIDGE_OPS = itertools.count()


def kt_bridge(spec: KernelSpec, device: str, dtype: torch.dtype, package):
    """The Mojo op called with torch tensors through MAX's torch bridge
    (`max.experimental.torch.graph_op`), with symbolic dims so it compiles once (at the
    first call, absorbed by the correctness check): what a PyTorch user of the kernel runs."""
    from max import driver
    from max.dtype import DType
    from max.experimental.torch import graph_op
    from max.graph import DeviceRef, KernelLibrary, TensorType, ops

    from harness.build import max_dtype, precompiled_package, resolve_package

    lib = KernelLibrary()
    lib.load_paths([precompiled_package(resolve_package(package))])
    dev = DeviceRef.CPU() if device == "cpu" else DeviceRef.GPU(0)
    cpu = DeviceRef.CPU()
    scalars = spec.kernel_params()
    in_types = [TensorType(max_dtype(t.torch_dtype(dtype)), list(t.dims), device=dev)
                for t in spec.inputs]
    in_types += [TensorType(DType.int32 if p.dtype == "int32" else DType.float32, [], device=cpu)
                 for p in scalars]
    out_types = [TensorType(max_dtype(t.torch_dtype(dtype)), list(t.dims), device=dev)
                 for t in spec.outputs]

    def graph_fn(*values):
        outs = ops.custom(spec.op, device=dev, values=list(values), out_types=out_types)
        return [o.tensor for o in outs]

    # torch derives the op's schema from the signature: one named tensor per input
    graph_fn.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
         for n in [t.name for t in spec.inputs] + [p.name for p in scalars]])
    name = f"kt_{spec.name}_{str(dtype).removeprefix('torch.')}_{device}_{next(_BRIDGE_OPS)}"
    op = graph_op(graph_fn, name=name, kernel_library=lib, input_types=in_types,
                  output_types=out_types)
    max_device = driver.CPU() if device == "cpu" else driver.Accelerator(0)
    stream = None if device == "cpu" else int(max_device.default_queue.native_stream_handle)

    def bind(inputs: Tensors, params: Params) -> Bound:
        sizes = {}
        for t in spec.inputs:
            sizes.update(zip(t.dims, inputs[t.name].shape))
        args = [inputs[t.name].contiguous() for t in spec.inputs]
        args += [torch.tensor(params[p.name], dtype=torch.int32 if p.dtype == "int32"
                              else torch.float32) for p in scalars]
        shapes = [(tuple(sizes[d] for d in t.dims), t.torch_dtype(dtype)) for t in spec.outputs]

        def run():
            outs = [torch.empty(s, dtype=dt, device=device) for s, dt in shapes]
            op(*outs, *args)
            return outs

        return Bound(run, stream=stream, sync=max_device.synchronize)

    return bind


def triton_twin(spec: KernelSpec, device: str, dtype: torch.dtype, package):
    """The spec's Triton twin (in Triton's interpreter on the CPU: TRITON_INTERPRET=1)."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device != "cpu" and interpreted:
        raise Unavailable("TRITON_INTERPRET=1 is set: the twin would not run on the GPU")
    if device == "cpu" and not interpreted:
        raise Unavailable("n/a on cpu without TRITON_INTERPRET=1 (set before triton is imported)")

    def bind(inputs: Tensors, params: Params) -> Bound:
        return Bound(lambda: spec.triton(inputs, params),
                     note="Triton interpreter" if device == "cpu" else "")

    return bind


GENERIC = {"kt_graph": kt_graph, "kt_bridge": kt_bridge, "triton": triton_twin}


def providers_of(spec: KernelSpec) -> dict[str, Callable]:
    """Every provider of `spec`: the generic ones, then the spec's own."""
    out: dict[str, Callable] = {name: (lambda device, dtype, package, f=f: f(spec, device, dtype,
                                                                               package))
                                for name, f in GENERIC.items()}
    for name, prep in spec.providers.items():
        out[name] = lambda device, dtype, package, prep=prep: prep(device, dtype)
    return out


# --- checking --------------------------------------------------------------------------

def _thin(x: torch.Tensor, n: int) -> torch.Tensor:
    flat = x.reshape(-1)
    step = max(1, math.ceil(flat.numel() / n))
    return flat[::step]


class Gate:
    """The reference outputs of one (shape, params, inputs), computed once, against which
    every provider is checked. Computed on the inputs' device in `reference_dtype`; a spec
    module may define `bench_views(shape)` (a list of {tensor name: index}) to check only
    slices of huge outputs (attention's O(S^2) reference does not fit at S = 16k)."""

    def __init__(self, spec: KernelSpec, shape: Shape, params: Params, inputs: Tensors):
        from harness.checking import reference_dtype

        self.spec, self.params = spec, params
        self.shapes = [t.concrete_shape(shape) for t in spec.outputs]
        io = next(inputs[t.name].dtype for t in spec.inputs if t.dtype == "io")
        views = _bench_views(spec, shape)
        self.views = views
        ref_dt = reference_dtype(io)
        self.ref: list[list[torch.Tensor]] = [[] for _ in spec.outputs]
        self.base: list[list[torch.Tensor]] = [[] for _ in spec.outputs]
        per_view = CHECK_ELEMENTS // max(1, len(views or [None]))
        for view in views or [None]:
            sub = {k: (v if view is None else v[view[k]]) for k, v in inputs.items()}
            up = {k: v.to(ref_dt) if v.is_floating_point() else v for k, v in sub.items()}
            with torch.no_grad():
                ref = spec.reference(up, params)
                base = spec.reference(sub, params)
            for i in range(len(spec.outputs)):
                self.ref[i].append(_thin(ref[i], per_view).cpu())
                self.base[i].append(_thin(base[i], per_view).cpu())
            del ref, base, up
        self.per_view = per_view

    def check(self, outputs: tuple[torch.Tensor, ...]) -> list:
        """One `harness.checking.Check` per output (compared where the reference was)."""
        from harness.checking import compare

        checks = []
        for i, t in enumerate(self.spec.outputs):
            out = outputs[i]
            ref, base = torch.cat(self.ref[i]), torch.cat(self.base[i])
            if tuple(out.shape) != self.shapes[i]:
                checks.append(compare(t.name, out.reshape(-1)[:1], ref, base))
                continue
            pieces = [out] if self.views is None else [out[v[t.name]] for v in self.views]
            got = torch.cat([_thin(p, self.per_view).cpu() for p in pieces])
            checks.append(compare(t.name, got, ref, base, k=self.spec.tolerance_k))
        return checks


def _bench_views(spec: KernelSpec, shape: Shape):
    module = sys.modules.get(spec.module) if spec.module else None
    fn = getattr(module, "bench_views", None)
    return fn(shape) if fn else None


# --- the run ---------------------------------------------------------------------------

@dataclass
class Settings:
    warmup_ms: float = 25.0
    min_reps: int = 10
    max_reps: int = 200
    rse_target: float = 0.01
    budget_s: float = 0.4
    seed: int = 0


def cpu_settings() -> Settings:
    return Settings(warmup_ms=10.0, min_reps=5, max_reps=50, rse_target=0.02, budget_s=0.25)


def timer_label(backend: str) -> str:
    if backend == "cpu":
        return CPU_TIMER_LABEL
    label = {"cuda": "CUDA events", "rocm": "HIP events (torch.cuda API)",
             "metal": "Metal events (torch.mps), launch overhead included: Metal has no spin "
                      "kernel to hide it behind"}[backend]
    if backend in UNTESTED_BACKENDS:
        label += ": this backend was never measured on kt's machines; treat with care"
    return label


def shape_key(shape: Shape, params: Params) -> str:
    return json.dumps({"shape": shape, "params": params}, sort_keys=True, separators=(",", ":"))


def shape_label(spec: KernelSpec, shape: Shape, params: Params, varying: set[str]) -> str:
    """Free axes, then the params that vary within the family."""
    parts = [f"{a.name}={shape[a.name]}" for a in spec.axes]
    parts += [f"{k}={params[k]}" for k in sorted(varying)]
    return " ".join(parts)


def _stream_ctx(bound: Bound, device: str):
    import contextlib

    if bound.stream is None or not device.startswith("cuda"):
        return contextlib.nullcontext()
    return torch.cuda.stream(torch.cuda.ExternalStream(bound.stream))


def _tail_ms(bound: Bound, calls: int = 5) -> float:
    """A lower bound of the GPU time per call, from the host clock alone: how long a device
    synchronize takes after `run()` returns, less what it takes on an idle device (median of
    `calls`). Whatever stream the work went to, the device was still busy with it that long;
    the host's enqueue time is not in it, so a host-bound op does not inflate it."""
    bound.sync()
    idle = []
    for _ in range(3):
        t0 = time.perf_counter()
        bound.sync()
        idle.append(time.perf_counter() - t0)
    tails = []
    for _ in range(calls):
        bound.run()
        t0 = time.perf_counter()
        bound.sync()
        tails.append(time.perf_counter() - t0 - min(idle))
    return max(0.0, sorted(tails)[len(tails) // 2] * 1e3)


def events_missed_work(event_p50_ms: float, tail_ms: float) -> bool:
    """Whether events recorded around a call saw less than half of `tail_ms`, a lower bound
    of its GPU time (`_tail_ms`), beyond 10 us of host-clock jitter: then they were recorded
    on a stream the work did not run on."""
    return event_p50_ms < 0.5 * tail_ms - 0.01


def _peak(device_name: str, dtype: torch.dtype, bound: str) -> tuple[float | None, str]:
    from harness.devices import peak_for

    peak = peak_for(device_name)
    if peak is None:
        return None, ""
    if bound == "memory":
        return peak.tb_per_s * 1e3, "GB/s (HBM)"
    if dtype == torch.float32:
        return peak.tflops_fp32, "TFLOP/s (fp32)"
    return peak.tflops_bf16, "TFLOP/s (dense tensor, bf16)"


def run(spec: KernelSpec, device: str, families: list[Family], provider_names: list[str],
        package=None, settings: Settings | None = None, baseline: str | None = None,
        command: str = "", on_event: Callable[[dict], None] = lambda ev: None,
        check: bool = True, time_it: bool = True) -> dict:
    """Check and time every provider on every case of `families` on `device` ('cpu' or
    'gpu'); returns the JSON-ready record. Ctrl-C stops early and returns what was measured
    (`record['interrupted']`). `check=False, time_it=False` only compiles and runs each
    provider once per case (warming MAX's, Triton's and Inductor's caches)."""
    from harness import devices as devs
    from harness.io import provenance
    from harness.timing import NotCorrect, backend_of, bench

    targets = devs.select(device)
    dev = targets[-1]
    tdev = dev.torch_device
    backend = backend_of(tdev) if dev.kind == "gpu" else "cpu"
    settings = settings or (cpu_settings() if dev.kind == "cpu" else Settings())
    prov = provenance(targets)
    gpu = prov.get("gpu") or {}
    all_providers = providers_of(spec)
    prepared: dict[tuple[str, str], Any] = {}
    rows: list[dict] = []
    record = {
        "kernel": spec.name, "device": dev.name, "device_kind": dev.kind, "backend": backend,
        "timer": timer_label(backend), "command": command, "provenance": prov,
        "settings": settings.__dict__, "families": {f.name: {"doc": f.doc, "dtype": f.dtype,
                                                            "bound": f.bound, "x": f.x}
                                                   for f in families},
        "rows": rows, "interrupted": False, "complete": False,
    }
    common = {"kernel": spec.name, "device": dev.name, "backend": backend,
              "driver": gpu.get("driver"), "cuda": gpu.get("cuda"), "hip": gpu.get("hip"),
              "versions": prov["versions"], "git_sha": prov["git_sha"], "command": command,
              "metric": "time", "unit": "ms"}
    case_rows: list[dict] = []
    try:
        for fam in families:
            dtype = DTYPES[fam.dtype]
            varying = {k for k in fam.cases[0][1]
                       if len({json.dumps(c[1][k]) for c in fam.cases}) > 1}
            for shape, params in fam.cases:
                label = shape_label(spec, shape, params, varying)
                gen = torch.Generator(device=tdev).manual_seed(settings.seed)
                inputs = spec.make_inputs(shape, params, dtype, torch.device(tdev), gen)
                gate = None
                if check:
                    on_event({"event": "reference", "family": fam.name, "shape": label})
                    t0 = time.perf_counter()
                    gate = Gate(spec, shape, params, inputs)
                    on_event({"event": "reference_done", "family": fam.name, "shape": label,
                              "seconds": time.perf_counter() - t0})
                case_rows = []
                for pname in provider_names:
                    on_event({"event": "provider", "family": fam.name, "shape": label,
                              "provider": pname})
                    row = {**common, "provider": pname, "family": fam.name, "shape": shape,
                           "params": params, "label": label, "dtype": fam.dtype,
                           "flops": spec.flops(shape, params),
                           "bytes": spec.bytes(shape, params, dtype), "bound": fam.bound}
                    row.update(_measure(spec, all_providers[pname], pname, prepared, tdev,
                                        dtype, package, inputs, params, gate, settings,
                                        bench, NotCorrect, time_it))
                    case_rows.append(row)
                    rows.append(row)
                    if time_it:
                        on_event({"event": "row", "row": row})
                _derive(case_rows, spec, dev.name, dtype, fam.bound, baseline,
                        dev.kind == "gpu")
                on_event({"event": "case", "record": record})
                del inputs, gate
                if tdev.startswith("cuda"):
                    torch.cuda.empty_cache()
        record["complete"] = True
    except KeyboardInterrupt:
        record["interrupted"] = True
        if case_rows and "tflops" not in case_rows[-1]:  # the case Ctrl-C cut short
            _derive(case_rows, spec, dev.name, dtype, fam.bound, baseline, dev.kind == "gpu")
    return record


def _measure(spec, provider, pname, prepared, tdev, dtype, package, inputs, params, gate,
             settings, bench, NotCorrect, time_it) -> dict:
    """One provider on one case: prepare (once per dtype), bind, check, time."""
    key = (pname, str(dtype))
    first: dict[str, Any] = {}  # the seconds prepare took, in the row that paid them
    try:
        if key not in prepared:
            t0 = time.perf_counter()
            try:
                prepared[key] = provider("cpu" if tdev == "cpu" else tdev, dtype, package)
            except Unavailable as e:
                prepared[key] = e
            except Exception as e:  # a compile error is this provider's row, not the run's end
                prepared[key] = RuntimeError(_one_line(e))
            first["prepare_s"] = round(time.perf_counter() - t0, 3)
        bind = prepared[key]
        if isinstance(bind, Unavailable):
            return {"status": "n/a", "note": str(bind), **first}
        if isinstance(bind, Exception):
            return {"status": "error", "note": str(bind), **first}
        t0 = time.perf_counter()
        bound = bind(inputs, params)
        bind_s = time.perf_counter() - t0
        if not isinstance(bound, Bound):
            bound = Bound(bound)
    except Unavailable as e:
        return {"status": "n/a", "note": str(e), **first}
    except Exception as e:
        return {"status": "error", "note": _one_line(e), **first}

    out: dict[str, Any] = {"note": bound.note, **first, "bind_s": round(bind_s, 3)}
    checks: list = []
    if bound.yardstick:
        out["yardstick"] = True
        out["note"] = _join(f"yardstick: {bound.yardstick}; not the op, not checked", out["note"])
        gate = None

    def check() -> bool:
        t0 = time.perf_counter()
        result = bound.run()  # on the stream bench runs under; synchronized before reading
        if bound.sync:
            bound.sync()
        elif tdev.startswith("cuda"):
            torch.cuda.synchronize()
        outputs = bound.to_torch(result)
        out["first_call_s"] = round(time.perf_counter() - t0, 3)
        if gate is None:
            return True
        checks.extend(gate.check(outputs))
        return all(c.passed for c in checks)

    def timed(fn, stream_bound, hide_launch=True):
        with _stream_ctx(stream_bound, tdev):
            return bench(fn, device=tdev, check=None if "first_call_s" in out else check,
                         warmup_ms=settings.warmup_ms, min_reps=settings.min_reps,
                         max_reps=settings.max_reps, rse_target=settings.rse_target,
                         budget_s=settings.budget_s, hide_launch=hide_launch)

    def synced():
        bound.run()
        bound.sync()

    # Host-synchronized timing, the fallback when events cannot see MAX's stream: events on
    # torch's stream around a call that waits for the device; a spin there would run beside
    # MAX's work, not before it, so the launch is not hidden.
    def timed_synced():
        return timed(synced, Bound(bound.run), hide_launch=False)

    try:
        if not time_it:
            check()
            out["status"] = "ok" if all(c.passed for c in checks) else "WRONG"
            return out
        t0 = time.perf_counter()
        try:
            t = timed(bound.run, bound)
        except NotCorrect:
            raise
        except Exception as e:
            if bound.stream is None or bound.sync is None:
                raise
            # events on MAX's stream failed: time host-synchronized calls instead
            t = timed_synced()
            out["note"] = _join(out["note"], f"host-synced timing ({_one_line(e)})")
        else:
            if bound.stream is not None and bound.sync is not None:
                # events on MAX's stream must see at least the GPU time the host clock
                # proves (spin-hidden events of a host-bound op are far below its wall time)
                tail = _tail_ms(bound)
                if events_missed_work(t.p50, tail):
                    t = timed_synced()
                    out["note"] = _join(out["note"], f"events missed MAX's stream (GPU busy "
                                                     f">= {tail:.3f} ms after each call "
                                                     "returned): host-synced timing")
        out["bench_s"] = round(time.perf_counter() - t0, 3)
    except NotCorrect:
        out["status"] = "WRONG"
    except Exception as e:
        out["status"] = "error"
        out["note"] = _join(out["note"], _one_line(e))
        return out
    else:
        out["status"] = "ok"
        out.update({"p10": t.p10, "p50": t.p50, "p90": t.p90, "mean": t.mean, "n": len(t.samples_ms),
                    "stopped_by": t.stopped_by, "samples_ms": [round(s, 6) for s in t.samples_ms],
                    "host_ms": t.host_ms, "launch_hidden": t.hidden,
                    "launch_cover_ms": round(t.cover_ms, 4), "uncovered": t.uncovered})
        if t.launch_note and "host-synced" not in out["note"]:
            out["note"] = _join(out["note"], t.launch_note)
        if t.uncovered > len(t.samples_ms) // 10:
            out["note"] = _join(out["note"], f"{t.uncovered}/{len(t.samples_ms)} calls enqueued "
                                             "for longer than the spin covered: GPU idle time "
                                             "timed")
    if checks:
        worst = max(checks, key=lambda c: c.max_abs_err / c.tolerance if c.tolerance else math.inf)
        out["check"] = {"passed": all(c.passed for c in checks), "max_abs_err": worst.max_abs_err,
                        "tolerance": worst.tolerance, "n_bad": sum(c.n_bad for c in checks),
                        "numel": sum(c.numel for c in checks), "output": worst.name}
        if out["status"] == "WRONG":
            out["note"] = _join(out["note"], f"{worst.name}: max err {worst.max_abs_err:.3g} > "
                                             f"tolerance {worst.tolerance:.3g} "
                                             f"({worst.n_bad}/{worst.numel} elements)")
    return out


def _derive(rows: list[dict], spec: KernelSpec, device_name: str, dtype: torch.dtype,
            bound: str, baseline: str | None, gpu: bool) -> None:
    """Throughput, % of peak, speedup vs the baseline and the bridge's overhead, per case.
    The baseline is `baseline` if it was timed, else the fastest provider that is neither
    kt's nor a yardstick; a yardstick is never the baseline, even when asked for."""
    peak, peak_unit = _peak(device_name, dtype, bound) if gpu else (None, "")
    ok = {r["provider"]: r for r in rows if r["status"] == "ok" and "p50" in r}
    base = ok.get(baseline) if baseline else None
    if base is not None and base.get("yardstick"):
        base = None
    if base is None:
        others = [r for r in ok.values()
                  if r["provider"] not in KT_PROVIDERS and not r.get("yardstick")]
        base = min(others, key=lambda r: r["p50"]) if others else None
    for r in ok.values():
        sec = r["p50"] * 1e-3
        r["tflops"] = r["flops"] / sec / 1e12
        r["gb_s"] = r["bytes"] / sec / 1e9
        if peak:
            achieved = r["gb_s"] if bound == "memory" else r["tflops"]
            r["pct_peak"] = 100.0 * achieved / peak
            r["peak"] = f"{peak:g} {peak_unit}"
            if r["pct_peak"] > 105.0:  # no kernel beats the datasheet: the timing missed work
                r["note"] = _join(r.get("note", ""), "above the datasheet peak: suspect timing")
        if base is not None:
            r["baseline"] = base["provider"]
            r["speedup"] = base["p50"] / r["p50"]
    if "kt_bridge" in ok and "kt_graph" in ok:  # the same op: the bridge's cost, on each side
        bridge, graph = ok["kt_bridge"], ok["kt_graph"]
        bridge["bridge_overhead_ms"] = bridge["p50"] - graph["p50"]
        bridge["bridge_host_overhead_ms"] = bridge["host_ms"] - graph["host_ms"]


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def _join(a: str, b: str) -> str:
    return "; ".join(x for x in (a, b) if x)


# --- comparing two runs ----------------------------------------------------------------

def _row_key(r: dict) -> tuple:
    return (r["kernel"], r["provider"], shape_key(r["shape"], r["params"]), r["dtype"], r["device"])


def noise(r: dict) -> float:
    """Relative spread (p90 - p10) / p50 of one measurement."""
    return (r["p90"] - r["p10"]) / r["p50"] if r["p50"] > 0 else math.inf


def regression_threshold(old: dict, new: dict) -> float:
    """The relative slow-down beyond which `new` is a regression of `old`."""
    combined = math.hypot(noise(old), noise(new))
    return max(2.0 * combined, REGRESSION_FLOOR)


def compare_records(new_rows: list[dict], old_rows: list[dict]) -> dict:
    """Match rows and flag regressions; rows on one side only are listed, not failures."""
    old = {_row_key(r): r for r in old_rows}
    new = {_row_key(r): r for r in new_rows}
    matched, not_comparable = [], []
    for key, n in new.items():
        o = old.get(key)
        if o is None:
            continue
        if n.get("status") != "ok" or o.get("status") != "ok":
            not_comparable.append({"key": key, "old": o.get("status"), "new": n.get("status"),
                                   "label": n.get("label", "")})
            continue
        change = n["p50"] / o["p50"] - 1.0
        thr = regression_threshold(o, n)
        matched.append({"provider": n["provider"], "family": n.get("family"),
                        "label": n.get("label", ""), "old_p50": o["p50"], "new_p50": n["p50"],
                        "change": change, "threshold": thr, "regression": change > thr,
                        "improvement": change < -thr})
    return {
        "matched": matched,
        "regressions": [m for m in matched if m["regression"]],
        "only_new": [{"provider": n["provider"], "label": n.get("label", "")}
                     for k, n in new.items() if k not in old],
        "only_old": [{"provider": o["provider"], "label": o.get("label", "")}
                     for k, o in old.items() if k not in new],
        "not_comparable": not_comparable,
    }


def load_rows(path: Path) -> list[dict]:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise MicrobenchError(f"cannot read {path}: {e}") from None
    rows = doc.get("rows") if isinstance(doc, dict) else None
    if not isinstance(rows, list):
        raise MicrobenchError(f"{path} is not a file written by kt microbench --save")
    return rows


# --- output ----------------------------------------------------------------------------

def _fmt(v, spec=".3g") -> str:
    return "-" if v is None else format(v, spec)


def render(record: dict, console) -> None:
    from rich.table import Table

    rows = record["rows"]
    title = f"kt microbench {record['kernel']} on {record['device']} — {record['timer']}"
    table = Table(title=title, header_style="bold", title_justify="left")
    for col in ("family", "shape", "provider", "status", "p50 ms", "p10–p90 ms", "host ms",
                "TFLOP/s", "GB/s", "% peak", "speedup", "note"):
        table.add_column(col, justify="right" if col in ("p50 ms", "host ms", "TFLOP/s", "GB/s",
                                                         "% peak", "speedup") else "left",
                         overflow="fold")
    style = {"ok": "", "WRONG": "red", "error": "red", "n/a": "yellow"}
    last = None
    for r in rows:
        case = (r["family"], r["label"])
        if last is not None and case != last:
            table.add_section()
        first = case != last
        last = case
        status = r["status"]
        note = r.get("note", "")
        if "bridge_overhead_ms" in r:
            host = (f", host {r['bridge_host_overhead_ms'] * 1e3:+.1f} us"
                    if r.get("launch_hidden") else "")
            note = _join(f"bridge overhead {r['bridge_overhead_ms'] * 1e3:+.1f} us{host}", note)
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        if "speedup" in r and r["provider"] == r.get("baseline"):
            sp = "1.00x (base)"
        table.add_row(
            r["family"] if first else "", r["label"] if first else "", r["provider"],
            f"[{style[status]}]{status}" if style[status] else status,
            _fmt(r.get("p50"), ".4f"),
            f"{r['p10']:.4f}–{r['p90']:.4f}" if "p10" in r else "-",
            _fmt(r.get("host_ms"), ".3f"), _fmt(r.get("tflops"), ".3g"), _fmt(r.get("gb_s"), ".4g"),
            _fmt(r.get("pct_peak"), ".1f"), sp, note)
    console.print(table)
    peaks = {r["peak"] for r in rows if "peak" in r}
    if peaks:
        console.print(f"% peak: of the datasheet peak ({'; '.join(sorted(peaks))}) for "
                      f"{record['device']}; compute-bound families use TFLOP/s, memory-bound GB/s.",
                      highlight=False)
    if record["backend"] in ("cuda", "rocm"):
        console.print("p50 ms: GPU time, launches hidden behind a GPU spin (harness/timing.py; "
                      "a row noting 'launch not hidden' includes its host time); host ms: the "
                      "host's time to enqueue one call, paid in full when the GPU is not ahead "
                      "of the host.", highlight=False)
    if record["backend"] == "cpu":
        console.print(f"[bold yellow]{CPU_TIMER_LABEL}.[/] TFLOP/s and GB/s are for "
                      "exercising the pipeline; % of peak is not computed on the CPU.")
    elif record["backend"] in UNTESTED_BACKENDS:
        console.print(f"[bold yellow]{record['timer']}[/]")
    if record.get("interrupted"):
        console.print("[red]interrupted[/]: the table holds what was measured before Ctrl-C")


def render_comparison(cmp: dict, console, path) -> None:
    from rich.table import Table

    table = Table(title=f"against {path}", header_style="bold", title_justify="left")
    for col in ("provider", "shape", "old p50 ms", "new p50 ms", "change", "noise limit",
                "verdict"):
        table.add_column(col, justify="right" if "ms" in col or col in ("change", "noise limit")
                         else "left")
    for m in cmp["matched"]:
        verdict = ("[red]REGRESSION" if m["regression"] else
                   "[green]faster" if m["improvement"] else "same (within noise)")
        table.add_row(m["provider"], m["label"], f"{m['old_p50']:.4f}", f"{m['new_p50']:.4f}",
                      f"{100 * m['change']:+.1f}%", f"±{100 * m['threshold']:.1f}%", verdict)
    console.print(table)
    for what, items in (("only in this run", cmp["only_new"]), ("only in the old file",
                                                                cmp["only_old"])):
        if items:
            console.print(f"{len(items)} rows {what} (not compared): " + ", ".join(
                f"{i['provider']} [{i['label']}]" for i in items[:6]) +
                (" ..." if len(items) > 6 else ""), highlight=False, markup=False)
    for n in cmp["not_comparable"]:
        console.print(f"not comparable: {n['key'][1]} [{n['label']}]: old {n['old']}, new {n['new']}",
                      highlight=False, markup=False)
    verdict = (f"[red]{len(cmp['regressions'])} regression(s)[/]" if cmp["regressions"]
               else "[green]no regressions[/]")
    console.print(f"{verdict} in {len(cmp['matched'])} matched rows "
                  f"(limit: max(2 x combined (p90-p10)/p50, {REGRESSION_FLOOR:.0%}))")


def plot(record: dict, path: Path) -> None:
    """TFLOP/s (compute-bound families) or GB/s (memory-bound) against the family's x axis,
    one line per provider, one panel per (family, value of the params varying in it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple, list[dict]] = {}
    fams = record["families"]
    for r in record["rows"]:
        if "tflops" not in r:  # not timed (or interrupted before its case was complete)
            continue
        fam_rows = [x for x in record["rows"] if x["family"] == r["family"]]
        varying = sorted(k for k in r["params"]
                         if len({json.dumps(x["params"][k]) for x in fam_rows}) > 1)
        sub = tuple(f"{k}={r['params'][k]}" for k in varying)
        # shapes that share x but differ elsewhere (batch) stay in one panel, by x
        panels.setdefault((r["family"], sub), []).append(r)
    if not panels:
        raise MicrobenchError("nothing to plot: no provider was timed")
    n = len(panels)
    cols = min(3, n)
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 3.8 * rows_n), squeeze=False)
    for ax, ((family, sub), rows) in zip(axes.flat, panels.items()):
        f = fams[family]
        metric, unit = ("gb_s", "GB/s") if f["bound"] == "memory" else ("tflops", "TFLOP/s")
        for prov in dict.fromkeys(r["provider"] for r in rows):
            mine = [r for r in rows if r["provider"] == prov]
            pts = sorted((r["shape"][f["x"]], r[metric]) for r in mine)
            ruler = any(r.get("yardstick") for r in mine)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    linestyle="--" if ruler else "-",
                    label=f"{prov} (yardstick, not the op)" if ruler else prov)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f["x"])
        ax.set_ylabel(unit)
        ax.set_title(" ".join((family,) + sub), fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(f"{record['kernel']} on {record['device']} ({record['timer']})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- entry point used by the CLI -------------------------------------------------------

def select_families(spec: KernelSpec, families: dict[str, Family], requested: list[str],
                    device_kind: str) -> list[Family]:
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


def select_providers(spec: KernelSpec, requested: str | None) -> list[str]:
    known = list(providers_of(spec))
    if not requested:
        return known
    names = [n.strip() for n in requested.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise MicrobenchError(f"unknown provider {', '.join(unknown)} for {spec.name} "
                              f"(providers: {', '.join(known)})")
    return names


def command_line(argv: list[str] | None = None) -> str:
    return "kt " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))


def process_age_s() -> float:
    """Seconds since this process started (Linux's /proc), else 0."""
    try:
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - int(stat[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def row_seconds(r: dict) -> str:
    """Where one row's wall time went: preparing the provider (compiles and loads, once per
    dtype), binding it to the inputs, its first call with the check, then timing."""
    first = r.get("first_call_s", 0.0)
    parts = [("prepare", r.get("prepare_s", 0.0)), ("bind", r.get("bind_s", 0.0)),
             ("first call + check", first),
             ("timing", max(0.0, r["bench_s"] - first) if "bench_s" in r else 0.0)]
    return ", ".join(f"{name} {sec:.1f} s" for name, sec in parts if sec >= 0.05) or "< 0.1 s"


def cli_main(kernel: str, device: str | None, families: list[str], providers: str | None,
             baseline: str | None, save, compare_path, plot_path, package, seed: int,
             budget: float | None, list_only: bool, out, err) -> int:
    """`kt microbench`: everything after click parsed the flags. Returns the exit code."""
    t_start = time.perf_counter() - process_age_s()
    from harness import devices as devs
    from harness.io import write_json_atomic

    if device is None:
        device = "gpu" if devs.gpu_device() is not None else "cpu"
    if device == "cpu":
        # the Triton twin runs in Triton's interpreter, chosen when triton is first imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import pykernels

    try:
        spec = pykernels.get(kernel)
    except KeyError as e:
        raise MicrobenchError(e.args[0]) from None
    all_families = load_families(spec)
    if list_only:
        for f in all_families.values():
            out.print(f"family {f.name} ({f.device}, {f.dtype}, {f.bound}-bound, "
                      f"{len(f.cases)} shapes): {f.doc}", highlight=False)
        out.print(f"providers: {', '.join(providers_of(spec))}", highlight=False)
        return 0
    chosen = select_families(spec, all_families, families, device)
    names = select_providers(spec, providers)
    if baseline is not None and baseline not in providers_of(spec):
        raise MicrobenchError(f"unknown baseline provider {baseline!r} "
                              f"(providers: {', '.join(providers_of(spec))})")
    if baseline is None and device == "gpu":
        baseline = default_baseline(spec)
    from harness.build import resolve_run

    try:
        _, package = resolve_run(device, package)
    except ValueError as e:
        raise MicrobenchError(str(e)) from None
    old_rows = load_rows(compare_path) if compare_path else None
    settings = cpu_settings() if device == "cpu" else Settings()
    settings.seed = seed
    if budget is not None:
        settings.budget_s = budget
    if device == "cpu":
        err.print(f"[bold yellow]{CPU_TIMER_LABEL}[/]")

    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    total = sum(len(f.cases) for f in chosen) * len(names)

    def log(line: str) -> None:  # a log (not a terminal) gets a line per step, time-stamped
        if not err.is_terminal:
            err.print(f"[{time.perf_counter() - t_start:.0f} s] {line}", highlight=False,
                      markup=False, soft_wrap=True)

    log(f"{spec.name}: {sum(len(f.cases) for f in chosen)} shapes x {len(names)} providers "
        "(seconds since the process started)")
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  console=err, transient=True) as progress:
        task = progress.add_task(f"{spec.name}", total=total)

        def on_event(ev: dict) -> None:
            if ev["event"] == "reference":
                progress.update(task, description=f"{ev['family']} {ev['shape']}: reference")
            elif ev["event"] == "reference_done":
                log(f"{ev['family']} {ev['shape']}: inputs and reference, {ev['seconds']:.1f} s")
            elif ev["event"] == "provider":
                progress.update(task, description=f"{ev['family']} {ev['shape']}: {ev['provider']}")
            elif ev["event"] == "case" and save:  # a killed run keeps what it measured
                write_json_atomic(save, ev["record"])
            elif ev["event"] == "row":
                progress.advance(task)
                r = ev["row"]
                p50 = (f"{r['p50']:.4f} ms (host {r['host_ms']:.3f} ms)" if "p50" in r
                       else r.get("note", ""))
                log(f"{r['family']} {r['label']} {r['provider']}: {r['status']} {p50} "
                    f"[{row_seconds(r)}]")

        record = run(spec, device, chosen, names, package, settings, baseline,
                     command_line(), on_event)
    render(record, out)
    if save:
        write_json_atomic(save, record)
        out.print(f"results written to {save}")
    code = 0
    if old_rows is not None:
        cmp = compare_records(record["rows"], old_rows)
        render_comparison(cmp, out, compare_path)
        code = 1 if cmp["regressions"] else 0
    if plot_path:
        try:
            plot(record, Path(plot_path))
            out.print(f"plot written to {plot_path}")
        except MicrobenchError as e:
            err.print(f"no plot: {e}")
    if record["interrupted"]:
        raise MicrobenchError("interrupted: the rows measured so far are above"
                              + (f" and in {save}" if save else ""))
    return code


def summary(paths: list[str], console) -> None:
    """Compact lines: per kernel the row counts by status; per family its largest shapes with
    every provider's p50 (fastest first) and speedup; the issue's targets (`target_lines`),
    the fused op's goal ratio against the cudnn_alone yardstick for every prefill case."""
    for p in paths:
        try:
            doc = json.loads(Path(p).read_text())
        except (OSError, ValueError) as e:
            console.print(f"{p}: unreadable ({e})", markup=False, highlight=False)
            continue
        rows = doc.get("rows", [])
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        console.print(f"== {doc.get('kernel')} on {doc.get('device')} ({doc.get('timer')}): "
                      f"{len(rows)} rows, " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
                      + (" — INTERRUPTED" if doc.get("interrupted") else
                         " — INCOMPLETE (the run was killed)" if not doc.get("complete", True)
                         else ""),
                      markup=False, highlight=False)
        for fam, info in doc.get("families", {}).items():
            frows = [r for r in rows if r["family"] == fam]
            if not frows:
                continue
            top = max(r["shape"][info["x"]] for r in frows)
            for label in dict.fromkeys(r["label"] for r in frows if r["shape"][info["x"]] == top):
                case = [r for r in frows if r["label"] == label]
                timed = sorted((r for r in case if "p50" in r), key=lambda r: r["p50"])
                parts = [f"{r['provider']}{' [yardstick]' if r.get('yardstick') else ''} "
                         f"{r['p50']:.3f}" + (f" ({r['speedup']:.2f}x)" if "speedup" in r else "")
                         for r in timed]
                for status in ("WRONG", "error", "n/a"):
                    bad = [r["provider"] for r in case if r["status"] == status]
                    if bad:
                        parts.append(f"{status}: {','.join(bad)}")
                console.print(f"  {fam} {label} [ms]: " + " | ".join(parts),
                              markup=False, highlight=False)
        for line in target_lines(rows):
            console.print("  " + line, markup=False, highlight=False)


GOAL_RATIO, MOONSHOT_RATIO = 1.0, 0.95


def goal_verdict(ratio: float) -> str:
    """The issue's goal for the fused op: kt_graph p50 / cudnn_alone p50 <= 1.00 (no slower
    than cuDNN SDPA without RoPE), moonshot <= 0.95."""
    if ratio <= MOONSHOT_RATIO:
        return "moonshot met"
    return "goal met" if ratio <= GOAL_RATIO else "goal not met"


def target_lines(rows: list[dict]) -> list[str]:
    """The issue's fused-attention targets, per prefill case, as ratios of p50s from one
    run: kt_graph against the yardstick cuDNN SDPA without RoPE (`goal_verdict`) and against
    torch.compile'd RoPE + cuDNN and stock MAX (milestone < 1.00)."""
    cases: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if (r["kernel"] == "fused_rope_attention" and r["family"].startswith("prefill")
                and r["status"] == "ok" and "p50" in r):
            cases.setdefault((r["family"], r["label"]), {})[r["provider"]] = r
    out = []
    for (fam, label), by in cases.items():
        kt = by.get("kt_graph")
        if kt is None:
            continue
        parts = []
        if "cudnn_alone" in by:
            ratio = kt["p50"] / by["cudnn_alone"]["p50"]
            parts.append(f"goal kt/cudnn_alone {ratio:.3f} ({goal_verdict(ratio)})")
        parts += [f"{name} {kt['p50'] / by[p]['p50']:.3f}"
                  for name, p in (("milestone kt/torch_compile", "torch_compile"),
                                  ("kt/max_flash", "max_flash")) if p in by]
        if parts:
            out.append(f"targets {fam} {label}: " + ", ".join(parts))
    for r in rows:  # memory-bound targets (GPU): decode >= 80 % of HBM, RoPE >= 2.9 TB/s
        if r["provider"] != "kt_graph" or "gb_s" not in r or r.get("backend") == "cpu":
            continue
        if r["kernel"] == "fused_rope_attention" and r["family"] == "decode":
            out.append(f"targets decode {r['label']}: kt_graph {r['gb_s']:.0f} GB/s = "
                       f"{r.get('pct_peak', float('nan')):.1f}% of HBM (target >= 80%)")
        elif r["kernel"] == "rope":
            out.append(f"targets rope {r['family']} {r['label']}: kt_graph "
                       f"{r['gb_s'] / 1e3:.2f} TB/s (target >= 2.9)")
    return out


def where(family: Family, conditions: list[str]) -> Family:
    """`family` with only the cases whose params match every "name=value" of `conditions`."""
    import dataclasses

    pairs = [c.split("=", 1) for c in conditions]
    if any(len(p) != 2 for p in pairs):
        raise MicrobenchError(f"--where takes name=value, not {conditions}")
    cases = [c for c in family.cases if all(str(c[1].get(k)) == v for k, v in pairs)]
    return dataclasses.replace(family, cases=cases)


def main(argv: list[str]) -> int:
    """Helpers for benchmarks/gpu_run.sh, not part of `kt`:

    python -m harness.microbench warm KERNEL [--shapes F] [--providers P] [--where K=V]
        compile and run every provider once per case, untimed and unchecked, to fill MAX's,
        Triton's and Inductor's on-disk caches (gpu_run.sh runs several at once first);
        --where keeps the cases whose param K is V (one compile per job where a provider
        compiles per param value, as stock MAX attention does per mask);
    python -m harness.microbench summary FILE.json...   the short summary it ends with;
    python -m harness.microbench plot FILE.json FILE.png   the plot of a saved run."""
    import argparse

    from rich.console import Console

    ap = argparse.ArgumentParser(prog="python -m harness.microbench")
    sub = ap.add_subparsers(dest="what", required=True)
    w = sub.add_parser("warm")
    w.add_argument("kernel")
    w.add_argument("--device", default="gpu", choices=("cpu", "gpu"))
    w.add_argument("--shapes", action="append", default=[])
    w.add_argument("--providers", default=None)
    w.add_argument("--kernels", default=None)
    w.add_argument("--where", action="append", default=[])
    sm = sub.add_parser("summary")
    sm.add_argument("files", nargs="+")
    pl = sub.add_parser("plot")
    pl.add_argument("file")
    pl.add_argument("png")
    a = ap.parse_args(argv)
    if a.what == "summary":
        summary(a.files, Console(width=250))
        return 0
    if a.what == "plot":
        plot(json.loads(Path(a.file).read_text()), Path(a.png))
        return 0
    if a.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import pykernels

    spec = pykernels.get(a.kernel)
    fams = select_families(spec, load_families(spec), a.shapes, a.device)
    fams = [f for f in (where(f, a.where) for f in fams) if f.cases]
    provs = select_providers(spec, a.providers)
    t0 = time.perf_counter()
    rec = run(spec, a.device, fams, provs, package=a.kernels, check=False, time_it=False)
    for b in sorted({(r["provider"], r["status"], r.get("note", ""))
                     for r in rec["rows"] if r["status"] not in ("ok", "n/a")}):
        print(f"warm {a.kernel} {b[0]}: {b[1]} {b[2]}", flush=True)
    print(f"warm {a.kernel} [{','.join(provs)}] {','.join(f.name for f in fams)}: "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    # run the imported module, not this __main__ copy, so the spec modules' `Bound` and
    # `Unavailable` are the classes `run` checks for
    from harness import microbench

    sys.exit(microbench.main(sys.argv[1:]))
