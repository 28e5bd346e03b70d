"""What can run here: the CPU always, plus CUDA, ROCm or Metal GPUs that torch and MAX see.

`PEAKS` holds datasheet peaks (dense tensor-core TFLOP/s without sparsity, HBM TB/s) per
GPU model, used for "% of peak"; they are leads, not measurements.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Peak:
    tflops_bf16: float
    tflops_fp32: float
    tb_per_s: float


PEAKS: dict[str, Peak] = {
    "H100 SXM": Peak(989.0, 67.0, 3.35),
    "H100 PCIe": Peak(756.0, 51.0, 2.0),
    "H100 NVL": Peak(835.0, 60.0, 3.9),
    "H200": Peak(989.0, 67.0, 4.8),
    "B200": Peak(2250.0, 80.0, 8.0),
    "A100 SXM": Peak(312.0, 19.5, 2.04),
    "A100 PCIe": Peak(312.0, 19.5, 1.94),
    "L40S": Peak(362.0, 91.6, 0.864),
    "L4": Peak(121.0, 30.3, 0.3),
    "A10": Peak(125.0, 31.2, 0.6),
    "MI300X": Peak(1307.0, 163.4, 5.3),
    "MI250X": Peak(383.0, 95.7, 3.2),
}


def peak_for(name: str) -> Peak | None:
    """Datasheet peaks for a device name as torch reports it ('NVIDIA H100 80GB HBM3')."""
    n = name.upper()
    if "H100" in n:
        if "PCIE" in n:
            return PEAKS["H100 PCIe"]
        return PEAKS["H100 NVL"] if "NVL" in n else PEAKS["H100 SXM"]
    for key in ("H200", "B200", "L40S", "MI300X", "MI250X", "L4", "A10"):
        if key in n:
            return PEAKS[key]
    if "A100" in n:
        return PEAKS["A100 PCIe"] if "PCIE" in n else PEAKS["A100 SXM"]
    return None


@dataclass(frozen=True)
class Device:
    kind: str  # cpu | gpu
    backend: str  # cpu | cuda | rocm | metal
    name: str
    torch_device: str  # "cpu", "cuda", "mps"

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.name}"


def cpu_device() -> Device:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return Device("cpu", "cpu", f"{name} ({os.cpu_count()} cores)", "cpu")


def gpu_device() -> Device | None:
    """The first GPU torch can use, if MAX also sees an accelerator."""
    if torch.cuda.is_available():
        backend = "rocm" if torch.version.hip else "cuda"
        if not _max_sees_accelerator():
            return None
        return Device("gpu", backend, torch.cuda.get_device_name(0), "cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available() and _max_sees_accelerator():
        return Device("gpu", "metal", "Apple GPU", "mps")
    return None


def _max_sees_accelerator() -> bool:
    try:
        from max import driver

        return driver.accelerator_count() > 0
    except Exception:
        return False


def select(which: str) -> list[Device]:
    """Devices for --device cpu|gpu|all; ValueError when a GPU is asked for and absent."""
    gpu = gpu_device() if which in ("gpu", "all") else None
    if which == "gpu" and gpu is None:
        raise ValueError("no GPU visible to both torch and MAX on this machine (try --device cpu)")
    devices = [cpu_device()] if which in ("cpu", "all") else []
    if gpu is not None:
        devices.append(gpu)
    return devices


def prepare_bench_device(requested: str | None) -> str:
    """The device kind `kt microbench` runs on: `requested`, or "gpu" when one is visible,
    else "cpu". On the CPU the Triton twins run in Triton's interpreter, which is chosen by
    TRITON_INTERPRET=1 when triton is first imported (by `pykernels`): so this sets it, and
    its callers import `pykernels` only after calling it. One BLAS thread: numpy's threads
    fighting torch's on a small CPU make the interpreter several times slower."""
    kind = requested or ("gpu" if gpu_device() is not None else "cpu")
    if kind == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    return kind
