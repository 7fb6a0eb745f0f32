"""``setup(config) -> Run``: everything a run needs, built once, as data.

Validate the config (before any compile) -> the task -> the mesh -> the train
state's layout and jitted init -> the jitted train step and one jitted eval step
per evaluated geometry (with the transfer that moves the parameters there) ->
the checkpoint metadata. ``posenc.training.train(run, workdir)`` loops over it;
benchmarks and the study time and reuse its pieces.

Geometry crosses checkpoints as data: a checkpoint records its run's task,
geometry, encoding and encoding options, and ``init_from`` transfers from that
recorded geometry to the config's through ``posenc.transfer.jit_transfer``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from posenc import tasks, transfer
from posenc.config import ConfigError
from posenc.encodings import Geometry
from posenc.encodings.base import POSENC_KEY
from posenc.training import checkpoint, sharding
from posenc.training.config import task_of, transfer_options, validate
from posenc.training.optim import make_optimizer
from posenc.training.state import StateSpec, abstract_params, build
from posenc.training.steps import make_eval_step, make_train_step, task_forward


@dataclasses.dataclass(frozen=True)
class Source:
  """The checkpoint ``init_from`` names, as its metadata describes it."""

  root: str
  step: int
  geometry: Geometry
  posenc: str
  position_scale: float


@dataclasses.dataclass
class EvalAt:
  """Evaluation at one geometry: its jitted step, and the jitted transfer of the parameters
  from the trained geometry (None where their shapes do not change)."""

  size: Any                   # the task's size (image_size / max_len); None: as trained
  geometry: Geometry
  step: Callable              # (params, model_state, batch) -> summed stats
  move: Callable | None       # params -> params at this geometry
  position_scale: float       # positions are multiplied by this (position interpolation)
  suffix: str                 # appended to the metric names ("" or "_56")


@dataclasses.dataclass
class Run:
  """A set-up run. ``state`` is the latest train state: None until ``initial_state()`` or
  ``train()`` sets it (after ``train()``, the final state; ``train_seconds``, its steps' time)."""

  config: ml_collections.ConfigDict
  task: tasks.Task
  mesh: jax.sharding.Mesh
  mesh_shape: tuple[int, ...]
  batch_sharding: jax.sharding.NamedSharding
  spec: StateSpec             # graphdef, optimizer, abstract state + shardings, jitted init
  train_step: Callable        # jitted (state, batch) -> (state, metrics); donates state
  evals: list[EvalAt]
  geometry: Geometry          # the trained geometry
  position_scale: float       # positions are multiplied by this (position interpolation)
  source: Source | None       # init_from's checkpoint, if any
  meta: dict                  # what every checkpoint of this run records
  state: dict | None = None
  train_seconds: float = 0.0  # after train(): seconds in its training steps (no compile, evaluation, checkpoints)
  start_step: int = 0         # after train(): the step it started from (> 0: resumed from a checkpoint)

  def loader(self, split: str, *, train: bool, size=None):
    batch_size = self.config.batch_size if train else self.config.eval_batch_size
    return self.task.batches(self.config, split, train=train, batch_size=batch_size, size=size)

  def initial_state(self, log: Callable[[str], None] = print) -> dict:
    """A fresh sharded state; with ``init_from``, its parameters come from that checkpoint
    (transferred to this geometry where their shapes change)."""
    state = self.spec.init()
    if self.source is not None:
      state["params"], changed = restore_source(self, self.source)
      log(f"Initialised parameters from {self.source.root}/{self.source.step}"
            + (f"; transferred ({self.config.transfer.method}): {', '.join(changed)}" if changed else ""))
    self.state = state
    return state

  def model(self, state: dict | None = None) -> nnx.Module:
    """The model holding ``state``'s (default: ``self.state``'s) parameters."""
    state = self.state if state is None else state
    return nnx.merge(self.spec.graphdef, state["params"], state["model_state"])


def read_source(config, task: tasks.Task) -> Source:
  """``init_from``'s checkpoint and what its metadata says of the stored model."""
  try:
    root, step = checkpoint.resolve(config.init_from)
    meta = checkpoint.Checkpointer(root, read_only=True).meta(step)
  except checkpoint.CheckpointError as e:
    raise ConfigError(f"config field 'init_from': {e}") from None
  if "geometry" not in meta:
    raise ConfigError(f"config field 'init_from': checkpoint {root}/{step} records no geometry (a posenc "
                      f"version before geometries were recorded wrote it); restore it with that version, "
                      f"or start from a run of this one.")
  geometry = Geometry.from_dict(meta["geometry"])
  if meta["task"] != task.name:
    raise ConfigError(f"config field 'init_from': checkpoint {root}/{step} is a '{meta['task']}' run; this "
                      f"config's task is '{task.name}'.")
  posenc = meta["posenc"]
  if posenc != config.posenc:
    raise ConfigError(f"config field 'posenc' is '{config.posenc}' but checkpoint {root}/{step} (init_from) "
                      f"was trained with '{posenc}'; set --config.posenc={posenc} to start from it.")
  return Source(root, step, geometry, posenc, float(meta.get("position_scale", 1.0)))


def restore_source(run: Run, source: Source) -> tuple[dict, list[str]]:
  """``source``'s parameters in ``run``'s layout (jitted transfer where shapes change)."""
  wanted = run.spec.abstract["params"]
  move = transfer.jit_transfer(source.posenc, source.geometry, run.geometry, wanted,
                               transfer_options(run.config))
  try:
    return checkpoint.Checkpointer(source.root, read_only=True).restore_params(source.step, wanted, move)
  except (checkpoint.CheckpointError, transfer.TransferError) as e:
    raise ConfigError(f"config field 'init_from': {e}") from None


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def _flag(field: str, value) -> str:
  text = f"({', '.join(map(str, value))}{',' if len(value) == 1 else ''})" if isinstance(value, list) else str(value)
  return f"--config.{field}={shlex.quote(text)}"


def _checkpoints_exist(directory: str) -> bool:
  """Whether ``directory`` exists, one answer for every process: all look before any goes on (and
  process 0 creates it), so all open it, with Orbax's collective syncs, or none does."""
  exists = os.path.isdir(directory)
  if jax.process_count() == 1:
    return exists
  return bool(np.max(multihost_utils.process_allgather(np.int32(exists))))


def check_resume(run: Run, workdir: str) -> None:
  """ConfigError, before anything is written, when ``workdir`` holds a run whose newest checkpoint
  (``restore_step``'s, if set) is of another model than ``run``'s, not only at another geometry
  (which ``init_from`` transfers): it names the parameters and the config fields that differ, and
  the two ways on (the run's own values resume it; a fresh --workdir trains this config)."""
  config = run.config
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if config.get("restart") or not _checkpoints_exist(directory):
    return
  ckpt = checkpoint.Checkpointer(directory, read_only=True)
  step = ckpt.latest_step() if config.get("restore_step") is None else config.restore_step
  if step is None:
    return
  try:
    stored, meta = ckpt.stored_shapes(step), ckpt.meta(step)
  except checkpoint.CheckpointError:
    return  # damaged, or not a kept step: the loop says so
  wanted = transfer.flat_shapes(run.spec.abstract["params"])
  differ = (stored.keys() ^ wanted.keys()) | {k for k in stored.keys() & wanted.keys() if stored[k] != wanted[k]}
  stored_posenc = meta.get("posenc", meta.get("config", {}).get("posenc"))  # older checkpoints: in the config
  geometry_only = all(k.startswith(POSENC_KEY + "/") for k in differ) and stored_posenc == config.posenc
  if not differ or geometry_only:
    return  # the same model, or another geometry of it: the loop resumes, or says how to transfer
  fields = {"model", "model_options", "posenc", "posenc_options", *run.task.FIELDS}
  was, now = _flat(meta.get("config", {})), _flat(json.loads(config.to_json_best_effort()))
  changed = [k for k in sorted(was.keys() | now.keys()) if k.split(".")[0] in fields and was.get(k) != now.get(k)]
  if changed:
    what = ", ".join(f"{k} ({was.get(k, 'unset')} -> {now.get(k, 'unset')})" for k in changed)
    back = " ".join(_flag(k, was[k]) if k in was else f"(without {k})" for k in changed)
    fix = f"This config differs from the run's in {what}: to resume the run, rerun with {back}"
  else:
    fix = "To resume the run, rerun with the config stored in its checkpoint's meta"
  problems = transfer.shape_diff(stored, wanted)
  raise ConfigError(f"cannot resume from workdir {os.path.abspath(workdir)}: its checkpoint {ckpt.path(step)} "
                    f"holds another model than this config builds ({'; '.join(problems[:4])}"
                    f"{'; ...' if len(problems) > 4 else ''}). {fix}; to train this config instead, give a "
                    f"fresh --workdir.")


def _eval_at(config, task, spec, mesh, batch_sharding, geometry, size, scale) -> EvalAt:
  """The eval step at ``size`` (None: the trained geometry), and the parameters' transfer there."""
  graphdef, params = spec.graphdef, spec.abstract["params"]
  target = geometry if size is None else task.geometry(config, size)
  if size is not None:
    rules = tuple(tuple(r) for r in config.logical_axis_rules)
    graphdef, params, _ = abstract_params(lambda: task.create_model(config, size), rules, mesh)
  move = None
  if transfer.flat_shapes(params) != transfer.flat_shapes(spec.abstract["params"]):
    move = transfer.jit_transfer(config.posenc, geometry, target, params, transfer_options(config))
  if config.transfer.interpolate_positions:
    scale = scale * transfer.interpolation_scale(geometry, target)
  step = jax.jit(make_eval_step(graphdef, task_forward(task, scale)),
                 in_shardings=(jax.tree.map(lambda x: x.sharding, params), spec.shardings["model_state"],
                               batch_sharding),
                 out_shardings=sharding.replicated(mesh))
  return EvalAt(size, target, step, move, scale, "" if size is None else task.size_suffix(size))


def setup(config: ml_collections.ConfigDict) -> Run:
  """Validate ``config`` and build its run (a ConfigError names the first bad field)."""
  shape = validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
  task = task_of(config)
  geometry = task.geometry(config)
  source = read_source(config, task) if config.init_from else None
  scale = 1.0
  if source is not None:
    scale = source.position_scale
    if config.transfer.interpolate_positions:
      scale *= transfer.interpolation_scale(source.geometry, geometry)
  mesh = sharding.make_mesh(shape)
  rules = tuple(tuple(r) for r in config.logical_axis_rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  try:  # builds the model abstractly: bad model/encoding options surface here, before compiling
    spec = build(lambda: task.create_model(config), make_optimizer(config), rules, mesh)
    evals = [_eval_at(config, task, spec, mesh, batch_sharding, geometry, size, scale)
             for size in (None, *task.eval_sizes(config))]
  except ValueError as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"cannot build model '{config.model}' with posenc '{config.posenc}' "
                      f"(fields model_options / posenc_options): {e}") from None
  train_step = jax.jit(make_train_step(spec.graphdef, spec.tx, task_forward(task, scale, config.label_smoothing),
                                       task.metrics),
                       in_shardings=(spec.shardings, batch_sharding),
                       out_shardings=(spec.shardings, sharding.replicated(mesh)), donate_argnums=0)
  meta = {"config": json.loads(config.to_json_best_effort()), "task": task.name,
          "geometry": geometry.to_dict(), "posenc": config.posenc,
          "posenc_options": dict(config.posenc_options), "position_scale": scale, "mesh": list(shape)}
  return Run(config, task, mesh, shape, batch_sharding, spec, train_step, evals, geometry, scale, source, meta)
