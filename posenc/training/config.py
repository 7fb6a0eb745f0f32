"""The fields every run has, their validation (before any compile), the mesh and the workdir name.

A config is ``COMMON_FIELDS`` (configs/common.py sets their defaults) plus its
task's own fields (``posenc.tasks.<task>.FIELDS``), nothing else. ``validate``
checks the common ones here and hands the rest to the task.
"""
from __future__ import annotations

import math
import os
import re

import ml_collections

from posenc import encodings, models, tasks, transfer
from posenc.config import ConfigError, check_number

MESH_AXES = ("data", "fsdp", "model")
COMMON_FIELDS = frozenset({
    "task", "model", "model_options", "attention_impl", "posenc", "posenc_options", "dtype", "dataset", "batch_size",
    "eval_batch_size", "eval_max_batches", "total_steps", "warmup_steps", "lr", "weight_decay",
    "grad_clip_norm", "label_smoothing", "posenc_lr_mult", "seed", "log_every", "eval_every", "checkpoint_every",
    "keep_checkpoints", "restore_step", "restart", "divergence_factor", "init_from", "transfer", "mesh",
    "logical_axis_rules"})
DTYPES = ("float32", "bfloat16")


def task_of(config) -> "tasks.Task":
  try:
    return tasks.get(config.get("task"))
  except ValueError as e:
    raise ConfigError(f"config field 'task': {e}") from None


def default_workdir(config: ml_collections.ConfigDict, config_name: str) -> str:
  """``runs/<config>-<posenc>-<size>``."""
  name = os.path.splitext(os.path.basename(config_name))[0]
  size = task_of(config).size_label(config)
  return os.path.join("runs", re.sub(r"[^\w.-]+", "_", f"{name}-{config.posenc}-{size}"))


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Axis sizes ``(data, fsdp, model)`` with one ``-1`` meaning 'the rest'."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"config field 'mesh': sizes {dict(zip(MESH_AXES, sizes))} must be "
                      f"positive, with at most one -1 ('all remaining devices').")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"config field 'mesh': {num_devices} devices cannot be split into "
                        f"{dict(zip(MESH_AXES, sizes))}; make the fixed sizes divide {num_devices}.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"config field 'mesh': {dict(zip(MESH_AXES, sizes))} uses "
                      f"{math.prod(sizes)} devices but {num_devices} are present; set one "
                      f"axis to -1 to use the rest.")
  return tuple(sizes)


def transfer_options(config) -> transfer.TransferOptions:
  """The config's ``transfer`` fields as TransferOptions (a clear error if invalid)."""
  t = config.transfer
  try:
    return transfer.TransferOptions(method=t.method, antialias=bool(t.antialias), extend=t.extend)
  except ValueError as e:
    raise ConfigError(f"config field 'transfer': {e}") from None


def _check_encoding(config, task) -> None:
  try:
    cls = encodings.get(config.posenc, ndim=task.NDIM)
  except ValueError as e:
    raise ConfigError(f"config field 'posenc': {e}") from None
  if task.NDIM not in cls.supported_ndims:
    raise ConfigError(f"config field 'posenc': '{config.posenc}' does not support the {task.NDIM}D "
                      f"inputs of task '{config.task}'; choose one of: {', '.join(encodings.names(task.NDIM))}.")
  if not isinstance(config.posenc_options, ml_collections.ConfigDict | dict):
    raise ConfigError(f"config field 'posenc_options' must be a dict of options, got {config.posenc_options!r}.")
  try:
    options = encodings.options(config.posenc, **dict(config.posenc_options))
  except ConfigError as e:
    raise ConfigError(f"config field 'posenc_options': {e}") from None
  options.check_run(config)  # the rules that join the encoding to the run live with it
  if config.transfer.interpolate_positions and not cls.continuous:
    raise ConfigError(f"config field 'transfer.interpolate_positions': '{config.posenc}' looks positions up "
                      f"in a table and cannot take interpolated (real-valued) positions; set it False "
                      f"(tables are resampled instead) or use a continuous encoding such as rope.")


