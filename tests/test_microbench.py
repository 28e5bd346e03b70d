"""`kt microbench`: family files, the correctness gate, provenance in the rows, `--compare`'s
noise rule, unavailable providers, and (slow) the CPU run end to end through the CLI."""

import dataclasses
import json
import time

import pytest

import pykernels
from harness import microbench as mb

ROW_FIELDS = ("kernel", "provider", "shape", "params", "dtype", "metric", "unit", "p50", "p10",
              "p90", "host_ms", "device", "backend", "driver", "versions", "git_sha", "command",
              "status")


@pytest.mark.parametrize("kernel", list(pykernels.discover()))
def test_family_files_parse_and_every_shape_validates(kernel):
    spec = pykernels.get(kernel)
    families = mb.load_families(spec)
    assert {f.device for f in families.values()} == {"cpu", "gpu"}
    for fam in families.values():
        assert fam.dtype == "bfloat16" and fam.bound in ("compute", "memory")
        for shape, params in fam.cases:
            assert mb.validate_bench_shape(spec, shape, params) is None
            assert shape == spec.complete({a.name: shape[a.name] for a in spec.axes})
            assert set(params) == {p.name for p in spec.params}
        if fam.device == "cpu":  # CI shapes stay small
            assert max(spec.flops(s, p) for s, p in fam.cases) < 1e8
    assert set(spec.providers) <= set(mb.providers_of(spec))


def test_issue_families_are_covered():
    att = mb.load_families(pykernels.get("fused_rope_attention"))
    prefill = [s for f in ("prefill", "prefill_gqa") for s, _ in att[f].cases]
    assert {(s["B"], s["Sq"]) for s in prefill} == {(8, 1024), (2, 4096), (1, 8192), (1, 16384)}
    assert {s["Hq"] for s in prefill} == {32} and {s["Hk"] for s in prefill} == {8, 32}
    assert {p["causal"] for f in ("prefill", "prefill_gqa") for _, p in att[f].cases} == {0, 1}
    decode = att["decode"].cases
    assert {s["Sq"] for s, _ in decode} == {1} and all(s["group"] > 1 for s, _ in decode)
    assert min(s["Skv"] for s, _ in decode) == 1024 and max(s["Skv"] for s, _ in decode) == 32768
    for fam in mb.load_families(pykernels.get("rope")).values():
        if fam.device == "gpu":  # "RoPE alone at >= 16M elements" (of q and k)
            assert all(s["B"] * s["S"] * (s["Hq"] + s["Hk"]) * s["D"] >= 16 * 2**20
                       for s, _ in fam.cases)


def test_bench_shapes_keep_every_check_but_the_upper_bounds():
    spec = pykernels.get("rms_norm")
    assert mb.validate_bench_shape(spec, {"M": 32768, "N": 4096}, {}) is None
    assert "axis M" in mb.validate_bench_shape(spec, {"M": 0, "N": 4096}, {})
    assert "unknown axes" in mb.validate_bench_shape(spec, {"M": 4, "N": 4, "K": 1}, {})
    att = pykernels.get("fused_rope_attention")
    shape = {"B": 1, "Sq": 4096, "cache": 0, "Hk": 8, "group": 4, "D": 100}
    assert "axis D" in mb.validate_bench_shape(att, shape, {})  # choices stay strict


def test_bad_family_file_is_one_clear_error(tmp_path):
    spec = pykernels.get("rms_norm")
    bad = tmp_path / "f.toml"
    bad.write_text('[families.x]\nbound = "compute"\nshapes = [{ M = 4 }]\n')
    with pytest.raises(mb.MicrobenchError, match=r"families.x.*missing axes N"):
        mb.load_families(spec, bad)
    with pytest.raises(mb.MicrobenchError, match="unknown shape family nope"):
        mb.select_families(spec, mb.load_families(spec), ["nope"], "cpu")
    with pytest.raises(mb.MicrobenchError, match="unknown provider nope"):
        mb.select_providers(spec, "torch_eager,nope")


def _tiny_run(providers: dict, names: list[str], **kw):
    """rms_norm on one small CPU shape with extra providers planted in a copy of its spec."""
    spec = pykernels.get("rms_norm")
    spec = dataclasses.replace(spec, providers={**spec.providers, **providers})
    fam = mb.Family("t", "", "cpu", "float32", "memory", "M",
                    [(spec.complete({"M": 8, "N": 64}), spec.full_params({}))])
    settings = mb.Settings(warmup_ms=1, min_reps=3, max_reps=5, budget_s=0.05)
    return mb.run(spec, "cpu", [fam], names, settings=settings, command="kt test", **kw)


def _wrong(device, dtype):
    def bind(inputs, params):
        x, w = inputs["x"], inputs["w"]
        return lambda: (x * w * 1.01,)  # forgot the normalization

    return bind


def _unavailable(device, dtype):
    raise mb.Unavailable("n/a on cpu: planted")


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
    from harness.io import write_json_atomic

    rec = _tiny_run({}, ["torch_eager", "torch_functional"], baseline="torch_eager")
    path = tmp_path / "r.json"
    write_json_atomic(path, rec)
    saved = json.loads(path.read_text())
    assert saved["timer"] == mb.CPU_TIMER_LABEL and saved["interrupted"] is False
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


