"""The training loop: ``train(run, workdir)`` (``run`` from ``setup(config)``, or a config).

State (resumed from the workdir's newest readable checkpoint or ``restore_step``, or fresh, or
initialised from another run) -> loop with periodic evaluation, logs and async checkpoints ->
final evaluation. A resumed run ends with the same parameters, bit for bit, as an uninterrupted
one: the state, the data iterator position and the RNG state are all in the checkpoint, and
nothing else influences a step. What keeps a run safe (``posenc.training.guard``): one writer per
workdir; SIGTERM / SIGINT save the step in progress and stop (``Preempted``); storage failures stop
with one message; a loss out of its healthy range stops before anything diverged is saved.
"""
from __future__ import annotations

import itertools
import os
import shutil
import signal
import sys

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from posenc.config import ConfigError
from posenc.training import sharding
from posenc.training.checkpoint import Checkpointer, CheckpointError
from posenc.training.guard import (DivergenceWatch, Interrupts, Preempted, RunError, WorkdirLock, os_error_in,
                                   silenced_stderr, storage_error)
from posenc.training.metrics import LoopClock, MetricLogger
from posenc.training.run import Run, check_resume, setup
from posenc.training.state import count_params


class NonFiniteLossError(RunError):
  """The loss left its healthy range (not finite, or a spike: ``guard.DivergenceWatch``); nothing
  from that step on was saved."""


def _eval_splits(run: Run) -> tuple[str, str]:
  """(split for periodic evaluation, split for the final report)."""
  splits = run.task.splits(run.config)
  periodic = "validation" if "validation" in splits else "test"
  return periodic, ("test" if "test" in splits else periodic)


def evaluate(run: Run, state: dict, split: str) -> dict[str, float]:
  """The task's metrics over ``split`` (or its first ``eval_max_batches`` batches) at every
  evaluated geometry; padding rows count zero."""
  results = {}
  for at in run.evals:
    params = state["params"] if at.move is None else at.move(state["params"])
    batches = itertools.islice(run.loader(split, train=False, size=at.size), run.config.eval_max_batches or None)
    stats = [at.step(params, state["model_state"], sharding.global_batch(b, run.batch_sharding)) for b in batches]
    totals = {k: np.sum([s[k] for s in jax.device_get(stats)]) for k in stats[0]}
    results.update({f"{k}{at.suffix}": float(v) for k, v in run.task.metrics(totals).items()})
  return results


def _check_loss(pending: list, config, watch: DivergenceWatch, saved: dict, ckpt: Checkpointer) -> list:
  """Host copies of buffered step metrics; NonFiniteLossError at the first step out of range."""
  host = jax.device_get([m for _, m in pending])
  for (step, _), m in zip(pending, host):
    reason = watch.out_of_range(float(m["loss"]))
    if reason is None and not m["finite"]:
      reason = "finite, but the gradients or parameters are not"
    if reason is None:
      continue
    ckpt.wait()
    if saved:
      last = max(saved)
      where = (f"The newest checkpoint, saved before that, is {ckpt.path(last)} (step {last}, training loss "
               f"{_loss_text(saved[last])}). Rerun the same command with a lower --config.lr (it was {config.lr:g}) "
               f"to continue from it; --config.restore_step=K continues from an earlier kept step "
               f"({', '.join(map(str, sorted(saved)))}).")
    else:
      where = (f"No checkpoint had been written. Rerun the same command with a lower --config.lr (it was "
               f"{config.lr:g}) or a longer --config.warmup_steps.")
    raise NonFiniteLossError(f"Training stopped: the loss at step {step} is {reason} (loss={float(m['loss']):.4g}, "
                             f"grad_norm={float(m['grad_norm']):.4g}); nothing from that step on was saved. {where}")
  return host


def _loss_text(loss) -> str:
  return "not recorded" if loss is None else f"{loss:.4g}"


