"""Which of MAX 26.7's mechanisms can carry kt's kernels (see harness/serving/maxkt.py)?

A custom extension that registers a kernel under a `mo.*` name MAX calls by name replaces MAX's
kernel in that graph. Runs in MAX's serving environment, as MAX Serve would.
"""

import subprocess
from pathlib import Path

import pytest

from serving_helpers import engine_python

HERE = Path(__file__).parent
pytestmark = pytest.mark.slow

SCRIPT = """
import sys
from pathlib import Path
import numpy as np
from max.driver import CPU, Buffer
from max.dtype import DType
from max.engine import InferenceSession
from max.graph import DeviceRef, Graph, TensorType, ops

ext = [Path(sys.argv[1])] if len(sys.argv) > 1 else []
cpu = DeviceRef.CPU()
with Graph("probe", input_types=[TensorType(DType.float32, [4, 8], cpu)], custom_extensions=ext) as g:
    y = ops.custom("mo.reduce.row_mean_of_squares", device=cpu, values=[g.inputs[0]],
                   out_types=[TensorType(DType.float32, [4, 1], cpu)])[0]
    g.output(y)
x = np.arange(32, dtype=np.float32).reshape(4, 8)
print(" ".join(str(v) for v in InferenceSession(devices=[CPU()]).load(g).execute(Buffer.from_numpy(x))[0].to_numpy().ravel()))
"""


def run(*args):
    python = engine_python("max")
    r = subprocess.run([str(python), "-c", SCRIPT, *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return [float(v) for v in r.stdout.split()]


def test_extension_overrides_a_named_max_kernel():
    assert run() == [17.5, 137.5, 385.5, 761.5]  # MAX's own kernel: mean of squares per row
    assert run(str(HERE / "override_probe")) == [7.0] * 4  # the extension's kernel won