def _row(provider, p50, spread=0.02, **kw):
    return {"kernel": "k", "provider": provider, "shape": {"S": 1}, "params": {}, "dtype": "bf16",
            "device": "H100", "status": "ok", "p50": p50, "p10": p50 * (1 - spread / 2),
            "p90": p50 * (1 + spread / 2), "label": "S=1", **kw}


def test_compare_flags_a_regression_beyond_noise_only():
    old = [_row("a", 1.0), _row("b", 1.0), _row("c", 1.0, spread=0.2), _row("gone", 1.0)]
    new = [_row("a", 1.04), _row("b", 1.3), _row("c", 1.3, spread=0.2), _row("new", 1.0)]
    cmp = mb.compare_records(new, old)
    verdict = {m["provider"]: m["regression"] for m in cmp["matched"]}
    assert verdict == {"a": False, "b": True, "c": False}  # c: 30% < 2 x hypot(0.2, 0.2)
    assert [r["provider"] for r in cmp["regressions"]] == ["b"]
    assert [r["provider"] for r in cmp["only_new"]] == ["new"]
    assert [r["provider"] for r in cmp["only_old"]] == ["gone"]
    assert mb.regression_threshold(_row("x", 1.0, 0.0), _row("x", 1.0, 0.0)) == mb.REGRESSION_FLOOR


def test_compare_lists_rows_that_cannot_be_compared():
    old = [_row("a", 1.0)]
    new = [dict(_row("a", 1.0), status="WRONG")]
    cmp = mb.compare_records(new, old)
    assert not cmp["matched"] and not cmp["regressions"] and len(cmp["not_comparable"]) == 1


