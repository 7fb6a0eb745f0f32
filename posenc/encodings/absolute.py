"""Absolute position encodings: a vector per position, added once to the tokens.

=============  =====  ========================================  ===========================
name           dims   what is added to position (i[, j])        parameters
=============  =====  ========================================  ===========================
learned        1D-3D  trainable table row (BERT / ViT / video)  max_len*D, h*w*D, t*h*w*D
factorized     2D     row_table[i] + col_table[j] (NaViT)       (h+w)*D
sinusoidal     1D     fixed sin/cos of Vaswani et al. (2017)    0
sincos2d       2D     fixed 2D sin/cos (MoCo v3 / big_vision)   0
sincos3d       3D     sincos2d's form on (t, h, w), D/3 each        0
cape           2D     CAPE: sin/cos of patch centres in [-1,1]  0
none           any    nothing                                   0
=============  =====  ========================================  ===========================

Prefix tokens (class token, registers) get nothing: they carry no position.
Learned tables live in ``param_dtype`` and are cast to the dtype of the tokens
before the addition, so bf16 tokens stay bf16.

Positions: tables (``learned``, ``factorized``) look integer positions up
(``base.table_positions``: real-valued positions are a clear error, and so are
concrete positions outside the table; under ``jit`` a position outside the
table gives NaN, never a silent clamp). ``sinusoidal``, ``sincos2d`` and ``sincos3d``
take any real positions.

Any grid size: ``learned`` (2D or 3D) with ``resample=True`` resamples its table from
the built grid to the grid of each forward (FlexiViT-style; ``posenc.resize.resize_grid``
or ``resize_grid3d``, differentiable). ``cape`` works on patch centres normalised to [-1, 1], the same
range on every grid, and augments them when training (global shift, local shift,
global scaling; ``CAPE``).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from posenc.encodings import coordinates as coords_lib
from posenc.encodings.base import Encoding, Geometry, lookup, split_prefix, table_positions
from posenc.encodings.options import Options, at_least, greater, one_of, option
from posenc.encodings.registry import register
from posenc.resize import METHODS, resize_1d, resize_grid, resize_grid3d

_TABLE_AXES = ("posn", "embed")  # logical axis names of every table here


def _add_to_positions(enc: Encoding, x: jax.Array, geometry: Geometry, pe: jax.Array) -> jax.Array:
  """``x [B, T, D]`` with ``pe [B or 1, N, D]`` added to its position tokens."""
  enc.check(geometry)
  want = (geometry.num_tokens, pe.shape[-1])
  if x.ndim != 3 or tuple(x.shape[1:]) != want:
    raise ValueError(f"position encoding '{enc.name}' expects tokens [B, T, D] with T={want[0]} "
                     f"(geometry {geometry}) and D={want[1]}; got shape {tuple(x.shape)}.")
  prefix, tokens = split_prefix(x, geometry)
  tokens = tokens + pe.astype(x.dtype)
  if not geometry.num_prefix:
    return tokens
  return jnp.concatenate([jnp.broadcast_to(prefix, (tokens.shape[0], *prefix.shape[1:])), tokens], axis=1)


def _transfer_hint(enc: Encoding, geometry: Geometry) -> str:
  grid = "x".join(map(str, enc.built.shape))
  return (f"position encoding '{enc.name}' was built for the {grid} grid and cannot serve {geometry}: "
          f"transfer its parameters to the new grid with posenc.transfer (train.py: "
          f"--config.init_from=<run> at the new image_size).")


def _resize(table: jax.Array, old: tuple[int, ...], new: tuple[int, ...], **kwargs) -> jax.Array:
  """A row-major 2D ``(h, w)`` or 3D ``(t, h, w)`` grid table resampled per axis (``posenc.resize``)."""
  return (resize_grid if len(old) == 2 else resize_grid3d)(table, old, new, **kwargs)


def _normal_table(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype) -> nnx.Param:
  init = nnx.initializers.normal(stddev=std)
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=_TABLE_AXES)


def _in_range(positions: jax.Array, extent) -> jax.Array:
  """``[B, N]`` True where every coordinate lies in ``0..extent-1`` of its axis."""
  return jnp.all((positions >= 0) & (positions < jnp.asarray(extent)), axis=-1)


@dataclasses.dataclass(frozen=True)
class TableOptions(Options):
  init_std: float = option(0.02, "std of the tables' N(0, std^2) initialisation", at_least(0))


@dataclasses.dataclass(frozen=True)
class LearnedOptions(TableOptions):
  resample: bool = option(False, "2D and 3D grids: resample the table to each forward's grid (FlexiViT)")
  resample_method: str = option("bicubic", "resample's kernel (posenc.resize)", one_of(*METHODS))


@register("learned")
class Learned(Encoding):
  """A trainable vector per position, initialised N(0, init_std^2) (plain normal).

  Built at a 1D geometry ``(L,)``: a BERT-style table ``[max_len=L, D]``;
  position ``p`` reads row ``p``, so any length ``<= max_len`` works.
  Built at a 2D geometry ``(h, w)``: a ViT grid table ``[h*w, D]`` (row-major),
  usable only at that grid; other grids need ``posenc.transfer``. Built at a 3D
  geometry ``(t, h, w)`` (video): the same, a table ``[t*h*w, D]`` (row-major ``t, h, w``);
  transfer resamples each axis (``posenc.resize.resize_grid3d``).
  The default std 0.02 is BERT's and the original ViT's (vision_transformer:
  plain ``normal(0.02)``; BERT's TF code truncates at 2 std; today's
  big_vision uses ``normal(1/sqrt(D))``, i.e. ``init_std=D**-0.5``).

  ``resample=True`` (2D and 3D; FlexiViT-style, for multi-resolution training): at a
  grid other than the built one the table is resampled in the forward pass from
  the built grid (``posenc.resize.resize_grid`` with ``resample_method``, default
  ``"bicubic"`` = antialiased bicubic, as ``posenc.transfer``'s default), so
  gradients reach the one stored table; at the built grid nothing changes.
  """

  Options = LearnedOptions
  supported_ndims = (1, 2, 3)
  continuous = False

  def __init__(self, options: LearnedOptions, *, dim: int, geometry: Geometry, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    super().__init__(options)
    if options.resample and geometry.ndim == 1:
      raise ValueError(f"position encoding 'learned': resample=True resamples a 2D or 3D grid table; built at "
                       f"{geometry} it has a 1D table (extend it with posenc.transfer instead).")
    self.built = geometry
    self.resample, self.resample_method = options.resample, options.resample_method
    self.table = _normal_table(rngs, (geometry.num_positions, dim), options.init_std, param_dtype)

  def check(self, geometry: Geometry) -> None:
    built = self.built
    if geometry.ndim != built.ndim:
      raise ValueError(f"position encoding '{self.name}' was built for {built.ndim}D inputs "
                       f"({built}) and cannot serve {geometry}; build it at a "
                       f"{geometry.ndim}D geometry instead.")
    if built.ndim == 1 and geometry.shape[0] > built.shape[0]:
      raise ValueError(f"position encoding '{self.name}' has max_len={built.shape[0]} positions "
                       f"but got {geometry}; raise max_len or extend the table with "
                       f"posenc.transfer.")
    if built.ndim > 1 and geometry.shape != built.shape and not self.resample:
      raise ValueError(_transfer_hint(self, geometry))

  def embed(self, x, geometry, positions):
    self.check(geometry)
    table, extent = self.table[...], self.built.shape
    if self.built.ndim > 1 and geometry.shape != extent:  # resample=True (check refuses otherwise)
      table = _resize(table, extent, geometry.shape, method=self.resample_method)
      extent = geometry.shape
    positions = table_positions(self, positions, extent)
    strides = np.cumprod((*extent[1:], 1)[::-1])[::-1]  # row-major: (h*w, w, 1) in 3D
    index = jnp.sum(positions * jnp.asarray(strides, positions.dtype), axis=-1)
    pe = lookup(table, index, _in_range(positions, extent))
    return _add_to_positions(self, x, geometry, pe)

  @classmethod
  def transfer(cls, params, source, target, options):
    """2D and 3D grids resample each axis; 1D tables are cut, or extended by interpolation or by
    copying the trained table (``options.extend``: "interpolate" | "copy")."""
    table = params["table"]
    if source.ndim != target.ndim:
      raise ValueError(f"position encoding 'learned' cannot transfer a {source} table to {target}.")
    if source.ndim > 1:
      return {"table": _resize(table, source.shape, target.shape, method=options.method,
                               antialias=options.antialias)}
    old, new = source.shape[0], target.shape[0]
    if new <= old:
      return {"table": table[:new]}
    if options.extend == "copy":  # Longformer: position i takes the trained row i % old
      return {"table": jnp.tile(table, (-(-new // old), 1))[:new]}
    return {"table": resize_1d(table, new, method=options.method, antialias=options.antialias)}


@register("factorized")
class Factorized(Encoding):
  """NaViT-style: ``row_table[i] + col_table[j]`` for the patch at (row i, column j).

  Tables ``[h, D]`` and ``[w, D]`` for the grid it is built at, init
  N(0, init_std^2). Like NaViT, positions index the tables, so any grid with
  ``h' <= h`` and ``w' <= w`` uses their first rows; a bigger grid needs
  ``posenc.transfer``.
  """

  Options = TableOptions
  supported_ndims = (2,)
  continuous = False

  def __init__(self, options: TableOptions, *, dim: int, geometry: Geometry, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    super().__init__(options)
    self.built = None
    self.check(geometry)
    self.built = geometry
    h, w = geometry.shape
    self.row_table = _normal_table(rngs, (h, dim), options.init_std, param_dtype)
    self.col_table = _normal_table(rngs, (w, dim), options.init_std, param_dtype)

  def check(self, geometry: Geometry) -> None:
    super().check(geometry)
    if self.built is not None and any(n > b for n, b in zip(geometry.shape, self.built.shape)):
      raise ValueError(_transfer_hint(self, geometry))

  def embed(self, x, geometry, positions):
    self.check(geometry)
    positions = table_positions(self, positions, self.built.shape)
    valid = _in_range(positions, self.built.shape)
    rows = lookup(self.row_table[...], positions[..., 0], valid)
    cols = lookup(self.col_table[...], positions[..., 1], valid)
    return _add_to_positions(self, x, geometry, rows.astype(x.dtype) + cols.astype(x.dtype))

  @classmethod
  def transfer(cls, params, source, target, options):
    """Row and column tables resample in 1D to the new grid's height and width."""
    kw = dict(method=options.method, antialias=options.antialias)
    return {"row_table": resize_1d(params["row_table"], target.shape[0], **kw),
            "col_table": resize_1d(params["col_table"], target.shape[1], **kw)}


@dataclasses.dataclass(frozen=True)
class SinCosOptions(Options):
  temperature: float = option(10_000., "the longest wavelength over 2 pi (Vaswani et al.'s 10000)", greater(0))
  scale: float = option(1.0, "multiplies the table (amplitude)")


class _SinCos(Encoding):
  """Fixed sin/cos of the positions times geometric frequencies; no parameters, any size.

  ``scale`` multiplies the table (amplitude 1 by default). Vaswani et al. scale token
  embeddings by sqrt(D) to match it; BERT-initialised ones (std 0.02) are ~35x smaller,
  and an unscaled table then drowns the token identity after the embedding LayerNorm.
  """

  Options = SinCosOptions
  divisor = 2  # features per frequency and axis: a sin and a cos

  def __init__(self, options: SinCosOptions, *, dim: int):
    super().__init__(options)
    ndim = self.supported_ndims[0]
    if dim % (self.divisor * ndim) or dim < 4 * ndim:
      raise ValueError(f"position encoding '{self.name}' needs dim divisible by {self.divisor * ndim} (a sin "
                       f"and a cos per frequency{' and axis' if ndim > 1 else ''}) and at least {4 * ndim}; "
                       f"got dim={dim}.")
    self.dim = dim
    self.temperature, self.scale = options.temperature, options.scale

  def table(self, positions: jax.Array) -> jax.Array:
    """``[B, N, D]`` float32 for float32 ``positions [B, N, ndim]``."""
    raise NotImplementedError  # abstract: each subclass says its layout

  def embed(self, x, geometry, positions):
    self.check(geometry)
    pe = self.scale * self.table(positions.astype(jnp.float32))
    return _add_to_positions(self, x, geometry, pe)


@register("sinusoidal")
class Sinusoidal(_SinCos):
  """Fixed 1D sin/cos (Vaswani et al., 2017): ``pe[p, 2i] = sin(p / T^(2i/D))``,
  ``pe[p, 2i+1] = cos(...)``; ``scale`` multiplies it."""

  supported_ndims = (1,)

  def table(self, positions):
    inv_freq = 1.0 / self.temperature**(jnp.arange(0, self.dim, 2, dtype=jnp.float32) / self.dim)
    angle = positions * inv_freq  # [B, N, D/2]
    return jnp.stack([jnp.sin(angle), jnp.cos(angle)], axis=-1).reshape(*angle.shape[:-1], self.dim)


@register("sincos2d")
class SinCos2D(_SinCos):
  """Fixed 2D sin/cos (MoCo v3 / big_vision ``posemb_sincos_2d``); ``scale`` multiplies it.

  ``omega_k = 1 / T^(k / (D/4 - 1))`` for ``k < D/4``; with ``y`` the row and
  ``x`` the column, features are ``[sin(x*omega), cos(x*omega), sin(y*omega),
  cos(y*omega)]`` (big_vision's order: column first).
  """

  supported_ndims = (2,)

  def table(self, positions):
    n = self.dim // 4
    omega = 1.0 / self.temperature**(jnp.arange(n, dtype=jnp.float32) / (n - 1))
    y = positions[..., 0:1] * omega
    x = positions[..., 1:2] * omega
    return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=-1)


