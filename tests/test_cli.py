"""Bad input gives one clear line on stderr and a non-zero exit, never a traceback."""

import json
import re
import textwrap

import pytest


def _one_line_error(r, *needles):
    assert r.code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("kt: error: ")
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in r.output


def test_list_shows_every_discovered_kernel(kt):
    r = kt("list")
    assert r.code == 0
    for name in ("rope", "rms_norm", "fused_rope_attention"):
        assert name in r.stdout


def test_unknown_kernel(kt):
    _one_line_error(kt("verify", "nosuch"), "unknown kernel 'nosuch'", "rope")


def test_unknown_dtype(kt):
    _one_line_error(kt("verify", "rope", "--dtype", "int8"), "unknown dtype 'int8'")


def test_bad_shape_in_replay(kt):
    case = {"dtype": "float32", "shape": {"B": 0, "S": 3, "Hk": 1, "group": 1, "D": 8},
            "params": {}, "layout": "dense", "data_seed": 0}
    _one_line_error(kt("verify", "rope", "--replay", json.dumps(case)), "axis B")


def test_replay_that_is_not_json(kt):
    _one_line_error(kt("verify", "rope", "--replay", "{nope"), "--replay")


def test_gpu_requested_without_gpu(kt):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    _one_line_error(kt("verify", "rope", "--device", "gpu"), "no GPU")


def test_missing_package(kt, tmp_path):
    _one_line_error(kt("verify", "rope", "--kernels", str(tmp_path / "nope")), "does not exist")


def test_directory_that_is_not_a_mojo_package(kt, tmp_path):
    _one_line_error(kt("verify", "rope", "--kernels", str(tmp_path)), "not a Mojo package")


@pytest.mark.slow
def test_mojo_syntax_error_names_file_and_line(kt, tmp_path):
    pkg = tmp_path / "broken"
    pkg.mkdir()
    (pkg / "__init__.mojo").write_text("")
    (pkg / "rope.mojo").write_text(textwrap.dedent("""\
        def broken(x: Int) -> Int:
            return x +
        """))
    r = kt("verify", "rope", "--device", "cpu", "--kernels", str(pkg), "--dtype", "float32")
    _one_line_error(r, f"{pkg / 'rope.mojo'}:")
    assert re.search(r"rope\.mojo:\d+:\d+: ", r.stderr)


@pytest.mark.slow
def test_package_without_the_op(kt, tmp_path):
    pkg = tmp_path / "other"
    pkg.mkdir()
    (pkg / "__init__.mojo").write_text("")
    (pkg / "other.mojo").write_text("def helper(x: Int) -> Int:\n    return x\n")
    r = kt("verify", "rope", "--device", "cpu", "--kernels", str(pkg), "--dtype", "float32")
    _one_line_error(r, "does not register op 'kt.rope'")
