"""Resampling of position tables: the one place interpolation lives (2D grids, 3D (t, h, w) grids,
1D tables, Swin bias tables).

Every resize is separable: one interpolation matrix per spatial axis
(``new x old``, float32, built with numpy from the static sizes, so it is a
constant under ``jax.jit``), applied to the array with one einsum per axis. The array
math is pure ``jnp``: it traces under ``jax.jit`` with any
``in_shardings``/``out_shardings`` and never leaves the device.

Methods, each tested against the library it names:

=====================  =========================================================
``"bicubic"``          antialias=True: torch ``F.interpolate(mode="bicubic",
                       align_corners=False, antialias=True)`` (timm's default;
                       a PIL-style filter with a=-0.5, widened when shrinking).
                       antialias=False: same as ``"bicubic_torch"``.
``"bicubic_torch"``    torch bicubic, ``align_corners=False``, no antialias
                       (a=-0.75, edge indices clamped): HF, DeiT, Swin.
``"bilinear"``         torch bilinear, ``align_corners=False`` (± antialias).
``"bilinear_aligned"`` ``scipy.ndimage.zoom(order=1)``: corners aligned
                       (big_vision, vision_transformer).
``"nearest"``          torch ``F.interpolate(mode="nearest")``.
=====================  =========================================================

``antialias`` only changes ``"bicubic"`` and ``"bilinear"``.
"""
from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("bicubic", "bicubic_torch", "bilinear", "bilinear_aligned", "nearest")


# ----------------------------------------------------------------------------
# Interpolation matrices (numpy, static sizes only)
# ----------------------------------------------------------------------------

def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter ``a``."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
  return np.maximum(0.0, 1.0 - np.abs(x))


def _torch_cubic(old: int, new: int) -> np.ndarray:
  """torch upsample_bicubic2d, align_corners=False: 4 taps, clamped indices."""
  src = old / new * (np.arange(new) + 0.5) - 0.5
  base = np.floor(src)
  m = np.zeros((new, old))
  for tap in (-1, 0, 1, 2):
    idx = np.clip(base + tap, 0, old - 1).astype(int)
    np.add.at(m, (np.arange(new), idx), _cubic(src - base - tap, -0.75))
  return m


def _torch_linear(old: int, new: int) -> np.ndarray:
  """torch upsample_bilinear2d, align_corners=False."""
  src = np.maximum(old / new * (np.arange(new) + 0.5) - 0.5, 0.0)
  lo = np.minimum(np.floor(src), old - 1).astype(int)
  hi = np.minimum(lo + 1, old - 1)
  frac = src - lo
  m = np.zeros((new, old))
  np.add.at(m, (np.arange(new), lo), 1.0 - frac)
  np.add.at(m, (np.arange(new), hi), frac)
  return m


def _torch_antialias(old: int, new: int, kernel, support: float) -> np.ndarray:
  """torch's antialiased path (_upsample_*_aa): the filter is stretched by the
  shrink factor when downsampling, cut at the image edge and each row
  renormalised to sum to one."""
  scale = old / new
  stretch = max(scale, 1.0)
  support *= stretch
  center = scale * (np.arange(new) + 0.5)
  lo = np.maximum(np.floor(center - support + 0.5), 0)
  hi = np.minimum(np.floor(center + support + 0.5), old)
  j = np.arange(old)
  inside = (j >= lo[:, None]) & (j < hi[:, None])
  m = np.where(inside, kernel((j + 0.5 - center[:, None]) / stretch), 0.0)
  total = m.sum(axis=1, keepdims=True)
  return m / np.where(total == 0, 1.0, total)


def _scipy_zoom_linear(old: int, new: int) -> np.ndarray:
  """scipy.ndimage.zoom(order=1, grid_mode=False): output i samples input
  i * (old - 1) / (new - 1), so the corner pixels' centres line up."""
  zoom = (old - 1) / (new - 1) if new > 1 else 1.0
  src = np.arange(new) * zoom
  lo = np.minimum(np.floor(src), old - 1).astype(int)
  hi = np.minimum(lo + 1, old - 1)
  frac = src - lo
  m = np.zeros((new, old))
  np.add.at(m, (np.arange(new), lo), 1.0 - frac)
  np.add.at(m, (np.arange(new), hi), frac)
  return m


