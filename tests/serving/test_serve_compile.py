"""kt serve-compile: max+kt's served graph compiled for a GPU that is not here (MAX's virtual
devices), the compiler's first error in one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from serving_helpers import engine_python
from harness.serving.compile_check import command, first_error
from harness.serving.config import parse_kt_ops
from harness.serving.engines import EngineOptions, get_engine
from harness.serving.engines.base import ServingSettings

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parent / "data"


def test_first_error_is_the_kernels_line_in_a_real_sm90a_compile_log():
    # `max warm-cache --target cuda:sm_90a` of max+kt with a kernel that fails a compile-time
    # constraint (kt's rms_norm with a planted `comptime assert`), on this CPU.
    log = (DATA / "max_warm_cache_sm90a_error.log").read_text()
    assert first_error(log) == ("/work/kt/kernels/rms_norm.mojo:214:9: constraint failed: PROBE rms_norm "
                                "X (256, 1)(-1, 256) Y (256, 1) W (1)")
    assert first_error("x.mojo:3:1: error: use of unknown declaration 'foo'\n") == (
        "x.mojo:3:1: use of unknown declaration 'foo'")
    assert first_error("all fine\n") is None
    assert first_error("...\nRuntimeError: Failed to compile the model.\n") == "RuntimeError: Failed to compile the model."


def test_the_command_compiles_kts_architecture_with_the_serving_flags_for_a_virtual_gpu(tmp_path):
    opts = EngineOptions(device="gpu", settings=ServingSettings(dtype="bfloat16", max_num_seqs=8, max_model_len=512),
                         custom_kernel_path=REPO / "kernels", kt_ops=parse_kt_ops("max+kt:attention", "attention"))
    argv = command(Path("/py"), tmp_path, "cuda:sm_90a", opts)
    assert argv[:6] == ["/py", "-m", "max._entrypoints.pipelines", "warm-cache", "--target", "cuda:sm_90a"]
    assert "--devices" in argv and argv[argv.index("--devices") + 1] == "gpu"
    assert argv[argv.index("--max-batch-size") + 1] == "8" and argv[argv.index("--max-length") + 1] == "512"
    assert argv[-1].endswith(":kt_max_llama") and argv[-2] == "--custom-architectures"
    env = get_engine("max").environment(opts)
    assert env["KT_OPS"] == "attention" and env["KT_CUSTOM_KERNEL_PATH"].endswith("kernels")


@pytest.mark.parametrize("args, says", [
    (["--target", "cuda:sm_9 0"], "--target"),
    (["--kt-ops", "softmax"], "kt ops are"),
    (["--kernels", "README.md"], "not a Mojo package"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, says):
    r = subprocess.run([sys.executable, "-m", "harness.serving", "serve-compile", "--model", str(tmp_path), *args],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr


# 6-8 minutes of CI's 90: CI builds kt's GPU kernels for sm_90a already (tests/test_project.py,
# tests/mojo/gpu_launch.mojo); this whole-graph build runs locally, before a GPU session, and in
# CI only with KT_CI_SERVE_COMPILE=1.
@pytest.mark.slow
@pytest.mark.skipif(bool(os.environ.get("CI")) and not os.environ.get("KT_CI_SERVE_COMPILE"),
                    reason="the whole-graph sm_90a build runs in CI only with KT_CI_SERVE_COMPILE=1")
def test_max_kt_compiles_for_the_h200_without_a_gpu(tiny_model, tmp_path):
    """The whole max+kt graph (kt's architecture, kt's kernels in every layer, MAX's Llama and
    sampler) compiled for sm_90a through MAX's virtual devices: what a GPU session would compile
    first, here on the CPU. A GPU-only compile error fails this test with the kernel's line."""
    engine_python("max")
    log = tmp_path / "max.log"
    r = subprocess.run([sys.executable, "-m", "harness.serving", "serve-compile", "--model", str(tiny_model),
                        "--target", "cuda:sm_90a", "--max-model-len", "256", "--max-num-seqs", "4",
                        "--log", str(log)], cwd=REPO, capture_output=True, text=True, timeout=2400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "max+kt compiles for cuda:sm_90a" in r.stdout
    text = log.read_text()
    assert "Compiling for target: cuda (sm_90a) using virtual devices" in text
    assert "attention layers call kt.paged_rope_store + kt.paged_rope_attention" in text
