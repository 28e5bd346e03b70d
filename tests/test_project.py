"""Project invariants: pixi and pyproject pins agree, CI runs the README's test command,
and the GPU paths of every kernel build for the H100 even where no GPU is present."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import max.nn.kv_cache  # noqa: F401  (loads max._kv_cache_ops: see test_children_inherit_os_environ)
import pytest
from mojo.run import subprocess_run_mojo

REPO = Path(__file__).resolve().parents[1]


def _pins(specs):
    out = {}
    for s in specs:
        m = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*==\s*([^\s;]+)", s)
        if m:
            out[m[1].lower()] = m[2]
    return out


def test_pixi_pins_match_pyproject():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pixi = tomllib.loads((REPO / "pixi.toml").read_text())
    py_pins = _pins(pyproject["project"]["dependencies"])
    pixi_pins = {}
    for name, spec in pixi["pypi-dependencies"].items():
        version = spec if isinstance(spec, str) else spec.get("version")
        if version and version.startswith("=="):
            pixi_pins[name.lower()] = version[2:]
    assert py_pins, "pyproject pins nothing"
    assert pixi_pins == py_pins


def _readme_commands():
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- fresh-machine -->\s*```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert block, "README has no fresh-machine command block"
    return [ln.strip() for ln in block[1].splitlines() if ln.strip() and not ln.startswith("#")]


def test_readme_gives_two_fresh_machine_commands_and_ci_runs_the_test_one():
    main, tests = _readme_commands()
    assert "kt verify" in main
    assert "pytest" in tests
    assert tests in (REPO / ".ci" / "run").read_text()


@pytest.mark.slow
def test_gpu_paths_build_for_hopper(tmp_path):
    proc = subprocess_run_mojo(
        ["build", "-I", str(REPO), "--target-accelerator=sm_90a",
         str(REPO / "tests" / "mojo" / "gpu_launch.mojo"), "-o", str(tmp_path / "gpu_launch")],
        capture_output=True, text=True, timeout=900)
    errors = [ln for ln in proc.stderr.splitlines() if ": error:" in ln]
    assert proc.returncode == 0, "\n".join(errors) or proc.stderr[-3000:]


@pytest.mark.slow
def test_fast_fp32_sincos_matches_the_accurate_one():
    """The decode kernel's in-register RoPE uses `sincos_f32_fast`; it must stay within two
    fp32 ulps of the fp64-based one on every angle up to 2^17 radians."""
    proc = subprocess_run_mojo(
        ["run", "-I", str(REPO), str(REPO / "tests" / "mojo" / "sincos_check.mojo")],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "PASS" in proc.stdout


def test_children_inherit_os_environ():
    """A child started without `env=` inherits `os.environ`, whatever native code set behind its
    back: importing `max.nn` (above, at collection) setenv()s PYTHONEXECUTABLE and PYTHONPATH,
    and a venv's interpreter or console script (`.venv/bin/mojo`) started afterwards ran outside
    the venv ("No module named 'mojo'") until conftest's restore_child_environment undid it."""
    out = subprocess.run(["env", "-0"], capture_output=True, check=True).stdout
    inherited = dict(v.split("=", 1) for v in os.fsdecode(out).split("\0") if "=" in v)
    assert inherited == dict(os.environ)
    child = subprocess.run([sys.executable, "-c", "import sys, mojo.run; print(sys.prefix)"],
                           capture_output=True, text=True)
    assert child.returncode == 0 and child.stdout.strip() == sys.prefix, child.stderr[-2000:]
