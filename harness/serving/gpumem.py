"""GPU memory of each serving engine, sampled from nvidia-smi while kt runs.

Every 0.5 s the monitor reads `nvidia-smi --query-compute-apps=pid,used_memory` (memory per
process) and `--query-gpu=index,memory.used` (per device). A registered engine's memory is the
sum over the processes of its process group (kt starts each server as a group leader: the API
server, engine cores and workers all belong to it). That is what separates two engines on one
GPU, or an engine from anything else the machine runs.

Where the processes nvidia-smi lists are not visible by those ids (a container whose PID
namespace differs from the driver's), no engine can be told apart: the monitor then reports the
devices' total in use, and says so (`attribution: "device total"`), never a per-engine figure it
did not measure.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


def group_pids(pgid: int) -> set[int]:
    """Live processes whose process group is `pgid` (read from /proc)."""
    out = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.add(int(d.name))
    return out


def parse_compute_apps(text: str) -> dict[int, float]:
    """`pid, used_memory` CSV lines (MiB) -> {pid: MiB}, summed over devices."""
    out: dict[int, float] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 2:
            continue
        try:
            pid, mib = int(parts[0]), float(parts[1])
        except ValueError:  # "[N/A]" or a header
            continue
        out[pid] = out.get(pid, 0.0) + mib
    return out


def parse_gpu_used(text: str) -> float | None:
    vals = []
    for line in text.splitlines():
        try:
            vals.append(float(line.split(",")[-1]))
        except ValueError:
            continue
    return sum(vals) if vals else None


@dataclass
class Sample:
    t: float
    device_used_mib: float | None
    per_engine_mib: dict[str, float] = field(default_factory=dict)
    attributed: bool = False  # some listed process belonged to a registered engine


class GpuMonitor:
    """Samples nvidia-smi in a thread; `peak(label, t0, t1)` answers for any engine and window."""

    def __init__(self, period_s: float = 0.5, smi: str | None = None) -> None:
        self.smi = smi or shutil.which("nvidia-smi")
        self.period_s = period_s
        self.samples: list[Sample] = []
        self.engines: dict[str, int] = {}  # label -> process group id
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pid_namespace_mismatch = False

    @property
    def available(self) -> bool:
        return self.smi is not None

    def register(self, label: str, pgid: int) -> None:
        with self._lock:
            self.engines[label] = pgid

    def start(self) -> "GpuMonitor":
        if self.available and self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    def _query(self, what: str) -> str:
        r = subprocess.run([self.smi, f"--query-{what}", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=10)
        return r.stdout

    def sample_once(self) -> Sample:
        t = time.monotonic()
        try:
            apps = parse_compute_apps(self._query("compute-apps=pid,used_memory"))
            used = parse_gpu_used(self._query("gpu=index,memory.used"))
        except (OSError, subprocess.TimeoutExpired):
            apps, used = {}, None
        s = Sample(t, used)
        with self._lock:
            engines = dict(self.engines)
        for label, pgid in engines.items():
            mine = group_pids(pgid) & set(apps)
            if mine:
                s.attributed = True
            s.per_engine_mib[label] = sum(apps[p] for p in mine)
        if apps and engines and not s.attributed and not any(p for p in apps if Path(f"/proc/{p}").exists()):
            self.pid_namespace_mismatch = True
        with self._lock:
            self.samples.append(s)
        return s

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample_once()
            self._stop.wait(self.period_s)

    def peak(self, label: str, t0: float, t1: float | None = None) -> dict:
        """Peak memory of engine `label` between monotonic times t0 and t1 (now when None):
        {'peak_mib', 'attribution', 'device_peak_used_mib'}; values None without nvidia-smi."""
        if not self.available:
            return {"peak_mib": None, "attribution": "no nvidia-smi", "device_peak_used_mib": None}
        t1 = time.monotonic() if t1 is None else t1
        with self._lock:
            window = [s for s in self.samples if t0 <= s.t <= t1]
        device = [s.device_used_mib for s in window if s.device_used_mib is not None]
        per = [s.per_engine_mib.get(label, 0.0) for s in window]
        attributed = any(s.attributed for s in self.samples)
        if attributed:
            return {"peak_mib": max(per) if per else None, "attribution": "per process (nvidia-smi compute apps)",
                    "device_peak_used_mib": max(device) if device else None}
        return {"peak_mib": None,
                "attribution": "device total (nvidia-smi lists no process of this engine's group by id)",
                "device_peak_used_mib": max(device) if device else None}
