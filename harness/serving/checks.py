"""The agreement checks of a serve-bench run: the fp32 reference probe (Hugging Face transformers
on the same model folder, `hf_reference.py`, in a child process under an engine's Python) and the
comparison of every engine's probe with stock MAX's and with the reference."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from rich.console import Console

from harness.io import write_json_atomic

from . import agreement
from .config import BenchConfig, Live
from .process import ServerProcess, tail

REFERENCE = Path(__file__).with_name("hf_reference.py")


def reference_probe(cfg: BenchConfig, lives: list[Live], prompts: list[str],
                    console: Console) -> tuple[dict | None, dict | None]:
    """The fp32 reference probe in a child process (under the first MAX engine's Python, else
    vLLM's, on the run's device), limited to --startup-timeout: (its probe.json, where it came
    from) or (None, why there is none). A reference that fails is a warning: the engines are still
    compared with each other."""
    pythons = [lv for name in ("max", "vllm") for lv in lives if lv.run.engine == name and lv.python]
    if not pythons:
        return None, None
    live, device = pythons[0], cfg.runs[0].opts.device
    device = "cpu" if device == "cpu" else "cuda:" + (device.split(":")[1].split(",")[0] if ":" in device else "0")
    out, log = cfg.out / "reference", cfg.out / "logs" / "reference.log"
    (out / "probe.json").unlink(missing_ok=True)
    write_json_atomic(out / "prompts.json", prompts)
    argv = [str(live.python), str(REFERENCE), "--model", str(Path(cfg.model).resolve()), "--prompts",
            str(out / "prompts.json"), "--out", str(out / "probe.json"), "--device", device,
            "--max-tokens", str(agreement.PROBE_TOKENS), "--top-k", str(agreement.PROBE_TOP_K)]
    console.print(f"reference: fp32 greedy probe with transformers on {device}, {live.python} (log {log})")
    child = ServerProcess("reference", argv, live.env, log, health_url="")
    t0 = time.monotonic()
    try:
        with console.status("reference: computing the fp32 probe"):
            code = child.start().wait_exit(cfg.startup_timeout_s)
    finally:
        child.stop()
    seconds = round(time.monotonic() - t0, 1)
    if code == 0:
        probe = json.loads((out / "probe.json").read_text())
        info = {k: probe.get(k) for k in ("device", "dtype", "transformers", "torch")}
        info |= {"probe": str(out / "probe.json"), "seconds": seconds, "python": str(live.python)}
        console.print(f"reference: done in {seconds:.0f} s -> {out / 'probe.json'}")
        return probe, info
    why = f"no result in {cfg.startup_timeout_s:.0f} s" if code is None else \
        f"exit code {code}: {(tail(log, 1) or 'no output').strip()}"
    console.print(f"[yellow]reference: {why}; no engine is compared with the fp32 reference (log {log})[/]")
    return None, {"error": f"{why} (log {log})", "python": str(live.python)}


def agreement_checks(cfg: BenchConfig, lives: list[Live], probes: dict[str, dict], ref: dict | None,
                     console: Console) -> tuple[dict, list[str]]:
    """Every engine against the reference, and every max+kt variant against stock max: (the
    checks for agreement.json, the problems that fail the run). A variant that disagrees with max
    does not fail the run when max disagrees with the reference and the variant agrees with it."""
    checks: dict[str, dict] = {}
    problems: list[str] = []

    def check(label: str, stock: dict, name: str) -> bool:
        dtype = next((lv.run.opts.settings.dtype for lv in lives if lv.run.label == label), None)
        tol = cfg.agreement_tol if cfg.agreement_tol is not None else agreement.default_tol(dtype)
        res = agreement.compare_probes(stock, probes[label], tol)
        checks[f"{label} vs {name}"] = asdict(res) | {"ok": res.ok, "summary": res.summary()}
        console.print(f"[bold]{label} vs {name}[/]: {res.summary()}")
        return res.ok

    vouched = {label for label in probes if check(label, ref, "reference")} if ref is not None else set()
    for label in probes:
        base = label.split("+kt", 1)[0]  # max+kt and max+kt:OP+OP against max
        if label == base or base not in probes or check(label, probes[base], base):
            continue
        if base not in vouched and label in vouched:
            checks[f"{label} vs {base}"]["waived"] = f"{base} disagrees with the fp32 reference; {label} agrees"
            console.print(f"[yellow]stock {base} disagrees with the fp32 reference and {label} agrees "
                          f"with it: {label}'s disagreement with {base} does not fail the run[/]")
        else:
            problems.append(f"{label} disagrees with {base}: {checks[f'{label} vs {base}']['summary']}")
    return checks, problems
