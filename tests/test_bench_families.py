"""`benchmarks/<kernel>.toml`: every kernel's file parses and each shape validates against its
spec; a bad file is one clear error; the warm jobs gpu_run.sh runs come from it."""

import pytest

import pykernels
from harness.bench import MicrobenchError
from harness.bench.families import (family_file, load_bench_file, load_families,
                                    select_families, validate_bench_shape, warm_jobs,
                                    with_providers)
from harness.bench.providers import providers_of, select_providers


@pytest.mark.parametrize("kernel", list(pykernels.discover()))
def test_family_files_parse_and_every_shape_validates(kernel):
    spec = pykernels.get(kernel)
    families = load_families(spec)
    assert {f.device for f in families.values()} == {"cpu", "gpu"}
    for fam in families.values():
        assert fam.dtype == "bfloat16" and fam.bound in ("compute", "memory")
        for shape, params in fam.cases:
            assert validate_bench_shape(spec, shape, params) is None
            assert shape == spec.complete({a.name: shape[a.name] for a in spec.axes})
            assert set(params) == {p.name for p in spec.params}
        if fam.device == "cpu":  # CI shapes stay small
            assert max(spec.flops(s, p) for s, p in fam.cases) < 1e8
    assert set(spec.providers) <= set(providers_of(spec))


def test_bench_shapes_keep_every_check_but_the_upper_bounds():
    spec = pykernels.get("rms_norm")
    assert validate_bench_shape(spec, {"M": 32768, "N": 4096}, {}) is None
    assert "axis M" in validate_bench_shape(spec, {"M": 0, "N": 4096}, {})
    assert "unknown axes" in validate_bench_shape(spec, {"M": 4, "N": 4, "K": 1}, {})
    att = pykernels.get("fused_rope_attention")
    shape = {"B": 1, "Sq": 4096, "cache": 0, "Hk": 8, "group": 4, "D": 100}
    assert "axis D" in validate_bench_shape(att, shape, {})  # choices stay strict


def test_bad_family_file_is_one_clear_error(tmp_path):
    spec = pykernels.get("rms_norm")
    bad = tmp_path / "f.toml"
    bad.write_text('[families.x]\nbound = "compute"\nshapes = [{ M = 4 }]\n')
    with pytest.raises(MicrobenchError, match=r"families.x.*missing axes N"):
        load_families(spec, bad)
    with pytest.raises(MicrobenchError, match="unknown shape family nope"):
        select_families(spec, load_families(spec), ["nope"], "cpu")
    with pytest.raises(MicrobenchError, match="unknown provider nope"):
        select_providers(spec, "torch_eager,nope")




def test_the_kernel_key_must_name_the_spec_and_unknown_keys_are_refused(tmp_path):
    spec = pykernels.get("rms_norm")
    text = family_file("rms_norm").read_text()
    assert 'kernel = "rms_norm"' in text
    stale = tmp_path / "stale.toml"
    stale.write_text(text.replace('kernel = "rms_norm"', 'kernel = "rope"'))
    with pytest.raises(MicrobenchError, match="kernel = 'rope', but the file belongs to 'rms_norm'"):
        load_families(spec, stale)
    typo = tmp_path / "typo.toml"
    typo.write_text("baselin = 'torch_eager'\n" + text)
    with pytest.raises(MicrobenchError, match="unknown keys baselin"):
        load_families(spec, typo)
    bad_provider = tmp_path / "bad.toml"
    bad_provider.write_text("baseline = 'nope'\n" + text)
    with pytest.raises(MicrobenchError, match="unknown provider nope"):
        load_families(spec, bad_provider)


@pytest.mark.parametrize("kernel", list(pykernels.discover()))
def test_warm_jobs_compile_kt_providers_and_the_files_own(kernel):
    spec = pykernels.get(kernel)
    bench = load_bench_file(spec)
    jobs = warm_jobs(spec, bench, "gpu")
    providers = [j[0] for j in jobs]
    assert providers[:3] == ["kt_graph", "kt_bridge", "triton"]
    assert set(bench.warm) <= set(providers) and set(providers) <= set(providers_of(spec))
    assert bench.time_limit_s > 0


