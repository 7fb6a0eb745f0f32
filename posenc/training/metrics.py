"""Metrics to the console (tqdm bar with steps/s and ETA), TensorBoard and JSONL.

Only process 0 writes; other processes get a silent logger. ``metrics.jsonl`` is only ever
appended to: a resumed (or restarted) run first appends an event record, ``{"step": s, "event":
"resumed"}``, and ``read_history`` reads the file as the run's history, in which an event at step
``s`` replaces the records of the steps after ``s`` that it redoes. The files are created at the
first write, so a run that fails before writing anything leaves none behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time

from tqdm import tqdm


class MetricLogger:
  """``log(step, metrics, prefix)`` writes one record to every sink."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self.tb_dir = os.path.join(workdir, "tb")
    self._last = (start_step, time.perf_counter())
    self._bar = None  # started by the first advance(), after compilation, so the ETA is honest
    self.items: tuple[str, int] | None = None  # (what, how many per step): logs <what>_per_sec
    self.train_seconds = 0.0  # the clock of steps/s summed: training steps only (no compile, eval, checkpoint)
    self._jsonl = self._tb = None  # opened at the first write
    self._total = total_steps

  @property
  def started(self) -> bool:
    return not self.enabled or self._bar is not None

  def _start_bar(self, step: int) -> None:
    tty = sys.stderr.isatty()
    self._bar = tqdm(total=self._total, initial=step, unit="step", dynamic_ncols=True,
                     mininterval=0.5 if tty else 30.0, smoothing=0.1)

  def _sinks(self):
    if self._jsonl is None:
      self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
      from tensorboard.summary import Writer  # TensorBoard's own event files; needs neither TF nor torch
      self._tb = Writer(self.tb_dir)
    return self._jsonl, self._tb

  def event(self, step: int, event: str) -> None:
    """Append an event record (``resumed`` / ``restarted`` at ``step``): see ``read_history``."""
    self._last = (step, time.perf_counter())
    if self.enabled:
      jsonl, _ = self._sinks()
      jsonl.write(json.dumps({"step": step, "time": time.time(), "event": event}) + "\n")
      jsonl.flush()

  def print(self, message: str) -> None:
    if self.enabled:
      tqdm.write(message)

  def advance(self, step: int) -> None:
    """Move the progress bar to ``step``."""
    if not self.enabled:
      return
    if self._bar is None:
      self._start_bar(step)
    self._bar.update(step - self._bar.n)

  def restart_clock(self, step: int) -> None:
    self._last = (step, time.perf_counter())

  def log(self, step: int, metrics: dict[str, float], prefix: str, *, quiet: bool = False) -> None:
    """Write ``metrics`` as ``<prefix>/<name>``; a record other than "train" is also printed unless ``quiet``."""
    if not self.enabled:
      return
    record = {f"{prefix}/{k}": float(v) for k, v in metrics.items()}
    if prefix == "train":
      last_step, last_time = self._last
      now = time.perf_counter()
      if step > last_step:
        record["train/steps_per_sec"] = (step - last_step) / (now - last_time)
        self.train_seconds += now - last_time
        if self.items:
          record[f"train/{self.items[0]}_per_sec"] = record["train/steps_per_sec"] * self.items[1]
      self._last = (step, now)
      if self._bar is not None:
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
    elif not quiet:
      self.print(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in record.items()))
    jsonl, tb = self._sinks()
    for k, v in record.items():
      tb.add_scalar(k, v, step)
    jsonl.write(json.dumps({"step": step, "time": time.time(), **record}) + "\n")
    jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      if self._bar is not None:
        self._bar.close()
      if self._jsonl is not None:
        self._tb.close()
        self._jsonl.close()


class LoopClock:
  """Wall seconds of the training loop by phase, from the end of its first (compiling) step:
  ``data`` waits for the next batch, ``logging`` copies metrics to the host (after the steps they
  come from have finished) and writes them, ``evaluation`` and ``checkpoints`` (a save's blocking
  part: Orbax writes asynchronously); ``steps`` is the rest: dispatching steps and waiting for them."""

  PHASES = ("data", "logging", "evaluation", "checkpoints")

  def __init__(self):
    self.seconds = dict.fromkeys(self.PHASES, 0.0)
    self.start: float | None = None

  def begin(self) -> None:
    self.start = time.perf_counter()

  @contextlib.contextmanager
  def phase(self, name: str):
    start = time.perf_counter()
    try:
      yield
    finally:
      if self.start is not None:
        self.seconds[name] += time.perf_counter() - start

  def summary(self) -> dict[str, float]:
    """Seconds per phase (``steps`` included) and in all (``total``); empty before ``begin``."""
    if self.start is None:
      return {}
    total = time.perf_counter() - self.start
    return {"total_s": total, "steps_s": total - sum(self.seconds.values()),
            **{f"{p}_s": s for p, s in self.seconds.items()}}

  @staticmethod
  def shares(summary: dict[str, float]) -> str:
    """``summary`` as shares of the loop's wall time, for the console."""
    total = summary["total_s"]
    return ", ".join(f"{k[:-2]} {v / total:.1%}" for k, v in summary.items() if k != "total_s" and total > 0)


def read_history(path: str) -> list[dict]:
  """The run's metric records in order, as its last attempt saw them: an event record at step ``s``
  (a resume from step ``s``, or a restart at 0) drops the earlier records of steps after ``s``."""
  history = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      if not line.strip():
        continue
      record = json.loads(line)
      if "event" in record:
        history = [r for r in history if r["step"] <= record["step"]]
      else:
        history.append(record)
  return history
