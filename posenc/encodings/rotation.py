"""The rotation every rotary encoding shares, and the variants of ``rope``'s frequencies.

Pairing convention: rotate-half (GPT-NeoX / HF Llama): feature ``i`` turns
together with feature ``i + Dh/2`` by ``angle[i]``, ``i < Dh/2``. (RoFormer and
rope-vit pair neighbours ``(2i, 2i+1)``; that is the same rotation after a fixed
permutation of the head features, which the learned q/k projections absorb.)

Angles: ``angle[b, n, h, i] = sum_a pos[b, n, a] * freqs[a, h, i]`` with
``pos = (t,)`` in 1D and ``pos = (x, y) = (column, row)`` on a 2D grid, computed
in float32 from the ``positions`` data, which may be real-valued: position
interpolation is positions times a factor < 1 (``posenc.transfer.interpolation_scale``).

``rope`` is one of three variants (``RopeVariant``), chosen by its options: ``Axial``
here (RoFormer in 1D, RoPE-Axial in 2D), 1D context extension
(``posenc.encodings.rope_scaling``) and DINOv3's normalised coordinates
(``posenc.encodings.rope_normalized``).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from posenc.encodings.base import Geometry


def cos_sin(angles: jax.Array, scale: float | jax.Array = 1.0, num_prefix: int = 0) -> tuple[jax.Array, jax.Array]:
  """float32 ``(cos, sin)`` of ``angles [B, N, H, Dh/2]`` times ``scale`` (a float or a traced
  scalar), with ``num_prefix`` leading tokens that do not turn (cos 1, sin 0: the identity)."""
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  if isinstance(scale, jax.Array) or scale != 1.0:
    cos, sin = cos * scale, sin * scale
  if num_prefix:
    pad = ((0, 0), (num_prefix, 0)) + ((0, 0),) * (angles.ndim - 2)
    cos, sin = jnp.pad(cos, pad, constant_values=1.0), jnp.pad(sin, pad)
  return cos, sin


def turn(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """``x [..., Dh]`` with features ``(i, i + Dh/2)`` turned by the angles of ``cos``/``sin`` ``[..., Dh/2]``."""
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def xy_layout(magnitudes: np.ndarray) -> np.ndarray:
  """2D frequencies ``[2, 1, Dh/2]`` from ``Dh/4`` magnitudes: the first Dh/4 pairs turn with ``x``
  (the column), the last Dh/4 with ``y`` (the row)."""
  zeros = np.zeros_like(magnitudes)
  return np.stack([np.concatenate([magnitudes, zeros]), np.concatenate([zeros, magnitudes])])[:, None, :]


def axial_frequencies(head_dim: int, ndim: int, theta: float) -> np.ndarray:
  """Fixed RoPE frequencies ``[ndim, 1, Dh/2]`` (1D: RoFormer ``theta**(-2i/Dh)``; 2D: RoPE-Axial,
  ``theta**(-4k/Dh)``, ``k < Dh/4``, per axis)."""
  if ndim == 1:
    return (theta ** (-np.arange(0, head_dim, 2) / head_dim)).reshape(1, 1, head_dim // 2)
  return xy_layout(theta ** (-np.arange(0, head_dim, 4) / head_dim))


@dataclasses.dataclass(frozen=True)
class RopeVariant:
  """What differs between ``rope``'s variants: a frozen dataclass whose fields are the ``rope``
  options it takes (checked one by one by ``RoPEOptions``); building it checks the rules between
  them. ``what`` names it in errors."""

  what = "?"
  length_dependent = False  # whether the frequencies depend on the sequence's length
  augments = False  # whether ``coordinates`` wants a PRNG key when training

  def check(self, geometry: Geometry) -> None:
    """A clear ValueError if this variant cannot serve ``geometry``."""

  def coordinates(self, positions: jax.Array, geometry: Geometry, key: jax.Array | None) -> jax.Array:
    return positions

  def frequencies(self, geometry: Geometry, head_dim: int, length=None) -> jax.Array:
    """float32 ``[ndim, 1, Dh/2]``; ``length``: ``(n, max_n)`` for ``length_dependent`` ones."""
    raise NotImplementedError  # abstract: every variant says its frequencies

  def attention_factor(self, geometry: Geometry, head_dim: int, length=None) -> float | jax.Array:
    return 1.0  # what cos and sin are multiplied by

  def check_run(self, config) -> None:
    """ConfigError if this variant cannot serve the training run ``config``."""


@dataclasses.dataclass(frozen=True)
class Axial(RopeVariant):
  """RoFormer in 1D, RoPE-Axial (Heo et al. 2024) on 2D grids: fixed frequencies of the integer
  positions, ``theta`` 10000 in 1D and 100 in 2D unless given."""

  what = "RoPE on the integer grid (scaling='none', normalize_coords=None)"
  theta: float | None

  def frequencies(self, geometry, head_dim, length=None):
    theta = self.theta or (10000.0 if geometry.ndim == 1 else 100.0)
    return jnp.asarray(axial_frequencies(head_dim, geometry.ndim, theta), jnp.float32)