def test_warm_split_gives_one_job_per_distinct_value():
    spec = pykernels.get("fused_rope_attention")
    bench = load_bench_file(spec)
    split = [j for j in warm_jobs(spec, bench, "gpu") if len(j) > 1]
    gpu_cases = [c for f in bench.families.values() if f.device == "gpu" for c in f.cases]
    assert {j[0] for j in split} == set(bench.warm_split) == {"max_flash", "max_flash_alone"}
    for provider, keys in bench.warm_split.items():
        jobs = [j for j in split if j[0] == provider]
        distinct = {tuple(str(c[1].get(k, c[0].get(k))) for k in keys) for c in gpu_cases}
        assert len(jobs) == len(distinct) > 1
        assert all(j[1::2] == ["--where"] * len(keys) for j in jobs)


def test_a_family_may_keep_to_a_few_providers(tmp_path):
    spec = pykernels.get("rms_norm")
    path = tmp_path / "f.toml"
    family = ('[families.few]\ndevice = "cpu"\nbound = "memory"\nproviders = ["torch_eager"]\n'
              'shapes = [{ M = 4, N = 8 }]\n'
              '[families.all]\ndevice = "cpu"\nbound = "memory"\nshapes = [{ M = 4, N = 8 }]\n')
    path.write_text(family)
    fams = load_families(spec, path)
    names = ["kt_graph", "torch_eager", "triton"]
    assert fams["few"].runs(names) == ["torch_eager"] and fams["all"].runs(names) == names
    assert with_providers(list(fams.values()), ["kt_graph"]) == [fams["all"]]
    path.write_text(family.replace('["torch_eager"]', '["torch_eagre"]'))
    with pytest.raises(MicrobenchError, match="unknown provider torch_eagre"):
        load_families(spec, path)
    path.write_text(family.replace('["torch_eager"]', '"torch_eager"'))
    with pytest.raises(MicrobenchError, match="providers must be a list"):
        load_families(spec, path)


def test_the_child_restarts_past_families_its_providers_skip():
    """After a provider dies, the next child starts at the next case on which one of the
    remaining providers runs, as the engine skips the families where none does."""
    from harness.bench.child import _advance, _skip_idle

    spec = pykernels.get("fused_rope_attention")
    fams = load_families(spec)
    order = [fams[n] for n in ("prefill_plain", "decode_plain", "decode")]
    pos = [0, len(order[0].cases) - 1]
    _advance(pos, order, ["flashinfer"])
    assert pos == [1, 0]
    pos = [0, len(order[0].cases) - 1]
    _advance(pos, order, ["triton"])  # runs on neither plain family
    assert pos == [2, 0]
    pos = [0, 0]
    _skip_idle(pos, order, ["max_flash"])
    assert pos == [2, 0]
    pos = [0, 0]
    _skip_idle(pos, order[:2], ["triton"])
    assert pos[0] == 2  # past the end: nothing left to run


def test_gpu_run_passes_a_kernels_shape_families_to_both_phases(tmp_path):
    """SHAPES_<kernel>=F,F: gpu_run.sh's warm jobs and its timed run of that kernel get
    `--shapes F,F`; another kernel's commands get none. A stand-in Python records each call."""
    import os
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    calls = tmp_path / "calls.txt"
    py = tmp_path / "python"
    py.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {calls}
if [ "$1 $2" = "-m harness.bench" ] && [ "$3" = plan ]; then
  printf 'warm rope kt_graph\\nwarm rms_norm triton\\ntime rope 5\\ntime rms_norm 5\\n'
fi
exit 0
""")
    py.chmod(0o755)
    env = dict(os.environ, PYTHON=str(py), OUT=str(tmp_path / "out"), DEVICE="cpu", SHAPES_rope="prefill,prefill_mha")
    r = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_run.sh"), "rope", "rms_norm"], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = calls.read_text().splitlines()
    rope = [ln for ln in lines if " rope " in f" {ln} " and ("warm" in ln or "microbench" in ln)]
    norm = [ln for ln in lines if " rms_norm " in f" {ln} " and ("warm" in ln or "microbench" in ln)]
    assert len(rope) == 2 and all("--shapes prefill,prefill_mha" in ln for ln in rope), lines
    assert len(norm) == 2 and not any("--shapes" in ln for ln in norm), lines
