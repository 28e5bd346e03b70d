"""Compiling kt's Mojo package through MAX and running one op as a callable.

One MAX graph per (kernel, dtype, device, package): every tensor dim is symbolic (named by
the spec's axes) and every kernel parameter is a scalar graph input, so one compile serves
every shape and parameter value Hypothesis draws. MAX caches compiled graphs on disk, so a
second `kt verify` of an unchanged kernel skips the compile. MAX does not cache the step
before it: given a source directory, every process re-runs `mojo precompile` on it (6 to 13
s for kt's package); `harness.precompiled` does that once per package content and compiler
version.

Also here: binding a compiled MAX model to argument buffers as a `Bound` (`max_model_bound`),
which the stock-MAX providers of the specs use. MAX and Mojo's Python modules are imported
inside the functions that use them, for start-up time (`kt list` needs neither).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from harness import devices
from harness.precompiled import BuildError, mojo_error_summary, precompiled_package
from harness.spec import Bound, KernelSpec, Params, Tensors

REPO = Path(__file__).resolve().parents[1]
KERNELS = REPO / "kernels"

def resolve_package(path: str | Path | None) -> Path:
    """The Mojo package directory to build: kt's own, or a user's `--kernels PATH`."""
    pkg = Path(path).expanduser().resolve() if path else KERNELS
    if not pkg.exists():
        raise BuildError(f"kernel package {pkg} does not exist")
    if pkg.is_dir() and not (pkg / "__init__.mojo").exists():
        raise BuildError(f"{pkg} is not a Mojo package (no __init__.mojo)")
    return pkg


def resolve_run(device: str, package: str | Path | None) -> tuple[list, str | None]:
    """What `kt verify` and `kt microbench` check before any work: the devices `device`
    selects and the package to build (None: kt's own). Either problem raises ValueError with
    a one-line message."""
    targets = devices.select(device)
    if package is None:
        return targets, None
    try:
        return targets, str(resolve_package(package))
    except BuildError as e:
        raise ValueError(str(e)) from None


@contextlib.contextmanager
def captured_stderr():
    """File descriptor 2 (where MAX's compiler prints its diagnostics, below Python) goes to a
    temporary file while the block runs; yields a dict whose "text" is what was printed. The
    caller decides whether to show it."""
    sys.stderr.flush()
    saved = os.dup(2)
    got: dict[str, str] = {"text": ""}
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield got
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            got["text"] = tmp.read().decode(errors="replace")


def expected_signature(spec: KernelSpec, dtype: torch.dtype) -> str:
    """The call kt makes to the op's `execute`, as a Mojo-like signature: outputs, inputs,
    scalar params (in the spec's order), then the device context."""
    def tensor(kind: str, t) -> str:
        dt = str(t.torch_dtype(dtype)).removeprefix("torch.")
        return f"{t.name}: {kind}[{dt}, rank={len(t.dims)}]"

    args = [tensor("OutputTensor", t) for t in spec.outputs]
    args += [tensor("MutableInputTensor" if t.mutable else "InputTensor", t) for t in spec.inputs]
    args += [f"{p.name}: {'Int32' if p.dtype == 'int32' else 'Float32'}"
             for p in spec.kernel_params()]
    return f"execute({', '.join(args + ['ctx: DeviceContext'])})"


_DIAG_ERROR = re.compile(r"^(?:(?P<loc>\S+\.mojo:\d+:\d+): )?error: (?P<msg>.+)$", re.M)
_DIAG_DECL = re.compile(r"^(?P<loc>\S+\.mojo:\d+:\d+): note: (?P<msg>.+)$", re.M)
_DIAG_NOTE = re.compile(r"^note: (?P<msg>.+)$", re.M)
_FIRST_SECOND = re.compile(r"^\.?(?P<what>[\w.]+) of the first value is '(?P<a>.*)' but the second "
                           r"value is '(?P<b>.*)'$")


def op_mismatch_summary(spec: KernelSpec, dtype: torch.dtype, diagnostics: str) -> str | None:
    """One line from the compiler's diagnostics of a graph calling `spec.op` that failed to
    compile: where (the error's file:line, else where the op's `execute` is declared), the
    compiler's message (conversion types shortened, "first/second value" notes named as what
    kt passes and what the op declares) and the call kt makes. None when the text holds no
    Mojo error."""
    err = _DIAG_ERROR.search(diagnostics)
    if err is None:
        return None
    msg = re.sub(r" cannot be converted from '.*' to '.*'$", " does not have the declared type",
                 err["msg"].strip())
    notes = []
    for n in _DIAG_NOTE.finditer(diagnostics, err.end()):
        m = _FIRST_SECOND.match(n["msg"].strip())
        notes.append(f"{m['what']}: kt passes {_unwrap(m['a'])}, the op declares {_unwrap(m['b'])}"
                     if m else n["msg"].strip())
    decl = _DIAG_DECL.search(diagnostics, err.end())
    loc = err["loc"] or (decl["loc"] if decl else None)
    detail = f"{msg} ({'; '.join(notes)})" if notes else msg
    where = f"{loc}: " if loc else ""
    return f"{where}{spec.op}: {detail}; kt calls {expected_signature(spec, dtype)}"


def _unwrap(value: str) -> str:
    """'Int(2)' -> '2': a compile-time value as a kernel author wrote it."""
    m = re.fullmatch(r"Int\((-?\d+)\)", value)
    return m[1] if m else value


def max_dtype(dtype: torch.dtype):
    from max.dtype import DType

    return {
        torch.float32: DType.float32,
        torch.bfloat16: DType.bfloat16,
        torch.float16: DType.float16,
        torch.int64: DType.int64,
        torch.int32: DType.int32,
        torch.uint32: DType.uint32,
    }[dtype]


@dataclass
class CompiledOp:
    """One spec's op compiled for one dtype and device; call it with torch tensors."""

    spec: KernelSpec
    dtype: torch.dtype
    device: str
    package: Path
    compile_seconds: float
    _model: Any
    _max_device: Any

    def __call__(self, inputs: Tensors, params: Params) -> tuple[torch.Tensor, ...]:
        """The op's outputs, then the contents of its mutated inputs after it ran (it
        mutates copies: `inputs` are left as they are)."""
        from max import driver

        args, mutated = [], []
        for t in self.spec.inputs:
            x = inputs[t.name]
            if t.mutable:
                x = x.clone(memory_format=torch.contiguous_format)
                mutated.append(x)
                args.append(driver.Buffer.from_dlpack(x))
            else:
                args.append(x if x.is_contiguous() else x.contiguous())
        for p in self.spec.kernel_params():
            args.append(np.array(p.op_value(params, inputs),
                                 dtype=np.int32 if p.dtype == "int32" else np.float32))
        if self.device != "cpu":
            torch.cuda.synchronize()
        outs = self._model.execute(*args)
        host = driver.CPU()
        result = tuple(torch.from_dlpack(o.to(host)) for o in outs)
        if self.device != "cpu":
            result = tuple(r.to(self.device) for r in result)
            self.synchronize()
        return result + tuple(mutated)

    def bind(self, inputs: Tensors, params: Params):
        """A zero-argument call running the model on `inputs` (already on the op's device)
        and returning its MAX device buffers: arguments are converted once, here, and
        nothing is copied to or from the host per call, so it is what a microbenchmark times.
        Mutated inputs are copied once, here; the op updates the copies (`run.mutated`).
        `to_torch(buffers)` views the buffers as torch tensors (DLPack, no copy where MAX
        allows it). The call is enqueued on the MAX device's stream (`stream_handle`)."""
        from max import driver

        keep = [inputs[t.name].clone(memory_format=torch.contiguous_format) if t.mutable
                else inputs[t.name] if inputs[t.name].is_contiguous() else inputs[t.name].contiguous()
                for t in self.spec.inputs]
        args = [driver.Buffer.from_dlpack(x) for x in keep]
        args += [driver.Buffer.from_numpy(np.array(
            p.op_value(params, inputs), dtype=np.int32 if p.dtype == "int32" else np.float32))
            for p in self.spec.kernel_params()]
        model = self._model

        def run():
            return model.execute(*args)

        run.keep_alive = keep  # the buffers alias these tensors' memory
        # the mutated inputs' copies, which the op updates on every call
        run.mutated = tuple(x for t, x in zip(self.spec.inputs, keep) if t.mutable)
        return run

    def stream_handle(self) -> int | None:
        """The native stream (CUstream / hipStream_t) MAX enqueues this op's work on."""
        if self.device == "cpu":
            return None
        return int(self._max_device.default_queue.native_stream_handle)

    def synchronize(self) -> None:
        self._max_device.synchronize()


def compile_op(spec: KernelSpec, dtype: torch.dtype, device: str = "cpu",
               package: str | Path | None = None) -> CompiledOp:
    """Build the symbolic-shape graph for `spec` and load it into a MAX session."""
    from max import driver, engine
    from max.dtype import DType
    from max.graph import BufferType, DeviceRef, Graph, TensorType, ops

    pkg = resolve_package(package)
    dev_ref = DeviceRef.CPU() if device == "cpu" else DeviceRef.GPU(0)
    max_device = driver.CPU() if device == "cpu" else driver.Accelerator(0)
    cpu = DeviceRef.CPU()

    def tensor_type(arg) -> TensorType:
        return TensorType(max_dtype(arg.torch_dtype(dtype)), shape=list(arg.dims), device=dev_ref)

    def input_type(arg):
        if arg.mutable:
            return BufferType(max_dtype(arg.torch_dtype(dtype)), shape=list(arg.dims), device=dev_ref)
        return tensor_type(arg)

    input_types = [input_type(t) for t in spec.inputs]
    input_types += [
        TensorType(DType.int32 if p.dtype == "int32" else DType.float32, shape=[], device=cpu)
        for p in spec.kernel_params()
    ]
    start = time.perf_counter()
    name = f"kt_{spec.name}_{str(dtype).removeprefix('torch.')}_{device}"
    ext = precompiled_package(pkg)
    try:
        # MAX's compiler prints why a graph does not compile (an op whose `execute` does not
        # take what the graph passes) on fd 2 and raises only "Failed to compile the model".
        with captured_stderr() as diagnostics:
            with Graph(name, input_types=input_types, custom_extensions=[ext]) as graph:
                # an op that mutates a buffer is in-place: MAX orders it in the buffer's chain
                call = ops.inplace_custom if any(t.mutable for t in spec.inputs) else ops.custom
                outs = call(
                    spec.op,
                    device=dev_ref,
                    values=list(graph.inputs),
                    out_types=[tensor_type(t) for t in spec.outputs],
                )
                graph.output(*outs)
            session = engine.InferenceSession(devices=[max_device])
            model = session.load(graph)
    except Exception as e:  # MAX raises several types; each becomes one line
        from mojo.paths import MojoCompilationError

        if isinstance(e, MojoCompilationError) or "Error compiling Mojo" in str(e):
            raise BuildError(mojo_error_summary(str(e))) from None
        if "no kernel registered" in str(e):
            raise BuildError(f"{pkg} does not register op {spec.op!r}") from None
        summary = op_mismatch_summary(spec, dtype, diagnostics["text"])
        if summary:
            raise BuildError(summary) from None
        first = str(e).strip().splitlines()
        raise BuildError(f"MAX could not build {spec.op} ({first[0] if first else type(e).__name__}); "
                         f"kt calls {expected_signature(spec, dtype)}") from None
    if diagnostics["text"]:  # warnings of a graph that compiled stay visible
        sys.stderr.write(diagnostics["text"])
    return CompiledOp(spec, dtype, device, pkg, time.perf_counter() - start, model, max_device)


def buffers_to_torch(buffers, device: str) -> tuple[torch.Tensor, ...]:
    """MAX device buffers as torch tensors on `device`: DLPack views, no copy where MAX allows."""
    from max import driver

    out = []
    for b in buffers:
        try:
            out.append(torch.from_dlpack(b))
        except Exception:  # a MAX build without device DLPack export: copy through the host
            out.append(torch.from_dlpack(b.to(driver.CPU())).to(device))
    return tuple(out)


def max_model_bound(model, max_device, args: list, keep: list, device: str,
                    to_torch: Callable[[Any], tuple[torch.Tensor, ...]] | None = None) -> Bound:
    """A compiled MAX model bound to its argument buffers, as the stock-MAX providers run
    it: the timed call is `model.execute(*args)` on `max_device`'s stream, `keep` holds the
    torch tensors the buffers alias, and the results come back through DLPack (then
    `to_torch`, when given, reshapes them)."""

    def run():
        return model.execute(*args)

    run.keep_alive = keep
    stream = None if device == "cpu" else int(max_device.default_queue.native_stream_handle)
    return Bound(run, to_torch or (lambda bufs: buffers_to_torch(bufs, device)), stream,
                 max_device.synchronize)
