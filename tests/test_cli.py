"""Bad input gives one clear line on stderr and a non-zero exit, never a traceback."""

import json
import re
import shutil
import textwrap

import pytest

from harness.build import KERNELS
from plants import Plant, plant


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


_ROPE_CASE = {"data_seed": 0, "dtype": "float32", "layout": "dense", "params": {},
              "shape": {"B": 1, "S": 3, "Hk": 1, "group": 1, "D": 8}}


@pytest.mark.parametrize("change,needle", [
    ({"data_seed": "x"}, "data_seed must be an integer"),
    ({"layout": "diagonal"}, "layout must be one of dense, strided"),
    ({"layout": None}, "the case lacks layout"),
], ids=["seed", "layout", "missing"])
def test_bad_replay_case_is_one_line_before_any_kernel_runs(kt, change, needle):
    """Validated in full before a kernel is compiled (every check: tests/test_verify.py): a bad
    seed used to crash the kernel's process (reported as a CRASH with a traceback), an
    unknown layout and a missing one were taken as dense."""
    case = {k: v for k, v in {**_ROPE_CASE, **change}.items() if v is not None}
    r = kt("verify", "rope", "--device", "cpu", "--replay", json.dumps(case))
    _one_line_error(r, "--replay is not a case of rope", needle)
    assert "compiled" not in r.output


@pytest.mark.slow
def test_op_with_a_wrong_signature_names_its_file_line_and_argument(kt, tmp_path):
    """`w` declared rank 2: MAX alone says "Failed to compile the model. Please file an issue";
    kt shows the compiler's diagnosis at the op's file:line and the call it makes."""
    pkg = plant(tmp_path, Plant("rms_norm_w_rank_2", "rms_norm", "rms_norm.mojo",
                                "w: InputTensor[dtype=dtype, rank=1, ...]",
                                "w: InputTensor[dtype=dtype, rank=2, ...]"))
    r = kt("verify", "rms_norm", "--device", "cpu", "--dtype", "float32", "--kernels", str(pkg))
    _one_line_error(r, f"{pkg / 'rms_norm.mojo'}:", "'w'", "rank: kt passes 1, the op declares 2",
                    "w: InputTensor[float32, rank=1]")
    assert "file an issue" not in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["my-kernels", "tmp.Ab12"])
def test_package_folder_that_is_not_a_mojo_identifier_works(kt, tmp_path, folder):
    """The compiled package is named by a digest, not by the folder (a `mktemp -d` name or
    one with a dash would be an invalid module name)."""
    pkg = tmp_path / folder
    shutil.copytree(KERNELS, pkg)
    case = {"data_seed": 3, "dtype": "float32", "layout": "dense", "params": {},
            "shape": {"M": 3, "N": 129}}
    r = kt("verify", "rms_norm", "--device", "cpu", "--kernels", str(pkg), "--no-triton",
           "--replay", json.dumps(case))
    assert r.code == 0, r.output
    assert "PASS" in r.stdout
