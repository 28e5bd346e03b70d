"""Child processes that run kernels for `kt verify` and `kt microbench`, and never outlive kt.

A Mojo kernel can take its process down or never return, so kt runs kernels in a child and
watches it from outside:

* Each child leads its own process group (`start_new_session`): a Ctrl-C at a terminal reaches
  kt alone, and stopping the child stops what it forked (`mojo precompile`, compile workers).
* It reports on stdout in lines starting with `PREFIX` (one JSON event each); anything else a
  kernel or MAX prints is kept, the last 30 lines, for the report of a child that died.
* An event may carry `limit_s`: the seconds the child may take until its next event (the
  time limit of the kernel call it is about to make). `Child.events` raises `TimedOut` when
  that passes in silence; events without `limit_s` lift the limit (compiling is not limited).
* `Child.stop` sends SIGTERM to the group (kt's workers turn it into KeyboardInterrupt, so
  their `finally` blocks run, such as `build.py`'s staging cleanup), waits `grace_s`, then
  SIGKILLs the group. A child of a kt killed by SIGKILL, which no handler sees, dies with it
  (`die_with_parent`, Linux).

`interrupt_on_sigterm` makes SIGTERM to kt behave as Ctrl-C: KeyboardInterrupt in the main
thread, so the commands stop their children, save what finished and exit 130.
"""

from __future__ import annotations

import ctypes
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Iterator

PREFIX = "@@kt "
INTERRUPT_EXIT = 130


class TimedOut(Exception):
    """The child sent nothing within the limit of the step it was in."""

    def __init__(self, limit_s: float) -> None:
        super().__init__(f"no result within {limit_s:g} s")
        self.limit_s = limit_s


class Child:
    """`python -m MODULE JOB_JSON` in its own process group, its events read by a thread."""

    def __init__(self, module: str, job: dict, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ if env is None else env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.tail: deque[str] = deque(maxlen=30)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, json.dumps(job)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, errors="replace", env=env, start_new_session=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def events(self) -> Iterator[dict]:
        """The child's events until it closes stdout; TimedOut when a step's limit passes."""
        deadline: float | None = None
        limit = 0.0
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise TimedOut(limit) from None
            if line is None:
                return
            if not line.startswith(PREFIX):
                self.tail.append(line.rstrip())
                continue
            event = json.loads(line[len(PREFIX):])
            if event.get("limit_s"):
                limit = float(event["limit_s"])
                deadline = time.monotonic() + limit
            else:
                deadline = None
            yield event

    def how_it_ended(self) -> str | None:
        """'exit code N' / 'signal NAME' once the child exited with a failure, else None;
        whatever it left in its group is killed."""
        rc = self.proc.wait()
        _signal_group(self.proc.pid, signal.SIGKILL)
        if rc == 0:
            return None
        return f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"

    def stop(self, grace_s: float = 3.0) -> None:
        """SIGTERM the child's group, wait up to `grace_s`, SIGKILL what is left. A second
        Ctrl-C during the wait goes straight to SIGKILL."""
        try:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        finally:
            _signal_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _signal_group(pgid: int, signo: int) -> None:
    try:
        os.killpg(pgid, signo)
    except (ProcessLookupError, PermissionError):
        pass


def emit(event: dict) -> None:
    """A child's event to the parent (see the module docstring)."""
    sys.stdout.write(PREFIX + json.dumps(event, default=str) + "\n")
    sys.stdout.flush()


def _raise_interrupt(signo, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signo).name)


def die_with_parent() -> None:
    """In a child: SIGKILL when the parent dies (Linux), and SIGTERM as KeyboardInterrupt."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if sys.platform.startswith("linux"):
        parent = os.getppid()
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the parent died before the prctl
            os._exit(1)


@contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the main thread while in this block, as Ctrl-C."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
