"""The Hypothesis driver's strategies, `kt verify` end to end on the real Mojo kernels, and
how it reports a failure: a replayable minimal case, a kernel writing into its input, a
kernel that kills its process (each planted into a copy of kt's Mojo package)."""

import pytest
from hypothesis import given, settings

import pykernels
from harness.verify.engine import PROFILES, case_json, case_problem, case_strategy, make_inputs
from plants import Plant, plant

SPECS = list(pykernels.discover().values())


def test_every_spec_is_discovered_with_a_unique_op():
    assert {s.name for s in SPECS} >= {"rope", "rms_norm", "fused_rope_attention"}
    assert len({s.op for s in SPECS}) == len(SPECS)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("profile", ["ci", "local"])
def test_drawn_cases_are_valid_for_the_spec(spec, profile):
    prof = PROFILES[profile]

    @settings(max_examples=60, deadline=None, database=None, derandomize=True)
    @given(case_strategy(spec, list(spec.dtypes), prof))
    def check(case):
        assert spec.validate(case["shape"], case["params"]) is None
        for a in spec.axes:
            assert a.allowed(case["shape"][a.name])
            if prof.capped and a.ci_hi is not None:
                assert case["shape"][a.name] <= a.ci_hi

    check()


def test_a_replay_case_is_checked_in_full():
    """What `kt verify --replay` rejects before any kernel runs (one line each, exit 2)."""
    spec = pykernels.get("rope")
    good = {"data_seed": 0, "dtype": "float32", "layout": "strided",
            "params": {"theta": 10000.0, "positions": "long"},
            "shape": {"B": 1, "S": 3, "Hk": 1, "group": 1, "D": 8}}
    assert case_problem(spec, good) is None
    bad = {
        "data_seed must be an integer": [{"data_seed": "x"}, {"data_seed": True},
                                         {"data_seed": -1}, {"data_seed": 2**31}],
        "layout must be one of": [{"layout": "diagonal"}],
        "dtype must be one of": [{"dtype": "int8"}],
        "param positions must be one of": [{"params": {"positions": "far"}}],
        "param theta is a kernel argument (float32): a number": [{"params": {"theta": "big"}}],
        "shape must be a JSON object": [{"shape": [1, 3]}],
        "unknown keys extra": [{"extra": 1}],
        "axis B": [{"shape": {"B": 0, "S": 3, "Hk": 1, "group": 1, "D": 8}}],
        "unknown params": [{"params": {"nope": 1}}],
    }
    for needle, changes in bad.items():
        for change in changes:
            problem = case_problem(spec, {**good, **change})
            assert problem and needle in problem, (change, problem)
    for key in good:
        assert "the case lacks " + key in case_problem(
            spec, {k: v for k, v in good.items() if k != key})
    assert "JSON object" in case_problem(spec, [good])
    att = pykernels.get("fused_rope_attention")
    case = {"data_seed": 0, "dtype": "bfloat16", "layout": "dense", "params": {"causal": 1.5},
            "shape": {"B": 1, "Sq": 1, "cache": 0, "Hk": 1, "group": 1, "D": 16}}
    assert "param causal is a kernel argument (int32): an integer" in case_problem(att, case)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_edges_are_drawn(spec):
    """Every axis's awkward sizes show up among drawn cases."""
    seen = {a.name: set() for a in spec.axes}

    @settings(max_examples=300, deadline=None, database=None, derandomize=True)
    @given(case_strategy(spec, ["float32"], PROFILES["local"]))
    def collect(case):
        for name, v in case["shape"].items():
            seen[name].add(v)

    collect()
    for a in spec.axes:
        edges = {e for e in a.edges if a.allowed(e)}
        if edges:
            assert seen[a.name] & edges, f"{spec.name}.{a.name} never drew an edge size"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_inputs_are_reproducible_from_the_case(spec):
    case = {"dtype": "bfloat16", "shape": {a.name: g for a, g in zip(spec.axes, [2] * 99)},
            "params": {}, "layout": "strided", "data_seed": 7}
    for a in spec.axes:
        if not a.allowed(case["shape"][a.name]):
            case["shape"][a.name] = a.choices[0] if a.choices else a.lo
    if spec.constraint and not spec.constraint(spec.complete(case["shape"]), spec.full_params({})):
        pytest.skip("default shape violates the spec's constraint")
    one = make_inputs(spec, case, "cpu")
    two = make_inputs(spec, case, "cpu")
    for name in one:  # NaN where the spec puts NaN (a paged cache's unused slots)
        a, b = one[name], two[name]
        assert a.equal(b) or (a.isnan().equal(b.isnan()) and a.nan_to_num(0).equal(b.nan_to_num(0)))
    floats = [t for t in one.values() if t.dtype.is_floating_point and t.ndim > 1]
    assert floats and not floats[0].is_contiguous()


