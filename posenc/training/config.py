"""The fields every run has (``COMMON``), the run's validation (before any compile), the mesh and the
workdir name.

A config is ``COMMON`` plus its task's own fields (``posenc.tasks.<task>.FIELDS``), nothing else:
``defaults(task)`` is every one at its declared default (configs/common.py starts there), and
``validate`` checks each against its declaration (posenc.config_fields), then the rules that join
several fields. ``python -m posenc.config_fields [TASK]`` lists them.
"""
from __future__ import annotations

import math
import os
import re

import ml_collections

from posenc import encodings, models, resize, tasks, transfer
from posenc.config import ConfigError, did_you_mean
from posenc import config_fields
from posenc.config_fields import (BOOL, DICT, INT, NUMBER, STR, TUPLE, Field, Rule, at_least, check, greater,
                                  known, one_of, unknown_and_missing)
from posenc.models.kernels import ATTENTION_IMPLS

MESH_AXES = ("data", "fsdp", "model")
DTYPES = ("float32", "bfloat16")
_COUNT = (INT, at_least(0))  # steps, intervals, counts where 0 has a meaning

COMMON = {
    # --- task and model
    "task": Field("", "posenc.tasks name: " + " | ".join(tasks.names()), STR, known(tasks.get, "a task")),
    "model": Field("", "posenc.models name, e.g. vit-mu | vit-ti | bert-tiny | gpt-nano", STR,
                   known(models.check_name, "a model")),
    "model_options": Field({}, "overrides of the named size and model kwargs: --config.model_options.NAME=VALUE",
                           DICT),
    "attention_impl": Field("auto", " | ".join(ATTENTION_IMPLS) + " (auto: per_head on CPU, else "
                            "dot_product_attention)", STR),
    "posenc": Field("learned", "position encoding (posenc.encodings.names())", STR),
    "posenc_options": Field({}, "its options (README, Encodings): --config.posenc_options.NAME=VALUE", DICT),
    "dtype": Field("float32", "compute dtype (parameters stay float32)", STR, one_of(*DTYPES)),
    "dataset": Field("", "posenc.data dataset name (or any TFDS dataset online)", STR),
    # --- optimisation
    "batch_size": Field(128, "GLOBAL batch (divisible by mesh data x fsdp and by processes)", INT, greater(0)),
    "eval_batch_size": Field(512, "GLOBAL eval batch (the last one is padded; padding is masked)", INT,
                             greater(0)),
    "eval_max_batches": Field(0, "evaluate on this many batches of the split (0 = all of it)", *_COUNT),
    "total_steps": Field(1000, "optimizer steps; 0 with init_from: evaluate a checkpoint only", *_COUNT),
    "warmup_steps": Field(100, "linear warmup steps, then cosine decay to 0 at total_steps", *_COUNT),
    "lr": Field(1e-3, "peak AdamW learning rate", NUMBER, greater(0)),
    "weight_decay": Field(0.05, "AdamW decoupled decay (matrices only; not biases/norms/posenc)", NUMBER,
                          at_least(0)),
    "grad_clip_norm": Field(1.0, "clip gradients to this global norm (0 = no clipping)", NUMBER, at_least(0)),
    "label_smoothing": Field(0.0, "training loss only: targets (1 - a) one-hot + a / classes (Szegedy et al.)",
                             NUMBER, Rule(lambda v: 0 <= v < 1, "in [0, 1)")),
    "posenc_lr_mult": Field(1.0, "learning-rate multiplier for position-encoding parameters", NUMBER,
                            at_least(0)),
    "seed": Field(0, "seeds parameters, dropout, augmentation/masking and data order", *_COUNT),
    "data_workers": Field(0, "grain worker processes per host that read and augment (0 = in the main process)",
                          *_COUNT),
    # --- loop, logging, checkpoints
    "log_every": Field(50, "steps between train-metric logs (console, TensorBoard, JSONL)", *_COUNT),
    "eval_every": Field(500, "steps between evaluations (0 = only at the end)", *_COUNT),
    "checkpoint_every": Field(500, "steps between async checkpoints (0 = only at the end)", *_COUNT),
    "keep_checkpoints": Field(2, "keep the last K checkpoints (plus the best: Task.BEST_METRIC)", INT, greater(0)),
    "restore_step": Field(None, "resume from this kept step, not the newest (later ones set aside)", *_COUNT,
                          none="the newest"),
    "restart": Field(False, "start afresh in a workdir that holds a run (its checkpoints set aside, kept)", BOOL),
    "divergence_factor": Field(10.0, "stop when a step's loss > this x its recent median (guard.py)", NUMBER,
                               Rule(lambda v: v == 0 or v > 1, "> 1 (or 0: only check the loss is finite)")),
    "init_from": Field(None, "start from another run's params (its workdir or a step directory)", STR,
                       Rule(os.path.isdir, "the path of a directory: a run's workdir or one of its step directories"),
                       none="start from scratch"),
    # --- how init_from / eval sizes move position params
    "transfer.method": Field("bicubic", "posenc.resize method: " + " | ".join(resize.METHODS), STR),
    "transfer.antialias": Field(True, "torch's antialias flag (bicubic / bilinear)", BOOL),
    "transfer.extend": Field("interpolate", "learned 1D tables growing to a longer max_len: "
                             + " | ".join(transfer.EXTEND_MODES), STR),
    "transfer.interpolate_positions": Field(False, "continuous encodings (rope, ...): positions scaled into the "
                                            "trained range", BOOL),
    # --- devices
    **{f"mesh.{axis}": Field(size, f"mesh axis size; -1 = the devices the others leave", INT)
       for axis, size in zip(MESH_AXES, (-1, 1, 1))},
    "logical_axis_rules": Field(
        (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "model"), ("heads", "model"), ("kv", None),
         ("vocab", "model"), ("posn", None), ("layers", None)),
        "logical parameter/batch axis -> mesh axes (None = replicated)", TUPLE),
}


