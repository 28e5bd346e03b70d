"""kt's cache of precompiled Mojo packages: `mojo precompile` once per package content and
compiler version, shared by every process (and by the parallel ones of benchmarks/gpu_run.sh).

It lives in `cache_dir()/mojo_pkg`: `kt_<digest>.mojoc` per package, beside the lock file its
builders wait on (whose mtime says when the package was last used). A build works in
`.staging.<pid>`, removed on every exit path a process sees; a later build removes those of
processes killed outright. After a build the cache keeps the `PRECOMPILED_KEEP` most recently
used packages ($KT_PRECOMPILED_KEEP).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

PRECOMPILED_KEEP = 32

_ERROR_LINE = re.compile(r"^(?P<loc>[^\s:][^:]*\.mojo:\d+:\d+): error: (?P<msg>.*)$", re.M)


class BuildError(Exception):
    """A Mojo package that does not compile, or lacks the op; `str()` is one line."""


def mojo_error_summary(text: str) -> str:
    """The first compiler error as 'file:line:col: message', or the text's last line."""
    match = _ERROR_LINE.search(text)
    if match:
        return f"{match['loc']}: {match['msg'].strip()}"
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown Mojo compile error"


def _mojo_version() -> str:
    for dist in ("mojo-compiler", "mojo", "max"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def package_digest(pkg: Path) -> str:
    """sha256 of a source package's Mojo files (relative paths and bytes) and the compiler's
    version: what its precompiled form depends on."""
    h = hashlib.sha256(_mojo_version().encode())
    for f in sorted(p for p in pkg.rglob("*") if p.suffix in (".mojo", ".🔥") and p.is_file()):
        h.update(str(f.relative_to(pkg)).encode() + b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def cache_dir() -> Path:
    """kt's on-disk cache: $KT_CACHE_DIR, else $XDG_CACHE_HOME/kt, else ~/.cache/kt."""
    if os.environ.get("KT_CACHE_DIR"):
        return Path(os.environ["KT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kt"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_staging(out_dir: Path) -> list[Path]:
    """Remove the `.staging.<pid>` folders (and `.<name>.mojoc.<pid>` copies) of processes
    that are gone, killed while building; returns what was removed."""
    removed = []
    for d in [*out_dir.glob(".staging.*"), *out_dir.glob(".*.mojoc.*")]:
        pid = d.name.rsplit(".", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            if d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
            else:
                d.unlink(missing_ok=True)
            removed.append(d)
    return removed


def _lock(package: Path) -> Path:
    return package.with_name(package.name + ".lock")


def _last_used(package: Path) -> float:
    """When `package` was last used: its lock file's mtime (`_cache_hit`), else its own."""
    for f in (_lock(package), package):
        with contextlib.suppress(OSError):
            return f.stat().st_mtime
    return 0.0


def prune_precompiled(out_dir: Path, keep: int) -> list[Path]:
    """Keep the `keep` most recently used `.mojoc` files of the cache (`_last_used`), remove
    the others and the lock files nobody holds that no longer guard a package; returns the
    packages removed."""
    packages = sorted(out_dir.glob("*.mojoc"), key=_last_used, reverse=True)
    removed = packages[max(keep, 0):]
    for f in removed:
        f.unlink(missing_ok=True)
    for lock_path in out_dir.glob("*.mojoc.lock"):
        if lock_path.with_suffix("").exists():
            continue
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # a build holds it
                continue
            lock_path.unlink(missing_ok=True)
    return removed


def precompiled_package(pkg: Path) -> Path:
    """The `.mojoc` of the source package `pkg`, built by `mojo precompile` at most once per
    content (`package_digest`): concurrent callers wait on a file lock for the one that
    builds it. A `.mojoc` file is returned as it is. BuildError on a compile error. A build
    happens in `.staging.<pid>`, removed on every exit path a process sees (a later build
    removes those of processes killed outright), then prunes the cache.

    The compiler names the module after the output file, and MAX imports it by that name, so
    the file is named `kt_<digest>` whatever the folder: one whose name is not a Mojo
    identifier (`my-kernels`, `mktemp -d`'s `tmp.Ab12`) builds like any other. The digest
    covers the folder's path too, because a build records its source paths and the
    compiler's messages (an op's wrong signature) point there. A `.mojoc` file whose name is
    not an identifier is copied there under such a name."""
    out_dir = cache_dir() / "mojo_pkg"
    if pkg.is_file():
        if pkg.stem.isidentifier():
            return pkg
        out = out_dir / f"kt_{hashlib.sha256(pkg.read_bytes()).hexdigest()[:20]}.mojoc"
        if not _cache_hit(out):
            out_dir.mkdir(parents=True, exist_ok=True)
            tmp = out_dir / f".{out.name}.{os.getpid()}"
            tmp.write_bytes(pkg.read_bytes())
            os.replace(tmp, out)
        return out
    key = hashlib.sha256(f"{pkg.resolve()}\0{package_digest(pkg)}".encode()).hexdigest()
    out = out_dir / f"kt_{key[:20]}.mojoc"
    if _cache_hit(out):
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(_lock(out), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _cache_hit(out):  # built by another process while this one waited
            return out
        from mojo.run import subprocess_run_mojo

        clean_stale_staging(out_dir)
        # the compiler names the module after the output file: build under the final name
        staging = out_dir / f".staging.{os.getpid()}"
        staging.mkdir(exist_ok=True)
        tmp = staging / out.name
        try:
            subprocess_run_mojo(["precompile", str(pkg), "-o", str(tmp)], capture_output=True,
                                check=True)
            os.replace(tmp, out)
        except subprocess.CalledProcessError as e:
            raise BuildError(mojo_error_summary(e.stderr.decode(errors="replace"))) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    keep = os.environ.get("KT_PRECOMPILED_KEEP", "")
    prune_precompiled(out_dir, int(keep) if keep.isdigit() else PRECOMPILED_KEEP)
    return out


def _cache_hit(out: Path) -> bool:
    """`out` exists; its use is recorded in its lock file's mtime, which `prune_precompiled`
    orders by (the package keeps its build time; a read-only cache still serves)."""
    if not out.exists():
        return False
    with contextlib.suppress(OSError):
        _lock(out).touch()
    return True
