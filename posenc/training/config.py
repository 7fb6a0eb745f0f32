"""Config helpers: short ``get_config`` overrides and validation before any compile.

Every problem a config can have is reported as ONE ``ConfigError`` that names the
field, what is wrong and how to fix it; ``train.py`` prints it without a traceback.
"""
from __future__ import annotations

import ast
import inspect
import math
import os
import re

import ml_collections

from posenc import encodings

MESH_AXES = ("data", "fsdp", "model")
FIELDS = frozenset({
    "model", "model_options", "posenc", "posenc_options", "dtype", "dataset", "augment",
    "image_size", "patch_size", "max_len", "eval_image_sizes", "batch_size", "eval_batch_size",
    "eval_max_batches", "total_steps", "warmup_steps", "lr", "weight_decay", "grad_clip_norm",
    "posenc_lr_mult", "seed", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
    "init_from", "transfer", "mesh", "logical_axis_rules"})
DTYPES = ("float32", "bfloat16")
# Model families and the input dimensionality their encodings must support.
FAMILIES = {"vit": 2, "bert": 1}


class ConfigError(ValueError):
  """A config value is invalid; the message names the field and the fix."""


# --------------------------------------------------------------------------- overrides


def split_arg(arg: str | None) -> tuple[list[str], dict[str, str]]:
  """``"full,posenc=rope,eval_image_sizes=(14,28)"`` -> (["full"], {"posenc": "rope", ...}).

  Commas inside brackets belong to the value; items without ``=`` are presets.
  """
  presets, overrides, depth, item = [], {}, 0, ""
  for ch in (arg or "") + ",":
    depth += (ch in "([{") - (ch in ")]}")
    if ch == "," and depth == 0:
      item = item.strip()
      if "=" in item:
        key, value = item.split("=", 1)
        overrides[key.strip()] = value.strip()
      elif item:
        presets.append(item)
      item = ""
    else:
      item += ch
  return presets, overrides


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare word is a string


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> None:
  """Set dotted ``field=value`` pairs, parsing values as Python literals."""
  for key, text in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node.get(p) if isinstance(node, ml_collections.ConfigDict) else None
    open_dict = bool(parents) and parents[-1].endswith("_options")  # model/posenc kwargs
    if not isinstance(node, ml_collections.ConfigDict) or (leaf not in node and not open_dict):
      raise ConfigError(f"config has no field '{key}'; fields: {', '.join(sorted(config))}.")
    value = _parse_value(text)
    if isinstance(node.get(leaf), float) and isinstance(value, int):
      value = float(value)
    if isinstance(node.get(leaf), tuple) and isinstance(value, (int, list)):
      value = tuple(value) if isinstance(value, list) else (value,)
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"config field '{key}': cannot set {text!r}: {e}") from None


def get_config_with_arg(make_base, presets: dict, arg: str | None) -> ml_collections.ConfigDict:
  """What a config file's ``get_config(arg)`` does: base, presets, then overrides."""
  names, overrides = split_arg(arg)
  config = make_base()
  for name in names:
    if name not in presets:
      raise ConfigError(f"unknown config preset '{name}'; choose from {sorted(presets)} "
                        f"or give field=value overrides.")
    presets[name](config)
  apply_overrides(config, overrides)
  return config


# --------------------------------------------------------------------------- derived values


def model_family(model: str) -> str:
  family = str(model).split("-")[0]
  if family not in FAMILIES:
    raise ConfigError(f"config field 'model': unknown model '{model}'; use a ViT "
                      f"('vit-mu', 'vit-ti', 'vit-s', 'vit-b') or BERT ('bert-mini', "
                      f"'bert-small', 'bert-base').")
  return family


def image_hw(size) -> tuple[int, int]:
  """``28`` or ``(28, 32)`` -> ``(h, w)``."""
  hw = (size, size) if isinstance(size, int) else tuple(size)
  if len(hw) != 2 or not all(isinstance(s, int) and s > 0 for s in hw):
    raise ConfigError(f"image size {size!r} must be a positive int or an (h, w) pair.")
  return hw


def default_workdir(config: ml_collections.ConfigDict, config_name: str) -> str:
  """``runs/<config>-<posenc>-<image_size or max_len>``."""
  if model_family(config.model) == "vit":
    h, w = image_hw(config.image_size)
    size = str(h) if h == w else f"{h}x{w}"
  else:
    size = f"len{config.max_len}"
  name = os.path.splitext(os.path.basename(config_name))[0]
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


# --------------------------------------------------------------------------- validation


