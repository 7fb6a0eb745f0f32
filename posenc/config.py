"""Config files' plumbing: ``get_config(arg)`` overrides, and the one error type for bad values.

Every problem a config can have is reported as ONE ``ConfigError`` that names the
field, what is wrong and how to fix it; ``train.py`` prints it without a traceback.
The fields themselves are declared in ``posenc.config_fields`` (the schema),
``posenc.tasks`` (each task's) and ``posenc.training.config`` (the ones every run has).
"""
from __future__ import annotations

import ast
import difflib
import importlib.machinery
import importlib.util
import os
import traceback

import ml_collections


class ConfigError(ValueError):
  """A config value is invalid; the message names the field and the fix."""


def did_you_mean(name, valid) -> str:
  """`` (did you mean 'rope'?)`` for an unknown ``name`` close to one of ``valid``; else ``""``."""
  close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""


def split_arg(arg: str | None) -> tuple[list[str], dict[str, str]]:
  """``"full,posenc=rope,eval_image_sizes=(14,28)"`` -> ``(["full"], {"posenc": "rope", "eval_image_sizes":
  "(14,28)"})``: items without ``=`` are presets; commas inside brackets belong to the value."""
  items, depth, item = [], 0, ""
  for ch in (arg or "") + ",":
    depth += (ch in "([{") - (ch in ")]}")
    if ch == "," and depth == 0:
      items.append(item.strip())
      item = ""
    else:
      item += ch
  pairs = [i.split("=", 1) for i in items if "=" in i]
  return [i for i in items if i and "=" not in i], {k.strip(): v.strip() for k, v in pairs}


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> None:
  """Set dotted ``field=value`` pairs on existing fields (new keys only inside ``*_options``); a value is
  a Python literal, else a string."""
  for key, text in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node.get(p) if isinstance(node, ml_collections.ConfigDict) else None
    nested = bool(parents) and isinstance(node, ml_collections.ConfigDict)
    if not isinstance(node, ml_collections.ConfigDict) or (leaf not in node and not (
        nested and parents[-1].endswith("_options"))):  # model/posenc kwargs are open
      fields = [".".join([*parents, f]) for f in sorted(node)] if nested else sorted(config)
      raise ConfigError(f"config has no field '{key}'{did_you_mean(key, fields)}; fields: {', '.join(fields)}.")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text  # a bare word
    if leaf in node and node.get_type(leaf) is tuple and not isinstance(value, tuple | list):
      value = (value,)  # eval_lengths=32
    try:
      node[leaf] = value  # ml_collections casts ints to floats, lists to tuples
    except (TypeError, ValueError) as e:
      raise ConfigError(f"config field '{key}': cannot set {text!r}: {e}") from None


def get_config_with_arg(make_base, presets: dict, arg: str | None) -> ml_collections.ConfigDict:
  """What a config file's ``get_config(arg)`` does: base, presets, then overrides."""
  names, overrides = split_arg(arg)
  config = make_base()
  for name in names:
    if name not in presets:
      raise ConfigError(f"unknown config preset '{name}'{did_you_mean(name, presets)}; choose from "
                        f"{sorted(presets)} or give field=value overrides.")
    presets[name](config)
  apply_overrides(config, overrides)
  return config


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """``"path/to/config.py[:arg]"`` -> its ``get_config(arg)``; one ConfigError for anything wrong."""
  path, _, arg = spec.partition(":")
  where = f"--config={spec}"
  if not os.path.isfile(path):
    raise ConfigError(f"{where}: no config file '{path}' (from {os.getcwd()}); give a Python config "
                      f"file such as configs/vit_tiny.py.")
  try:
    loader = importlib.machinery.SourceFileLoader("posenc_user_config", path)
    module_spec = importlib.util.spec_from_file_location("posenc_user_config", path, loader=loader)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001 - any failure to load the file: say where it broke
    frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    line = getattr(e, "lineno", None) or (frame.lineno if frame else "?")
    raise ConfigError(f"{where}: '{path}' is not a loadable config file ({type(e).__name__} at line "
                      f"{line}: {getattr(e, 'msg', None) or e}).") from None
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"{where}: '{path}' defines no get_config(arg=None) function.")
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except ConfigError as e:
    raise ConfigError(f"{where}: {e}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{where}: get_config() returned {type(config).__name__}, not an ml_collections.ConfigDict.")
  return config
