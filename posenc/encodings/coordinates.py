"""Coordinate transforms an encoding applies to its positions (``Encoding.coordinates``).

Pure functions of positions ``[B, N, ndim]`` (``(row, col)`` in 2D), the grid
``shape`` and, for the train-time augmentations, a PRNG key. Each draw is per
row of ``positions`` (per example when the model passes positions broadcast to
the batch) and, unless said otherwise, shared by that row's N positions.

Normalised coordinates (DINOv3, ``RopePositionEmbedding``): the patch centre
``p + 1/2`` of each axis divided by a side length ``d`` and mapped from
``[0, 1]`` to ``[-1, 1]``::

    u = 2 (p + 1/2) / d - 1,   d = n_axis ("separate"), max(h, w) ("max"), min(h, w) ("min")

so with ``"separate"`` a grid of any size fills ``[-1 + 1/n, 1 - 1/n]`` per
axis: a larger grid samples the same range more densely. ``to_grid`` inverts
the ``"separate"`` map (back to grid units: ``p = (u + 1) n / 2 - 1/2``).

Augmentations (in the normalised frame; all factors and shifts drawn per row):

- DINOv3 (``dinov3_augment``): ``u' = ((u + s) * j) * r``, with the shift
  ``s_a ~ U[-shift, shift]`` per axis, the jitter ``log j_a ~ U[-log jitter, log jitter]``
  per axis and the rescale ``log r ~ U[-log rescale, log rescale]`` shared by the axes.
- CAPE (Likhomanenko et al. 2021; ``cape_augment``): ``u' = lam * (u + Delta + eps)``, with the
  global shift ``Delta_a ~ U[-global_shift, global_shift]`` per axis, the local shift
  ``eps_{n,a} ~ U[-local_shift, local_shift] * spacing_a`` drawn per position and axis
  (``spacing_a = 2 / n_a``, the distance between neighbouring patch centres), and the
  global scaling ``log lam ~ U[-log global_scaling, log global_scaling]`` shared by the axes.

A disabled transform (``None``, or a shift of 0 / factor of 1) leaves its term
out exactly; the draws of the others do not depend on which are enabled (each
transform has its own fold of the key).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

NORMALIZE_MODES = ("separate", "max", "min")


def side_lengths(shape: Sequence[int], mode: str = "separate") -> tuple[float, ...]:
  """The divisor ``d`` per axis: the axis length (``"separate"``), or the longer (``"max"``)
  or shorter (``"min"``) side for every axis."""
  if mode not in NORMALIZE_MODES:
    raise ValueError(f"normalize_coords must be one of {NORMALIZE_MODES}, got {mode!r}.")
  shape = tuple(float(s) for s in shape)
  if mode == "separate":
    return shape
  return (max(shape) if mode == "max" else min(shape),) * len(shape)


def normalize(positions: jax.Array, shape: Sequence[int], mode: str = "separate") -> jax.Array:
  """``u = 2 (p + 1/2) / d - 1`` per axis (``d`` from ``side_lengths``), float32."""
  d = jnp.asarray(side_lengths(shape, mode), jnp.float32)
  return 2.0 * (jnp.asarray(positions).astype(jnp.float32) + 0.5) / d - 1.0


def to_grid(coords: jax.Array, shape: Sequence[int]) -> jax.Array:
  """The inverse of ``normalize(., shape, "separate")``: ``p = (u + 1) n / 2 - 1/2``, float32."""
  n = jnp.asarray(tuple(float(s) for s in shape), jnp.float32)
  return (coords.astype(jnp.float32) + 1.0) * n / 2.0 - 0.5


def uniform(key: jax.Array, shape: tuple[int, ...], limit: float) -> jax.Array:
  """``U[-limit, limit]`` float32 draws of ``shape``."""
  return jax.random.uniform(key, shape, jnp.float32, -limit, limit)


def log_uniform(key: jax.Array, shape: tuple[int, ...], limit: float) -> jax.Array:
  """Factors ``exp(U[-log limit, log limit])``, i.e. in ``[1/limit, limit]``, float32 (``limit >= 1``)."""
  return jnp.exp(uniform(key, shape, math.log(limit)))


def _on(value, neutral: float) -> bool:
  return value is not None and float(value) != neutral


def dinov3_augment(coords: jax.Array, key: jax.Array, *, shift: float | None = None,
                   jitter: float | None = None, rescale: float | None = None) -> jax.Array:
  """DINOv3's train-time box augmentation ``((u + s) * j) * r`` of ``coords [B, N, ndim]``
  (module docstring), drawn per row; ``None`` disables a term."""
  coords = coords.astype(jnp.float32)
  batch, ndim = coords.shape[0], coords.shape[-1]
  if _on(shift, 0.0):
    coords = coords + uniform(jax.random.fold_in(key, 0), (batch, 1, ndim), float(shift))
  if _on(jitter, 1.0):
    coords = coords * log_uniform(jax.random.fold_in(key, 1), (batch, 1, ndim), float(jitter))
  if _on(rescale, 1.0):
    coords = coords * log_uniform(jax.random.fold_in(key, 2), (batch, 1, 1), float(rescale))
  return coords


def cape_augment(coords: jax.Array, key: jax.Array, shape: Sequence[int], *, global_shift: float = 0.0,
                 local_shift: float = 0.0, global_scaling: float = 1.0) -> jax.Array:
  """CAPE's ``lam * (u + Delta + eps)`` of normalised ``coords [B, N, ndim]`` on a grid of
  ``shape`` (module docstring); ``local_shift`` is in units of the patch spacing ``2 / n_a``."""
  coords = coords.astype(jnp.float32)
  batch, ndim = coords.shape[0], coords.shape[-1]
  if _on(global_shift, 0.0):
    coords = coords + uniform(jax.random.fold_in(key, 0), (batch, 1, ndim), float(global_shift))
  if _on(local_shift, 0.0):
    spacing = 2.0 / jnp.asarray(tuple(float(s) for s in shape), jnp.float32)
    coords = coords + uniform(jax.random.fold_in(key, 1), coords.shape, float(local_shift)) * spacing
  if _on(global_scaling, 1.0):
    coords = coords * log_uniform(jax.random.fold_in(key, 2), (batch, 1, 1), float(global_scaling))
  return coords
