"""Result files and where a result came from: the one atomic JSON writer, the one reader of a
result file (plain or xz-compressed, as committed under benchmarks/results), the git sha and the
provenance record that `kt verify`, `kt microbench` and `kt serve-bench` all write."""

from __future__ import annotations

import datetime as _dt
import json
import lzma
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VERSIONED = ("torch", "triton", "max", "mojo", "mojo-compiler", "hypothesis")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to a temp file beside `path`, then rename it over `path`: readers (and a run
    killed half-way) never see half a file. The file is 0644, readable by the group, like a
    file written with open()."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def result_path(path: str | Path) -> Path:
    """The file that holds result `path`: `path` itself when it exists, else `path` + ".xz"
    when that exists (benchmarks/results commits large results compressed:
    scripts/compact-results.sh), else `path` (for the caller's "cannot read" error)."""
    path = Path(path)
    if not path.exists() and path.suffix != ".xz":
        packed = path.with_name(path.name + ".xz")
        if packed.is_file():
            return packed
    return path


def read_result_text(path: str | Path) -> str:
    """The text of result file `path` (`result_path`), decompressed when it ends in .xz.
    OSError when it cannot be read; ValueError when it is not xz data or not UTF-8."""
    path = result_path(path)
    if path.suffix != ".xz":
        return path.read_text()
    try:
        return lzma.decompress(path.read_bytes()).decode()
    except (lzma.LZMAError, EOFError) as e:
        raise ValueError(f"{path}: not a whole xz file ({e})") from None


def read_result_json(path: str | Path) -> Any:
    """Result file `path` as JSON, plain or .xz (`read_result_text`); ValueError when it is
    not JSON."""
    return json.loads(read_result_text(path))


def unwritable(path: str | Path, flag: str) -> str | None:
    """Why `flag`'s result file `path` cannot be written (None: it can), found before any work:
    its folder is made if missing, and a file is created in it and removed, as
    `write_json_atomic` will."""
    path = Path(path)
    if path.is_dir():
        return f"{flag} {path}: is a folder"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"{flag} {path}: cannot write there ({e.strerror or e})"
    return None


def command_line(argv: list[str] | None = None) -> str:
    """The `kt ...` command that reproduces this run, shell-quoted."""
    return "kt " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))


def error_line(e: BaseException) -> str:
    """An exception as one line for a result row: its type and first line, at most 300 chars."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def git_sha() -> str | None:
    """HEAD's sha, "-dirty" if tracked files differ from it. KT_GIT_SHA overrides it: for a
    copy of the tree on another machine whose git metadata is not this checkout's."""
    if os.environ.get("KT_GIT_SHA"):
        return os.environ["KT_GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not re.fullmatch(r"[0-9a-f]{40}", sha):
        return None
    return sha + ("-dirty" if dirty else "")


def versions() -> dict[str, str | None]:
    """Installed versions of the packages a result depends on (None: not installed)."""
    out: dict[str, str | None] = {}
    for dist in VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def gpu_info() -> dict | None:
    """The first GPU torch sees: name, SMs, memory, CUDA/HIP and driver versions."""
    import torch  # heavy: imported here so `kt serve-bench` starts without it

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    info = {"name": props.name, "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda, "hip": torch.version.hip}
    try:
        info["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        info["driver"] = None
    return info


def host_provenance() -> dict:
    """Where a result came from, without torch (`kt serve-bench` starts without it): time,
    host, platform, Python, kt's package versions and git sha (`git_sha`, KT_GIT_SHA first).
    Every command's record is built on it."""
    return {
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions(),
        "git_sha": git_sha(),
    }


def provenance(devices=None) -> dict:
    """A JSON-ready record of the machine and software a result was measured with
    (`host_provenance`, plus the devices and torch's GPU); `devices` are
    `harness.devices.Device`s."""
    return host_provenance() | {
        "devices": [d.label for d in devices] if devices else None,
        "gpu": gpu_info(),
    }
