"""max+kt under tensor parallelism: MAX's tensor-parallel Llama keeps one RMSNorm copy per device
in plain lists; kt's architecture must make every copy call kt's op and attach kt's package to
the graph. Built with MAX's own blocks (all but the all-reduce, whose constructor opens the GPUs),
in MAX's environment."""

import os
import subprocess
from pathlib import Path

import pytest

from serving_helpers import engine_python
from harness.serving.maxkt import ARCH_DIR

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

SCRIPT = """
import dataclasses
from max.dtype import DType
from max.graph import DeviceRef
from max.nn.norm import RMSNorm
from max.nn.transformer.distributed_transformer import DistributedTransformerBlock
from max.nn.layer import Module
import kt_max_llama as kt

class Identity(Module):  # stands for the attention and MLP, which this check does not touch
    sharding_strategy = None
    def shard(self, devices):
        return [self for _ in devices]
    def __call__(self, x):
        return x

import max.nn.transformer.distributed_transformer as dt
dt.Allreduce = lambda num_accelerators: Identity()  # its constructor opens the GPUs; not under test here
devices = [DeviceRef.GPU(0), DeviceRef.GPU(1)]
blocks = [DistributedTransformerBlock(Identity(), Identity(), RMSNorm(64, DType.bfloat16, 1e-5),
                                      RMSNorm(64, DType.bfloat16, 1e-5), devices) for _ in range(3)]
class Top(Module):
    def __init__(self):
        super().__init__()
        from max.nn.layer import LayerList
        self.layers = LayerList(blocks)
        self.norm = RMSNorm(64, DType.bfloat16, 1e-5)
        from max.nn.transformer.distributed_transformer import ShardingStrategy
        self.norm.sharding_strategy = ShardingStrategy.replicate(2)
        self.norm_shards = self.norm.shard(devices)
    def __call__(self, x):
        return x

@dataclasses.dataclass
class Spec:  # the two fields of MAX's GraphSpec that kt's architecture reads and replaces
    module: object
    custom_extensions: list

top = Top()
out = kt._with_kt(Spec(top, []))
shards = [n for b in blocks for n in (*b.input_layernorm_shards, *b.post_attention_layernorm_shards)]
shards += list(top.norm_shards)
print(len(shards), sum(type(n) is kt.KtRMSNorm for n in shards), [str(p) for p in out.custom_extensions])
"""


def test_every_device_copy_of_rmsnorm_calls_kt():
    python = engine_python("max")
    env = dict(os.environ, KT_CUSTOM_KERNEL_PATH=str(REPO / "kernels"), PYTHONPATH=str(ARCH_DIR))
    r = subprocess.run([str(python), "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    total, swapped, ext = r.stdout.split(" ", 2)
    assert int(total) == 3 * 2 * 2 + 2 and int(swapped) == int(total)  # 3 blocks x 2 norms x 2 GPUs + final norm
    assert str(REPO / "kernels") in ext
