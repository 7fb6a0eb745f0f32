"""Token geometry, low enough for every layer: ``Geometry`` (a 1D sequence, a 2D grid or a 3D
``(t, h, w)`` grid such as video frames, plus prefix tokens), ``as_hw`` (an image size as ``(h, w)``) and ``patch_grid`` (the geometry of images or clips cut into
patches: the one place a ViT's token grid is computed, for the task and the model alike).

Nothing here imports the encodings, the models or the data: they import this.
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np


def as_hw(size) -> tuple[int, int]:
  """``28`` or ``(28, 32)`` -> ``(h, w)``; a clear ValueError for anything else."""
  hw = (size, size) if isinstance(size, int | np.integer) else tuple(size) if isinstance(
      size, tuple | list) else ()
  if len(hw) != 2 or not all(isinstance(s, int | np.integer) and not isinstance(s, bool) and s > 0
                             for s in hw):
    raise ValueError(f"image size {size!r} must be a positive int or an (h, w) pair of them.")
  return int(hw[0]), int(hw[1])


@dataclasses.dataclass(frozen=True)
class Geometry:
  """What a token sequence is: a 1D sequence ``(L,)``, a 2D grid ``(h, w)`` or a 3D grid ``(t, h, w)``
  (frames of ``h x w`` patches), all row-major.

  Hashable, so it can be a static argument of ``jax.jit``.
  """

  shape: tuple[int, ...]
  num_prefix: int = 0

  def __post_init__(self):
    shape = tuple(int(s) for s in self.shape)
    object.__setattr__(self, "shape", shape)
    if len(shape) not in (1, 2, 3) or any(s < 1 for s in shape) or self.num_prefix < 0:
      raise ValueError(f"Geometry needs a shape (L,), (h, w) or (t, h, w) of positive sizes and "
                       f"num_prefix >= 0; got shape={shape}, num_prefix={self.num_prefix}.")

  @classmethod
  def seq(cls, length: int, num_prefix: int = 0) -> "Geometry":
    return cls((length,), num_prefix)

  @classmethod
  def grid(cls, h: int, w: int, num_prefix: int = 0) -> "Geometry":
    return cls((h, w), num_prefix)

  @classmethod
  def grid3d(cls, t: int, h: int, w: int, num_prefix: int = 0) -> "Geometry":
    """``t`` frames of ``h x w`` tokens (video), row-major ``(t, h, w)``."""
    return cls((t, h, w), num_prefix)

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
    """Integer coordinates of the positions, ``[num_positions, ndim]``, row-major: (row, col) in 2D,
    (t, row, col) in 3D."""
    axes = [jnp.arange(s) for s in self.shape]
    return jnp.stack([a.reshape(-1) for a in jnp.meshgrid(*axes, indexing="ij")], axis=-1)

  def positions(self) -> jnp.ndarray:
    """The default positions, ``[1, num_positions, ndim]`` int32: this grid's coordinates."""
    return self.coords().astype(jnp.int32)[None]

  def to_dict(self) -> dict:
    return {"shape": list(self.shape), "num_prefix": self.num_prefix}

  @classmethod
  def from_dict(cls, d: dict) -> "Geometry":
    return cls(tuple(d["shape"]), int(d.get("num_prefix", 0)))

  def __str__(self) -> str:
    dims = "x".join(map(str, self.shape))
    return f"{self.ndim}D {dims}" + (f" (+{self.num_prefix} prefix)" if self.num_prefix else "")


def patch_grid(size, patch_size: int, num_prefix: int = 0, tubelet: int = 0) -> Geometry:
  """The tokens of an ``(h, w)`` image cut into ``patch_size`` patches, or (``tubelet`` > 0) of a
  ``(t, h, w)`` clip cut into tubelets of ``tubelet`` frames (ViViT), after ``num_prefix`` prefix
  tokens; a clear error if the patch or the tubelet doesn't divide the input."""
  *frames, h, w = size
  p = patch_size
  if h % p or w % p or h < p or w < p:
    raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}; resize or crop the "
                     f"images to multiples of {p} (e.g. {max(p, h // p * p)}x{max(p, w // p * p)}).")
  if not tubelet:
    return Geometry.grid(h // p, w // p, num_prefix=num_prefix)
  (t,) = frames
  if t % tubelet or t < tubelet:
    raise ValueError(f"a clip of {t} frames is not divisible by the tubelet of {tubelet} frames; use "
                     f"{max(tubelet, t // tubelet * tubelet)} frames or another tubelet.")
  return Geometry.grid3d(t // tubelet, h // p, w // p, num_prefix=num_prefix)
