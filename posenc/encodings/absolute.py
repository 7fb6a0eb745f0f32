"""Absolute position encodings: a vector per position, added once to the tokens.

=============  =====  ========================================  ===========================
name           dims   what is added to position (i[, j])        parameters
=============  =====  ========================================  ===========================
learned        1D/2D  trainable table row (BERT / ViT)          max_len*D (1D), h*w*D (2D)
factorized     2D     row_table[i] + col_table[j] (NaViT)       (h+w)*D
sinusoidal     1D     fixed sin/cos of Vaswani et al. (2017)    0
sincos2d       2D     fixed 2D sin/cos (MoCo v3 / big_vision)   0
none           any    nothing                                   0
=============  =====  ========================================  ===========================

Prefix tokens (class token, registers) get nothing: they carry no position.
Learned tables live in ``param_dtype`` and are cast to the dtype of the tokens
before the addition, so bf16 tokens stay bf16. Encodings with a table keep the
position shape it covers in the static attribute ``built_shape`` (``(max_len,)``
or ``(h, w)``), which is what ``posenc.transfer`` reads to resize it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from posenc.encodings.base import Encoding, Geometry, split_prefix
from posenc.encodings.registry import register
from posenc.resize import resize_1d, resize_grid

_TABLE_AXES = ("posn", "embed")  # logical axis names of every table here


def _add_to_positions(enc: Encoding, x: jax.Array, geometry: Geometry,
                      pe: jax.Array) -> jax.Array:
  """``x [B, T, D]`` with ``pe [num_positions, D]`` added to its position tokens."""
  enc.check(geometry)
  want = (geometry.num_tokens, pe.shape[-1])
  if x.ndim != 3 or tuple(x.shape[1:]) != want:
    raise ValueError(f"position encoding '{enc.name}' expects tokens [B, T, D] with T={want[0]} "
                     f"(geometry {geometry}) and D={want[1]}; got shape {tuple(x.shape)}.")
  prefix, positions = split_prefix(x, geometry)
  return jnp.concatenate([prefix, positions + pe.astype(x.dtype)], axis=1)


def _transfer_hint(enc: Encoding, built: Geometry, geometry: Geometry) -> str:
  return (f"position encoding '{enc.name}' was built for the {built.shape[0]}x{built.shape[1]} "
          f"grid and cannot serve {geometry}: transfer its parameters to the new grid with "
          f"posenc.transfer (train.py: --config.init_from=<run> at the new image_size).")


def _normal_table(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype) -> nnx.Param:
  init = nnx.initializers.normal(stddev=std)
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=_TABLE_AXES)


@register("learned")
class Learned(Encoding):
  """A trainable vector per position, initialised N(0, init_std^2) (plain normal).

  Built at a 1D geometry ``(L,)``: a BERT-style table ``[max_len=L, D]``;
  a sequence of length ``l <= max_len`` uses its first ``l`` rows.
  Built at a 2D geometry ``(h, w)``: a ViT grid table ``[h*w, D]`` (row-major),
  usable only at that grid; other grids need ``posenc.transfer``.
  The default std 0.02 is BERT's and the original ViT's (vision_transformer:
  plain ``normal(0.02)``; BERT's TF code truncates at 2 std; today's
  big_vision uses ``normal(1/sqrt(D))``, i.e. ``init_std=D**-0.5``).
  """

  def __init__(self, dim: int, geometry: Geometry, *, init_std: float = 0.02,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.built_shape = geometry.shape
    self.table = _normal_table(rngs, (geometry.num_positions, dim), init_std, param_dtype)

  def check(self, geometry: Geometry) -> None:
    built = Geometry(self.built_shape)
    if geometry.ndim != built.ndim:
      raise ValueError(f"position encoding '{self.name}' was built for {built.ndim}D inputs "
                       f"({built}) and cannot serve {geometry}; build it at a "
                       f"{geometry.ndim}D geometry instead.")
    if built.ndim == 1 and geometry.shape[0] > built.shape[0]:
      raise ValueError(f"position encoding '{self.name}' has max_len={built.shape[0]} positions "
                       f"but got {geometry}; raise max_len or extend the table with "
                       f"posenc.transfer.")
    if built.ndim == 2 and geometry.shape != built.shape:
      raise ValueError(_transfer_hint(self, built, geometry))

  def embed(self, x: jax.Array, geometry: Geometry) -> jax.Array:
    return _add_to_positions(self, x, geometry, self.table[:geometry.num_positions])

  def transfer(self, params, source, target, options):
    """2D grids resample; 1D tables are cut, or extended by interpolation or by
    copying the trained table (``options.extend``: "interpolate" | "copy")."""
    table = params["table"]
    if source.ndim != target.ndim:
      raise ValueError(f"position encoding 'learned' cannot transfer a {source} table to {target}.")
    if source.ndim == 2:
      return {"table": resize_grid(table, source.shape, target.shape, method=options.method,
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

  supported_ndims = (2,)

  def __init__(self, dim: int, geometry: Geometry, *, init_std: float = 0.02,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.check(geometry)
    self.built_shape = geometry.shape
    h, w = geometry.shape
    self.row_table = _normal_table(rngs, (h, dim), init_std, param_dtype)
    self.col_table = _normal_table(rngs, (w, dim), init_std, param_dtype)

  def check(self, geometry: Geometry) -> None:
    super().check(geometry)
    built = getattr(self, "built_shape", None)
    if built is not None and any(n > b for n, b in zip(geometry.shape, built)):
      raise ValueError(_transfer_hint(self, Geometry(built), geometry))

  def embed(self, x: jax.Array, geometry: Geometry) -> jax.Array:
    self.check(geometry)
    h, w = geometry.shape
    rows = self.row_table[:h].astype(x.dtype)
    cols = self.col_table[:w].astype(x.dtype)
    pe = (rows[:, None, :] + cols[None, :, :]).reshape(h * w, -1)
    return _add_to_positions(self, x, geometry, pe)

  def transfer(self, params, source, target, options):
    """Row and column tables resample in 1D to the new grid's height and width."""
    kw = dict(method=options.method, antialias=options.antialias)
    return {"row_table": resize_1d(params["row_table"], target.shape[0], **kw),
            "col_table": resize_1d(params["col_table"], target.shape[1], **kw)}


