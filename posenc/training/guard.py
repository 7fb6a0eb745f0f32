"""What keeps a run safe from its surroundings: signals, a second writer, failing storage, divergence.

- ``Interrupts``: SIGTERM (what a preemptible VM or a scheduler sends) and SIGINT set a flag;
  the loop finishes its step, saves that step synchronously and stops with ``Preempted``
  (exit status 128 + the signal's number, 143 or 130, as a process killed by it reports).
  Further signals while saving only print a note: the save completes.
- ``WorkdirLock``: one writer per workdir. The lock file ``<workdir>/.lock`` names the holder
  (host, pid, start time) and is held with ``flock``, so a dead holder releases it; a lock file
  left by a dead process of this host is taken over with a warning.
- ``StorageError``: an unwritable workdir, a read-only mount or a full disk, named with the path
  and the cause, from any ``OSError`` (also one Orbax raises from its writer threads).
- ``DivergenceWatch``: the spike rule. A step's training loss is out of range when it is not
  finite or exceeds ``factor`` times the larger of the median of the last ``window`` healthy
  steps' losses and a tenth of the first step's loss (a floor, so that a loss near zero late in
  training cannot trip it with noise). The loop checks every step before it saves, so a diverged
  state is never saved.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import json
import math
import os
import re
import signal
import socket
import statistics
import sys
import time


class RunError(RuntimeError):
  """A run stopped for a reason outside its config; the message says what to do."""


class StorageError(RunError):
  """The workdir cannot be written (permissions, a read-only mount, a full disk)."""


class Preempted(RunError):
  """A signal asked the run to stop; its step was saved. ``exit_code``: 128 + the signal."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + signum


class WorkdirBusy(RunError):
  """Another live run holds the workdir."""


# TensorStore (Orbax's writer) reports a failed write as a ValueError carrying the OS error code.
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def os_error_in(e: BaseException) -> OSError | None:
  """The ``OSError`` that caused ``e`` (itself, a cause or a context, or a TensorStore error that
  carries its code), if any."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno is not None:
      return e
    found = _OS_ERROR_CODE.search(str(e))
    if found:
      code = int(found.group(1))
      path = re.search(r'local file "([^"]+)"', str(e))
      return OSError(code, os.strerror(code), path.group(1) if path else None)
    e = e.__cause__ or e.__context__
  return None


def storage_error(e: OSError, what: str, last_checkpoint: str | None = None) -> StorageError:
  """One message for a failed write: the path, the cause, the fix, and what survives."""
  path = f" ({e.filename})" if e.filename else ""
  cause = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
           errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
           errno.EPERM: "permission denied"}.get(e.errno, e.strerror or str(e))
  fix = ("free space on that disk" if e.errno in (errno.ENOSPC, errno.EDQUOT) else
         "make it writable or give another --workdir")
  kept = (f" The last complete checkpoint is {last_checkpoint}; rerunning the same command resumes from it."
          if last_checkpoint else " No checkpoint of this run was complete.")
  return StorageError(f"cannot write {what}{path}: {cause}. Stopped: {fix}, then rerun.{kept}")


@contextlib.contextmanager
def silenced_stderr():
  """File descriptor 2 to /dev/null: the tracebacks that native writer threads print directly (TensorStore's
  callbacks on a closed event loop) while a failed run shuts its checkpointer down after the one message."""
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(os.devnull, "w") as null:
      os.dup2(null.fileno(), 2)
      yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)


class Interrupts:
  """While active, SIGTERM and SIGINT set ``signum`` instead of killing the process."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, enabled: bool = True):
    self.enabled = enabled and _main_thread()
    self.signum: int | None = None
    self.saving = False
    self._previous = {}

  def _handle(self, signum, frame) -> None:  # noqa: ARG002 - the signal module's signature
    if self.signum is None:
      self.signum = signum
      print(f"\n{signal.Signals(signum).name} received: finishing this step and saving it...", file=sys.stderr,
            flush=True)
    else:
      print(f"{signal.Signals(signum).name} received again: still saving; the checkpoint will be complete.",
            file=sys.stderr, flush=True)

  def __enter__(self) -> "Interrupts":
    if self.enabled:
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)


def _main_thread() -> bool:
  import threading
  return threading.current_thread() is threading.main_thread()


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """``<workdir>/.lock``: held with ``flock`` for the run's life, its text naming the holder."""

  NAME = ".lock"

  def __init__(self, workdir: str, warn=print):
    self.path = os.path.join(workdir, self.NAME)
    self.warn = warn
    self._file = None

  def acquire(self) -> None:
    try:
      f = open(self.path, "a+", encoding="utf-8")
    except OSError as e:
      raise storage_error(e, "the workdir's lock file") from None
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = self._holder(f)
      f.close()
      raise WorkdirBusy(f"workdir {os.path.dirname(self.path)} is in use by another run ({holder}); wait for "
                        f"it to finish or stop it, or give this run another --workdir.") from None
    old = self._holder(f, parsed=True)
    if old and old.get("pid") and old.get("host") == socket.gethostname() and not _pid_alive(old["pid"]):
      self.warn(f"WARNING: taking over the stale lock of process {old['pid']} (started {old.get('start')}), "
                f"which is no longer running.")
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                        "start": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    f.flush()
    self._file = f

  @staticmethod
  def _holder(f, parsed: bool = False):
    f.seek(0)
    try:
      info = json.loads(f.read() or "{}")
    except ValueError:
      info = {}
    if parsed:
      return info
    return (f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, started {info.get('start', '?')}"
            if info else "holder unknown")

  def release(self) -> None:
    if self._file is not None:
      try:
        self._file.seek(0)
        self._file.truncate()
      except OSError:
        pass
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


class DivergenceWatch:
  """The spike rule (module docstring) over per-step training losses; ``factor=0`` keeps only the
  finiteness check."""

  def __init__(self, factor: float, window: int = 100):
    self.factor = float(factor)
    self.losses = collections.deque(maxlen=window)
    self.first: float | None = None

  def out_of_range(self, loss: float) -> str | None:
    """Why ``loss`` is out of range (None: healthy); healthy losses join the window."""
    if not math.isfinite(loss):
      return "not finite"
    if self.factor and self.losses:
      limit = self.factor * max(statistics.median(self.losses), self.first / 10)
      if loss > limit:
        return (f"above {self.factor:g} x the larger of the median of the last {len(self.losses)} steps' losses "
                f"and a tenth of the first step's ({limit:.4g})")
    if self.first is None:
      self.first = loss
    self.losses.append(loss)
    return None
