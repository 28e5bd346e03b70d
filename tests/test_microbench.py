"""`kt microbench`: family files, the correctness gate, provenance in the rows, `--compare`'s
noise rule, unavailable providers, and (slow) the CPU run end to end through the CLI."""

import dataclasses
import json

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
    from harness.report import write_json_atomic

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


def test_target_lines_state_each_target_as_a_ratio_from_one_run():
    def row(provider, p50, family="prefill", **kw):
        return {"kernel": "fused_rope_attention", "provider": provider, "family": family,
                "label": "B=1 Sq=8192", "status": "ok", "p50": p50, **kw}

    lines = mb.target_lines([row("kt_graph", 1.9), row("cudnn_alone", 2.0),
                             row("torch_compile", 2.5), row("max_flash", 1.8),
                             row("kt_graph", 0.5, family="decode", gb_s=2700.0, pct_peak=80.6)])
    (prefill,) = [ln for ln in lines if "prefill" in ln]
    assert "goal kt/cudnn_alone 0.950" in prefill
    assert "milestone kt/torch_compile 0.760" in prefill and "kt/max_flash 1.056" in prefill
    assert any("decode" in ln and "80.6% of HBM" in ln for ln in lines)
