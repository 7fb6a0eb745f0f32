"""``rope`` on DINOv3's normalised coordinates (option ``normalize_coords``; ``RopePositionEmbedding``).

``coordinates`` maps the grid positions to patch centres in ``[-1, 1]``
(``posenc.encodings.coordinates.normalize``: ``u = 2 (p + 1/2) / d - 1`` with ``d`` the
axis length, ``"separate"``, or the longer / shorter side, ``"max"`` / ``"min"``), so a
larger grid samples the trained range more densely instead of reaching angles never
seen in training. Frequencies are then given by periods, as in DINOv3:
``angle = 2 pi u / period``, ``period_k = base**(4k/Dh)`` for ``k < Dh/4`` (``base``
100), or ``min_period * (max_period / min_period)**(k / (Dh/4 - 1))``. Pairs are laid
out as RoPE-Axial's (the first Dh/4 turn with the column ``x``, the last with the row
``y``; DINOv3 puts the row first, a fixed permutation of the head features).

Train-time augmentation (``augment=True``; DINOv3's ``shift_coords``,
``jitter_coords``, ``rescale_coords``, drawn per example;
``posenc.encodings.coordinates.dinov3_augment``): ``u' = ((u + s) * j) * r``.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from posenc.config import ConfigError
from posenc.encodings import coordinates as coords_lib
from posenc.encodings.base import Geometry
from posenc.encodings.rotation import RopeVariant, xy_layout

DEFAULT_BASE = 100.0  # DINOv3's pos_embed_rope_base


def period_frequencies(head_dim: int, base: float | None = DEFAULT_BASE, min_period: float | None = None,
                       max_period: float | None = None) -> np.ndarray:
  """DINOv3's 2D RoPE frequencies for normalised coordinates, ``[2, 1, Dh/2]`` (``xy_layout``):
  ``2 pi / period_k`` with ``period_k = base**(4k/Dh)``, ``k < Dh/4``, or, with ``min_period`` and
  ``max_period``, ``max_period * (max_period/min_period)**(e_k - 1)``, ``e_k = linspace(0, 1, Dh/4)``
  (from ``min_period`` to ``max_period``)."""
  quarter = head_dim // 4
  if base is not None:
    periods = float(base) ** (2 * np.arange(quarter) / (head_dim // 2))
  else:
    ratio = max_period / min_period
    periods = ratio ** np.linspace(0.0, 1.0, quarter) / ratio * max_period
  return xy_layout(2 * np.pi / periods)


@dataclasses.dataclass(frozen=True)
class Normalized(RopeVariant):
  """2D RoPE on patch centres in ``[-1, 1]``, frequencies from periods (``base`` or
  ``min_period``/``max_period``); no augmentation."""

  what = "DINOv3's normalised coordinates without augmentation (normalize_coords set, augment=False)"
  normalize_coords: str
  base: float | None
  min_period: float | None
  max_period: float | None

  def __post_init__(self):
    if (self.min_period is None) != (self.max_period is None):
      raise ConfigError(f"min_period and max_period go together; got min_period={self.min_period}, "
                        f"max_period={self.max_period}.")
    if self.min_period is not None:
      if self.base is not None:
        raise ConfigError("give either base or min_period and max_period, not both.")
      if not self.min_period < self.max_period:
        raise ConfigError(f"needs 0 < min_period < max_period; got {self.min_period}, {self.max_period}.")
    elif self.base is None:
      object.__setattr__(self, "base", DEFAULT_BASE)

  def check(self, geometry: Geometry) -> None:
    if geometry.ndim != 2:
      raise ValueError(f"position encoding 'rope': normalize_coords={self.normalize_coords!r} normalises 2D "
                       f"grids, not {geometry}; leave it None for 1D sequences.")

  def coordinates(self, positions, geometry, key=None):
    """Patch centres in ``[-1, 1]``."""
    return coords_lib.normalize(positions, geometry.shape, self.normalize_coords)

  def frequencies(self, geometry, head_dim, length=None):
    return jnp.asarray(period_frequencies(head_dim, self.base, self.min_period, self.max_period), jnp.float32)

  def check_run(self, config) -> None:
    if config.transfer.interpolate_positions:
      raise ConfigError("config field 'transfer.interpolate_positions': with posenc_options.normalize_coords "
                        "every grid is already mapped into the trained range; set one of them, not both.")


@dataclasses.dataclass(frozen=True)
class Augmented(Normalized):
  """``Normalized``, and when training DINOv3's augmentation per example: a shift
  ``U[-shift_coords, shift_coords]`` per axis, a jitter ``[1/jitter_coords, jitter_coords]``
  (log-uniform) per axis, a rescale ``[1/rescale_coords, rescale_coords]`` (log-uniform)
  shared by the axes; None turns one off."""

  what = "DINOv3's augmented coordinates (normalize_coords set, augment=True)"
  augments = True
  augment: bool
  shift_coords: float | None
  jitter_coords: float | None
  rescale_coords: float | None

  def coordinates(self, positions, geometry, key=None):
    """Patch centres in ``[-1, 1]``, then, with a ``key`` (training), shifted, jittered, rescaled."""
    coords = super().coordinates(positions, geometry, key)
    if key is None:
      return coords
    return coords_lib.dinov3_augment(coords, key, shift=self.shift_coords, jitter=self.jitter_coords,
                                     rescale=self.rescale_coords)
