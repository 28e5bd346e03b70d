"""MAX custom architecture: stock MAX Llama 3 whose RMSNorm layers call kt's `kt.rms_norm`.

Loaded by `max serve --custom-architectures <this dir>:kt_max_llama`, which imports it inside
MAX's own environment (no kt import here) and registers `ARCHITECTURES` over the built-in
`LlamaForCausalLM`. Everything else (weights, attention, KV cache, sampler) is MAX's.

The Mojo package comes from $KT_CUSTOM_KERNEL_PATH and is attached to the decoder graph through
`GraphSpec.custom_extensions`, MAX's mechanism for graphs that call custom ops.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from max.dtype import DType
from max.graph import DeviceRef, TensorType, TensorValue, ops
from max.nn.norm import RMSNorm
from max.pipelines.architectures.llama3.arch import llama_arch
from max.pipelines.architectures.llama3.model import Llama3Model

KERNELS = Path(os.environ["KT_CUSTOM_KERNEL_PATH"])
OP = os.environ.get("KT_RMS_NORM_OP", "kt.rms_norm")


class KtRMSNorm(RMSNorm):
    """RMSNorm through kt's op: y = x / sqrt(mean(x^2) + eps) * w, over the last axis."""

    def __call__(self, x: TensorValue) -> TensorValue:
        if self.weight_offset != 0.0:
            raise ValueError("kt.rms_norm has no weight offset (Gemma-style norms are not Llama's)")
        w = self.weight.cast(x.dtype)
        if x.device:
            w = w.to(x.device)
        shape = x.shape
        x2 = x if x.rank == 2 else ops.reshape(x, [-1, shape[-1]])
        eps = ops.constant(self.eps, DType.float32, device=DeviceRef.CPU())
        y = ops.custom(
            OP,
            device=x.device,
            values=[x2, w, eps],
            out_types=[TensorType(x.dtype, x2.shape, x.device)],
        )[0].tensor
        return y if x.rank == 2 else ops.reshape(y, shape)


def _norms(module):
    """Every RMSNorm of the graph's module tree, also the per-device copies that MAX's
    tensor-parallel blocks keep in plain lists (`input_layernorm_shards`, `norm_shards`)."""
    for _, m in module.named_modules():
        yield m
        for value in vars(m).values():
            if isinstance(value, (list, tuple)):
                yield from (v for v in value if isinstance(v, RMSNorm))


def _with_kt(spec):
    swapped = set()
    for module in _norms(spec.module):
        if type(module) is RMSNorm:
            module.__class__ = KtRMSNorm
            swapped.add(id(module))
    print(f"kt: {len(swapped)} RMSNorm layers call {OP} from {KERNELS}", file=sys.stderr, flush=True)
    return dataclasses.replace(spec, custom_extensions=[*spec.custom_extensions, KERNELS])


class KtLlama3Model(Llama3Model):
    """Llama3Model whose decoder graph, on one device or tensor-parallel over several, uses
    KtRMSNorm (kt's package is attached to the graph, so every device gets kt's kernel)."""

    def _single_device_spec(self, model_config):
        return _with_kt(super()._single_device_spec(model_config))

    def _tensor_parallel_spec(self, model_config):
        return _with_kt(super()._tensor_parallel_spec(model_config))

    def _data_parallel_spec(self, model_config):
        raise NotImplementedError("kt's custom architecture supports one device")


ARCHITECTURES = [dataclasses.replace(llama_arch, pipeline_model=KtLlama3Model)]
