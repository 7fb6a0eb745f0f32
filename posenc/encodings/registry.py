"""The one encoding registry: ``make(name, **kwargs)``."""
from __future__ import annotations

import inspect

from posenc.config import ConfigError, did_you_mean
from posenc.encodings.base import Encoding
from posenc.encodings.options import Options

_REGISTRY: dict[str, type[Encoding]] = {}

# What a model always offers; an encoding takes the ones its __init__ names. ``causal``: the
# model is a causal decoder (rel_bias then uses T5's decoder buckets).
CONTEXT_KEYS = frozenset({"dim", "num_heads", "num_layers", "geometry", "causal", "param_dtype", "rngs"})


def register(name: str):
  """Class decorator: make the encoding available as ``make(name)``."""

  def decorator(cls: type[Encoding]) -> type[Encoding]:
    if name in _REGISTRY:
      raise ValueError(f"position encoding '{name}' is registered twice")
    cls.name = name
    _REGISTRY[name] = cls
    return cls

  return decorator


def names(ndim: int | None = None, *, causal: bool | None = None) -> list[str]:
  """The registered encodings (those whose ``supported_ndims`` include ``ndim``, if given; with
  ``causal=False`` only those a bidirectional model can use: not ``causal_only``)."""
  return sorted(n for n, cls in _REGISTRY.items() if (ndim is None or ndim in cls.supported_ndims)
                and (causal is not False or not cls.causal_only))


def get(name: str, ndim: int | None = None) -> type[Encoding]:
  """Encoding ``name``'s class; an unknown name is an error listing the encodings (of ``ndim``
  dimensions, if given) and the closest one."""
  if name not in _REGISTRY:
    valid = names(ndim)
    which = f" the {ndim}D encodings" if ndim else ""
    raise ValueError(f"unknown position encoding '{name}'{did_you_mean(name, valid)}; choose one of{which}: "
                     f"{', '.join(valid)}.")
  return _REGISTRY[name]


def options(name: str, **kwargs) -> Options:
  """Encoding ``name``'s declared options (its class's ``Options``) from ``kwargs``: one ConfigError
  naming an unknown option (and the closest one) or a bad value."""
  cls = get(name)
  declared = [f for f, _, _ in cls.Options.describe()]
  unknown = sorted(k for k in kwargs if k not in declared)
  if unknown:
    raise ConfigError(f"position encoding '{name}' has no option(s) {unknown}{did_you_mean(unknown[0], declared)}; "
                      f"its options are {declared or 'none'}.")
  try:
    return cls.Options(**kwargs)
  except ConfigError as e:
    raise ConfigError(f"position encoding '{name}': {e}") from None


def make(name: str, **kwargs) -> Encoding:
  """Build encoding ``name``.

  Keys in ``CONTEXT_KEYS`` are what the model offers: the encoding takes those its ``__init__``
  names. Every other key is one of its declared options (``options``).
  """
  cls = get(name)
  opts = options(name, **{k: v for k, v in kwargs.items() if k not in CONTEXT_KEYS})
  accepted = inspect.signature(cls.__init__).parameters
  enc = cls(opts, **{k: v for k, v in kwargs.items() if k in CONTEXT_KEYS and k in accepted})
  if "geometry" in kwargs:
    enc.check(kwargs["geometry"])
  return enc


def options_table() -> str:
  """The README's table of every encoding's options, from their declarations."""
  rows = ["| encoding | option | default | what |", "|---|---|---|---|"]
  for name in names():
    for option, default, doc in get(name).Options.describe():
      rows.append(f"| `{name}` | `{option}` | `{default}` | {doc} |")
  return "\n".join(rows)
