"""The training loop: ``train(config, workdir)``.

Validate -> mesh -> sharded state (fresh, resumed from the workdir, or initialised
from another run) -> jitted steps -> loop with periodic eval, logs and async
checkpoints. A resumed run ends with the same parameters, bit for bit, as an
uninterrupted one: the state, the data iterator position and the RNG state are
all in the checkpoint, and nothing else influences a step.
"""
from __future__ import annotations

import itertools
import json
import os

import jax
import ml_collections
import numpy as np

from posenc.training import sharding
from posenc import transfer
from posenc.training import resolution
from posenc.training.checkpoint import Checkpointer, flat_shapes, resolve_init_from
from posenc.training.config import ConfigError, model_family, validate
from posenc.training.metrics import MetricLogger
from posenc.training.optim import make_optimizer
from posenc.training.state import abstract_params, build, count_params, model_factory
from posenc.training.steps import make_eval_step, make_train_step


class NonFiniteLossError(RuntimeError):
  """The loss (or the parameters) stopped being finite; nothing after it was saved."""


def _loader(config, split: str, *, train: bool, batch_size: int, image_size=None):
  from posenc import data  # imported late: data builders are heavy
  geometry = ({"image_size": image_size or config.image_size, "augment": train and config.augment}
              if model_family(config.model) == "vit" else {"max_len": config.max_len})
  return data.make_loader(config.dataset, split, batch_size=batch_size, train=train,
                          seed=config.seed, process_index=jax.process_index(),
                          process_count=jax.process_count(), **geometry)


def _eval_splits(info) -> tuple[str, str]:
  """(split for periodic eval, split for the final report)."""
  splits = dict(getattr(info, "splits", {}) or {})
  periodic = "validation" if "validation" in splits else "test"
  return periodic, ("test" if "test" in splits else periodic)


