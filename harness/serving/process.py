"""Server child processes that never outlive kt.

Each server starts in its own session (`start_new_session=True`), so it leads a process group
holding everything it forks (MAX's model worker, vLLM's engine core). Teardown signals the whole
group: SIGTERM, a grace period, then SIGKILL. It runs on every exit path:

* normal return and exceptions: `ServerProcess` is a context manager;
* Ctrl-C / SIGTERM: `install_signal_handlers()` turns them into a teardown of every live server,
  then `Interrupted` in the main thread (kt saves what finished and exits 130); SIGHUP: teardown,
  then the default action;
* interpreter exit: `atexit` tears down whatever is still registered.

SIGKILL of kt itself cannot be caught; for that each server runs under a small supervisor
(`_SUPERVISOR`, the group's leader) that takes the group down when kt is gone.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

_LIVE: dict[int, "ServerProcess"] = {}

# The session leader of every server kt starts: it runs the server as its child, in its own
# process group, and exits with the server's status. It ignores SIGTERM (kt signals the whole
# group; the server's exit ends it) and, when kt (argv[1]) is gone, as after `kill -9`, which no
# handler sees, it takes the group down itself.
_SUPERVISOR = """
import os, signal, subprocess, sys, time
kt = int(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: None)
signal.signal(signal.SIGINT, lambda *_: None)
child = subprocess.Popen(sys.argv[2:])
while child.poll() is None:
    time.sleep(0.5)
    if os.getppid() != kt:
        os.killpg(0, signal.SIGTERM)
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(0, signal.SIGKILL)
code = child.returncode
sys.exit(128 - code if code < 0 else code)
"""


class ServerError(RuntimeError):
    """A server failed to start or to stay up; the message carries the log's tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just handed out on `host`. Another process may take it before the
    server binds (the usual race); `wait_healthy` then reports the server's bind error."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class ServerProcess:
    """One server command run as a child process group, logging to `log`."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    health_url: str
    popen: subprocess.Popen | None = None
    start_s: float | None = None
    ready_s: float | None = None
    extra: dict = field(default_factory=dict)

    def start(self) -> "ServerProcess":
        install_signal_handlers()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.log, "wb")
        os.fchmod(fh.fileno(), 0o644)  # logs are results too: readable by the group whatever the umask
        self.start_s = time.monotonic()
        self.popen = subprocess.Popen(
            [sys.executable, "-c", _SUPERVISOR, str(os.getpid()), *self.argv],
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        fh.close()
        _LIVE[self.popen.pid] = self
        return self

    @property
    def pgid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def wait_healthy(self, timeout_s: float, poll_s: float = 1.0) -> float:
        """Block until GET health_url answers 200; return the cold-start seconds."""
        assert self.popen is not None and self.start_s is not None
        deadline = self.start_s + timeout_s
        while True:
            code = self.popen.poll()
            if code is not None:
                raise ServerError(
                    f"{self.name} exited with code {code} before it was ready; log {self.log}:\n"
                    + tail(self.log)
                )
            try:
                with urllib.request.urlopen(self.health_url, timeout=2) as r:
                    if r.status == 200:
                        self.ready_s = time.monotonic() - self.start_s
                        return self.ready_s
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ServerError(
                    f"{self.name} not healthy at {self.health_url} after {timeout_s:.0f} s; "
                    f"log {self.log}:\n" + tail(self.log)
                )
            time.sleep(poll_s)

    def wait_exit(self, timeout_s: float, poll_s: float = 0.5) -> int | None:
        """Block until the process exits (a child that is no server); its exit code, or None
        when it still runs after `timeout_s`."""
        assert self.popen is not None and self.start_s is not None
        while self.popen.poll() is None and time.monotonic() < self.start_s + timeout_s:
            time.sleep(poll_s)
        return self.popen.poll()

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the group, wait up to `grace_s`, then SIGKILL it. Idempotent."""
        if self.popen is None:
            return
        _LIVE.pop(self.popen.pid, None)
        kill_group(self.pgid, grace_s)
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A group whose members are all zombies still answers; reap what is ours.
    try:
        while os.waitpid(-pgid, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def kill_group(pgid: int, grace_s: float = 10.0) -> None:
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_all() -> None:
    for server in list(_LIVE.values()):
        server.stop(grace_s=5.0)


_INSTALLED = False


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: servers are down; the caller saves what finished."""

    def __init__(self, signo: int) -> None:
        super().__init__(signal.Signals(signo).name)
        self.signo = signo


def _on_signal(signo: int, frame: object) -> None:
    stop_all()
    signal.signal(signo, signal.SIG_DFL)  # a second signal takes the default action
    if signo == signal.SIGHUP:
        os.kill(os.getpid(), signo)
        return
    raise Interrupted(signo)


def install_signal_handlers() -> None:
    """Tear down live servers on SIGINT/SIGTERM/SIGHUP and at exit (main thread only).
    SIGINT and SIGTERM then raise `Interrupted` (a KeyboardInterrupt) in the main thread, so the
    caller can save the results it has; SIGHUP takes its default action."""
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    atexit.register(stop_all)
    try:
        for signo in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signo, _on_signal)
    except ValueError:  # not the main thread: atexit and context managers still apply
        pass