def sinusoidal_table(length: int, dim: int, temperature: float = 10_000.) -> jax.Array:
  """Vaswani et al.: ``pe[p, 2i] = sin(p / T^(2i/D))``, ``pe[p, 2i+1] = cos(...)``; float32."""
  position = jnp.arange(length, dtype=jnp.float32)[:, None]
  inv_freq = 1.0 / temperature**(jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  angle = position * inv_freq  # [L, D/2]
  return jnp.stack([jnp.sin(angle), jnp.cos(angle)], axis=-1).reshape(length, dim)


def sincos2d_table(geometry: Geometry, dim: int, temperature: float = 10_000.) -> jax.Array:
  """MoCo v3 / big_vision ``posemb_sincos_2d``, ``[h*w, D]`` float32, row-major.

  ``omega_k = 1 / T^(k / (D/4 - 1))`` for ``k < D/4``; with ``y`` the row and
  ``x`` the column, features are ``[sin(x*omega), cos(x*omega), sin(y*omega),
  cos(y*omega)]`` (big_vision's order: column first).
  """
  n = dim // 4
  omega = 1.0 / temperature**(jnp.arange(n, dtype=jnp.float32) / (n - 1))
  coords = geometry.coords().astype(jnp.float32)
  y = coords[:, 0:1] * omega
  x = coords[:, 1:2] * omega
  return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)


@register("sinusoidal")
class Sinusoidal(Encoding):
  """Fixed 1D sin/cos (Vaswani et al., 2017); no parameters, any length.

  ``scale`` multiplies the table (amplitude 1 by default). Vaswani et al. scale token
  embeddings by sqrt(D) to match it; BERT-initialised ones (std 0.02) are ~35x smaller,
  and an unscaled table then drowns the token identity after the embedding LayerNorm.
  """

  supported_ndims = (1,)

  def __init__(self, dim: int, *, temperature: float = 10_000., scale: float = 1.0):
    if dim % 2:
      raise ValueError(f"position encoding '{self.name}' needs an even dim (a sin and a cos per "
                       f"frequency); got dim={dim}.")
    self.dim = dim
    self.temperature, self.scale = float(temperature), float(scale)

  def embed(self, x: jax.Array, geometry: Geometry) -> jax.Array:
    self.check(geometry)
    pe = self.scale * sinusoidal_table(geometry.shape[0], self.dim, self.temperature)
    return _add_to_positions(self, x, geometry, pe)


@register("sincos2d")
class SinCos2D(Encoding):
  """Fixed 2D sin/cos (MoCo v3, big_vision); no parameters, any grid; ``scale`` as in sinusoidal."""

  supported_ndims = (2,)

  def __init__(self, dim: int, *, temperature: float = 10_000., scale: float = 1.0):
    if dim % 4 or dim < 8:
      raise ValueError(f"position encoding '{self.name}' needs dim divisible by 4 (sin and cos "
                       f"for each of 2 axes) and at least 8; got dim={dim}.")
    self.dim = dim
    self.temperature, self.scale = float(temperature), float(scale)

  def embed(self, x: jax.Array, geometry: Geometry) -> jax.Array:
    self.check(geometry)
    pe = self.scale * sincos2d_table(geometry, self.dim, self.temperature)
    return _add_to_positions(self, x, geometry, pe)


@register("none")
class NoPosition(Encoding):
  """No position information at all (every hook is the identity): a baseline."""
