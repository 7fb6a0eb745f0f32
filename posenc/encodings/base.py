"""Geometry, positions, and the base class every position encoding derives from.

A model calls all five hooks of its encoding and never asks which encoding it
is; hooks an encoding does not need keep the defaults below (identity / None).

Shapes: tokens ``x`` are ``[B, T, D]`` and ``q``/``k`` are ``[B, T, H, Dh]``
where ``T = geometry.num_tokens`` (prefix tokens first, then the positions in
row-major order). Prefix tokens (class token, registers) carry no position:
every hook leaves them alone.

``positions`` are data: ``[B, N, ndim]`` coordinates of the ``N`` non-prefix
tokens, ``B`` either the batch or 1 (one set shared by the batch). The default
(``Geometry.positions()``) is the integer grid ``(row, col)`` in 2D, ``(t, row, col)``
in 3D and ``0..L-1`` in 1D; callers may pass others: restarting per packed sequence,
offset for incremental decoding, scaled for position interpolation, real-valued
for continuous encodings. The static ``geometry`` still gives the shapes.
Before any hook, a model passes its positions once through the encoding's
``coordinates`` (default: unchanged), which may map them to the encoding's own
frame (e.g. normalised coordinates) and, when training, augment them.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from posenc.encodings.options import Options
from posenc.geometry import Geometry, as_hw  # noqa: F401  (re-exported: posenc.encodings.Geometry)

POSENC_KEY = "posenc"  # every model keeps its encoding at this attribute (parameter path root)


def check_positions(positions, geometry: Geometry) -> jax.Array:
  """``positions`` as ``[B, N, ndim]`` (1D ``[B, L]`` is accepted), or a clear ValueError."""
  positions = jnp.asarray(positions)
  if geometry.ndim == 1 and positions.ndim == 2:
    positions = positions[..., None]
  want = (geometry.num_positions, geometry.ndim)
  if positions.ndim != 3 or tuple(positions.shape[1:]) != want:
    form = {1: "[B, L] or [B, L, 1]", 2: "[B, h*w, 2]", 3: "[B, t*h*w, 3]"}[geometry.ndim]
    raise ValueError(f"positions must be {form} with {want[0]} positions for {geometry}; got shape "
                     f"{tuple(positions.shape)}.")
  if not (jnp.issubdtype(positions.dtype, jnp.integer) or jnp.issubdtype(positions.dtype, jnp.floating)):
    raise ValueError(f"positions must be integers or floats, got {positions.dtype}.")
  return positions


class ContentInputs(NamedTuple):
  """What ``content_bias`` sees in one layer. ``x [B, T, D]``: the attention's input (its new tokens
  when decoding); ``q [B, T, H, Dh]`` (scaled by ``1/sqrt(Dh)``, after ``rotate``) and ``k [B, S, H, Dh]``
  (``S = T``, or the cache's slots); ``mask`` broadcastable to ``[B, T, S]`` (True = may attend) or None;
  ``start``: the slot of the first query (0 without a cache); ``state``: this layer's cache state
  (``content_state``), None without a cache."""

  x: jax.Array
  q: jax.Array
  k: jax.Array
  mask: jax.Array | None
  start: Any
  state: Any


class Encoding(nnx.Module):
  """Base class: every hook is the identity / absent.

  Subclasses set ``supported_ndims`` and ``continuous`` (whether real-valued
  positions are accepted; table encodings look integer positions up) and
  override the hooks they use. ``coordinates`` maps the positions once per
  forward, before the hooks (normalised coordinates, train-time augmentation);
  ``augments`` says whether it wants a PRNG key when training; ``bias_shared_by_layers``
  that ``attention_bias`` does not depend on ``layer``, so a model calls it once per forward
  and gives every layer that bias (one backward pass through it, not one per layer). The constructor
  arguments a model always offers (and ``make`` passes on when a subclass's
  ``__init__`` names them) are
  ``dim``, ``num_heads``, ``num_layers``, ``geometry`` (the geometry the model
  is built at; encodings that depend on it keep it as ``self.built``),
  ``param_dtype`` and ``rngs``. The first argument is the encoding's declared options, an
  instance of its ``Options`` (``posenc.encodings.options``), which ``make`` builds and checks.
  """

  Options = Options  # none by default; an encoding with options declares its own subclass
  name: str = "?"
  supported_ndims: tuple[int, ...] = (1, 2)
  continuous: bool = True
  augments: bool = False  # whether ``coordinates`` wants a PRNG key when training
  bias_shared_by_layers: bool = False  # attention_bias ignores ``layer``: models compute it once per forward
  causal_only: bool = False  # only a causal model may use it (a bidirectional one is an error at build)

  def __init__(self, options: Options | None = None):
    self.options = self.Options() if options is None else options

  def coordinates(self, positions: jax.Array, geometry: Geometry, key: jax.Array | None = None) -> jax.Array:
    """The positions every hook of this forward sees: ``positions [B or 1, N, ndim]`` in, the
    encoding's own coordinates out (default: unchanged).

    A model calls it once per forward, before any hook. ``key`` is given only when training
    and only to an encoding whose ``augments`` is True; the model then broadcasts positions to
    the batch first, so random draws are per example. ``key=None`` (evaluation, decoding) must
    be deterministic. Shared transforms live in ``posenc.encodings.coordinates``.
    """
    return positions

  def check(self, geometry: Geometry) -> None:
    """Raise a clear ValueError if this encoding cannot serve ``geometry``."""
    if geometry.ndim not in self.supported_ndims:
      dims = " or ".join(f"{n}D" for n in self.supported_ndims)
      raise ValueError(
          f"position encoding '{self.name}' supports {dims} inputs, not {geometry}; "
          f"choose an encoding that supports {geometry.ndim}D (see posenc.encodings.names()).")

  def embed(self, x: jax.Array, geometry: Geometry, positions: jax.Array) -> jax.Array:
    """Called once on the token embeddings ``[B, T, D]``."""
    return x

  def attention_bias(self, geometry: Geometry, positions: jax.Array, layer) -> jax.Array | None:
    """``[B or 1, H, T, T]`` float32 added to the attention logits of ``layer``, or None."""
    return None

  def rotate(self, q: jax.Array, k: jax.Array, geometry: Geometry, positions: jax.Array, layer):
    """Called on ``q, k`` ``[B, T, H, Dh]`` before q·k in ``layer``."""
    return q, k

  def content_bias(self, inputs: ContentInputs, geometry: Geometry, positions: jax.Array, layer):
    """``(bias [B, H, T, S] float32 or None, new state)`` from the content of ``layer``'s attention
    (``ContentInputs``), added to the logits with ``attention_bias``. When decoding, ``geometry`` and
    ``positions`` are the new tokens'. Default: nothing, at no cost."""
    return None, inputs.state

  def content_state(self, batch: int, slots: int):
    """One layer's initial KV-cache state for ``content_bias`` (a pytree of arrays), or None."""
    return None

  def after_block(self, x: jax.Array, geometry: Geometry, positions: jax.Array, layer) -> jax.Array:
    """Called on ``x`` ``[B, T, D]`` after block ``layer`` (0-based)."""
    return x

  @classmethod
  def transfer(cls, params: dict, source: Geometry, target: Geometry, options) -> dict:
    """This encoding's parameters (a nested dict of arrays) built at ``source``, mapped to
    ``target``: pure jnp, traceable under ``jax.jit``. ``options`` is a
    ``posenc.transfer.TransferOptions``. By default nothing depends on the geometry."""
    return params


def forward_coordinates(enc: Encoding, positions: jax.Array | None, geometry: Geometry, batch: int,
                        rngs: nnx.Rngs, train: bool) -> jax.Array:
  """What a model does with its positions once per forward, before any hook: the encoding checks
  the geometry; positions default to the geometry's (else are validated); a key from the model's
  ``rngs.dropout`` stream only when ``train`` and ``enc.augments`` (deterministic per seed and
  step, new each step), positions then broadcast to the ``batch`` (one draw per example); and
  ``enc.coordinates``. Evaluation (or an encoding that does not augment) draws nothing."""
  enc.check(geometry)
  positions = geometry.positions() if positions is None else check_positions(positions, geometry)
  key = rngs.dropout() if train and enc.augments else None
  if key is not None:
    positions = jnp.broadcast_to(positions, (batch, *positions.shape[1:]))
  return enc.coordinates(positions, geometry, key)


def split_prefix(x: jax.Array, geometry: Geometry, axis: int = 1):
  """``x`` -> (prefix tokens, position tokens) along the token ``axis``."""
  n = geometry.num_prefix
  return jax.lax.slice_in_dim(x, 0, n, axis=axis), jax.lax.slice_in_dim(x, n, None, axis=axis)


def pad_prefix_bias(bias: jax.Array, geometry: Geometry) -> jax.Array:
  """Pad a ``[B, H, N, N]`` bias over positions with zeros for the prefix tokens."""
  n = geometry.num_prefix
  return jnp.pad(bias, ((0, 0), (0, 0), (n, 0), (n, 0))) if n else bias


def pair_offsets(positions: jax.Array) -> jax.Array:
  """``[B, N, N, ndim]`` offsets ``pos_i - pos_j`` (query minus key) of ``[B, N, ndim]`` positions."""
  return positions[:, :, None, :] - positions[:, None, :, :]


def table_positions(enc: Encoding, positions: jax.Array, extent=None, *, relative: bool = False) -> jax.Array:
  """Integer positions for a table lookup: a clear error for real-valued ones.

  Concrete (not traced) positions are also checked against the table's ``extent``
  per axis (``relative``: the spread of each row's positions, for tables of
  offsets); under ``jit`` a lookup outside the table gives NaN (``lookup``),
  never a silent clamp.
  """
  if not jnp.issubdtype(positions.dtype, jnp.integer):
    raise ValueError(f"position encoding '{enc.name}' looks positions up in a table and needs integer "
                     f"positions; got {positions.dtype}. Real-valued positions (position interpolation, "
                     f"coordinate augmentation) need a continuous encoding such as rope, sincos2d or alibi.")
  if extent is not None and not isinstance(positions, jax.core.Tracer) and positions.size:
    values = np.asarray(positions)
    low, high = values.min(axis=(0, 1)), values.max(axis=(0, 1))
    spread = (values.max(axis=1) - values.min(axis=1)).max(axis=0)
    if np.any(spread >= extent) if relative else (np.any(low < 0) or np.any(high >= extent)):
      what = (f"offsets up to {np.asarray(extent) - 1} per axis; got positions {spread} apart" if relative
              else f"positions 0..{np.asarray(extent) - 1} per axis; got {low} to {high}")
      raise ValueError(f"position encoding '{enc.name}' has a table for {what}. Transfer its parameters "
                       f"to a larger geometry with posenc.transfer.")
  return positions


def lookup(table: jax.Array, index: jax.Array, valid: jax.Array) -> jax.Array:
  """``table[index]`` along axis 0; rows where ``valid`` is False are NaN (outside the table)."""
  return jnp.take(table, jnp.where(valid, index, table.shape[0]), axis=0, mode="fill",
                  fill_value=jnp.nan)