def test_plot_writes_a_png(tmp_path):
    rec = _tiny_run({}, ["torch_eager"])
    mb.plot(rec, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_attention_check_views_cover_first_and_last_heads_with_their_kv_heads():
    spec = pykernels.get("fused_rope_attention")
    shape = spec.complete({"B": 2, "Sq": 3, "cache": 1, "Hk": 2, "group": 4, "D": 16})
    views = mb._bench_views(spec, shape)
    assert len(views) == 4
    last = views[-1]
    assert last["q"][2] == slice(7, 8) and last["k"][2] == slice(1, 2) and last["o"] == last["q"]


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
        return mb.Bound(lambda: (x * 2.0,), yardstick="a different computation")

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
    mb._derive(rows, pykernels.get("rms_norm"), "cpu", None, "memory", None, gpu=False)
    assert {r["baseline"] for r in rows} == {"torch_cudnn"}
    assert rows[0]["speedup"] == pytest.approx(2.0)


def _att(provider, p50, family="prefill", label="B=1 Sq=8192 causal=0", **kw):
    return {"kernel": "fused_rope_attention", "provider": provider, "family": family,
            "label": label, "status": "ok", "p50": p50, **kw}


def test_target_lines_state_each_target_as_a_ratio_from_one_run():
    lines = mb.target_lines([_att("kt_graph", 1.9), _att("cudnn_alone", 2.0),
                             _att("torch_compile", 2.5), _att("max_flash", 1.8),
                             _att("kt_graph", 0.5, family="decode", gb_s=2700.0, pct_peak=80.6)])
    (prefill,) = [ln for ln in lines if "prefill" in ln]
    assert "goal kt/cudnn_alone 0.950 (moonshot met)" in prefill
    assert "milestone kt/torch_compile 0.760" in prefill and "kt/max_flash 1.056" in prefill
    assert any("decode" in ln and "80.6% of HBM" in ln for ln in lines)


def test_goal_verdicts_at_their_thresholds():
    assert mb.goal_verdict(0.95) == "moonshot met"
    assert mb.goal_verdict(0.951) == mb.goal_verdict(1.0) == "goal met"
    assert mb.goal_verdict(1.001) == "goal not met"


def test_summary_prints_the_goal_ratio_for_every_prefill_case(tmp_path):
    from rich.console import Console

    rows = []
    for label, kt, ruler in (("B=8 Sq=1024 causal=0", 0.50, 0.45), ("B=8 Sq=1024 causal=1", 0.30,
                                                                      0.32)):
        for provider, p50 in (("kt_graph", kt), ("cudnn_alone", ruler), ("torch_cudnn", 0.9)):
            rows.append(_att(provider, p50, label=label, shape={"Sq": 1024}, params={},
                             yardstick=provider == "cudnn_alone"))
    rows.append(_att("kt_graph", 0.2, family="decode", label="B=8 Skv=1024", shape={"Sq": 1},
                     params={}))
    path = tmp_path / "att.json"
    path.write_text(json.dumps({"kernel": "fused_rope_attention", "device": "H100",
                                "timer": "CUDA events", "rows": rows,
                                "families": {"prefill": {"x": "Sq"}, "decode": {"x": "Sq"}}}))
    console = Console(width=250, record=True)
    mb.summary([str(path)], console)
    text = console.export_text()
    assert ("targets prefill B=8 Sq=1024 causal=0: goal kt/cudnn_alone 1.111 (goal not met)"
            in text)
    assert "targets prefill B=8 Sq=1024 causal=1: goal kt/cudnn_alone 0.938 (moonshot met)" in text
    assert "cudnn_alone [yardstick] 0.450" in text
    assert "goal kt/cudnn_alone" not in "".join(ln for ln in text.splitlines() if "decode" in ln)


def test_the_stream_check_passes_host_bound_ops_and_catches_missed_work():
    # rope through MAX on an H100: 30 us of GPU work behind 150 us of host enqueue; hidden
    # events see 0.030 ms, the device is busy ~0.02 ms after execute returns: no alarm
    # (the old rule, events < half the host-synchronized wall time, fired here)
    assert not mb.events_missed_work(0.030, 0.020)
    assert not mb.events_missed_work(1.0, 1.0)
    # events on a stream the work did not run on see ~2 us of a 1 ms kernel
    assert mb.events_missed_work(0.002, 1.0)
    assert not mb.events_missed_work(0.002, 0.02)  # within the host clock's jitter


class _Device:
    """A device busy until a host-clock time; `sync` waits for it."""

    def __init__(self):
        self.until = 0.0

    def busy(self, ms):
        self.until = max(time.perf_counter(), self.until) + ms / 1e3

    def sync(self):
        time.sleep(max(0.0, self.until - time.perf_counter()))


def test_tail_is_the_device_time_after_the_call_returns_not_the_host_time():
    dev = _Device()
    gpu_bound = mb.Bound(lambda: dev.busy(3.0), sync=dev.sync)
    assert 2.5 <= mb._tail_ms(gpu_bound) < 6.0

    def host_bound():
        time.sleep(0.003)
        dev.busy(0.0)

    assert mb._tail_ms(mb.Bound(host_bound, sync=dev.sync)) < 0.5


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

        return mb.Bound(run, stream=1, sync=dev.sync)

    return bind


def test_work_the_events_missed_is_timed_host_synchronized():
    rec = _tiny_run({"unseen": _unseen}, ["unseen"])
    (row,) = rec["rows"]
    assert row["status"] == "ok" and "events missed MAX's stream" in row["note"]
    assert row["p50"] >= 2.5 and row["launch_hidden"] is False


def test_rows_say_where_their_time_went():
    row = {"prepare_s": 13.1, "bind_s": 0.0, "first_call_s": 1.5, "bench_s": 1.9}
    assert mb.row_seconds(row) == "prepare 13.1 s, first call + check 1.5 s, timing 0.4 s"
    assert mb.row_seconds({"bind_s": 0.001}) == "< 0.1 s"
    rec = _tiny_run({}, ["torch_eager", "torch_functional"])
    first, second = rec["rows"]
    assert "prepare_s" in first and "bench_s" in first and first["bench_s"] > 0
    assert "prepare_s" in second  # each provider's own prepare


def test_warm_jobs_split_a_family_by_param():
    att = pykernels.get("fused_rope_attention")
    fam = mb.load_families(att)["prefill"]
    causal = mb.where(fam, ["causal=1"])
    assert causal.cases and {p["causal"] for _, p in causal.cases} == {1}
    assert len(causal.cases) + len(mb.where(fam, ["causal=0"]).cases) == len(fam.cases)
    with pytest.raises(mb.MicrobenchError, match="name=value"):
        mb.where(fam, ["causal"])


def _attention_cpu_family(spec):
    return mb.load_families(spec)["cpu"]


def test_cudnn_alone_is_na_on_cpu():
    spec = pykernels.get("fused_rope_attention")
    settings = mb.Settings(warmup_ms=1, min_reps=3, max_reps=5, budget_s=0.05)
    rec = mb.run(spec, "cpu", [_attention_cpu_family(spec)], ["cudnn_alone"], settings=settings)
    assert {r["status"] for r in rec["rows"]} == {"n/a"}
    assert all("n/a on cpu" in r["note"] for r in rec["rows"])


@pytest.mark.gpu
def test_gpu_cudnn_alone_is_an_unchecked_yardstick_beside_the_op():
    spec = pykernels.get("fused_rope_attention")
    settings = mb.Settings(warmup_ms=5, min_reps=5, max_reps=20, budget_s=0.2)
    rec = mb.run(spec, "gpu", [_attention_cpu_family(spec)], ["cudnn_alone", "torch_cudnn"],
                 settings=settings)  # tiny GQA shapes (2 q heads per kv head)
    rulers = [r for r in rec["rows"] if r["provider"] == "cudnn_alone"]
    if all(r["status"] == "n/a" for r in rulers):
        pytest.skip(f"no cuDNN attention here: {rulers[0]['note']}")
    for r in rulers:
        assert r["status"] == "ok" and r["yardstick"] is True and "check" not in r
        assert "not checked" in r["note"] and r.get("baseline") != "cudnn_alone"
