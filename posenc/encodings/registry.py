"""The one encoding registry: ``make(name, **kwargs)``."""
from __future__ import annotations

import inspect

from posenc.config import did_you_mean
from posenc.encodings.base import Encoding

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


def names(ndim: int | None = None) -> list[str]:
  """The registered encodings (those whose ``supported_ndims`` include ``ndim``, if given)."""
  return sorted(n for n, cls in _REGISTRY.items() if ndim is None or ndim in cls.supported_ndims)


def get(name: str, ndim: int | None = None) -> type[Encoding]:
  """Encoding ``name``'s class; an unknown name is an error listing the encodings (of ``ndim``
  dimensions, if given) and the closest one."""
  if name not in _REGISTRY:
    valid = names(ndim)
    which = f" the {ndim}D encodings" if ndim else ""
    raise ValueError(f"unknown position encoding '{name}'{did_you_mean(name, valid)}; choose one of{which}: "
                     f"{', '.join(valid)}.")
  return _REGISTRY[name]


def make(name: str, **kwargs) -> Encoding:
  """Build encoding ``name``.

  Context keys (``CONTEXT_KEYS``) the encoding does not use are dropped; any
  other key must be an argument of the encoding, else a clear error.
  """
  cls = get(name)
  params = inspect.signature(cls.__init__).parameters
  accepted = {p for p in params if p != "self"}
  unknown = sorted(k for k in kwargs if k not in accepted and k not in CONTEXT_KEYS)
  if unknown:
    options = sorted(accepted - CONTEXT_KEYS)
    raise ValueError(f"position encoding '{name}' has no option(s) {unknown}; "
                     f"its options are {options or 'none'}.")
  enc = cls(**{k: v for k, v in kwargs.items() if k in accepted})
  if "geometry" in kwargs:
    enc.check(kwargs["geometry"])
  return enc
