"""The run of `kt microbench`: every provider on every case of some families, checked by the
gate and warmed up, then the case's ready providers timed together in interleaved rounds by
`harness.timing` (the one timer), each also timed back to back; then throughput, % of peak,
speedups and ratios with their intervals (`metrics`).

Timing: GPU work is timed with device events (CUDA; ROCm keeps torch's `cuda` event API and
Apple Metal uses `torch.mps` events, through `harness.clocks`' backend table, but no kt machine
has either, so those numbers are labelled untested); a MAX provider's events are recorded on
MAX's stream and cross-checked with the host clock (`timing.prepare_on_stream`). On the CPU
the timer is `perf_counter`, labelled as such: CPU numbers are not comparable with GPU numbers.

A provider may be a *yardstick* (`Bound.yardstick` says what it computes): a different
computation timed beside the op as a reference point. Its output is not the op's, so it skips
the gate; its row says `"yardstick": true` and "not checked", and it is never the baseline.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from harness import devices
from harness.bench.families import Family, with_providers
from harness.bench.gate import Gate
from harness.bench.providers import providers_of
from harness.checking import Check
from harness.io import error_line, provenance
from harness.spec import DTYPES, Bound, KernelSpec, Params, Shape, Tensors, Unavailable
from harness.bench.metrics import derive_metrics, join_notes
from harness.interleave import bench_interleaved
from harness.timing import (NotCorrect, Sampler, Timing, backend_of, prepare_on_stream,
                            timings_agree, too_uncovered)

CPU_TIMER_LABEL = "CPU timing (perf_counter), not comparable with GPU"
UNTESTED_BACKENDS = ("rocm", "metal")


@dataclass
class Settings:
    """The timer's stopping rule and the inputs' seed (see `harness.timing.bench`)."""

    warmup_ms: float = 25.0
    min_reps: int = 10
    max_reps: int = 200
    rse_target: float = 0.01
    budget_s: float = 0.3
    seed: int = 0
    # interleaved rounds (harness/timing.py item 8): min_reps / max_reps bound the rounds, the
    # budget is budget_s per provider of the case, and rounds stop once every ratio to
    # kt_graph is known to +-ci_target; then `throughput_repeats` back-to-back batches (item 9)
    ci_target: float = 0.01
    throughput_repeats: int = 3


def cpu_settings() -> Settings:
    return Settings(warmup_ms=10.0, min_reps=5, max_reps=50, rse_target=0.02, budget_s=0.25,
                    ci_target=0.02)


def timer_label(backend: str) -> str:
    """What timed the rows, said in every record and table title."""
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


@dataclass
class _Run:
    """What every measurement of one run shares."""

    spec: KernelSpec
    device: str  # torch's device name
    package: Any
    settings: Settings
    time_it: bool
    providers: dict[str, Callable] = field(default_factory=dict)
    prepared: dict[tuple[str, str], Any] = field(default_factory=dict)
    on_event: Callable[[dict], None] = lambda ev: None


def benchmark_families(spec: KernelSpec, device: str, families: list[Family],
                       provider_names: list[str], package=None, settings: Settings | None = None,
                       baseline: str | None = None, command: str = "",
                       on_event: Callable[[dict], None] = lambda ev: None, check: bool = True,
                       time_it: bool = True) -> dict:
    """Check and time every provider on every case of `families` on `device` ('cpu' or
    'gpu'); returns the JSON-ready record. Ctrl-C stops early and returns what was measured
    (`record['interrupted']`). `check=False, time_it=False` only compiles and runs each
    provider once per case (warming MAX's, Triton's and Inductor's caches). Events for
    progress: start (the record, before any row), reference, reference_done, provider,
    prepared (a provider compiled), row, case (the record so far)."""
    targets = devices.select(device)
    dev = targets[-1]
    backend = backend_of(dev.torch_device) if dev.kind == "gpu" else "cpu"
    settings = settings or (cpu_settings() if dev.kind == "cpu" else Settings())
    ctx = _Run(spec, dev.torch_device, package, settings, time_it, providers_of(spec),
               on_event=on_event)
    prov = provenance(targets)
    gpu = prov.get("gpu") or {}
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
    on_event({"event": "start", "record": record})

    def finish_case(fam: Family) -> None:
        derive_metrics(case_rows, dev.name, DTYPES[fam.dtype], fam.bound, baseline,
                       dev.kind == "gpu")

    try:
        for fam in with_providers(families, provider_names):
            dtype = DTYPES[fam.dtype]
            varying = {k for k in fam.cases[0][1]
                       if len({json.dumps(c[1][k]) for c in fam.cases}) > 1}
            for shape, params in fam.cases:
                label = shape_label(spec, shape, params, varying)
                where = {"family": fam.name, "shape": label}
                gen = torch.Generator(device=ctx.device).manual_seed(settings.seed)
                inputs = spec.make_inputs(shape, params, dtype, torch.device(ctx.device), gen)
                gate = None
                if check:
                    on_event({"event": "reference", **where})
                    t0 = time.perf_counter()
                    gate = Gate(spec, shape, params, inputs)
                    on_event({"event": "reference_done", **where,
                              "seconds": time.perf_counter() - t0})
                case_rows = []
                ready: dict[str, tuple[Sampler, dict]] = {}
                for pname in fam.runs(provider_names):
                    on_event({"event": "provider", **where, "provider": pname})
                    row = {**common, "provider": pname, "family": fam.name, "shape": shape,
                           "params": params, "label": label, "dtype": fam.dtype,
                           "flops": spec.flops(shape, params),
                           "bytes": spec.bytes(shape, params, dtype), "bound": fam.bound}
                    out, sampler = prepare_provider(ctx, pname, dtype, inputs, params, gate)
                    row.update(out)
                    case_rows.append(row)
                    rows.append(row)
                    if sampler is not None:
                        ready[pname] = (sampler, row)
                    elif time_it:
                        on_event({"event": "row", "row": row})
                if ready:
                    on_event({"event": "provider", **where, "provider": "interleaved rounds"})
                    time_case(ctx, ready, baseline)
                    for _, row in ready.values():
                        on_event({"event": "row", "row": row})
                finish_case(fam)
                on_event({"event": "case", "record": record})
                del inputs, gate
                if ctx.device.startswith("cuda"):
                    torch.cuda.empty_cache()
        record["complete"] = True
    except KeyboardInterrupt:
        record["interrupted"] = True
        if case_rows and "tflops" not in case_rows[-1]:  # the case Ctrl-C cut short
            finish_case(fam)
    return record


def _bind(ctx: _Run, pname: str, dtype: torch.dtype, inputs: Tensors, params: Params,
          out: dict) -> Bound | None:
    """The provider prepared (once per dtype: the seconds it took go into `out`, in the row
    that paid them) and bound to the inputs; None, with the row's status and note set in
    `out`, when it is unavailable here or fails."""
    key = (pname, str(dtype))
    if key not in ctx.prepared:
        t0 = time.perf_counter()
        try:
            ctx.prepared[key] = ctx.providers[pname](ctx.device, dtype, ctx.package)
        except Unavailable as e:
            ctx.prepared[key] = e
        except Exception as e:  # a compile error is this provider's row, not the run's end
            ctx.prepared[key] = RuntimeError(error_line(e))
        out["prepare_s"] = round(time.perf_counter() - t0, 3)
        ctx.on_event({"event": "prepared", "provider": pname, "seconds": out["prepare_s"]})
    bind = ctx.prepared[key]
    if isinstance(bind, Exception):
        out.update(status="n/a" if isinstance(bind, Unavailable) else "error", note=str(bind))
        return None
    t0 = time.perf_counter()
    try:
        bound = bind(inputs, params)
    except Unavailable as e:
        out.update(status="n/a", note=str(e))
        return None
    except Exception as e:
        out.update(status="error", note=error_line(e))
        return None
    out["bind_s"] = round(time.perf_counter() - t0, 3)
    return bound if isinstance(bound, Bound) else Bound(bound)


def prepare_provider(ctx: _Run, pname: str, dtype: torch.dtype, inputs: Tensors,
                     params: Params, gate: Gate | None) -> tuple[dict, Sampler | None]:
    """One provider on one case: prepare, bind, check against `gate`, warm up (items 1-5 of
    `harness.timing`); the row's fields so far, and the provider ready to be timed (None when
    it is not: unavailable, failing, WRONG, or `time_it` is off)."""
    out: dict[str, Any] = {}
    bound = _bind(ctx, pname, dtype, inputs, params, out)
    if bound is None:
        return out, None
    out["note"] = bound.note
    checks: list[Check] = []
    if bound.yardstick:
        out["yardstick"] = True
        out["note"] = join_notes(f"yardstick: {bound.yardstick}; not the op, not checked",
                                 out["note"])
        gate = None

    def check() -> bool:
        """The first call, its outputs checked; later calls return the first verdict."""
        if "first_call_s" in out:
            return all(c.passed for c in checks)
        # A first call may compile (Triton's JIT, torch.compile, MAX's torch bridge): its own,
        # longer time limit (harness.bench.child), the step's limit again once it returns.
        ctx.on_event({"event": "first_call", "provider": pname})
        t0 = time.perf_counter()
        result = bound.run()  # on the stream bench runs under; synchronized before reading
        if bound.sync:
            bound.sync()
        elif ctx.device.startswith("cuda"):
            torch.cuda.synchronize()
        outputs = bound.to_torch(result)
        out["first_call_s"] = round(time.perf_counter() - t0, 3)
        ctx.on_event({"event": "first_call_done", "provider": pname, "seconds": out["first_call_s"]})
        if gate is not None:
            checks.extend(gate.check(outputs))
        return all(c.passed for c in checks)

    sampler = None
    try:
        if not ctx.time_it:
            out["status"] = "ok" if check() else "WRONG"
            return out, None
        t0 = time.perf_counter()
        sampler, note = prepare_on_stream(bound.run, stream=bound.stream, sync=bound.sync,
                                          device=ctx.device, check=check,
                                          warmup_ms=ctx.settings.warmup_ms)
        sampler.keep_alive = bound  # the sampler's call needs what the binding holds
        out["note"] = join_notes(out["note"], note)
        out["sync_note"] = note
        out["bench_s"] = round(time.perf_counter() - t0, 3)
        out["status"] = "ok"
    except NotCorrect:
        out["status"] = "WRONG"
    except Exception as e:
        out["status"] = "error"
        out["note"] = join_notes(out["note"], error_line(e))
        return out, None
    if checks:
        out.update(_check_fields(checks, out))
    return out, sampler


def time_case(ctx: _Run, ready: dict[str, tuple[Sampler, dict]], baseline: str | None) -> None:
    """The ready providers of one case timed in interleaved rounds (item 8 of
    `harness.timing`; the stopping rule's anchor is kt_graph, else the baseline, else the
    first), then each one's back-to-back timing (item 9); their rows filled in."""
    s = ctx.settings
    anchor = next((p for p in ("kt_graph", baseline) if p in ready), None)
    t0 = time.perf_counter()
    inter = bench_interleaved({p: smp for p, (smp, _) in ready.items()}, anchor=anchor,
                              min_rounds=s.min_reps, max_rounds=s.max_reps,
                              ci_target=s.ci_target, budget_s=s.budget_s * len(ready))
    shared = round(time.perf_counter() - t0, 3)
    for p, (smp, row) in ready.items():
        row["rounds_s"] = shared
        if p in inter.failed:
            row.update(status="error", note=join_notes(row["note"], inter.failed[p]))
            continue
        timing = inter.timings[p]
        row.update(_timing_fields(timing, row["note"], ctx.device))
        row.update(rounds=len(inter.orders), interleaved=len(ready) > 1,
                   rounds_anchor=inter.anchor, rounds_halfwidth=_finite(inter.halfwidth))
        t1 = time.perf_counter()
        try:
            second = smp.throughput(repeats=s.throughput_repeats)
        except Exception as e:
            row["note"] = join_notes(row["note"], f"back-to-back timing failed: {error_line(e)}")
            continue
        agree, why = timings_agree(timing, second)
        row.update(throughput_ms=second.per_call_ms, throughput_spread=_finite(second.spread),
                   throughput_calls=second.calls, throughput_samples_ms=second.samples_ms,
                   timings_agree=agree)
        if why:
            row["timings_note"] = why
        if agree is False:
            row["note"] = join_notes(row["note"], why)
        row["bench_s"] = round(row.get("bench_s", 0.0) + time.perf_counter() - t1, 3)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _timing_fields(t: Timing, note: str, device: str) -> dict:
    out = {"p10": t.p10, "p50": t.p50, "p90": t.p90, "mean": t.mean, "n": len(t.samples_ms),
           "stopped_by": t.stopped_by, "samples_ms": [round(s, 6) for s in t.samples_ms],
           "host_ms": t.host_ms, "launch_hidden": t.hidden,
           "launch_cover_ms": round(t.cover_ms, 4), "uncovered": t.uncovered,
           "launch_retimed": t.retimed_from is not None}
    if t.retimed_from is not None:  # the first pass, whose samples were discarded
        out["launch_first_pass"] = {**t.retimed_from,
                                    "cover_ms": round(t.retimed_from["cover_ms"], 4)}
    if t.launch_note and "host-synced" not in note:
        note = join_notes(note, t.launch_note)
    uncovered = t.hidden and too_uncovered(t.uncovered, len(t.samples_ms))
    if uncovered:
        again = (f" (re-timed with a {t.cover_ms:.2f} ms spin after "
                 f"{t.retimed_from['uncovered']}/{t.retimed_from['n']} with "
                 f"{t.retimed_from['cover_ms']:.2f} ms)" if t.retimed_from else "")
        note = join_notes(note, f"{t.uncovered}/{len(t.samples_ms)} calls enqueued for longer "
                                f"than the spin covered{again}: GPU idle time timed")
    # Timed unlike the others (events that include the host's time): kept out of ratios.
    if backend_of(device) in ("cuda", "rocm") and (not t.hidden or uncovered):
        out["ratio_excluded"] = ("host-synced timing" if "host-synced" in note else
                                 t.launch_note if not t.hidden else "GPU idle time timed")
    out["note"] = note
    return out


def _check_fields(checks: list[Check], out: dict) -> dict:
    worst = max(checks, key=lambda c: c.max_abs_err / c.tolerance if c.tolerance else math.inf)
    fields: dict[str, Any] = {"check": {
        "passed": all(c.passed for c in checks), "max_abs_err": worst.max_abs_err,
        "tolerance": worst.tolerance, "n_bad": sum(c.n_bad for c in checks),
        "numel": sum(c.numel for c in checks), "output": worst.name}}
    if out["status"] == "WRONG":
        fields["note"] = join_notes(out["note"], f"{worst.name}: max err {worst.max_abs_err:.3g}"
                                                 f" > tolerance {worst.tolerance:.3g} "
                                                 f"({worst.n_bad}/{worst.numel} elements)")
    return fields
