"""Config fields, each declared once: ``Field(default, doc, *checks)``.

    FIELDS = {
        "patch_size": Field(7, "patch side; must divide every image size", INT, greater(0)),
        "eval_protocol": Field("zoom", "how other sizes are shown", one_of("zoom", "canvas")),
    }

The first check is the type (``INT``, ``NUMBER``, ``BOOL``, ``STR``, ``SIZE``, ...), the others
the rules the value must pass; ``none`` says what None means where None is allowed. A dotted
name ("transfer.method") is a field of a group. Each task declares its own fields
(``Task.FIELDS``), ``posenc.training.config.COMMON`` the ones every run has. From them come the
config files' defaults (``defaults``), validation (``check``: one ConfigError naming the field),
the README's table (``table``) and the CLI listing:

    python -m posenc.config_fields [TASK]
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import ml_collections
from ml_collections import config_dict

from posenc.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Rule:
  """A check: ``holds(value)``, else the value must be ``need``. ``holds`` may raise ValueError with
  its own message (a registry lookup). A type's ``python_type`` is what ml_collections stores."""

  holds: Callable[[Any], bool]
  need: str
  python_type: type | None = None


def _int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _size(v) -> bool:
  pair = isinstance(v, tuple | list) and len(v) == 2
  return (_int(v) and v > 0) or (pair and all(_int(s) and s > 0 for s in v))


INT = Rule(_int, "an int", int)
NUMBER = Rule(lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number", float)
BOOL = Rule(lambda v: isinstance(v, bool), "True or False", bool)
STR = Rule(lambda v: isinstance(v, str), "a string", str)
INTS = Rule(lambda v: isinstance(v, tuple | list) and all(map(_int, v)), "a tuple of ints", tuple)
SIZE = Rule(_size, "a size: an int or (h, w), > 0", object)
SIZES = Rule(lambda v: isinstance(v, tuple | list) and all(map(_size, v)), "a tuple of sizes (int or (h, w), > 0)",
             tuple)
DICT = Rule(lambda v: isinstance(v, dict | ml_collections.ConfigDict), "a dict", ml_collections.ConfigDict)
TUPLE = Rule(lambda v: isinstance(v, tuple | list), "a tuple", tuple)


def greater(low: float) -> Rule:
  return Rule(lambda v: v > low, f"> {low:g}")


def at_least(low: float) -> Rule:
  return Rule(lambda v: v >= low, f">= {low:g}")


def at_most(high: float) -> Rule:
  return Rule(lambda v: v <= high, f"<= {high:g}")


def one_of(*choices) -> Rule:
  return Rule(lambda v: v in choices, f"one of {choices}")


def known(lookup: Callable[[Any], Any], need: str) -> Rule:
  """``lookup(value)`` raises ValueError (its message is the error) unless the value is known."""
  return Rule(lambda v: lookup(v) is not False, need)


@dataclasses.dataclass(frozen=True, init=False)
class Field:
  """A declared config field: its default, a one-line doc, its type and rules, what None means."""

  default: Any
  doc: str
  checks: tuple[Rule, ...]
  none: str

  def __init__(self, default, doc: str, kind: Rule, *rules: Rule, none: str = ""):
    for name, value in (("default", default), ("doc", doc), ("checks", (kind, *rules)), ("none", none)):
      object.__setattr__(self, name, value)

  @property
  def need(self) -> str:
    """What a value must be, e.g. ``an int >= 0``, ``None (start afresh) or a string``."""
    kind, *rules = self.checks
    words = [r.need for r in rules] if kind is STR and rules else [kind.need, " and ".join(r.need for r in rules)]
    need = " ".join(w for w in words if w)
    return f"None ({self.none}) or {need}" if self.none else need

  def value(self):
    """The default as a config value (a fresh dict; a typed placeholder for None)."""
    kind = self.checks[0]
    if kind is DICT:
      return ml_collections.ConfigDict(dict(self.default))
    if self.default is None or kind.python_type is object:
      return config_dict.FieldReference(self.default, field_type=kind.python_type)
    return self.default


def get(config, name: str):
  """``config``'s value of a (dotted) field."""
  for part in name.split("."):
    config = config[part]
  return config


def defaults(fields: dict[str, Field]) -> ml_collections.ConfigDict:
  """A config of every field at its declared default (groups as nested configs)."""
  config = ml_collections.ConfigDict()
  for name, field in fields.items():
    *groups, leaf = name.split(".")
    node = config
    for g in groups:
      if g not in node:
        node[g] = ml_collections.ConfigDict()
      node = node[g]
    node[leaf] = field.value()
  return config


def unknown_and_missing(config, fields: dict[str, Field]) -> tuple[list[str], list[str]]:
  """The config's fields (groups' fields dotted) that are not declared, and the declared ones it lacks."""
  groups = {name.split(".")[0] for name in fields if "." in name}
  present = set()
  for key, value in config.items():
    nested = key in groups and isinstance(value, dict | ml_collections.ConfigDict)
    present |= {f"{key}.{k}" for k in value} if nested else {key}
  return sorted(present - set(fields)), sorted(set(fields) - present)


def check(config, fields: dict[str, Field]) -> None:
  """ConfigError naming the first field whose value fails its declared checks."""
  for name, field in fields.items():
    value = get(config, name)
    if value is None and field.none:
      continue
    try:
      ok = all(rule.holds(value) for rule in field.checks)
    except ValueError as e:  # a lookup's own message, e.g. an unknown model with the closest names
      raise ConfigError(f"config field '{name}': {e}") from None
    if not ok:
      raise ConfigError(f"config field '{name}' must be {field.need}, got {value!r}.")


def table(sections: dict[str, dict[str, Field]]) -> str:
  """A markdown table of the fields of each section (``{"every task": COMMON, ...}``)."""
  rows = ["| task | field | default | value | what |", "|---|---|---|---|---|"]
  for section, fields in sections.items():
    for name, f in fields.items():
      cells = (section, f"`{name}`", f"`{f.default!r}`", f.need, f.doc)
      rows.append("| " + " | ".join(c.replace("|", r"\|") for c in cells) + " |")
  return "\n".join(rows)


def main(argv: list[str]) -> int:
  """``python -m posenc.config_fields [TASK]``: the fields (of every task, or of TASK) as a table."""
  from posenc.training import config  # imported late: the declarations import every task
  try:
    print(config.fields_table(*argv[1:2]))
  except ConfigError as e:
    print(f"Config error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