def _torch_nearest(old: int, new: int) -> np.ndarray:
  """torch mode="nearest": floor(i * old / new), in float32 arithmetic as torch."""
  if new == 2 * old:
    idx = np.arange(new) // 2
  else:
    scale = np.float32(old) / np.float32(new)
    idx = np.minimum(np.floor(np.arange(new, dtype=np.float32) * scale), old - 1).astype(int)
  m = np.zeros((new, old))
  m[np.arange(new), idx] = 1.0
  return m


@functools.lru_cache(maxsize=256)
def _matrix(old: int, new: int, method: str, antialias: bool) -> np.ndarray:
  """The ``(new, old)`` float32 matrix resampling one axis of length ``old``."""
  if method == "bicubic" and antialias:
    m = _torch_antialias(old, new, lambda x: _cubic(x, -0.5), support=2.0)
  elif method in ("bicubic", "bicubic_torch"):
    m = _torch_cubic(old, new)
  elif method == "bilinear" and antialias:
    m = _torch_antialias(old, new, _triangle, support=1.0)
  elif method == "bilinear":
    m = _torch_linear(old, new)
  elif method == "bilinear_aligned":
    m = _scipy_zoom_linear(old, new)
  else:
    m = _torch_nearest(old, new)
  return m.astype(np.float32)


# ----------------------------------------------------------------------------
# Argument checks (one clear error each)
# ----------------------------------------------------------------------------

def _sizes(value, name: str, count: int) -> tuple[int, ...]:
  """``value`` as a tuple of ``count`` positive Python ints, or a ValueError."""
  try:
    sizes = tuple(operator.index(v) for v in value)
  except TypeError:
    sizes = ()
  if len(sizes) != count or any(s < 1 for s in sizes):
    raise ValueError(f"{name} must be {count} positive Python ints (static sizes, not arrays); "
                     f"got {value!r}.")
  return sizes


def _check_array(x, name: str, min_ndim: int) -> None:
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise ValueError(f"{name} must be an array; got {type(x).__name__}.")
  if x.ndim < min_ndim:
    raise ValueError(f"{name} must have at least {min_ndim} dims; got shape {tuple(x.shape)}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be floating point; got dtype {x.dtype}. Cast it first.")


def _check_method(method: str, antialias: bool) -> None:
  if method not in METHODS:
    raise ValueError(f"Unknown resize method {method!r}; valid methods: {', '.join(METHODS)}.")
  if not isinstance(antialias, (bool, np.bool_)):
    raise ValueError(f"antialias must be True or False; got {antialias!r}.")


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------

def _resample(grid: jax.Array, old: tuple[int, ...], new: tuple[int, ...], method: str,
              antialias: bool) -> jax.Array:
  """Resamples ``grid`` of shape ``(..., *old, C)`` to ``(..., *new, C)``, one axis at a time."""
  dtype = grid.dtype
  x = grid.astype(jnp.promote_types(dtype, jnp.float32))
  hi = jax.lax.Precision.HIGHEST  # full float32 matmuls on TPU/GPU too
  letters = "thw"[-len(old):]  # 2D: "oh,...hwc->...owc" (rows, then columns), as before
  for axis, (o, n) in enumerate(zip(old, new)):
    if o != n:
      m = jnp.asarray(_matrix(o, n, method, bool(antialias)), x.dtype)
      out = letters[:axis] + "o" + letters[axis + 1:]
      x = jnp.einsum(f"o{letters[axis]},...{letters}c->...{out}c", m, x, precision=hi)
  return x.astype(dtype)


def _resize_rows(emb: jax.Array, old: tuple[int, ...], new: tuple[int, ...], method: str, antialias: bool,
                 num_prefix_tokens, name: str) -> jax.Array:
  """``resize_grid``'s work for a grid of ``len(old)`` axes (checked sizes); ``name`` for errors."""
  _check_method(method, antialias)
  try:
    prefix = operator.index(num_prefix_tokens)
  except TypeError:
    prefix = -1
  if prefix < 0:
    raise ValueError(f"num_prefix_tokens must be a Python int >= 0; got {num_prefix_tokens!r}.")
  size = int(np.prod(old))
  if emb.shape[-2] != prefix + size:
    grid = "x".join(map(str, old))
    raise ValueError(
        f"{name}: emb of shape {tuple(emb.shape)} has {emb.shape[-2]} rows on axis -2, but "
        f"num_prefix_tokens={prefix} + old grid {grid} needs {prefix + size}. Pass the grid "
        f"and prefix count the table was built with.")
  if old == new:
    return emb
  lead, dim = emb.shape[:-2], emb.shape[-1]
  grid = emb[..., prefix:, :].reshape(*lead, *old, dim)
  out = _resample(grid, old, new, method, antialias).reshape(*lead, int(np.prod(new)), dim)
  return jnp.concatenate([emb[..., :prefix, :], out], axis=-2) if prefix else out