def _resume_or_start(run: Run, ckpt: Checkpointer, train_iter, log: MetricLogger) -> dict:
  """The state to train from: a kept checkpoint (the newest readable, or ``restore_step``), or a fresh
  (or ``init_from``) start; never a silent fresh start over a run's damaged checkpoints."""
  c = run.config
  if c.restart and ckpt.all_steps():
    moved = ckpt.set_aside_all("replaced")
    log.print(f"restart=True: the run's checkpoints were moved to {moved}; starting afresh.")
    log.event(0, "restarted")
  damaged = ckpt.damaged_steps()
  try:
    if c.restore_step is not None:
      found = ckpt.restore_step(c.restore_step, run.spec.abstract, train_iter, log.print)
    else:
      found = ckpt.restore_latest(run.spec.abstract, train_iter, log.print)
  except CheckpointError as e:
    raise ConfigError(f"cannot resume from workdir {os.path.dirname(ckpt.directory)}: {e} To start "
                      f"from it at another geometry, use a fresh --workdir with "
                      f"--config.init_from={os.path.dirname(ckpt.directory)}.") from None
  if found is None:
    damaged = ckpt.damaged_steps() if not c.restart else []
    if damaged:
      raise RunError(f"every checkpoint of the run in {os.path.dirname(ckpt.directory)} is damaged ("
                     f"{', '.join(damaged)}, under {ckpt.directory}.damaged/); nothing was started. To start this "
                     f"run afresh in the same workdir, rerun with --config.restart=True (the damaged checkpoints "
                     f"stay where they are), or give a new --workdir.")
    return run.initial_state(log.print)
  state, step = found
  log.print(f"Resuming from {ckpt.path(step)} (step {step})")
  log.event(step, "resumed")
  return state


def _agreed(signum: int | None) -> int | None:
  """The signal every process acts on at this step (multi-process: the same step everywhere)."""
  if jax.process_count() == 1:
    return signum
  seen = int(np.max(multihost_utils.process_allgather(np.int32(signum or 0))))
  return seen or None


