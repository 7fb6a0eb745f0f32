"""Each encoding's options, declared once: a frozen dataclass whose fields are the options.

    @dataclasses.dataclass(frozen=True)
    class FIREOptions(Options):
      hidden_dim: int = option(32, "width of the MLP", at_least(1))

A field's annotation is its type (``bool``, ``int``, ``float``, ``str``, ``tuple[int, ...]``,
``tuple[float, ...]``, any of them ``| None``), ``option`` gives its default, its one-line doc and the rules its value
must pass. Building the dataclass checks every field against them (ints become floats where the
type says ``float``), then ``check`` the rules that join several options. ``check_run`` holds
the rules that join an encoding's options to a training run; the config validation calls it
for every encoding. ``posenc.encodings.make`` builds the options from its keyword arguments,
and the README's options table is generated from the declarations.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing

import numpy as np

from posenc.config import ConfigError
from posenc.config_fields import Rule, at_least, at_most, greater, one_of  # noqa: F401 (the rules options use)


def option(default, doc: str, *rules: Rule, none: str = ""):
  """A declared option: its ``default``, a one-line ``doc``, the ``rules`` a value other than None
  must pass, and ``none``, what None means where the type allows it."""
  return dataclasses.field(default=default, metadata={"doc": doc, "rules": rules, "none": none})


_KINDS = {bool: "True or False", int: "an int", float: "a number", str: "a string", tuple: "a tuple of ints",
          (tuple, float): "a tuple of numbers"}


def _converted(kind, value):
  """``value`` as ``kind``, or None if it is not one (a bool is not a number)."""
  if kind == (tuple, float):
    items = [_converted(float, v) for v in value] if isinstance(value, tuple | list) else [None]
    return None if None in items else tuple(items)
  if kind is bool:
    return bool(value) if isinstance(value, bool | np.bool_) else None
  if isinstance(value, bool | np.bool_):
    return None
  if kind is int:
    return int(value) if isinstance(value, int | np.integer) else None
  if kind is float:
    return float(value) if isinstance(value, int | float | np.integer | np.floating) else None
  if kind is str:
    return value if isinstance(value, str) else None
  if isinstance(value, tuple | list) and all(_converted(int, v) is not None for v in value):
    return tuple(int(v) for v in value)  # tuple[int, ...]
  return None


@functools.cache
def _types(cls) -> dict[str, tuple[type, bool]]:
  """Each field's ``(kind, optional)`` from ``cls``'s annotations (``(tuple, float)``: a tuple of floats)."""
  out = {}
  for name, hint in typing.get_type_hints(cls).items():
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    kinds = [(tuple, float) if typing.get_args(a)[:1] == (float,) else typing.get_origin(a) or a
             for a in args if a is not type(None)]
    if len(kinds) != 1 or kinds[0] not in _KINDS:
      raise TypeError(f"{cls.__name__}.{name}: an option is one of {list(_KINDS)}, or one of them | None.")
    out[name] = (kinds[0], len(kinds) < len(args))
  return out


@dataclasses.dataclass(frozen=True)
class Options:
  """An encoding's options (none by default); subclasses declare theirs as fields."""

  def __post_init__(self):
    for field in dataclasses.fields(self):
      kind, optional = _types(type(self))[field.name]
      value = getattr(self, field.name)
      if value is None and optional:
        continue
      converted = None if value is None else _converted(kind, value)
      rules = field.metadata["rules"]
      if converted is None or not all(rule.holds(converted) for rule in rules):
        needs = " and ".join(r.need for r in rules)
        what = needs if kind is str and rules else f"{_KINDS[kind]} {needs}".strip()
        none = field.metadata["none"]
        if optional:
          what = f"None{f' ({none})' if none else ''} or {what}"
        raise ConfigError(f"{field.name} must be {what}, got {value!r}.")
      object.__setattr__(self, field.name, converted)
    self.check()

  def check(self) -> None:
    """ConfigError if the options contradict each other (each field is already valid)."""

  def check_run(self, config) -> None:
    """ConfigError if these options cannot serve the run ``config`` (an ml_collections.ConfigDict);
    the message names the config field to change."""

  @classmethod
  def describe(cls) -> list[tuple[str, str, str]]:
    """``(name, default, doc)`` of each declared option, in declaration order."""
    return [(f.name, repr(f.default), f.metadata["doc"] + (f" (None: {f.metadata['none']})" if f.metadata["none"]
                                                            else "")) for f in dataclasses.fields(cls)]


@dataclasses.dataclass(frozen=True)
class SharedBiasOptions(Options):
  """Options of an attention-bias encoding whose parameters the layers may share."""
  bias_once_per_forward: bool = option(True, "with parameters shared by the layers: compute the bias once "
                                             "per forward for every layer (else in every layer: same numbers)")