@register("sincos3d")
class SinCos3D(_SinCos):
  """Fixed 3D sin/cos for ``(t, h, w)`` grids (video); ``scale`` multiplies it.

  ``sincos2d``'s form with a third axis, ``D/3`` features per axis: ``omega_k = 1 / T^(k / (D/6 - 1))``
  for ``k < D/6``; with ``x`` the column, ``y`` the row, features ``[sin(x*omega), cos(x*omega),
  sin(y*omega), cos(y*omega), sin(t*omega), cos(t*omega)]``. So the first ``2D/3`` features are
  ``sincos2d``'s at width ``2D/3`` for every frame. (An equal split; MAE-ST's
  ``get_3d_sincos_pos_embed`` gives ``t`` a quarter of the features and space three quarters.)
  """

  supported_ndims = (3,)

  def table(self, positions):
    n = self.dim // 6
    omega = 1.0 / self.temperature**(jnp.arange(n, dtype=jnp.float32) / (n - 1))
    t, y, x = (positions[..., a:a + 1] * omega for a in range(3))
    return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y), jnp.sin(t), jnp.cos(t)], axis=-1)


@dataclasses.dataclass(frozen=True)
class CAPEOptions(Options):
  scale: float = option(1.0, "multiplies the table (amplitude)")
  global_shift: float = option(0.5, "training: a shift U[-g, g] per axis", at_least(0))
  local_shift: float = option(0.5, "training: a shift U[-l, l] patch spacings per patch and axis", at_least(0))
  global_scaling: float = option(1.4, "training: a scaling [1/s, s] (log-uniform)", at_least(1))