def train(run: Run | ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Train ``run`` in ``workdir`` (resuming from its checkpoints); the final eval metrics.
  ``run.state`` is the final state afterwards. Raises ``ConfigError`` for bad input and a
  ``guard.RunError`` (``Preempted``, ``WorkdirBusy``, ``StorageError``, ``NonFiniteLossError``)
  when the run stops for another reason; either way a failed start leaves the workdir as it was."""
  if not isinstance(run, Run):
    run = setup(run)
  c, workdir = run.config, os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"workdir '{workdir}' is a file, not a directory; give a directory for the run.")
  check_resume(run, workdir)  # another model in the workdir: one message, before anything is written
  leader = jax.process_index() == 0
  fresh = [p for p in (workdir, os.path.join(workdir, "checkpoints")) if not os.path.exists(p)]
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise storage_error(e, "the workdir") from None
  lock = WorkdirLock(workdir, warn=lambda m: print(m, file=sys.stderr))
  if leader:
    lock.acquire()
  log = MetricLogger(workdir, total_steps=c.total_steps, enabled=leader)
  ckpt, saved, started, failed = None, {}, False, True
  try:
    with Interrupts() as interrupts:
      try:
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=c.keep_checkpoints,
                            best=run.task.BEST_METRIC)
      except Exception as e:  # noqa: BLE001 - Orbax creating the directory
        if (oe := os_error_in(e)) is None:
          raise
        raise storage_error(oe, "the checkpoint directory") from None
      log.print(f"workdir: {workdir}")
      eval_split, test_split = _eval_splits(run)
      train_iter = iter(run.loader("train", train=True))
      state = _resume_or_start(run, ckpt, train_iter, log)
      step = run.start_step = int(jax.device_get(state["step"]))
      saved = {s: loss for s, loss in ckpt.train_losses().items() if s <= step}
      started = True
      results = _loop(run, state, step, ckpt, log, train_iter, interrupts, saved, eval_split)
      state = run.state
      if test_split != eval_split or not results:
        results = evaluate(run, state, test_split)
        _write(lambda: log.log(c.total_steps, results, test_split), "metrics.jsonl", ckpt, saved)
      run.train_seconds = log.train_seconds
      failed = False
      return results
  except BaseException:
    if not started:
      _leave_as_found(fresh, ckpt, log)
      ckpt = None
    raise
  finally:
    try:
      if ckpt is not None:
        if failed:  # already stopping: finish what can finish, report only the first failure
          with silenced_stderr():
            _quietly(ckpt.close)
        else:
          _write(ckpt.close, f"the checkpoints in {ckpt.directory}", ckpt, saved)
    finally:
      if failed:
        _quietly(log.close)
      else:
        log.close()
      lock.release()


def _quietly(action) -> None:
  try:
    action()
  except Exception:  # noqa: BLE001 - a second failure while stopping after the first
    pass


def _loop(run: Run, state: dict, step: int, ckpt: Checkpointer, log: MetricLogger, train_iter,
          interrupts: Interrupts, saved: dict, eval_split: str) -> dict:
  """Steps ``step`` -> ``total_steps`` with evaluation, logs and checkpoints; ``run.state`` the last."""
  c = run.config
  run.state = state  # also when no step is left (a finished run, resumed)
  watch = DivergenceWatch(c.divergence_factor)
  log.print(f"model {c.model} + posenc '{c.posenc}' at {run.geometry}: {count_params(state['params']):,} "
            f"parameters; mesh {', '.join(f'{a}={n}' for a, n in zip(run.mesh.axis_names, run.mesh_shape))} over "
            f"{jax.device_count()} device(s), {jax.process_count()} process(es); steps {step} -> {c.total_steps}")
  pending, results, last_loss = [], {}, None
  clock = LoopClock()
  every = lambda n: bool(n) and step % n == 0  # noqa: E731
  while step < c.total_steps:
    with clock.phase("data"):
      batch = next(train_iter)
    log.items = (run.task.ITEMS, run.task.items(batch) * jax.process_count())
    state, metrics = run.train_step(state, sharding.global_batch(batch, run.batch_sharding))
    step += 1
    run.state = state
    pending.append((step, metrics))
    if len(pending) == 1 and not log.started:
      jax.block_until_ready(metrics)  # compiled: start the clock for steps/s and ETA
      log.restart_clock(step - 1)
      clock.begin()
    log.advance(step)
    signum = _agreed(interrupts.signum)
    last = step == c.total_steps
    do_eval = (last or every(c.eval_every)) and signum is None
    do_save = do_eval or every(c.checkpoint_every) or signum is not None
    if pending and (do_save or every(c.log_every)):
      jax.block_until_ready(pending[-1][1])  # the steps' own time, not the logging's
      with clock.phase("logging"):
        host = _check_loss(pending, c, watch, saved, ckpt)
        last_loss = float(host[-1]["loss"])
        keys = [k for k in host[0] if k != "finite"]
        _write(lambda: log.log(pending[-1][0], {k: float(np.mean([m[k] for m in host])) for k in keys}, "train"),
               "metrics.jsonl", ckpt, saved)
        pending.clear()
    if do_eval:
      with clock.phase("evaluation"):
        results = evaluate(run, state, eval_split)
        _write(lambda: log.log(step, results, eval_split), "metrics.jsonl", ckpt, saved)
    if do_save:
      meta = {**run.meta, "train_loss": last_loss}
      with clock.phase("checkpoints"):
        _write(lambda: ckpt.save(step, state, train_iter, meta, metrics=results if do_eval else None),
               "a checkpoint", ckpt, saved)
      if signum is not None:  # preempted: this step's checkpoint, complete, then stop
        interrupts.saving = True
        _write(ckpt.wait, "a checkpoint", ckpt, saved)
        saved[step] = last_loss
        name = signal.Signals(signum).name
        raise Preempted(f"Stopped by {name} after step {step}; saved {ckpt.path(step)} (with the data position "
                        f"and RNG state). Rerun the same command to resume from it.", signum)
      saved[step] = last_loss
    if do_save or do_eval:
      log.restart_clock(step)  # steps/s counts training only
  if pending:
    _check_loss(pending, c, watch, saved, ckpt)
  if timing := clock.summary():
    _write(lambda: log.log(step, timing, "loop_time", quiet=True), "metrics.jsonl", ckpt, saved)
    log.print(f"loop time after the first step: {timing['total_s']:.1f} s; {LoopClock.shares(timing)}")
  return results

def _write(action, what: str, ckpt: Checkpointer | None, saved: dict):
  """``action()``, its storage failures (also from Orbax's writer threads) one ``StorageError``."""
  try:
    return action()
  except Exception as e:  # noqa: BLE001 - find the OSError underneath
    if (oe := os_error_in(e)) is None:
      raise
    complete = [int(d) for d in os.listdir(ckpt.directory) if d.isdigit()] if ckpt is not None else []
    raise storage_error(oe, what, ckpt.path(max(complete)) if complete else None) from None


def _leave_as_found(fresh: list[str], ckpt: Checkpointer | None, log: MetricLogger) -> None:
  """After a failed start: remove the directories this run created, if they are still empty but for
  the lock and the (empty) checkpoint directory."""
  if ckpt is not None:
    try:
      ckpt.close()
    except Exception:  # noqa: BLE001 - nothing was saved; the directory is removed below if empty
      pass
  for path in reversed(fresh):
    if os.path.isdir(path) and set(os.listdir(path)) <= {WorkdirLock.NAME, "checkpoints"}:
      shutil.rmtree(path, ignore_errors=True)