def fields(task: str) -> dict[str, Field]:
  """The declared fields of a run of ``task``: COMMON, then the task's own."""
  try:
    return {**COMMON, **tasks.get(task).FIELDS}
  except ValueError as e:
    raise ConfigError(f"config field 'task': {e}") from None


def defaults(task: str) -> ml_collections.ConfigDict:
  """Every field of ``task`` at its declared default."""
  config = config_fields.defaults(fields(task))
  config.task = task
  return config


def fields_table(task: str | None = None) -> str:
  """The fields of every task (or of ``task``) as the README's markdown table."""
  if task:
    fields(task)  # a clear error for an unknown task
  return config_fields.table({"every task": COMMON, **{n: tasks.get(n).FIELDS for n in ([task] if task else
                                                                                       tasks.names())}})


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
  if cls.causal_only and not task.CAUSAL:
    raise ConfigError(f"config field 'posenc': '{config.posenc}' is causal only and task '{config.task}' attends "
                      f"both ways; choose one of: {', '.join(encodings.names(task.NDIM, causal=False))}.")
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
  declared = fields(config.task)
  unknown, missing = unknown_and_missing(config, declared)
  if unknown or missing:
    hint = did_you_mean(unknown[0], declared) if unknown else ""
    raise ConfigError(f"config has unknown field(s) {unknown}{hint} / lacks field(s) {missing}; task "
                      f"'{config.task}' has the fields: {', '.join(declared)}.")
  check(config, declared)
  # --- the rules that join several fields (or a field and the machine)
  _check_encoding(config, task)
  transfer_options(config)
  if config.total_steps == 0 and not config.init_from:
    raise ConfigError("config field 'total_steps' is 0, which only evaluates a checkpoint: set "
                      "init_from to a run's workdir, or give total_steps > 0 to train.")
  if 0 < config.total_steps < config.warmup_steps:
    raise ConfigError(f"config field 'warmup_steps' ({config.warmup_steps}) exceeds "
                      f"total_steps ({config.total_steps}).")
  shape = mesh_shape(config.mesh, num_devices)
  data_parallel = shape[0] * shape[1]
  for f in ("batch_size", "eval_batch_size"):
    for n, what in ((data_parallel, "data-parallel devices (mesh data x fsdp)"),
                    (process_count, "processes")):
      if config[f] % n:
        raise ConfigError(f"config field '{f}': {config[f]} is not divisible by the {n} {what}; "
                          f"use a multiple of {n}.")
  if config.restart and config.restore_step is not None:
    raise ConfigError("config fields 'restart' and 'restore_step' contradict each other: restart starts afresh, "
                      "restore_step resumes from a kept step; set one of them.")
  task.validate(config)
  if check_dataset:
    task.check_dataset(config)
  return shape