def resize_grid(emb: jax.Array, old_hw: Sequence[int], new_hw: Sequence[int], *,
                method: str = "bicubic", antialias: bool = True,
                num_prefix_tokens: int = 0) -> jax.Array:
  """Resamples a row-major position grid from ``old_hw`` to ``new_hw``.

  Args:
    emb: ``(..., num_prefix_tokens + h*w, D)``; leading axes are batch-like.
    old_hw: ``(h, w)`` the table was built for (explicit; never guessed).
    new_hw: ``(new_h, new_w)`` wanted.
    method: one of ``METHODS`` (see the module docstring).
    antialias: widen the filter when shrinking (``"bicubic"``/``"bilinear"``).
    num_prefix_tokens: leading rows (class token, registers) passed through.

  Returns:
    ``(..., num_prefix_tokens + new_h*new_w, D)`` in ``emb``'s dtype (computed
    in float32); ``emb`` itself when the geometry does not change.
  """
  _check_array(emb, "resize_grid: emb", 2)
  old, new = _sizes(old_hw, "old_hw", 2), _sizes(new_hw, "new_hw", 2)
  return _resize_rows(emb, old, new, method, antialias, num_prefix_tokens, "resize_grid")


def resize_grid3d(emb: jax.Array, old_thw: Sequence[int], new_thw: Sequence[int], *,
                  method: str = "bicubic", antialias: bool = True,
                  num_prefix_tokens: int = 0) -> jax.Array:
  """``resize_grid`` for a row-major ``(t, h, w)`` grid (video): ``emb (..., prefix + t*h*w, D)``
  to ``(..., prefix + new_t*new_h*new_w, D)``, each axis resampled with ``method``'s 1D kernel
  (separable: a grid constant in ``t`` resizes as ``resize_grid`` of each frame)."""
  _check_array(emb, "resize_grid3d: emb", 2)
  old, new = _sizes(old_thw, "old_thw", 3), _sizes(new_thw, "new_thw", 3)
  return _resize_rows(emb, old, new, method, antialias, num_prefix_tokens, "resize_grid3d")


def resize_table(table: jax.Array, old_hw: Sequence[int], new_hw: Sequence[int], *,
                 method: str = "bicubic_torch", antialias: bool = True) -> jax.Array:
  """Resamples a Swin relative-position bias table to a new window.

  Args:
    table: ``(..., (2h-1)*(2w-1), H)``: one row per relative offset (row-major
      over ``(dy, dx)``), one column per head; leading axes (e.g. layers) kept.
    old_hw: the window ``(h, w)`` the table was built for.
    new_hw: the new window ``(new_h, new_w)``.
    method, antialias: as in ``resize_grid``; the default is Swin's recipe
      (torch bicubic, ``align_corners=False``, per head).

  Returns:
    ``(..., (2*new_h-1)*(2*new_w-1), H)`` in ``table``'s dtype.
  """
  _check_array(table, "resize_table: table", 2)
  (h, w), (nh, nw) = _sizes(old_hw, "old_hw", 2), _sizes(new_hw, "new_hw", 2)
  rows = (2 * h - 1) * (2 * w - 1)
  if table.shape[-2] != rows:
    raise ValueError(
        f"resize_table: table of shape {tuple(table.shape)} has {table.shape[-2]} rows on axis "
        f"-2, but a {h}x{w} window has (2*{h}-1)*(2*{w}-1) = {rows} relative offsets. Pass the "
        f"window size the table was built for.")
  return resize_grid(table, (2 * h - 1, 2 * w - 1), (2 * nh - 1, 2 * nw - 1),
                     method=method, antialias=antialias)


def resize_1d(table: jax.Array, new_len: int, *, method: str = "bicubic",
              antialias: bool = True) -> jax.Array:
  """Resamples a 1D table ``(..., L, D)`` along axis -2 to ``(..., new_len, D)``.

  Same kernels as ``resize_grid`` (a ``1 x L`` grid), so resizing factorized
  row and column tables equals resizing the grid they add up to.
  """
  _check_array(table, "resize_1d: table", 2)
  (new_len,) = _sizes((new_len,), "new_len", 1)
  return resize_grid(table, (1, table.shape[-2]), (1, new_len), method=method,
                     antialias=antialias)
