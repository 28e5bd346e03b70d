"""`kt microbench`'s run: the correctness gate, unavailable and failing providers as rows,
provenance and metrics in the rows, yardsticks, work the events miss, where a row's time
went, one-line CLI errors, and (slow) the CPU run end to end through the CLI."""

import dataclasses
import json
import subprocess
import sys
import time

import pytest
import torch

import pykernels
from harness.bench.engine import CPU_TIMER_LABEL, Settings, benchmark_families, derive_metrics
from harness.bench.families import Family, load_families
from harness.bench.plots import plot
from harness.bench.report import row_seconds
from harness.io import write_json_atomic
from harness.spec import Bound, Unavailable

class _Device:
    """A device busy until a host-clock time; `sync` waits for it."""

    def __init__(self):
        self.until = 0.0

    def busy(self, ms):
        self.until = max(time.perf_counter(), self.until) + ms / 1e3

    def sync(self):
        time.sleep(max(0.0, self.until - time.perf_counter()))


def _row(provider, p50, **kw):
    return {"kernel": "k", "provider": provider, "shape": {"S": 1}, "params": {}, "dtype": "bf16",
            "device": "H100", "status": "ok", "p50": p50, "p10": p50 * 0.99, "p90": p50 * 1.01,
            "label": "S=1", **kw}


ROW_FIELDS = ("kernel", "provider", "shape", "params", "dtype", "metric", "unit", "p50", "p10",
              "p90", "host_ms", "device", "backend", "driver", "versions", "git_sha", "command",
              "status")


def _tiny_run(providers: dict, names: list[str], **kw):
    """rms_norm on one small CPU shape with extra providers planted in a copy of its spec."""
    spec = pykernels.get("rms_norm")
    spec = dataclasses.replace(spec, providers={**spec.providers, **providers})
    fam = Family("t", "", "cpu", "float32", "memory", "M",
                    [(spec.complete({"M": 8, "N": 64}), spec.full_params({}))])
    settings = Settings(warmup_ms=1, min_reps=3, max_reps=5, budget_s=0.05)
    return benchmark_families(spec, "cpu", [fam], names, settings=settings, command="kt test", **kw)


def _wrong(device, dtype):
    def bind(inputs, params):
        x, w = inputs["x"], inputs["w"]
        return lambda: (x * w * 1.01,)  # forgot the normalization

    return bind


def _unavailable(device, dtype):
    raise Unavailable("n/a on cpu: planted")


def _broken(device, dtype):
    def bind(inputs, params):
        raise ValueError("planted bind failure\nsecond line")

    return bind


def test_correctness_gate_refuses_a_wrong_provider_and_times_the_right_one():
    rec = _tiny_run({"wrong": _wrong}, ["wrong", "torch_eager"])
    rows = {r["provider"]: r for r in rec["rows"]}
    assert rows["wrong"]["status"] == "WRONG"
    assert "p50" not in rows["wrong"] and "samples_ms" not in rows["wrong"]
    assert not rows["wrong"]["check"]["passed"] and "tolerance" in rows["wrong"]["note"]
    assert rows["torch_eager"]["status"] == "ok" and rows["torch_eager"]["check"]["passed"]
    assert rows["torch_eager"]["p10"] <= rows["torch_eager"]["p50"] <= rows["torch_eager"]["p90"]


def test_unavailable_and_failing_providers_are_rows_not_crashes():
    rec = _tiny_run({"gone": _unavailable, "broken": _broken}, ["gone", "broken", "torch_eager"])
    rows = {r["provider"]: r for r in rec["rows"]}
    assert rows["gone"]["status"] == "n/a" and "planted" in rows["gone"]["note"]
    assert rows["broken"]["status"] == "error"
    assert rows["broken"]["note"] == "ValueError: planted bind failure"
    assert rows["torch_eager"]["status"] == "ok"