def _positive(config, *fields, allow_zero=False):
  for f in fields:
    v = config[f]
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or (v == 0 and not allow_zero):
      need = ">= 0" if allow_zero else "> 0"
      raise ConfigError(f"config field '{f}' must be a number {need}, got {v!r}.")


def _check_encoding(config, ndim: int) -> None:
  names = encodings.names()
  if config.posenc not in names:
    raise ConfigError(f"config field 'posenc': unknown position encoding '{config.posenc}'; "
                      f"choose one of: {', '.join(names)}.")
  cls = encodings.get(config.posenc)
  if ndim not in cls.supported_ndims:
    fits = [n for n in names if ndim in encodings.get(n).supported_ndims]
    raise ConfigError(f"config field 'posenc': '{config.posenc}' does not support the "
                      f"{ndim}D inputs of model '{config.model}'; choose one of: {', '.join(fits)}.")
  params = inspect.signature(cls.__init__).parameters.values()
  accepted = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
  accepted -= {"self"} | encodings.CONTEXT_KEYS
  unknown = sorted(set(config.posenc_options) - accepted)
  if unknown:
    raise ConfigError(f"config field 'posenc_options': '{config.posenc}' has no option(s) "
                      f"{unknown}; its options are {sorted(accepted) or 'none'}.")


def _check_geometry(config, family: str) -> None:
  if family == "vit":
    for field, sizes in (("image_size", [config.image_size]),
                         ("eval_image_sizes", list(config.eval_image_sizes))):
      for size in sizes:
        try:
          hw = image_hw(size)
        except ConfigError as e:
          raise ConfigError(f"config field '{field}': {e}") from None
        p = config.patch_size
        if not isinstance(p, int) or p <= 0 or any(s % p for s in hw):
          raise ConfigError(f"config field 'patch_size': {p!r} does not divide {field}={size!r}; "
                            f"pick a patch size that divides every image size.")
  else:
    if not isinstance(config.max_len, int) or config.max_len < 2:
      raise ConfigError(f"config field 'max_len' must be an int >= 2 for text, got {config.max_len!r}.")
    if config.eval_image_sizes:
      raise ConfigError("config field 'eval_image_sizes' applies to image models only; set it to ().")


def _check_dataset(config, family: str) -> None:
  from posenc import data  # imported late: data builders are heavy
  try:
    info = data.info(config.dataset)
  except Exception as e:  # noqa: BLE001 - any failure to find the dataset is a config problem
    raise ConfigError(f"config field 'dataset': cannot use '{config.dataset}': {e}") from None
  kind = "images" if family == "vit" else "text"
  has = "images" if getattr(info, "num_classes", None) else "text"
  if kind != has:
    raise ConfigError(f"config field 'dataset': '{config.dataset}' holds {has} but model "
                      f"'{config.model}' needs {kind}; use 'fashion_mnist' for ViTs, 'text' for BERT.")


def validate(config: ml_collections.ConfigDict, *, num_devices: int, process_count: int = 1,
             check_dataset: bool = True) -> tuple[int, ...]:
  """Raise ``ConfigError`` for the first problem found; return the resolved mesh shape."""
  unknown = sorted(set(config) - FIELDS) + [f"mesh.{k}" for k in sorted(set(config.mesh) - set(MESH_AXES))]
  missing = sorted(FIELDS - set(config))
  if unknown or missing:
    raise ConfigError(f"config has unknown field(s) {unknown} / lacks field(s) {missing}; the fields "
                      f"are: {', '.join(sorted(FIELDS))} (mesh: {', '.join(MESH_AXES)}).")
  family = model_family(config.model)
  _check_encoding(config, FAMILIES[family])
  _check_geometry(config, family)
  _positive(config, "batch_size", "eval_batch_size", "lr", "keep_checkpoints")
  _positive(config, "total_steps", "warmup_steps", "weight_decay", "posenc_lr_mult", "grad_clip_norm",
            "eval_every", "checkpoint_every", "log_every", "eval_max_batches", allow_zero=True)
  for f in ("total_steps", "warmup_steps", "eval_every", "checkpoint_every", "log_every",
            "eval_max_batches",
            "batch_size", "eval_batch_size", "keep_checkpoints", "seed"):
    if not isinstance(config[f], int):
      raise ConfigError(f"config field '{f}' must be an int, got {config[f]!r}.")
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
  if config.init_from and not os.path.isdir(config.init_from):
    raise ConfigError(f"config field 'init_from': no directory '{config.init_from}'; give a run's "
                      f"workdir or one of its checkpoint step directories.")
  if check_dataset:
    _check_dataset(config, family)
  return shape