class Trainer:
  """One run; ``run()`` trains to ``total_steps`` and returns the final eval metrics."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    from posenc import data
    self.shape = validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
    self.transfer_options = resolution.options(config)
    self.info = data.info(config.dataset)
    if config.init_from:  # position interpolation (e.g. RoPE scale) for the stored geometry
      config = resolution.interpolated(config, self._init_from_config(config), self.info)
    self.config, self.workdir = config, os.path.abspath(workdir)
    self.mesh = sharding.make_mesh(self.shape)
    self.rules = tuple(tuple(r) for r in config.logical_axis_rules)
    self.eval_split, self.test_split = _eval_splits(self.info)
    self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
    try:  # builds the model abstractly: bad model/encoding options surface here, before compiling
      self.run = build(model_factory(config, self.info), make_optimizer(config), self.rules, self.mesh)
    except ValueError as e:
      raise ConfigError(f"cannot build model '{config.model}' with posenc '{config.posenc}' "
                        f"(fields model_options / posenc_options): {e}") from None
    self.meta = {"config": json.loads(config.to_json_best_effort()), "mesh": list(self.shape)}
    self.train_step = jax.jit(make_train_step(self.run.graphdef, self.run.tx),
                              in_shardings=(self.run.shardings, self.batch_sharding),
                              out_shardings=(self.run.shardings, sharding.replicated(self.mesh)),
                              donate_argnums=0)
    self.eval_sizes = self._eval_geometries()
    self.ckpt = Checkpointer(os.path.join(self.workdir, "checkpoints"), keep=config.keep_checkpoints)
    self.log = MetricLogger(self.workdir, total_steps=config.total_steps,
                            enabled=jax.process_index() == 0)

  # ----------------------------------------------------------------------- set-up

  def _eval_geometries(self) -> dict:
    """Per extra eval image size: (jitted eval step, params shardings, needs transfer)."""
    out = {None: (self._eval_step(self.run.graphdef, self.run.shardings["params"]), None)}
    for size in self.config.eval_image_sizes:
      graphdef, params, _ = abstract_params(model_factory(self.config, self.info, image_size=size),
                                            self.rules, self.mesh)
      shard = jax.tree.map(lambda x: x.sharding, params)
      move = None
      if flat_shapes(params) != flat_shapes(self.run.abstract["params"]):
        at_size = resolution.as_config(self.config.to_dict())
        at_size.image_size = size
        move = resolution.make_transfer(self.config, at_size, self.info, self.transfer_options,
                                        out_shardings=shard)
      out[size] = (self._eval_step(graphdef, shard), move)
    return out

  @staticmethod
  def _init_from_config(config) -> dict:
    root, step = resolve_init_from(config.init_from)
    return Checkpointer(root, keep=1, read_only=True).meta(step).get("config", {})

  def _transfer_to_this_model(self, params, source_config: dict, _abstract):
    """Pure: ``params`` of the run ``source_config`` describes, mapped onto this run's model."""
    try:
      return transfer.transfer_params(
          params, source=resolution.abstract_model(source_config, self.info),
          target=resolution.abstract_model(self.config, self.info), options=self.transfer_options)
    except transfer.TransferError as e:
      raise ConfigError(f"config field 'init_from': {e}") from None

  def _eval_step(self, graphdef, params_sharding):
    return jax.jit(make_eval_step(graphdef),
                   in_shardings=(params_sharding, self.run.shardings["model_state"],
                                 self.batch_sharding),
                   out_shardings=sharding.replicated(self.mesh))

  def _initial_state(self, train_iter) -> dict:
    latest = self.ckpt.latest_step()
    if latest is not None:
      self.log.print(f"Resuming from {self.ckpt.directory}/{latest}")
      return self.ckpt.restore(latest, self.run.abstract, train_iter)
    state = self.run.init()
    if self.config.init_from:
      root, step = resolve_init_from(self.config.init_from)
      source = Checkpointer(root, keep=1, read_only=True)
      state["params"], changed = source.restore_params(step, self.run.abstract["params"],
                                                       self._transfer_to_this_model)
      self.log.print(f"Initialised parameters from {root}/{step}"
                     + (f"; transferred ({self.config.transfer.method}): {', '.join(changed)}"
                        if changed else ""))
    return state

  # ----------------------------------------------------------------------- eval

  def evaluate(self, state: dict, split: str) -> dict[str, float]:
    """Loss and accuracy over ``split`` (or its first ``eval_max_batches`` batches) at every
    eval image size; padding rows are masked out."""
    results = {}
    for size, (eval_step, move) in self.eval_sizes.items():
      params = state["params"] if move is None else move(state["params"])
      loader = _loader(self.config, split, train=False, batch_size=self.config.eval_batch_size,
                       image_size=size)
      batches = itertools.islice(loader, self.config.eval_max_batches or None)
      stats = [eval_step(params, state["model_state"],
                         sharding.global_batch(batch, self.batch_sharding)) for batch in batches]
      totals = {k: np.sum([s[k] for s in jax.device_get(stats)]) for k in stats[0]}
      suffix = "" if size is None else f"_{size}"
      count = max(float(totals["count"]), 1.0)
      results[f"loss{suffix}"] = float(totals["loss_sum"]) / count
      results[f"accuracy{suffix}"] = float(totals["correct"]) / count
    return results

  # ----------------------------------------------------------------------- loop

  def _check_and_log(self, pending: list, last_saved: int | None) -> None:
    """Fetch buffered step metrics; stop on a non-finite loss; log their means."""
    if not pending:
      return
    host = jax.device_get([m for _, m in pending])
    for (step, _), m in zip(pending, host):
      if not m["finite"]:
        self.ckpt.wait()
        where = (f"The last good checkpoint is {self.ckpt.directory}/{last_saved}; rerunning the "
                 f"same command resumes from it." if last_saved is not None
                 else "No checkpoint had been written yet.")
        raise NonFiniteLossError(
            f"Training stopped: the loss became non-finite at step {step} (loss={m['loss']}, "
            f"grad_norm={m['grad_norm']}); nothing from that step on was saved. {where} "
            f"Lower --config.lr (now {self.config.lr}) or raise --config.warmup_steps.")
    means = {k: float(np.mean([m[k] for m in host])) for k in ("loss", "accuracy", "grad_norm")}
    self.log.log(pending[-1][0], means, "train")
    pending.clear()

  def run_loop(self) -> dict[str, float]:
    c = self.config
    self.log.print(f"workdir: {self.workdir}")
    train_iter = iter(_loader(c, "train", train=True, batch_size=c.batch_size))
    state = self._initial_state(train_iter)
    step = int(jax.device_get(state["step"]))
    self.log.drop_after(step)
    last_saved = step if self.ckpt.latest_step() == step else None
    mesh = ", ".join(f"{a}={n}" for a, n in zip(self.mesh.axis_names, self.shape))
    self.log.print(f"model {c.model} + posenc '{c.posenc}': "
                   f"{count_params(state['params']):,} parameters; mesh {mesh} over "
                   f"{jax.device_count()} device(s), {jax.process_count()} process(es); "
                   f"steps {step} -> {c.total_steps}")
    pending, results = [], {}
    every = lambda n: bool(n) and step % n == 0
    while step < c.total_steps:
      batch = sharding.global_batch(next(train_iter), self.batch_sharding)
      state, metrics = self.train_step(state, batch)
      step += 1
      pending.append((step, metrics))
      if len(pending) == 1 and not self.log.started:
        jax.block_until_ready(metrics)  # compiled: start the clock for steps/s and ETA
        self.log.restart_clock(step - 1)
      self.log.advance(step)
      last = step == c.total_steps
      do_eval = last or every(c.eval_every)
      do_save = do_eval or every(c.checkpoint_every)
      if do_save or every(c.log_every):
        self._check_and_log(pending, last_saved)
      if do_eval:
        results = self.evaluate(state, self.eval_split)
        self.log.log(step, results, self.eval_split)
      if do_save:
        self.ckpt.save(step, state, train_iter, self.meta, metrics=results if do_eval else None)
        last_saved = step
      if do_save or do_eval:
        self.log.restart_clock(step)  # steps/s counts training only
    self._check_and_log(pending, last_saved)
    if self.test_split != self.eval_split or not results:
      results = self.evaluate(state, self.test_split)
      self.log.log(step, results, self.test_split)
    self.final_state = state
    return results

  def close(self) -> None:
    self.ckpt.close()
    self.log.close()


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Train ``config`` in ``workdir`` (resuming if it holds checkpoints); final eval metrics."""
  trainer = Trainer(config, workdir)
  try:
    return trainer.run_loop()
  finally:
    trainer.close()
