"""`kt verify`'s verdict table, failure details and replay commands."""

from __future__ import annotations

import shlex

from rich.console import Console
from rich.table import Table

from harness.verify.engine import case_json


def replay_command(result: dict, case: dict, package: str | None) -> str:
    cmd = ["kt", "verify", result["kernel"], "--device", result["device"], "--replay", case_json(case)]
    if package:
        cmd += ["--kernels", package]
    return " ".join(shlex.quote(c) for c in cmd)


def dtype_verdicts(result: dict) -> dict[str, str]:
    """PASS / FAIL / ERROR / CRASH / HANG / INTERRUPTED / SKIP per dtype of one job result."""
    if result["status"] == "error":
        return {"*": "ERROR"}
    if result["status"] in ("crash", "hang"):
        dt = (result.get("last_case") or {}).get("dtype", "*")
        return {dt: result["status"].upper()}
    if result["status"] == "interrupted":
        return {dt: "INTERRUPTED" for dt in result["dtypes"]}
    out = {}
    failure = result.get("failure")
    for dt in result["dtypes"]:
        integ = result["integrity"].get(dt, {})
        if failure and failure["case"]["dtype"] == dt:
            out[dt] = "FAIL"
        elif failure or result.get("flaky"):
            out[dt] = "FAIL" if result.get("flaky") else "SKIP"
        elif integ and not (integ["no_stale_state"] and integ["deterministic"]):
            out[dt] = "FAIL"
        else:
            out[dt] = "PASS"
    return out


def all_passed(results: list[dict]) -> bool:
    return bool(results) and all(v == "PASS" for r in results for v in dtype_verdicts(r).values())


def _worst(stats: dict, impl: str) -> tuple[str, str]:
    rows = [v for k, v in stats["worst"].items() if k.startswith(impl + ":")]
    if not rows:
        return "-", "-"
    w = max(rows, key=lambda c: c["max_abs_err"] / c["tolerance"] if c["tolerance"] else 0)
    return f"{w['max_abs_err']:.2e} ({w['rel_err']:.1e})", f"{w['tolerance']:.2e}"


_STYLE = {"PASS": "green", "FAIL": "red", "CRASH": "red", "HANG": "red", "ERROR": "red",
          "SKIP": "yellow", "INTERRUPTED": "yellow"}


def render(results: list[dict], console: Console, package: str | None = None) -> None:
    table = Table(title="kt verify", header_style="bold")
    for col in ("kernel", "device", "dtype", "verdict", "examples", "mojo max err (rel)",
                "tolerance", "triton max err (rel)", "triton ex.", "compile s"):
        table.add_column(col, justify="right" if col in ("examples", "triton ex.", "compile s") else "left")
    for r in results:
        verdicts = dtype_verdicts(r)
        for dt, verdict in verdicts.items():
            if r["status"] != "ok":  # examples: those passed before it died or was stopped
                passed = r.get("passed", {})
                table.add_row(r["kernel"], r["device"], dt, f"[{_STYLE[verdict]}]{verdict}",
                              str(passed.get(dt, 0)) if passed else "-", "-", "-", "-", "-", "-")
                continue
            st = r["stats"][dt]
            mojo_err, tol = _worst(st, "mojo")
            tri_err, _ = _worst(st, "triton")
            table.add_row(r["kernel"], r["device"], dt, f"[{_STYLE[verdict]}]{verdict}",
                          str(st["examples"]), mojo_err, tol, tri_err, str(st["triton_examples"]),
                          f"{r['compile_seconds'].get(dt, 0):.1f}")
    console.print(table)
    if any(r["status"] == "ok" and r["device"] == "cpu" for r in results):
        console.print("triton ex.: examples the Triton twin ran; on the CPU it runs in Triton's "
                      "interpreter, only on examples of at most 3e7 FLOPs", highlight=False)
    for r in results:
        _render_detail(r, console, package)


def _render_detail(r: dict, console: Console, package: str | None) -> None:
    head = f"[bold]{r['kernel']}[/] on {r['device']}"
    if r["status"] == "error":
        console.print(f"{head}: [red]error[/]: {r['message']}")
        return
    if r["status"] in ("crash", "hang", "interrupted"):
        if r["status"] == "crash":
            console.print(f"{head}: [red]the kernel process died ({r['how']})[/]")
        elif r["status"] == "hang":
            console.print(f"{head}: [red]HANG[/]: no result within {r['limit_s']:g} s "
                          "(--case-timeout; the default grows with the case's size); stopped")
        else:
            console.print(f"{head}: [yellow]interrupted[/] after {r['examples']} passed examples")
        if r["status"] != "interrupted" and r.get("examples"):
            console.print(f"  {r['examples']} examples passed before", highlight=False)
        if r.get("last_case"):
            console.print(f"  while running case {case_json(r['last_case'])}", markup=False,
                          highlight=False)
            console.print(f"  replay: {replay_command(r, r['last_case'], package)}",
                          markup=False, highlight=False)
        for line in r.get("log_tail", [])[-8:] if r["status"] != "interrupted" else []:
            console.print(f"  | {line}", markup=False, highlight=False)
        return
    if r.get("flaky"):
        console.print(f"{head}: [red]flaky[/]: {r['flaky']}")
    f = r.get("failure")
    if f:
        console.print(f"{head}: [red]FAIL[/] ({f['what']}) — minimal failing case:")
        console.print(f"  {case_json(f['case'])}", markup=False, highlight=False)
        for impl in ("mojo", "triton"):
            for c in f.get(impl) or []:
                if c["passed"]:
                    continue
                console.print(
                    f"  {impl} {c['name']}: max abs err {c['max_abs_err']:.3e} > tolerance "
                    f"{c['tolerance']:.3e} (2 x torch-same-dtype err {c['baseline_err']:.3e} + atol "
                    f"{c['atol']:.1e}); {c['n_bad']}/{c['numel']} elements out "
                    f"({100 * c['n_bad'] / max(c['numel'], 1):.2f}%), NaN/Inf mismatches {c['nan_mismatch']}",
                    highlight=False)
                for w in c["worst"][:3]:
                    console.print(f"    at {tuple(w['index'])}: got {w['out']:.6g}, expected {w['ref']:.6g}",
                                  highlight=False)
        if f.get("triton_error"):
            console.print(f"  triton twin raised: {f['triton_error']}", markup=False)
        if f.get("mutated"):
            console.print(f"  the kernel wrote into its inputs: {', '.join(f['mutated'])}")
        console.print(f"  replay: {replay_command(r, f['case'], package)}", markup=False, highlight=False)
    for dt, integ in r.get("integrity", {}).items():
        if not integ["no_stale_state"]:
            console.print(f"{head} {dt}: [red]stale state[/]: after a NaN-poisoned run, fresh inputs "
                          "gave wrong results (unwritten outputs or state kept across calls)")
        if not integ["deterministic"]:
            console.print(f"{head} {dt}: [red]nondeterministic[/]: the same inputs gave different bits")
