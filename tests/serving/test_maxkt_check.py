"""KT_CHECK in kt's MAX architecture: a graph that prints, where it runs, the largest |kt| and
|kt - MAX| of an op's output (the per-layer diagnostic of `--engine-env max+kt=KT_CHECK=1`).
Run in MAX's environment with MAX's engine on the CPU."""

import os
import subprocess
from pathlib import Path

import pytest

from serving_helpers import engine_python
from harness.serving.maxkt import ARCH_DIR

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

SCRIPT = """
import numpy as np
import kt_max_llama as kt
from max.driver import CPU, Buffer
from max.dtype import DType
from max.engine import InferenceSession
from max.graph import DeviceRef, Graph, TensorType
assert kt.CHECK and kt.KT_OPS == {"attention"}
t = TensorType(DType.float32, [2, 3], DeviceRef.CPU())
with Graph("check", input_types=[t, t]) as g:
    a, b = (v.tensor for v in g.inputs)
    kt._check("probe", a, b)
    g.output(a)
model = InferenceSession(devices=[CPU()]).load(g)
model.execute(Buffer.from_numpy(np.array([[1, -7, 2], [0, 3, 4]], np.float32)),
              Buffer.from_numpy(np.array([[1, -6.5, 2], [0, 3, 4.25]], np.float32)))
"""


def printed(script: str, prefix: str, **env) -> str:
    """The line starting with `prefix` that `script` prints, run under MAX's Python with kt's
    architecture importable and `env` set."""
    e = dict(os.environ, KT_CUSTOM_KERNEL_PATH=str(REPO / "kernels"), PYTHONPATH=str(ARCH_DIR), **env)
    r = subprocess.run([str(engine_python("max")), "-c", script], capture_output=True, text=True, timeout=300, env=e)
    assert r.returncode == 0, r.stderr[-3000:]
    return next(ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith(prefix))


def test_check_prints_the_largest_output_and_difference():
    line = printed(SCRIPT, "kt check probe", KT_CHECK="1", KT_OPS="attention")
    assert "[7.0000, 0.5000]" in line  # max |a| = 7 (a -7), max |a - b| = 0.5


def test_bad_kt_ops_stop_the_architecture_in_one_line():
    python = engine_python("max")
    env = dict(os.environ, KT_CUSTOM_KERNEL_PATH=str(REPO / "kernels"), PYTHONPATH=str(ARCH_DIR), KT_OPS="softmax")
    r = subprocess.run([str(python), "-c", "import kt_max_llama"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0 and "KT_OPS='softmax'" in r.stderr



MODES = """
import importlib, os
import kt_max_llama as kt
for mode in ["1", "store", "sync", "hidden", "0", ""]:
    os.environ["KT_CHECK"] = mode
    importlib.reload(kt)
    print(repr(mode), kt.CHECK_MODE, kt.CHECK)
os.environ["KT_CHECK"] = "prints"
try:
    importlib.reload(kt)
except ValueError as e:
    print("refused:", e)
"""


def test_check_modes_and_a_bad_one():
    """KT_CHECK=1 is the full check; store and sync are its two parts alone; hidden prints each
    layer's output; anything else stops the architecture with one line naming the value."""
    python = engine_python("max")
    env = dict(os.environ, KT_CUSTOM_KERNEL_PATH=str(REPO / "kernels"), PYTHONPATH=str(ARCH_DIR))
    r = subprocess.run([str(python), "-c", MODES], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines() == [
        "'1' full True", "'store' store False", "'sync' sync False", "'hidden' hidden False", "'0' None False",
        "'' None False", "refused: KT_CHECK='prints': use 1 (full), store, sync or hidden"]


HIDDEN = """
import numpy as np
import kt_max_llama as kt
from max.driver import CPU, Buffer
from max.dtype import DType
from max.engine import InferenceSession
from max.graph import DeviceRef, Graph, TensorType, ops
assert kt.CHECK_MODE == "hidden" and kt.KT_OPS == set()
h = TensorType(DType.float32, [5, 2], DeviceRef.CPU())
offsets = TensorType(DType.uint32, [3], DeviceRef.CPU())
with Graph("hidden", input_types=[h, offsets]) as g:
    x, rows = (v.tensor for v in g.inputs)
    kt._hidden_print(ops.constant(7, DType.uint32, device=DeviceRef.CPU()), x, rows, "kt hidden")
    g.output(x)
model = InferenceSession(devices=[CPU()]).load(g)
model.execute(Buffer.from_numpy(np.array([[9, 9], [3, -4], [9, 9], [9, 9], [0, -2]], np.float32)),
              Buffer.from_numpy(np.array([0, 2, 5], np.uint32)))
"""


def test_hidden_prints_each_sequences_last_row():
    """KT_CHECK=hidden with max+kt:none (KT_OPS=none): the layer, the batch's rows, then max |h|
    and the RMS of each sequence's last row (rows 1 and 4 here, not the 9s around them)."""
    line = printed(HIDDEN, "kt hidden", KT_CHECK="hidden", KT_OPS="none")
    # row 1 = (3, -4): max 4, RMS sqrt(12.5) = 3.5355; row 4 = (0, -2): max 2, RMS sqrt(2) = 1.4142
    assert "[7.0000, 5.0000, 4.0000, 3.5355, 2.0000, 1.4142]" in line, line
