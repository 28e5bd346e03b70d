"""`kt serve-bench`: start each engine, drive it with the same workloads at each load point, report.

Per engine: find its interpreter and environment, start its server on a free 127.0.0.1 port (or
attach to `--base-url`), wait for health (the wait ends as soon as the server process dies), send
the first request, whose success ends the cold start, then the other warmups (all excluded),
probe greedy logprobs for the agreement check, run every load point of every dataset (one JSON
each), stop the server. Once every engine is stopped, the fp32 reference probe (Hugging Face
transformers on the same model folder, `hf_reference.py`, under the first MAX engine's Python).
Then the table, the ratios, the agreement verdict and the plots.

Start-up modes (`--startup`):
* `serial` (default): one engine at a time, alone on the machine from start to stop.
* `concurrent`: every engine's server is started at once (each with its own KV-cache memory
  share, `--kv-cache-memory`, so they fit together), then the engines are measured one at a time
  while the others sit idle, each stopped once measured. Every result says so: its cold start was
  measured while N other engines were starting (`startup.started_with`), and its load points ran
  beside idle servers (`idle_engines_during_load`). An engine whose concurrent start fails is
  started again alone after the others are done, and says that too.

Exit: 0 when every request of every load point succeeded (and max+kt agrees with max where both
ran, or agrees with the fp32 reference where stock max does not); 1 when a request failed, an
engine did not start, or the agreement check failed (everything measured is still written); a
reference that fails is a warning; 2 for bad input or a missing environment, before any work; 130 on
Ctrl-C / SIGTERM, after writing the summary, report and table of the load points that finished.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from harness.io import write_json_atomic

from . import agreement, client, metrics, report, workload
from .checks import agreement_checks, reference_probe
from .config import (STARTUP_MODES, BenchConfig, BenchError, Live, RunFailed, RunInterrupted, build_workloads,
                     checkpoint_dtype, engine_lives, fit_to_gpu, prompts_for, read_model_config)
from .engines.base import ServingSettings
from .gpumem import GpuMonitor
from .process import ServerError, ServerProcess, free_port, port_in_use
from .records import gpu_info, result_row, run_record


def _get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def served_model(base_url: str) -> str:
    try:
        data = _get_json(base_url + "/v1/models")
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise BenchError(f"cannot reach an OpenAI server at {base_url}: {getattr(e, 'reason', e)}") from None
    ids = [m.get("id") for m in data.get("data", [])]
    if not ids:
        raise BenchError(f"{base_url}/v1/models lists no model")
    return ids[0]


class Bench:
    """One `kt serve-bench` run (see the module docstring)."""

    def __init__(self, cfg: BenchConfig, console: Console | None = None) -> None:
        self.cfg = cfg
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.rows: list[dict] = []
        self.probes: dict[str, list] = {}
        self.ref_probe: dict | None = None  # the fp32 reference's probe.json
        self.reference: dict | None = None  # where it came from, or why there is none
        self.problems: list[str] = []
        self.lives: list[Live] = []
        self.monitor = GpuMonitor()
        self.gpus = None
        self.held = False  # --measure-after waited for already
        self.started = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")

    # ----- before any server starts: everything that can be checked is checked
    def prepare(self) -> None:
        cfg = self.cfg
        if cfg.startup not in STARTUP_MODES:
            raise BenchError(f"--startup {cfg.startup!r}: use one of {', '.join(STARTUP_MODES)}")
        self.model_cfg = read_model_config(cfg.model)
        dtype = checkpoint_dtype(self.model_cfg)
        for run in cfg.runs:
            if run.opts.settings.dtype is None and dtype:
                run.opts.settings = ServingSettings(**(asdict(run.opts.settings) | {"dtype": dtype}))
        self.workloads, self.warm = build_workloads(cfg)
        tok = workload.load_tokenizer(cfg.model) if (Path(cfg.model) / "tokenizer.json").exists() else None
        self.count_tokens = (lambda s: workload.count_tokens(tok, s)) if tok else None
        self.probe_prompts = agreement.probe_prompts(workload.stable_words(tok), cfg.probe_lengths) if tok and cfg.probe else []
        if cfg.port is not None and port_in_use(cfg.host, cfg.port):
            raise BenchError(f"port {cfg.port} on {cfg.host} is busy")
        self.lives = engine_lives(cfg)
        if any(r.opts.device.startswith("gpu") for r in cfg.runs):
            self.gpus = gpu_info()
            fit_to_gpu(self.lives, self.gpus, cfg.model)

    # ----- one engine's life
    def launch(self, live: Live) -> None:
        cfg = self.cfg
        port = cfg.port + live.order if cfg.port is not None else free_port(cfg.host)
        if port_in_use(cfg.host, port):
            raise ServerError(f"port {port} on {cfg.host} is busy")
        live.base_url = f"http://{cfg.host}:{port}"
        live.argv = live.engine.command(live.python, Path(cfg.model).resolve(), cfg.host, port, live.run.opts)
        live.prov["server_command"] = shlex.join(live.argv)
        log = cfg.out / "logs" / f"{live.slug}.log"
        live.server = ServerProcess(live.run.label, live.argv, live.env, log,
                                    live.base_url + live.engine.health_path)
        self.console.print(f"[bold]{live.run.label}[/]: starting {live.engine.name} "
                           f"{live.prov['engine_version']} on {live.base_url} (log {log})")
        live.server.start()
        live.started_at = live.server.start_s
        self.monitor.register(live.run.label, live.server.pgid)

    def await_ready(self, live: Live) -> None:
        """Health, then the first request; the cold start ends when that request succeeds."""
        cfg = self.cfg
        live.server.wait_healthy(cfg.startup_timeout_s)
        live.ready_at = time.monotonic()
        live.model_id = served_model(live.base_url)
        deadline = live.started_at + cfg.startup_timeout_s
        errors = []
        while True:
            results, _, _ = self._load(live, self.warm[:1], client.LoadPoint(max_concurrency=1), None)
            if results and results[0].success:
                break
            errors.append(results[0].error if results else "not sent")
            if live.server.popen.poll() is not None or time.monotonic() > deadline or len(errors) >= 5:
                raise ServerError(f"{live.run.label}: the first request failed: {errors[-1]}")
            time.sleep(1.0)
        live.first_ok_at = time.monotonic()
        phases = live.engine.parse_log(live.server.log.read_text(errors="replace")) if live.server.log.exists() else {}
        live.startup |= {
            "cold_start_s": round(live.first_ok_at - live.started_at, 3),
            "health_ready_s": round(live.ready_at - live.started_at, 3),
            "first_request_retries": len(errors),
            "phases_from_log": phases,
        }
        self.console.print(f"{live.run.label}: first request answered {live.startup['cold_start_s']:.1f} s "
                           f"after start (health at {live.startup['health_ready_s']:.1f} s)"
                           + (f"; log: {', '.join(f'{k} {v}' for k, v in phases.items())}" if phases else ""))

    def attach(self, live: Live) -> None:
        live.base_url = live.run.base_url.rstrip("/")
        live.model_id = served_model(live.base_url)
        live.startup = {"mode": "attached", "cold_start_s": None}

    def stop(self, live: Live) -> None:
        if live.server is not None and live.stopped_at is None:
            live.server.stop()
            live.stopped_at = time.monotonic()
            if live.started_at is not None:
                live.prov["gpu_memory"] = self.monitor.peak(live.run.label, live.started_at, live.stopped_at)

    def fail(self, live: Live, msg: str) -> None:
        live.error = msg
        self.problems.append(msg)
        self.console.print(f"[red]{live.run.label}: {msg}[/]")
        self.stop(live)

    # ----- measuring
    def _load(self, live: Live, reqs, point, progress):
        cfg = self.cfg
        task = progress.add_task(f"{live.run.label} {point.name}", total=len(reqs)) if progress else None

        def done(_r: metrics.RequestResult) -> None:
            if progress is not None:
                progress.advance(task)

        out = asyncio.run(client.run_load(live.base_url, live.model_id, reqs, point, live.engine.request_fields(),
                                          cfg.seed, self.count_tokens, done, cfg.request_timeout_s))
        if progress is not None:
            progress.update(task, visible=False)
        return out

    def hold(self, live: Live) -> None:
        """--measure-after: wait until its file exists (once per run, before the first load point)."""
        path = self.cfg.measure_after
        if path is None or self.held:
            return
        self.held = True
        t0 = time.monotonic()
        deadline = t0 + self.cfg.startup_timeout_s
        with self.console.status(f"waiting for {path} before measuring"):
            while not Path(path).exists() and time.monotonic() < deadline:
                time.sleep(1.0)
        waited = time.monotonic() - t0
        found = Path(path).exists()
        live.startup["measure_after"] = {"path": str(path), "waited_s": round(waited, 1), "found": found}
        self.console.print(f"{live.run.label}: measuring after {waited:.0f} s wait for {path}"
                           + ("" if found else " (not there: gave up at --startup-timeout)"))

    def measure(self, live: Live) -> None:
        cfg = self.cfg
        self.hold(live)
        extra = live.engine.request_fields()
        # Warmups (excluded); a started server has answered the first already (its cold start).
        warm = self.warm[1:] if live.first_ok_at is not None else self.warm[: cfg.num_warmups]
        if warm:
            self._load(live, warm, client.LoadPoint(max_concurrency=1), None)
        if self.probe_prompts:
            self.probe(live, extra)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=self.console, transient=True) as progress:
            for wl in self.workloads:
                for pi, point in enumerate(cfg.points):
                    if live.server is not None and live.server.popen.poll() is not None:
                        self.fail(live, f"server exited with code {live.server.popen.poll()} during the load "
                                        f"points; log {live.server.log}")
                        return
                    reqs = wl.requests[: prompts_for(cfg, point)]
                    idle = [o.run.label for o in self.lives if o is not live and o.up]
                    t0 = time.monotonic()
                    results, duration, not_sent = self._load(live, reqs, point, progress)
                    self.row(live, wl, pi, point, reqs, results, duration, not_sent, t0, idle)
        live.measured = True

    def probe(self, live: Live, extra: dict) -> None:
        """Greedy top-k logprobs for the agreement check; greedy texts where the server serves no
        logprobs (HTTP 400 for a logprobs request: MAX's overlap scheduler)."""
        cfg, label = self.cfg, live.run.label
        record: dict = {"prompts": self.probe_prompts}
        try:
            try:
                record["steps"] = agreement.probe(live.base_url, live.model_id, self.probe_prompts, extra=extra,
                                                  timeout_s=cfg.request_timeout_s)
            except urllib.error.HTTPError as e:
                if e.code != 400:
                    raise
                record["logprobs_refused"] = e.read().decode(errors="replace")[:300]
                self.console.print(f"{label}: the server serves no logprobs here; the agreement probe compares "
                                   "greedy texts")
            record["texts"] = agreement.probe_texts(live.base_url, live.model_id, self.probe_prompts, extra=extra,
                                                    timeout_s=cfg.request_timeout_s)
        except (urllib.error.URLError, OSError, KeyError, TypeError, ValueError) as e:
            self.console.print(f"[yellow]{label}: probe failed, no agreement check: {e}[/]")
            return
        self.probes[label] = record
        write_json_atomic(cfg.out / live.slug / "probe.json", record)

    def row(self, live, wl, pi, point, reqs, results, duration, not_sent, t0, idle) -> None:
        cfg = self.cfg
        row = result_row(cfg, live, wl, pi, point, metrics.compute(results, duration, cfg.goodput),
                         num_prompts=len(reqs), whash=workload.workload_hash(reqs), not_sent=not_sent,
                         mem=self.monitor.peak(live.run.label, t0), idle=idle, gpus=self.gpus)
        name = point.name if len(self.workloads) == 1 else f"{wl.dataset}_{point.name}"
        path = cfg.out / live.slug / f"{name}.json"
        write_json_atomic(path, row)
        self.rows.append(row)
        tput = row["output_throughput"]
        self.console.print(f"{live.run.label} {wl.dataset} {point.name}: {row['completed']} ok, {row['failed']} failed, "
                           f"{tput:.1f} out tok/s -> {path}")
        if row["failed"]:
            self.problems.append(f"{live.run.label} {wl.dataset} {point.name}: {row['failed']} of "
                                 f"{len(results)} requests failed")
            for err, n in row["error_counts"].items():
                self.console.print(f"  [red]{n} x {err}[/]")

    # ----- the run
    def run_serial(self, lives: list[Live], mode: str = "serial", note: str = "started and measured alone") -> None:
        for live in lives:
            live.startup = {"mode": mode, "started_with": [], "note": note}
            try:
                if live.run.base_url:
                    self.attach(live)
                else:
                    self.launch(live)
                    self.await_ready(live)
                self.measure(live)
            except (ServerError, BenchError) as e:
                self.fail(live, str(e))
            finally:
                self.stop(live)

    def run_concurrent(self) -> None:
        lives = self.lives
        n = len(lives)
        for live in lives:
            live.startup = {"mode": "concurrent", "note": f"started at once with {n - 1} other engine(s); "
                            "measured one at a time while the others sat idle"}
            try:
                self.launch(live)
            except ServerError as e:
                self.fail(live, str(e))
        threads = []
        for live in lives:
            if live.error:
                continue

            def wait(live=live):
                try:
                    self.await_ready(live)
                except (ServerError, BenchError) as e:
                    live.error = str(e)
            t = threading.Thread(target=wait, daemon=True)
            t.start()
            threads.append(t)
        while any(t.is_alive() for t in threads):  # joins in steps: Ctrl-C stays responsive
            for t in threads:
                t.join(timeout=0.5)
        for live in lives:  # who was starting while each engine started
            end = live.first_ok_at or time.monotonic()
            live.startup["started_with"] = [
                o.run.label for o in lives if o is not live and o.started_at is not None
                and o.started_at < end and (o.first_ok_at or time.monotonic()) > live.started_at]
        retry = []
        for live in lives:
            if live.error:
                msg = live.error
                live.error = None
                self.stop(live)
                self.console.print(f"[yellow]{live.run.label}: concurrent start failed ({msg.splitlines()[0]}); "
                                   "it starts again alone once the others are measured[/]")
                retry.append((live, msg))
        for live in lives:
            if live.up and live not in [r for r, _ in retry]:
                try:
                    self.measure(live)
                except (ServerError, BenchError) as e:
                    self.fail(live, str(e))
                finally:
                    self.stop(live)
        for live, msg in retry:
            live.stopped_at = None
            live.server = None
            live.first_ok_at = None
            self.run_serial([live], mode="serial (retry)",
                            note=f"its concurrent start failed ({msg.splitlines()[0]}); started again alone "
                                 "after the others were measured and stopped")

    def go(self) -> list[dict]:
        cfg = self.cfg
        self.prepare()
        cfg.out.mkdir(parents=True, exist_ok=True)
        if any(r.opts.device.startswith("gpu") for r in cfg.runs):
            self.monitor.start()
        interrupted = None
        try:
            if cfg.startup == "concurrent" and len(self.lives) > 1 and not any(r.base_url for r in cfg.runs):
                self.run_concurrent()
            else:
                self.run_serial(self.lives)
            self.reference_probe()
        except KeyboardInterrupt as e:
            interrupted = getattr(e, "signo", None) or 2
        finally:
            for live in self.lives:
                self.stop(live)
            self.monitor.stop()
        self.finish(interrupted)
        return self.rows

    def reference_probe(self) -> None:
        """The fp32 reference probe (`checks.reference_probe`), once every engine is stopped."""
        if self.probes:
            self.ref_probe, self.reference = reference_probe(self.cfg, self.lives, self.probe_prompts,
                                                             self.console)

    def finish(self, interrupted) -> None:
        cfg = self.cfg
        checks, problems = agreement_checks(cfg, self.lives, self.probes, self.ref_probe, self.console)
        self.problems += problems
        if checks:
            write_json_atomic(cfg.out / "agreement.json", checks)
        summary = [{k: v for k, v in r.items() if not isinstance(v, list)} for r in self.rows]
        write_json_atomic(cfg.out / "summary.json", summary)
        run = run_record(cfg, started=self.started, gpus=self.gpus, workloads=getattr(self, "workloads", []),
                         lives=self.lives, rows=self.rows, checks=checks, problems=self.problems,
                         interrupted=interrupted, reference=self.reference)
        write_json_atomic(cfg.out / "run.json", run)
        report.write_text_atomic(cfg.out / "report.md", report.run_markdown(run, self.rows))
        if self.rows:
            report.print_table(self.rows, Console(width=200))
            for p in report.plots(self.rows, cfg.out):
                self.console.print(f"plot: {p}")
        if interrupted:
            raise RunInterrupted(f"interrupted by {signal.Signals(interrupted).name}: wrote the summary, report and "
                                 f"table of the {len(self.rows)} load point(s) that finished to {cfg.out}")
        if not self.rows and not self.problems:
            self.problems.append("no load point ran")
        if self.problems:
            total = sum(r["completed"] + r["failed"] for r in self.rows)
            ok = sum(r["completed"] for r in self.rows)
            first = self.problems[0]
            more = f" (+{len(self.problems) - 1} more problem(s), see {cfg.out / 'run.json'})" if len(self.problems) > 1 else ""
            raise RunFailed(f"{first}{more}; {ok}/{total} requests succeeded; results in {cfg.out}")


def serve_bench(cfg: BenchConfig, console: Console | None = None) -> list[dict]:
    """Run the whole benchmark; return one row (metrics + provenance) per engine, dataset and load point."""
    return Bench(cfg, console).go()