def test_rows_carry_provenance_metrics_and_speedup(tmp_path):
    rec = _tiny_run({}, ["torch_eager", "torch_functional"], baseline="torch_eager")
    path = tmp_path / "r.json"
    write_json_atomic(path, rec)
    saved = json.loads(path.read_text())
    assert saved["timer"] == CPU_TIMER_LABEL and saved["interrupted"] is False
    assert {"time_utc", "gpu", "versions", "git_sha", "platform"} <= set(saved["provenance"])
    for row in saved["rows"]:
        missing = [f for f in ROW_FIELDS if f not in row]
        assert not missing, missing
        assert row["metric"] == "time" and row["unit"] == "ms" and row["command"] == "kt test"
        assert set(row["versions"]) >= {"torch", "triton", "max", "mojo"}
        assert row["gb_s"] == pytest.approx(row["bytes"] / (row["p50"] * 1e-3) / 1e9)
        assert row["baseline"] == "torch_eager"
    base = saved["rows"][0]
    assert base["speedup"] == 1.0


def test_plot_writes_a_png(tmp_path):
    rec = _tiny_run({}, ["torch_eager"])
    plot(rec, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_of_a_run_that_timed_nothing_is_one_line(tmp_path):
    """gpu_run.sh plots a run stopped at its limit: with no provider timed it says so in one
    line, without a traceback."""
    rec = _tiny_run({}, ["torch_eager"])
    rec["rows"] = [{k: v for k, v in r.items() if k not in ("p50", "tflops", "gb_s")}
                   | {"status": "error", "note": "stopped"} for r in rec["rows"]]
    write_json_atomic(tmp_path / "r.json", rec)
    r = subprocess.run([sys.executable, "-m", "harness.bench", "plot", str(tmp_path / "r.json"),
                        str(tmp_path / "p.png")], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == "no plot: nothing to plot: no provider was timed"
    assert not (tmp_path / "p.png").exists()


@pytest.mark.slow
def test_cpu_run_end_to_end_then_compare(kt, tmp_path):
    plot = tmp_path / "a.png"
    r = kt("microbench", "fused_rope_attention", "--device", "cpu", "--plot", str(plot),
           json_out=True, timeout=600)
    assert r.code == 0, r.output
    assert "CPU timing (perf_counter), not comparable with GPU" in r.stdout
    rows = r.json["rows"]
    status = {row["provider"]: row["status"] for row in rows}
    for p in ("kt_graph", "kt_bridge", "triton", "torch_flash", "torch_compile"):
        assert status[p] == "ok", (p, r.output)
    assert status["max_flash"] == "n/a" and status["torch_cudnn"] == "n/a"
    assert all("bridge_overhead_ms" in row for row in rows
               if row["provider"] == "kt_bridge" and row["status"] == "ok")
    assert plot.read_bytes()[:4] == b"\x89PNG"
    for row in rows:
        assert not [f for f in ROW_FIELDS if f not in row and row["status"] == "ok"]

    # an old run 10x faster than this one: every matched row is a regression, exit code 1
    old = dict(r.json)
    old["rows"] = [dict(row, **{k: row[k] / 10 for k in ("p10", "p50", "p90") if k in row})
                   for row in rows]
    old_path = tmp_path / "old.json"
    old_path.write_text(json.dumps(old))
    r2 = kt("microbench", "fused_rope_attention", "--device", "cpu", "--shapes", "cpu",
            "--providers", "kt_graph,torch_flash", "--compare", str(old_path), timeout=600)
    assert r2.code == 1, r2.output
    assert "REGRESSION" in r2.stdout and "regression(s)" in r2.stdout


def test_cli_errors_are_one_line(kt):
    for args, needle in ((("nosuch",), "unknown kernel 'nosuch'"),
                         (("rope", "--shapes", "nope"), "unknown shape family nope"),
                         (("rope", "--device", "cpu", "--providers", "x"), "unknown provider x")):
        r = kt("microbench", *args)
        assert r.code == 2 and r.stderr.strip().startswith("kt: error: "), r.output
        assert needle in r.stderr and "Traceback" not in r.output


def _yardstick(device, dtype):
    def bind(inputs, params):
        x = inputs["x"]
        return Bound(lambda: (x * 2.0,), yardstick="a different computation")

    return bind


def test_yardstick_is_timed_unchecked_and_never_the_baseline():
    rec = _tiny_run({"ruler": _yardstick}, ["ruler", "torch_eager"])
    rows = {r["provider"]: r for r in rec["rows"]}
    ruler = rows["ruler"]
    assert ruler["status"] == "ok" and ruler["yardstick"] is True and "p50" in ruler
    assert "check" not in ruler and "not checked" in ruler["note"]
    # asked for as the baseline, it is refused: speedups stay relative to the op's providers
    rec = _tiny_run({"ruler": _yardstick}, ["ruler", "torch_eager"], baseline="ruler")
    assert {r["baseline"] for r in rec["rows"]} == {"torch_eager"}


def test_a_yardstick_faster_than_everything_is_still_not_the_baseline():
    rows = [_row("ruler", 0.5, yardstick=True, flops=1.0, bytes=1.0),
            _row("torch_cudnn", 1.0, flops=1.0, bytes=1.0),
            _row("kt_graph", 0.8, flops=1.0, bytes=1.0)]
    derive_metrics(rows, "cpu", None, "memory", None, gpu=False)
    assert {r["baseline"] for r in rows} == {"torch_cudnn"}
    assert rows[0]["speedup"] == pytest.approx(2.0)


@pytest.mark.parametrize("kernel", ["rope", "rms_norm"])
def test_copy_alone_moves_the_ops_own_bytes_unchecked(kernel):
    """The memory-bound ops' copy yardstick: its row counts the op's bytes (so its GB/s and
    % of peak read against kt's), copies what it is given, and is never checked nor the
    baseline."""
    spec = pykernels.get(kernel)
    settings = Settings(warmup_ms=1, min_reps=3, max_reps=5, budget_s=0.05)
    fam = load_families(spec)["cpu"]
    rec = benchmark_families(spec, "cpu", [fam], ["copy_alone", "torch_eager"], settings=settings)
    by_case: dict = {}
    for r in rec["rows"]:
        by_case.setdefault(r["label"], {})[r["provider"]] = r
    assert len(by_case) == len(fam.cases)
    for rows in by_case.values():
        copy, eager = rows["copy_alone"], rows["torch_eager"]
        assert copy["status"] == "ok" and copy["yardstick"] is True and "check" not in copy
        assert copy["bytes"] == eager["bytes"] > 0 and copy["gb_s"] > 0
        assert copy["baseline"] == "torch_eager"
    bind = spec.providers["copy_alone"]("cpu", torch.float32)
    inputs = spec.make_inputs(fam.cases[0][0], fam.cases[0][1], torch.float32, torch.device("cpu"),
                              torch.Generator().manual_seed(0))
    bound = bind(inputs, fam.cases[0][1])
    names = [n for n in ("q", "k", "x") if n in inputs]
    for out, name in zip(bound.run(), names):
        assert torch.equal(out, inputs[name]) and out.data_ptr() != inputs[name].data_ptr()


def _unseen(device, dtype):
    """A MAX-like provider whose work the timer cannot see: `run` returns at once while its
    'device' stays busy 3 ms; only `sync` waits for it (events on the wrong stream)."""
    spec = pykernels.get("rms_norm")

    def bind(inputs, params):
        out = spec.reference(inputs, params)
        dev = _Device()

        def run():
            dev.busy(3.0)
            return out

        return Bound(run, stream=1, sync=dev.sync)

    return bind


def test_work_the_events_missed_is_timed_host_synchronized():
    rec = _tiny_run({"unseen": _unseen}, ["unseen"])
    (row,) = rec["rows"]
    assert row["status"] == "ok" and "events missed MAX's stream" in row["note"]
    assert row["p50"] >= 2.5 and row["launch_hidden"] is False


def test_rows_say_where_their_time_went():
    row = {"prepare_s": 13.1, "bind_s": 0.0, "first_call_s": 1.5, "bench_s": 1.9}
    assert row_seconds(row) == "prepare 13.1 s, first call + check 1.5 s, timing 0.4 s"
    assert row_seconds({"bind_s": 0.001}) == "< 0.1 s"
    rec = _tiny_run({}, ["torch_eager", "torch_functional"])
    first, second = rec["rows"]
    assert "prepare_s" in first and "bench_s" in first and first["bench_s"] > 0
    assert "prepare_s" in second  # each provider's own prepare




def test_the_rows_of_a_case_are_timed_in_interleaved_rounds_with_intervals_and_a_second_timing():
    rec = _tiny_run({}, ["torch_eager", "torch_functional"], baseline="torch_eager")
    eager, functional = rec["rows"]
    for r in (eager, functional):
        assert r["status"] == "ok" and r["interleaved"] is True
        assert r["rounds"] == len(r["samples_ms"]) == eager["rounds"] >= 3
        assert r["stopped_by"] in ("ci", "budget", "max_rounds")
        assert "throughput_ms" in r and r["throughput_calls"] >= 2
        assert r["timings_agree"] in (True, False, None)
        assert (r["timings_agree"] is None) == ("timings_note" in r and "not compared" in
                                                 r["timings_note"])
        assert (r["timings_agree"] is False) == ("timings disagree" in r["note"])
    vs = functional["vs_baseline"]
    assert vs["lo"] <= vs["ratio"] <= vs["hi"] and vs["halfwidth"] >= 0
    assert functional["speedup_ci"][0] <= functional["speedup_ci"][1]


def _timed(provider, samples, **kw):
    return _row(provider, sorted(samples)[len(samples) // 2], samples_ms=samples,
                rounds=len(samples), interleaved=True, flops=1.0, bytes=1.0, host_ms=0.01, **kw)


def test_ratios_come_from_the_rounds_and_rows_timed_otherwise_are_kept_out():
    drift = [1.0, 1.5, 1.0, 1.5, 1.0, 1.5, 1.0]
    rows = [_timed("kt_graph", [0.9 * d for d in drift]), _timed("torch_a", drift),
            _timed("max_x", [0.5 * d for d in drift], ratio_excluded="host-synced timing")]
    derive_metrics(rows, "cpu", None, "memory", None, gpu=False)
    kt, a, mx = rows
    assert kt["ratios"]["torch_a"]["ratio"] == pytest.approx(0.9)
    assert kt["ratios"]["torch_a"]["lo"] == pytest.approx(0.9)  # no noise left in the rounds
    assert "max_x" not in kt["ratios"] and kt["baseline"] == "torch_a"  # not the faster max_x
    assert "speedup" not in mx and "kept out of ratios" in mx["note"]


def test_a_row_says_which_spin_timed_it_and_stays_out_of_ratios_only_while_uncovered():
    from harness.bench.engine import _timing_fields
    from harness.timing import Timing

    first = {"cover_ms": 0.2, "uncovered": 179, "n": 200}

    def timed(uncovered, retimed_from):
        return Timing([0.07] * 200, "cuda", "ci", 30, [0.22] * 200, cover_ms=0.43,
                      uncovered=uncovered, hidden=True, retimed_from=retimed_from)

    covered = _timing_fields(timed(3, first), "", "cuda")  # re-timed, then covered
    assert covered["launch_retimed"] is True and covered["launch_cover_ms"] == 0.43
    assert covered["launch_first_pass"] == first and covered["uncovered"] == 3
    assert "ratio_excluded" not in covered and "idle" not in covered["note"]
    still = _timing_fields(timed(150, first), "", "cuda")  # re-timed, still uncovered
    assert still["ratio_excluded"] == "GPU idle time timed"
    assert "150/200 calls" in still["note"] and "re-timed with a 0.43 ms spin" in still["note"]
    once = _timing_fields(timed(15, None), "", "cuda")  # 7.5 %: timed once, kept in
    assert once["launch_retimed"] is False and "launch_first_pass" not in once
    assert "ratio_excluded" not in once
