"""`kt microbench`'s providers run in a child process (`harness.children`), as `kt verify`'s
kernels do: a provider that hangs or crashes cannot take kt with it, and Ctrl-C / SIGTERM stop
the run at once, keeping the rows finished so far.

The child (`python -m harness.bench.child JOB`) runs `engine.benchmark_families` and does all
checking and timing; only events and finished rows travel back. Each kernel call has a time
limit (`call_limit_s`: --case-timeout, else derived from the case's size): a provider's first
use also compiles, which is not limited, and its first call on each case (which may compile too:
Triton's JIT, torch.compile, MAX's torch bridge) gets at least FIRST_CALL_FLOOR_S; from then
on, a step with no result within its limit is a HANG. A hung or crashed provider gets a row with status `hang` or `crash`; the child is
stopped and a new one carries on from the case it was in, without that provider.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Callable

from harness import devices
from harness.bench import MicrobenchError
from harness.bench.engine import Settings, derive_metrics, shape_label
from harness.bench.families import Family
from harness.children import Child, TimedOut, die_with_parent, emit
from harness.spec import DTYPES, KernelSpec

# Limits when --case-timeout sets none: a floor, the timer's budget, and the case's FLOPs at a
# pessimistic pace (Triton's interpreter on the CPU; an fp64 reference on a GPU).
CALL_LIMIT_FLOOR_S = 120.0
# A provider's first call on a case may compile (Triton's JIT, torch.compile, MAX's torch bridge
# took 171 s on a loaded 2-core machine): at least this long before it is a HANG.
FIRST_CALL_FLOOR_S = 900.0
FLOPS_PER_S = {"cpu": 1e7, "gpu": 1e10}


def call_limit_s(flops: float, device: str, budget_s: float, override: float | None) -> float:
    """Seconds one step (the reference, or a compiled provider's check and timing) may take."""
    if override is not None:
        return float(override)
    return round(CALL_LIMIT_FLOOR_S + 4 * budget_s + flops / FLOPS_PER_S[device], 1)


def run_in_child(spec: KernelSpec, device: str, families: list[Family], providers: list[str],
                 package, settings: Settings, baseline: str | None, command: str,
                 on_event: Callable[[dict], None], case_timeout: float | None = None) -> dict:
    """`benchmark_families` in child processes; returns its record. On Ctrl-C / SIGTERM the
    child is stopped and the record holds the rows finished so far (`interrupted`)."""
    record: dict = {"kernel": spec.name, "device_kind": device, "command": command, "rows": []}
    pos = [0, 0]  # the family, and the case in it, the next child starts at
    names = list(providers)
    pending: list[dict] = []  # rows of the case in progress (metrics come with case_done)
    _skip_idle(pos, families, names)
    while pos[0] < len(families):
        job = {"kernel": spec.name, "device": device, "package": package, "providers": names,
               "families": [[f.name, pos[1] if i == 0 else 0]
                            for i, f in enumerate(families[pos[0]:])],
               "settings": dataclasses.asdict(settings), "baseline": baseline,
               "command": command, "case_timeout": case_timeout}
        child = Child("harness.bench.child", job)
        step: dict = {}
        pending = []
        started = False
        try:
            for ev in child.events():
                kind = ev["event"]
                if kind == "start":
                    record = {**ev["record"], "rows": record["rows"]}
                    started = True
                elif kind in ("reference", "provider"):
                    step = ev
                elif kind == "row":
                    pending.append(ev["row"])
                elif kind == "case_done":
                    record["rows"].extend(_relabel(spec, families[pos[0]], ev["rows"]))
                    pending = []
                    step = {}
                    _advance(pos, families, names)
                if kind != "start":
                    on_event(ev if kind != "case_done" else {"event": "case", "record": record})
        except TimedOut as e:
            child.stop()
            fate = ("hang", f"no result within {e.limit_s:g} s (--case-timeout; the default "
                            "grows with the case's size); stopped")
        except KeyboardInterrupt:
            child.stop()
            record["interrupted"] = True
            if pending:
                _finish_partial(spec, record, pending, families[pos[0]], baseline)
            return record
        except BaseException:
            child.stop()
            raise
        else:
            how = child.how_it_ended()
            if pos[0] >= len(families):
                break
            if not started:  # not a provider's fault: the child could not start
                raise MicrobenchError("the benchmark process failed before any work ("
                                      f"{how}): " + " | ".join(list(child.tail)[-3:]))
            last = f"; its last output: {child.tail[-1][:200]}" if child.tail else ""
            fate = ("crash", f"its process died ({how or 'exit code 0 before the end'}){last}")
        # A provider hung or crashed: its row, then a new child from this case, without it.
        fam = families[pos[0]]
        shape, params = fam.cases[pos[1]]
        provider_died = step.get("event") == "provider"
        culprits = [step["provider"]] if provider_died else fam.runs(names)
        where = "; later cases skip it" if provider_died else ""
        for pname in culprits:
            record["rows"].append({
                "kernel": spec.name, "device": record.get("device"), "backend":
                record.get("backend"), "provider": pname, "family": fam.name, "shape": shape,
                "params": params, "label": _label(spec, fam, pos[1]), "dtype": fam.dtype,
                "status": fate[0], "note": (fate[1] if provider_died else
                                            f"the case's reference: {fate[1]}") + where})
        on_event({"event": "case", "record": record})
        if provider_died:
            names = [n for n in names if n != step["provider"]]
            if not names:
                break
            _skip_idle(pos, families, names)
        else:
            _advance(pos, families, names)
    record.setdefault("interrupted", False)
    record["complete"] = not any(r["status"] in ("hang", "crash") for r in record["rows"])
    return record


def _advance(pos: list[int], families: list[Family], names: list[str]) -> None:
    pos[1] += 1
    if pos[1] >= len(families[pos[0]].cases):
        pos[0], pos[1] = pos[0] + 1, 0
    _skip_idle(pos, families, names)


def _skip_idle(pos: list[int], families: list[Family], names: list[str]) -> None:
    """Past the families on which none of `names` runs (`Family.providers`): the engine
    skips them too."""
    while pos[0] < len(families) and not families[pos[0]].runs(names):
        pos[0], pos[1] = pos[0] + 1, 0


def _label(spec: KernelSpec, fam: Family, i: int) -> str:
    """The engine's label of case `i`, from the whole family (a child that started later in
    it sees fewer cases, so fewer params that vary)."""
    varying = {k for k in fam.cases[0][1]
               if len({json.dumps(c[1][k]) for c in fam.cases}) > 1}
    shape, params = fam.cases[i]
    return shape_label(spec, shape, params, varying)


def _relabel(spec: KernelSpec, fam: Family, rows: list[dict]) -> list[dict]:
    for r in rows:
        i = next((i for i, c in enumerate(fam.cases) if c == (r["shape"], r["params"])), None)
        if i is not None:
            r["label"] = _label(spec, fam, i)
    return rows


def _finish_partial(spec: KernelSpec, record: dict, pending: list[dict], fam: Family,
                    baseline: str | None) -> None:
    """The rows of the case Ctrl-C cut short, with the metrics their case allows."""
    if "device" in record:
        derive_metrics(pending, record["device"], DTYPES[fam.dtype], fam.bound, baseline,
                       record.get("device_kind") == "gpu")
    record["rows"].extend(_relabel(spec, fam, pending))


def main(argv: list[str]) -> int:
    die_with_parent()  # first: a kt killed during the imports below must not leave this behind
    job = json.loads(argv[1])
    devices.prepare_bench_device(job["device"])  # before pykernels imports triton
    import pykernels
    from harness.bench.engine import benchmark_families
    from harness.bench.families import load_bench_file, with_providers

    spec = pykernels.get(job["kernel"])
    all_families = load_bench_file(spec).families
    families = [dataclasses.replace(all_families[name], cases=all_families[name].cases[start:])
                for name, start in job["families"]]
    settings = Settings(**job["settings"])
    cases = iter([(f, c) for f in with_providers(families, job["providers"])
                  for c in f.cases])  # in the engine's order
    prepared: set[tuple[str, str]] = set()
    sent = 0
    current: dict = {}

    def limit() -> float:
        return call_limit_s(current["flops"], job["device"], settings.budget_s,
                            job["case_timeout"])

    def on_event(ev: dict) -> None:
        nonlocal sent
        kind = ev["event"]
        if kind == "start":
            emit({"event": "start", "record": {k: v for k, v in ev["record"].items() if k != "rows"}})
            return
        if kind == "case":
            rows = ev["record"]["rows"]
            emit({"event": "case_done", "rows": rows[sent:]})
            sent = len(rows)
            return
        if kind == "reference":
            fam, case = next(cases)
            current.update(family=fam, flops=spec.flops(*case))
            ev = {**ev, "limit_s": limit()}
        elif kind == "provider":
            current["provider"] = ev["provider"]
            key = (ev["provider"], current["family"].dtype)
            ev = {**ev, "limit_s": limit()} if key in prepared else ev
        elif kind == "prepared":
            prepared.add((ev["provider"], current["family"].dtype))
            ev = {**ev, "limit_s": limit()}
        elif kind == "first_call":
            ev = {**ev, "limit_s": limit() if job["case_timeout"] is not None else max(FIRST_CALL_FLOOR_S, limit())}
        elif kind == "first_call_done":
            ev = {**ev, "limit_s": limit()}
        emit(ev)

    record = benchmark_families(spec, job["device"], families, job["providers"], job["package"],
                                settings, job["baseline"], job["command"], on_event)
    emit({"event": "done", "complete": record["complete"]})
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except KeyboardInterrupt:
        sys.exit(130)