@pytest.mark.slow
def test_verify_every_shipped_kernel_on_cpu(kt):
    r = kt("verify", "--device", "cpu", "--profile", "ci", json_out=True)
    assert r.code == 0, r.output
    results = r.json["results"]
    assert {res["kernel"] for res in results} == {s.name for s in SPECS}
    for res in results:
        assert res["status"] == "ok" and res["failure"] is None, res
        for dt in res["dtypes"]:
            assert res["stats"][dt]["examples"] > 0
            integ = res["integrity"][dt]
            assert integ["no_stale_state"] and integ["deterministic"]
            assert any(k.startswith("triton:") for k in res["stats"][dt]["worst"])
    prov = r.json["provenance"]
    assert prov["versions"]["max"] == "26.7.0" and prov["versions"]["mojo"] == "1.2.0"
    assert "PASS" in r.stdout


@pytest.mark.gpu
def test_verify_every_shipped_kernel_on_gpu(kt):
    r = kt("verify", "--device", "gpu", "--examples", "30", json_out=True)
    assert r.code == 0, r.output


@pytest.mark.slow
def test_replay_reproduces_the_failure(kt, tmp_path):
    p = Plant("attention_wrong_gqa_head", "fused_rope_attention", "fused_rope_attention.mojo",
              "                var kvh = h // (hq // hk)", "                var kvh = h % hk")
    pkg = plant(tmp_path, p)
    first = kt("verify", p.kernel, "--device", "cpu", "--dtype", "float32", "--kernels", str(pkg),
               "--profile", "ci", "--no-triton", json_out=True)
    case = first.json["results"][0]["failure"]["case"]
    again = kt("verify", p.kernel, "--device", "cpu", "--kernels", str(pkg), "--replay",
               case_json(case), "--no-triton", json_out=True)
    assert again.code == 1
    assert again.json["results"][0]["failure"]["case"] == case


@pytest.mark.slow
def test_kernel_writing_into_its_input_is_caught(kt, tmp_path):
    p = Plant("rms_norm_clobbers_x", "rms_norm", "rms_norm.mojo",
              "y[unsafe_offset=j] = (v * r * w[unsafe_offset=j].cast[DType.float32]()).cast[dtype]()",
              "y[unsafe_offset=j] = (v * r * w[unsafe_offset=j].cast[DType.float32]()).cast[dtype]()\n"
              "        x[unsafe_offset=j] = 0")
    r = kt("verify", "rms_norm", "--device", "cpu", "--dtype", "float32", "--kernels",
           str(plant(tmp_path, p)), "--profile", "ci", "--no-triton", json_out=True)
    assert r.code == 1
    assert r.json["results"][0]["failure"]["mutated"] == ["x"]
    assert "wrote into its inputs: x" in r.stdout


@pytest.mark.slow
def test_crashing_kernel_is_reported_not_fatal(kt, tmp_path):
    p = Plant("rms_norm_aborts", "rms_norm", "rms_norm.mojo",
              "    var r = rsqrt(_sum_squares[dtype](x, n) / Float32(n) + eps)",
              "    abort(\"planted crash\")\n    var r = rsqrt(_sum_squares[dtype](x, n) / Float32(n) + eps)")
    pkg = plant(tmp_path, p)
    src = (pkg / p.file).read_text()
    (pkg / p.file).write_text(src.replace("import extensibility\n", "import extensibility\nfrom std.os import abort\n", 1))
    r = kt("verify", "rms_norm", "--device", "cpu", "--dtype", "float32", "--kernels",
           str(pkg), "--profile", "ci", "--no-triton", json_out=True)
    assert r.code == 1
    (result,) = r.json["results"]
    assert result["status"] == "crash" and result["last_case"]["dtype"] == "float32"
    assert "the kernel process died" in r.stdout and "Traceback" not in r.output
