"""Helpers for benchmarks/gpu_run.sh, not part of `kt`:

python -m harness.bench plan [--device gpu|cpu] [KERNEL...]
    what gpu_run.sh runs, for every kernel `kt list` shows (or those named): lines
    `warm KERNEL PROVIDER [--where K=V ...]` (phase 1, in parallel) and `time KERNEL SECONDS`
    (phase 2, one kernel at a time, with the limit of its benchmarks/<kernel>.toml);
python -m harness.bench warm KERNEL [--shapes F] [--providers P] [--where K=V]
    compile and run every provider once per case, untimed and unchecked, to fill MAX's,
    Triton's and Inductor's on-disk caches; --where keeps the cases whose param or axis K is
    V (one compile per job where a provider compiles per value, as stock MAX attention does
    per mask and head count);
python -m harness.bench summary FILE.json...   the short summary it ends with;
python -m harness.bench plot FILE.json FILE.png   the plot of a saved run.
A FILE.json may be FILE.json.xz (as committed under benchmarks/results), or name an absent
FILE.json beside its FILE.json.xz (`harness.io.read_result_json`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from harness import devices
from harness.bench import MicrobenchError
from harness.io import read_result_json


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m harness.bench")
    sub = ap.add_subparsers(dest="what", required=True)
    pn = sub.add_parser("plan")
    pn.add_argument("--device", default="gpu", choices=("cpu", "gpu"))
    pn.add_argument("kernels", nargs="*")
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
    return ap


def main(argv: list[str]) -> int:
    a = _parser().parse_args(argv)
    devices.prepare_bench_device(getattr(a, "device", "gpu"))
    # Imported after `prepare_bench_device`, which must choose Triton's interpreter before
    # `pykernels` imports triton (the CPU rehearsal of gpu_run.sh).
    import pykernels
    from harness.bench.engine import benchmark_families
    from harness.bench.families import (cases_where, load_bench_file, select_families,
                                        warm_jobs, with_providers)
    from harness.bench.plots import plot
    from harness.bench.providers import select_providers
    from harness.bench.summary import summary
    from rich.console import Console

    if a.what == "summary":
        summary(a.files, Console(width=250))
        return 0
    if a.what == "plot":
        try:
            plot(read_result_json(a.file), Path(a.png))
        except MicrobenchError as e:  # e.g. a run stopped before any provider was timed
            print(f"no plot: {e}", file=sys.stderr)
            return 1
        return 0
    if a.what == "plan":
        specs = [pykernels.get(k) for k in a.kernels] or list(pykernels.discover().values())
        files = {s.name: load_bench_file(s) for s in specs}
        for s in specs:
            for job in warm_jobs(s, files[s.name], a.device):
                print("warm", s.name, *job)
        for s in specs:
            print("time", s.name, f"{files[s.name].time_limit_s:g}")
        return 0
    spec = pykernels.get(a.kernel)
    fams = select_families(spec, load_bench_file(spec).families, a.shapes, a.device)
    fams = [f for f in (cases_where(f, a.where) for f in fams) if f.cases]
    provs = select_providers(spec, a.providers)
    fams = with_providers(fams, provs)
    t0 = time.perf_counter()
    rec = benchmark_families(spec, a.device, fams, provs, package=a.kernels, check=False,
                             time_it=False)
    for b in sorted({(r["provider"], r["status"], r.get("note", ""))
                     for r in rec["rows"] if r["status"] not in ("ok", "n/a")}):
        print(f"warm {a.kernel} {b[0]}: {b[1]} {b[2]}", flush=True)
    print(f"warm {a.kernel} [{','.join(provs)}] {','.join(f.name for f in fams)}"
          f"{' ' + ' '.join(a.where) if a.where else ''}: {time.perf_counter() - t0:.0f} s",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
