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
here (RoFormer in 1D, RoPE-Axial in 2D), 1D frequency scaling
(``posenc.encodings.rope_scaling``) and DINOv3's normalised coordinates
(``posenc.encodings.rope_normalized``). In 1D the first two may leave features
unrotated (``FewerRotated``: p-RoPE, or HF's ``partial_rotary_factor``).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from posenc.config import ConfigError
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
  """``x [..., Dh]`` with features ``(i, i + R/2)`` turned by the angles of ``cos``/``sin`` ``[..., R/2]``;
  the features past the first ``R`` (``R < Dh``: HF's ``partial_rotary_factor``) pass unchanged."""
  rotated = 2 * cos.shape[-1]
  x1, x2 = jnp.split(x[..., :rotated].astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
  return out if rotated == x.shape[-1] else jnp.concatenate([out, x[..., rotated:]], axis=-1)


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

  def check_head_dim(self, head_dim: int) -> None:
    """A clear ValueError if this variant cannot serve heads of ``head_dim`` features."""

  def coordinates(self, positions: jax.Array, geometry: Geometry, key: jax.Array | None) -> jax.Array:
    return positions

  def frequencies(self, geometry: Geometry, head_dim: int, length=None) -> jax.Array:
    """float32 ``[ndim, 1, R/2]`` for the first ``R <= Dh`` features (``turn``); ``length``: ``(n, max_n)``
    for ``length_dependent`` ones."""
    raise NotImplementedError  # abstract: every variant says its frequencies

  def attention_scale(self, geometry: Geometry, head_dim: int, length=None) -> float | jax.Array:
    return 1.0  # what cos and sin are multiplied by

  def check_run(self, config) -> None:
    """ConfigError if this variant cannot serve the training run ``config``."""


def inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
  """1D RoPE's ``theta**(-2i/Dh)``, ``i < Dh/2``, float64."""
  return theta ** -(np.arange(0, head_dim, 2) / head_dim)


def kept_pairs(head_dim: int, fraction: float | None) -> int:
  """p-RoPE: how many of the ``Dh/2`` pairs (the fastest) keep turning: ``int(fraction * Dh // 2)``, as HF's
  ``proportional`` and Gemma's ``rope_proportion`` round it."""
  return head_dim // 2 if fraction is None else int(fraction * head_dim // 2)


@dataclasses.dataclass(frozen=True)
class FewerRotated(RopeVariant):
  """1D options that leave features unrotated, two different ways (give at most one):

  - ``frequency_fraction`` (p-RoPE; HF's ``proportional``, Gemma's ``rope_proportion``): the spectrum is
    computed over the whole head dimension and only its fastest ``fraction`` is kept; the slowest pairs get
    frequency 0 (timescale infinity), so they are never turned. 1 is RoPE, 0 is NoPE.
  - ``partial_rotary_factor`` (HF's, e.g. Phi, GPT-NeoX): only the first ``R = int(Dh * factor)`` features
    are rotated (pairs ``(i, i + R/2)``), with the whole spectrum computed over ``R``; the rest pass.
  """

  frequency_fraction: float | None
  partial_rotary_factor: float | None

  def __post_init__(self):
    if self.frequency_fraction is not None and self.partial_rotary_factor is not None:
      raise ConfigError(f"frequency_fraction (p-RoPE: zero the slowest frequencies) and partial_rotary_factor "
                        f"(HF: rotate the first features only) leave features unrotated two different ways; give "
                        f"one, got frequency_fraction={self.frequency_fraction}, "
                        f"partial_rotary_factor={self.partial_rotary_factor}.")

  def check(self, geometry: Geometry) -> None:
    for name in ("frequency_fraction", "partial_rotary_factor"):
      if geometry.ndim != 1 and getattr(self, name) is not None:
        raise ValueError(f"position encoding 'rope': {name} applies to 1D sequences only, not {geometry}; "
                         f"leave it None on 2D grids.")

  def rotated_dim(self, head_dim: int) -> int:
    """The number of rotated features (``R``, as HF rounds it); a ValueError unless it is even and >= 2."""
    if self.partial_rotary_factor is None:
      return head_dim
    rotated = int(head_dim * self.partial_rotary_factor)
    if rotated < 2 or rotated % 2:
      raise ValueError(f"position encoding 'rope': partial_rotary_factor={self.partial_rotary_factor} rotates "
                       f"int({head_dim} * {self.partial_rotary_factor}) = {rotated} of the head_dim={head_dim} "
                       f"features; that must be an even number >= 2.")
    return rotated

  def check_head_dim(self, head_dim: int) -> None:
    self.rotated_dim(head_dim)

  def kept(self, freqs: np.ndarray, head_dim: int) -> np.ndarray:
    """``freqs`` with all but the fastest ``frequency_fraction`` set to 0 (p-RoPE)."""
    kept = kept_pairs(head_dim, self.frequency_fraction)
    return np.concatenate([freqs[:kept], np.zeros(len(freqs) - kept)])


@dataclasses.dataclass(frozen=True)
class Axial(FewerRotated):
  """RoFormer in 1D, RoPE-Axial (Heo et al. 2024) on 2D grids: fixed frequencies of the integer
  positions, ``theta`` 10000 in 1D and 100 in 2D unless given; in 1D, p-RoPE or partial rotation."""

  what = "RoPE on the integer grid (scaling='none', normalize_coords=None)"
  theta: float | None

  def frequencies(self, geometry, head_dim, length=None):
    if geometry.ndim != 1:
      return jnp.asarray(axial_frequencies(head_dim, geometry.ndim, self.theta or 100.0), jnp.float32)
    rotated = self.rotated_dim(head_dim)
    freqs = self.kept(inverse_frequencies(rotated, self.theta or 10000.0), rotated)
    return jnp.asarray(freqs, jnp.float32).reshape(1, 1, -1)
