"""The providers every kernel has, beside the spec's own (`KernelSpec.providers`):
`kt_graph` (the Mojo op in a MAX graph with symbolic dims, run on device buffers: no host
copies in the timed call), `kt_bridge` (the same op called with torch tensors through
`max.experimental.torch.graph_op`; its overhead over `kt_graph` is reported) and `triton` (the
spec's Triton twin; on the CPU it runs in Triton's interpreter). MAX's Python modules are
imported inside the providers, for start-up time."""

from __future__ import annotations

import inspect
import itertools
import os
from typing import Callable

import torch

from harness.bench import MicrobenchError
from harness.build import (buffers_to_torch, compile_op, max_dtype, precompiled_package,
                           resolve_package)
from harness.spec import Bound, KernelSpec, Params, Tensors, Unavailable

KT_PROVIDERS = ("kt_graph", "kt_bridge")
# The generic providers that compile (benchmarks/gpu_run.sh compiles them ahead).
KT_COMPILED = ("kt_graph", "kt_bridge", "triton")


def kt_graph(spec: KernelSpec, device: str, dtype: torch.dtype, package):
    """The Mojo op in a MAX graph with symbolic dims (one compile per dtype), run on device
    buffers: the timed call is `model.execute`, nothing else."""
    op = compile_op(spec, dtype, "cpu" if device == "cpu" else "gpu", package)

    def bind(inputs: Tensors, params: Params) -> Bound:
        run = op.bind(inputs, params)
        return Bound(run, lambda bufs: buffers_to_torch(bufs, device) + run.mutated,
                     op.stream_handle(),
                     op.synchronize, f"compiled in {op.compile_seconds:.1f} s")

    return bind


_BRIDGE_OPS = itertools.count()


def kt_bridge(spec: KernelSpec, device: str, dtype: torch.dtype, package):
    """The Mojo op called with torch tensors through MAX's torch bridge
    (`max.experimental.torch.graph_op`), with symbolic dims so it compiles once (at the
    first call, absorbed by the correctness check): what a PyTorch user of the kernel runs."""
    if any(t.mutable for t in spec.inputs):
        raise Unavailable("n/a: the torch bridge has no in-place (mutated) operands")
    from max import driver
    from max.dtype import DType
    from max.experimental.torch import graph_op
    from max.graph import DeviceRef, KernelLibrary, TensorType, ops

    lib = KernelLibrary()
    lib.load_paths([precompiled_package(resolve_package(package))])
    dev = DeviceRef.CPU() if device == "cpu" else DeviceRef.GPU(0)
    cpu = DeviceRef.CPU()
    scalars = spec.kernel_params()
    in_types = [TensorType(max_dtype(t.torch_dtype(dtype)), list(t.dims), device=dev)
                for t in spec.inputs]
    in_types += [TensorType(DType.int32 if p.dtype == "int32" else DType.float32, [], device=cpu)
                 for p in scalars]
    out_types = [TensorType(max_dtype(t.torch_dtype(dtype)), list(t.dims), device=dev)
                 for t in spec.outputs]

    def graph_fn(*values):
        outs = ops.custom(spec.op, device=dev, values=list(values), out_types=out_types)
        return [o.tensor for o in outs]

    # torch derives the op's schema from the signature: one named tensor per input
    graph_fn.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
         for n in [t.name for t in spec.inputs] + [p.name for p in scalars]])
    name = f"kt_{spec.name}_{str(dtype).removeprefix('torch.')}_{device}_{next(_BRIDGE_OPS)}"
    op = graph_op(graph_fn, name=name, kernel_library=lib, input_types=in_types,
                  output_types=out_types)
    max_device = driver.CPU() if device == "cpu" else driver.Accelerator(0)
    stream = None if device == "cpu" else int(max_device.default_queue.native_stream_handle)

    def bind(inputs: Tensors, params: Params) -> Bound:
        sizes = {}
        for t in spec.inputs:
            sizes.update(zip(t.dims, inputs[t.name].shape))
        args = [inputs[t.name].contiguous() for t in spec.inputs]
        args += [torch.tensor(p.op_value(params, inputs), dtype=torch.int32 if p.dtype == "int32"
                              else torch.float32) for p in scalars]
        shapes = [(tuple(sizes[d] for d in t.dims), t.torch_dtype(dtype)) for t in spec.outputs]

        def run():
            outs = [torch.empty(s, dtype=dt, device=device) for s, dt in shapes]
            op(*outs, *args)
            return outs

        return Bound(run, stream=stream, sync=max_device.synchronize)

    return bind


def triton_twin(spec: KernelSpec, device: str, dtype: torch.dtype, package):
    """The spec's Triton twin (in Triton's interpreter on the CPU: TRITON_INTERPRET=1)."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device != "cpu" and interpreted:
        raise Unavailable("TRITON_INTERPRET=1 is set: the twin would not run on the GPU")
    if device == "cpu" and not interpreted:
        raise Unavailable("n/a on cpu without TRITON_INTERPRET=1 (set before triton is imported)")

    def bind(inputs: Tensors, params: Params) -> Bound:
        return Bound(lambda: spec.triton(inputs, params),
                     note="Triton interpreter" if device == "cpu" else "")

    return bind


GENERIC = {"kt_graph": kt_graph, "kt_bridge": kt_bridge, "triton": triton_twin}


def providers_of(spec: KernelSpec) -> dict[str, Callable]:
    """Every provider of `spec` by name, the generic ones first, each as
    `prepare(device, dtype, package)`."""
    out: dict[str, Callable] = {name: (lambda device, dtype, package, f=f: f(spec, device, dtype,
                                                                               package))
                                for name, f in GENERIC.items()}
    for name, prep in spec.providers.items():
        out[name] = lambda device, dtype, package, prep=prep: prep(device, dtype)
    return out


def select_providers(spec: KernelSpec, requested: str | None) -> list[str]:
    """The comma-separated `requested` providers, or all of them."""
    known = list(providers_of(spec))
    if not requested:
        return known
    names = [n.strip() for n in requested.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise MicrobenchError(f"unknown provider {', '.join(unknown)} for {spec.name} "
                              f"(providers: {', '.join(known)})")
    return names
