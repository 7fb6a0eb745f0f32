"""Geometry and the base class every position encoding derives from.

A model calls all four hooks of its encoding and never asks which encoding it
is; hooks an encoding does not need keep the defaults below (identity / None).

Shapes: tokens ``x`` are ``[B, T, D]`` and ``q``/``k`` are ``[B, T, H, Dh]``
where ``T = geometry.num_tokens`` (prefix tokens first, then the positions in
row-major order). Prefix tokens (class token, registers) carry no position:
every hook leaves them alone.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Geometry:
  """What a token sequence is: a 1D sequence ``(L,)`` or a 2D grid ``(h, w)``.

  Hashable, so it can be a static argument of ``jax.jit``.
  """

  shape: tuple[int, ...]
  num_prefix: int = 0

  def __post_init__(self):
    shape = tuple(int(s) for s in self.shape)
    object.__setattr__(self, "shape", shape)
    if len(shape) not in (1, 2) or any(s < 1 for s in shape) or self.num_prefix < 0:
      raise ValueError(f"Geometry needs a shape (L,) or (h, w) of positive sizes and "
                       f"num_prefix >= 0; got shape={shape}, num_prefix={self.num_prefix}.")

  @classmethod
  def seq(cls, length: int, num_prefix: int = 0) -> "Geometry":
    return cls((length,), num_prefix)

  @classmethod
  def grid(cls, h: int, w: int, num_prefix: int = 0) -> "Geometry":
    return cls((h, w), num_prefix)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def num_positions(self) -> int:
    return math.prod(self.shape)

  @property
  def num_tokens(self) -> int:
    return self.num_prefix + self.num_positions

  def coords(self) -> jnp.ndarray:
    """Integer coordinates of the positions, ``[num_positions, ndim]``, row-major."""
    axes = [jnp.arange(s) for s in self.shape]
    return jnp.stack([a.reshape(-1) for a in jnp.meshgrid(*axes, indexing="ij")], axis=-1)

  def __str__(self) -> str:
    dims = "x".join(map(str, self.shape))
    return f"{self.ndim}D {dims}" + (f" (+{self.num_prefix} prefix)" if self.num_prefix else "")


class Encoding(nnx.Module):
  """Base class: every hook is the identity / absent.

  Subclasses set ``supported_ndims`` and override the hooks they use. The
  constructor arguments a model always offers (and ``make`` passes on when a
  subclass's ``__init__`` names them) are ``dim``, ``num_heads``,
  ``num_layers``, ``geometry`` (the geometry the model is built at),
  ``param_dtype`` and ``rngs``.
  """

  name: str = "?"
  supported_ndims: tuple[int, ...] = (1, 2)

  def check(self, geometry: Geometry) -> None:
    """Raise a clear ValueError if this encoding cannot serve ``geometry``."""
    if geometry.ndim not in self.supported_ndims:
      dims = " or ".join(f"{n}D" for n in self.supported_ndims)
      raise ValueError(
          f"position encoding '{self.name}' supports {dims} inputs, not {geometry}; "
          f"choose an encoding that supports {geometry.ndim}D (see posenc.encodings.names()).")

  def embed(self, x: jax.Array, geometry: Geometry) -> jax.Array:
    """Called once on the token embeddings ``[B, T, D]``."""
    return x

  def attention_bias(self, geometry: Geometry, layer) -> jax.Array | None:
    """``[H, T, T]`` float32 added to the attention logits of ``layer``, or None."""
    return None

  def rotate(self, q: jax.Array, k: jax.Array, geometry: Geometry, layer):
    """Called on ``q, k`` ``[B, T, H, Dh]`` before q·k in ``layer``."""
    return q, k

  def after_block(self, x: jax.Array, geometry: Geometry, layer) -> jax.Array:
    """Called on ``x`` ``[B, T, D]`` after block ``layer`` (0-based)."""
    return x

  # Resolution transfer (posenc.transfer calls these; ``self`` is the encoding
  # built at the new geometry).

  def transfer(self, params: dict, source: Geometry, target: Geometry, options) -> dict:
    """This encoding's parameters (a nested dict of arrays) built at ``source``,
    mapped to ``target``: pure jnp, traceable under ``jax.jit``. By default
    nothing depends on the geometry, so they pass unchanged."""
    return params

  @classmethod
  def interpolation_options(cls, source: Geometry, target: Geometry) -> dict:
    """Encoding options that map ``target``'s positions onto the trained range of
    ``source`` (position interpolation), or ``{}`` where that means nothing."""
    return {}


def split_prefix(x: jax.Array, geometry: Geometry, axis: int = 1):
  """``x`` -> (prefix tokens, position tokens) along the token ``axis``."""
  n = geometry.num_prefix
  return jax.lax.slice_in_dim(x, 0, n, axis=axis), jax.lax.slice_in_dim(x, n, None, axis=axis)


def pad_prefix_bias(bias: jax.Array, geometry: Geometry) -> jax.Array:
  """Pad a ``[H, N, N]`` bias over positions with zeros for the prefix tokens."""
  n = geometry.num_prefix
  return jnp.pad(bias, ((0, 0), (n, 0), (n, 0))) if n else bias