def validate(config: ml_collections.ConfigDict, *, num_devices: int, process_count: int = 1,
             check_dataset: bool = True) -> tuple[int, ...]:
  """Raise ``ConfigError`` for the first problem found; return the resolved mesh shape."""
  task = task_of(config)
  fields = COMMON_FIELDS | set(task.FIELDS)
  unknown = sorted(set(config) - fields) + [f"mesh.{k}" for k in sorted(set(config.mesh) - set(MESH_AXES))]
  missing = sorted(fields - set(config))
  if unknown or missing:
    raise ConfigError(f"config has unknown field(s) {unknown} / lacks field(s) {missing}; task "
                      f"'{config.task}' has the fields: {', '.join(sorted(fields))} (mesh: {', '.join(MESH_AXES)}).")
  if not isinstance(config.model_options, ml_collections.ConfigDict | dict):
    raise ConfigError(f"config field 'model_options' must be a dict of overrides, got {config.model_options!r}.")
  try:
    models.check_name(config.model)
  except ValueError as e:
    raise ConfigError(f"config field 'model': {e}") from None
  _check_encoding(config, task)
  transfer_options(config)
  check_number(config, "batch_size", "eval_batch_size", "keep_checkpoints", integer=True)
  check_number(config, "lr")
  check_number(config, "weight_decay", "posenc_lr_mult", "grad_clip_norm", allow_zero=True)
  if not 0 <= config.label_smoothing < 1 or isinstance(config.label_smoothing, bool):
    raise ConfigError(f"config field 'label_smoothing' must be a number in [0, 1), got {config.label_smoothing!r}.")
  check_number(config, "total_steps", "warmup_steps", "eval_every", "checkpoint_every", "log_every",
               "eval_max_batches", "seed", allow_zero=True, integer=True)
  if config.total_steps == 0 and not config.init_from:
    raise ConfigError("config field 'total_steps' is 0, which only evaluates a checkpoint: set "
                      "init_from to a run's workdir, or give total_steps > 0 to train.")
  if 0 < config.total_steps < config.warmup_steps:
    raise ConfigError(f"config field 'warmup_steps' ({config.warmup_steps}) exceeds "
                      f"total_steps ({config.total_steps}).")
  if config.dtype not in DTYPES:
    raise ConfigError(f"config field 'dtype': {config.dtype!r} is not one of {DTYPES}.")
  shape = mesh_shape(config.mesh, num_devices)
  data_parallel = shape[0] * shape[1]
  for f in ("batch_size", "eval_batch_size"):
    for n, what in ((data_parallel, "data-parallel devices (mesh data x fsdp)"),
                    (process_count, "processes")):
      if config[f] % n:
        raise ConfigError(f"config field '{f}': {config[f]} is not divisible by the {n} {what}; "
                          f"use a multiple of {n}.")
  check_number(config, "divergence_factor", allow_zero=True)
  if 0 < config.divergence_factor <= 1:
    raise ConfigError(f"config field 'divergence_factor' is a multiple of the recent median loss: give a number "
                      f"> 1 (e.g. 10), or 0 to check only that the loss is finite; got {config.divergence_factor!r}.")
  if config.restore_step is not None and (isinstance(config.restore_step, bool) or not isinstance(
      config.restore_step, int) or config.restore_step < 0):
    raise ConfigError(f"config field 'restore_step' must be a step number >= 0 (one of the workdir's kept "
                      f"checkpoints), got {config.restore_step!r}.")
  if not isinstance(config.restart, bool):
    raise ConfigError(f"config field 'restart' must be True or False, got {config.restart!r}.")
  if config.restart and config.restore_step is not None:
    raise ConfigError("config fields 'restart' and 'restore_step' contradict each other: restart starts afresh, "
                      "restore_step resumes from a kept step; set one of them.")
  if config.init_from and not os.path.isdir(config.init_from):
    raise ConfigError(f"config field 'init_from': no directory '{config.init_from}'; give a run's "
                      f"workdir or one of its checkpoint step directories.")
  task.validate(config)
  if check_dataset:
    task.check_dataset(config)
  return shape