@register("cape")
class CAPE(_SinCos):
  """CAPE for images (Likhomanenko et al. 2021): sin/cos of patch centres normalised to [-1, 1].

  Coordinates are the patch centres ``u = 2 (p + 1/2) / n - 1`` per axis
  (``coordinates.normalize``, "separate"): every grid spans the same range, a larger one
  more densely, which is what makes CAPE size-free; at evaluation they are exactly that.
  In training they are augmented per example (``coordinates.cape_augment``):
  ``u' = lam (u + Delta + eps)``, a global shift ``Delta ~ U[-global_shift, global_shift]``
  per axis, a local shift ``eps ~ U[-local_shift, local_shift]`` patch spacings per patch
  and axis, a global scaling ``lam`` log-uniform in ``[1/global_scaling, global_scaling]``.
  Defaults: CAPE's ViT recipe (0.5, 0.5, 1.4). The embedding is CAPE's 2D one:
  ``phase_k = pi (wx_k u_x + wy_k u_y)`` with directions ``w_k = rho_k (cos k, sin k)`` and
  magnitudes ``rho_k = 10^((k + 1) / K)``, ``K = D / 2``; features ``[cos(phase), sin(phase)]``
  times ``scale``.
  """

  Options = CAPEOptions
  supported_ndims = (2,)
  divisor = 1  # one cos and one sin per direction, over both axes at once
  augments = True

  def __init__(self, options: CAPEOptions, *, dim: int):
    Encoding.__init__(self, options)
    if dim % 2 or dim < 4:
      raise ValueError(f"position encoding 'cape' needs an even dim >= 4 (a cos and a sin per direction); "
                       f"got dim={dim}.")
    self.dim, self.scale = dim, options.scale
    self.global_shift, self.local_shift = options.global_shift, options.local_shift
    self.global_scaling = options.global_scaling

  def coordinates(self, positions, geometry, key=None):
    """Patch centres in [-1, 1] on ``geometry``'s grid; augmented when a ``key`` is given (training)."""
    self.check(geometry)
    unit = coords_lib.normalize(positions, geometry.shape, "separate")
    if key is None:
      return unit
    return coords_lib.cape_augment(unit, key, geometry.shape, global_shift=self.global_shift,
                                   local_shift=self.local_shift, global_scaling=self.global_scaling)

  def table(self, positions):
    half = self.dim // 2
    k = jnp.arange(half, dtype=jnp.float32)
    rho = 10.0 ** ((k + 1.0) / half)
    phase = jnp.pi * (positions[..., 0:1] * rho * jnp.cos(k) + positions[..., 1:2] * rho * jnp.sin(k))
    return jnp.concatenate([jnp.cos(phase), jnp.sin(phase)], axis=-1)


@register("none")
class NoPosition(Encoding):
  """No position information at all (every hook is the identity): a baseline."""

  supported_ndims = (1, 2, 3)
