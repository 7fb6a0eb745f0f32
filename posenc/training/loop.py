"""The training loop: ``train(run, workdir)`` (``run`` from ``setup(config)``, or a config).

State (resumed from the workdir's newest readable checkpoint, or fresh, or
initialised from another run) -> loop with periodic evaluation, logs and async
checkpoints -> final evaluation. A resumed run ends with the same parameters,
bit for bit, as an uninterrupted one: the state, the data iterator position and
the RNG state are all in the checkpoint, and nothing else influences a step.
"""
from __future__ import annotations

import itertools
import os

import jax
import ml_collections
import numpy as np

from posenc.config import ConfigError
from posenc.training import sharding
from posenc.training.checkpoint import Checkpointer, CheckpointError
from posenc.training.metrics import MetricLogger
from posenc.training.run import Run, setup
from posenc.training.state import count_params


class NonFiniteLossError(RuntimeError):
  """The loss (or the parameters) stopped being finite; nothing after it was saved."""


def _eval_splits(run: Run) -> tuple[str, str]:
  """(split for periodic evaluation, split for the final report)."""
  from posenc import data  # imported late: data builders are heavy
  splits = dict(getattr(data.info(run.config.dataset), "splits", {}) or {})
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


def _check_finite(pending: list, config, last_saved: int | None, ckpt: Checkpointer) -> list:
  """Host copies of buffered step metrics; NonFiniteLossError at the first non-finite step."""
  host = jax.device_get([m for _, m in pending])
  for (step, _), m in zip(pending, host):
    if not m["finite"]:
      ckpt.wait()
      where = (f"The last good checkpoint is {ckpt.path(last_saved)}; rerunning the same command "
               f"resumes from it." if last_saved is not None else "No checkpoint had been written yet.")
      raise NonFiniteLossError(
          f"Training stopped: the loss became non-finite at step {step} (loss={m['loss']}, "
          f"grad_norm={m['grad_norm']}); nothing from that step on was saved. {where} "
          f"Lower --config.lr (now {config.lr}) or raise --config.warmup_steps.")
  return host


def _resume_or_start(run: Run, ckpt: Checkpointer, train_iter, log) -> dict:
  try:
    found = ckpt.restore_latest(run.spec.abstract, train_iter, log)
  except CheckpointError as e:
    raise ConfigError(f"cannot resume from workdir {os.path.dirname(ckpt.directory)}: {e} To start "
                      f"from it at another geometry, use a fresh --workdir with "
                      f"--config.init_from={os.path.dirname(ckpt.directory)}.") from None
  if found is None:
    return run.initial_state(log)
  state, step = found
  log(f"Resuming from {ckpt.path(step)} (step {step})")
  return state


def train(run: Run | ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Train ``run`` in ``workdir`` (resuming from its checkpoints); the final eval metrics.
  ``run.state`` is the final state afterwards."""
  if not isinstance(run, Run):
    run = setup(run)
  c, workdir = run.config, os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"workdir '{workdir}' is a file, not a directory; give a directory for the run.")
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=c.keep_checkpoints)
  log = MetricLogger(workdir, total_steps=c.total_steps, enabled=jax.process_index() == 0)
  try:
    log.print(f"workdir: {workdir}")
    eval_split, test_split = _eval_splits(run)
    train_iter = iter(run.loader("train", train=True))
    state = _resume_or_start(run, ckpt, train_iter, log.print)
    step = int(jax.device_get(state["step"]))
    log.drop_after(step)
    last_saved = step if ckpt.latest_step() == step else None
    mesh = ", ".join(f"{a}={n}" for a, n in zip(run.mesh.axis_names, run.mesh_shape))
    log.print(f"model {c.model} + posenc '{c.posenc}' at {run.geometry}: {count_params(state['params']):,} "
              f"parameters; mesh {mesh} over {jax.device_count()} device(s), {jax.process_count()} "
              f"process(es); steps {step} -> {c.total_steps}")
    pending, results = [], {}
    every = lambda n: bool(n) and step % n == 0  # noqa: E731
    while step < c.total_steps:
      batch = next(train_iter)
      log.items = (run.task.ITEMS, run.task.items(batch) * jax.process_count())
      state, metrics = run.train_step(state, sharding.global_batch(batch, run.batch_sharding))
      step += 1
      pending.append((step, metrics))
      if len(pending) == 1 and not log.started:
        jax.block_until_ready(metrics)  # compiled: start the clock for steps/s and ETA
        log.restart_clock(step - 1)
      log.advance(step)
      last = step == c.total_steps
      do_eval = last or every(c.eval_every)
      do_save = do_eval or every(c.checkpoint_every)
      if pending and (do_save or every(c.log_every)):
        host = _check_finite(pending, c, last_saved, ckpt)
        keys = [k for k in host[0] if k != "finite"]
        log.log(pending[-1][0], {k: float(np.mean([m[k] for m in host])) for k in keys}, "train")
        pending.clear()
      if do_eval:
        results = evaluate(run, state, eval_split)
        log.log(step, results, eval_split)
      if do_save:
        ckpt.save(step, state, train_iter, run.meta, metrics=results if do_eval else None)
        last_saved = step
      if do_save or do_eval:
        log.restart_clock(step)  # steps/s counts training only
    if pending:
      _check_finite(pending, c, last_saved, ckpt)
    if test_split != eval_split or not results:
      results = evaluate(run, state, test_split)
      log.log(step, results, test_split)
    run.state = state
    run.train_seconds = log.train_seconds
    return results
  finally:
    ckpt.close()
    log.close()
