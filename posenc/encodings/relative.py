"""Relative position encodings: a per-head bias added to the attention logits.

All three return ``attention_bias(geometry, positions, layer) -> [B or 1, H, T, T]``
float32 whose entry ``[b, h, i, j]`` depends only on ``pos_i - pos_j`` (translation
invariant); rows and columns of prefix tokens are 0. ``rel_bias`` looks integer
offsets up in its table; ``cpb`` and ``alibi`` take real-valued positions.

- ``rel_bias``: a learned table per head. 1D uses T5's log-spaced buckets of
  ``key - query`` (any length): bidirectional in an encoder, unidirectional (T5's
  decoder) in a causal model. 2D uses Swin's table of ``(2h-1)(2w-1)`` rows,
  one per offset ``query - key`` on the built ``(h, w)`` grid.
- ``cpb``: Swin-V2's continuous position bias, an MLP of log-spaced offsets.
- ``alibi``: fixed per-head slopes times minus the distance (ALiBi).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from posenc.encodings.base import (Encoding, Geometry, lookup, pad_prefix_bias, pair_offsets,
                                   table_positions)
from posenc.encodings.options import Options, SharedBiasOptions, at_least, option
from posenc.encodings.registry import register
from posenc.resize import resize_table

_trunc_normal = nnx.initializers.truncated_normal(stddev=0.02)


def pair_mlp(x: jax.Array, w1: jax.Array, b1: jax.Array, w2: jax.Array) -> jax.Array:
  """``relu(x w1 + b1) w2``: ``[..., D] -> [..., H]``, the MLP ``cpb`` and ``fire`` run per pair.

  ``w1 [D, W]``, ``b1 [W]``, ``w2 [W, H]``; float32. Both layers are matmuls, FIRE's ``D = 1``
  included: written as a broadcast multiply, its backward reduces over every pair in fused loops
  that XLA:CPU runs several times slower (``benchmarks/RESULTS.md``).
  """
  hidden = jax.nn.relu(jnp.dot(x, w1, precision="highest") + b1)
  return jnp.dot(hidden, w2, precision="highest")


def t5_bucket(relative_position: jax.Array, num_buckets: int = 32,
              max_distance: int = 128, bidirectional: bool = True) -> jax.Array:
  """T5's bucket of ``relative_position = key - query`` (int32).

  Bidirectional (T5's encoder): half the buckets are for ``key > query``; within each half,
  distances below a quarter of the buckets get their own bucket, larger ones share log-spaced
  buckets up to ``max_distance``; everything further shares the half's last bucket. As in T5,
  bucket ``num_buckets // 2`` is never used (offset 0 is in the lower half). Unidirectional
  (T5's decoder): every bucket is for ``key <= query`` (half of them exact), and keys after the
  query share bucket 0 with offset 0 (a causal mask hides them).
  """
  n = num_buckets // 2 if bidirectional else num_buckets
  if bidirectional:
    bucket, distance = jnp.where(relative_position > 0, n, 0), jnp.abs(relative_position)
  else:
    bucket, distance = 0, jnp.maximum(-relative_position, 0)
  max_exact = n // 2
  # max(distance, 1) keeps log finite where the exact branch is taken anyway.
  log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
  large = max_exact + (log_ratio / math.log(max_distance / max_exact)
                       * (n - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, n - 1)
  return bucket + jnp.where(distance < max_exact, distance, large)


def table_index(offsets: jax.Array, table_hw: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
  """Row of each offset ``(dy, dx) = query - key`` in a Swin table for grid ``table_hw``, and
  whether the table has it: row ``(dy + th-1) * (2tw-1) + (dx + tw-1)``."""
  th, tw = table_hw
  dy, dx = offsets[..., 0], offsets[..., 1]
  valid = (jnp.abs(dy) < th) & (jnp.abs(dx) < tw)
  return (dy + th - 1) * (2 * tw - 1) + dx + tw - 1, valid


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi's head slopes: ``2**(-8 i / H)``, i = 1..H, for ``H`` a power of 2.

  Otherwise (Press et al.'s rule) the slopes of the closest smaller power of 2
  ``c``, then every other slope of ``2c`` heads for the remaining ``H - c``.
  """
  def power_of_2(n):
    return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]

  closest = 2 ** int(math.floor(math.log2(num_heads)))
  slopes = power_of_2(closest)
  if closest != num_heads:
    slopes += power_of_2(2 * closest)[0::2][:num_heads - closest]
  return np.asarray(slopes, np.float32)


def layer_params(value: jax.Array, per_layer: bool, layer) -> jax.Array:
  """``layer``'s slice of a per-layer parameter (``layer``: an int32 array from the model, clamped
  to range; a constant one, as in unrolled layers, is a static slice once compiled)."""
  if not per_layer:
    return value
  return jax.lax.dynamic_index_in_dim(value, layer, axis=0, keepdims=False)


def _require_geometry(name: str, geometry: Geometry | None) -> Geometry:
  if not isinstance(geometry, Geometry):
    raise ValueError(f"position encoding '{name}' needs geometry=Geometry(...) "
                     f"(the geometry the model is built at); got {geometry!r}.")
  return geometry


@dataclasses.dataclass(frozen=True)
class RelativeBiasOptions(SharedBiasOptions):
  num_buckets: int = option(32, "1D: T5's buckets (even, >= 4)", at_least(1))
  max_distance: int = option(128, "1D: T5's largest distinguished offset", at_least(1))
  bidirectional: bool | None = option(None, "1D: buckets on both sides of the query", none="not causal")
  per_layer: bool = option(False, "a table per layer (else one shared by the layers)")


@register("rel_bias")
class RelativeBias(Encoding):
  """Learned relative position bias per head (T5 buckets in 1D, Swin table in 2D).

  Parameter ``table``: 1D ``(num_buckets, H)``; 2D ``((2h-1)(2w-1), H)`` for the
  built grid ``(h, w)``, row ``(dy + h-1) * (2w-1) + (dx + w-1)`` for offset
  ``(dy, dx) = query - key`` (Swin's layout). With ``per_layer=True`` a leading
  ``num_layers`` axis. Init: truncated normal, std 0.02 (as Swin). Positions
  must be integers (a table of offsets).

  A 2D grid larger than the built one needs offsets the table lacks: transfer
  the parameters (``posenc.transfer`` resamples the table). A smaller grid uses
  the central part of the table, which is exactly the same bias for the
  offsets it has, so it stays translation invariant.
  ``bias_once_per_forward`` (with parameters shared by the layers): the model computes the bias once
  per forward and gives it to every layer (default), or, ``False``, recomputes it in every layer: the
  same numbers (``benchmarks.bias_sharing`` times what computing it once saves).
  """

  Options = RelativeBiasOptions
  continuous = False

  def __init__(self, options: RelativeBiasOptions, *, num_heads: int, geometry: Geometry | None = None,
               num_layers: int = 1, causal: bool = False, param_dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(options)
    num_buckets, max_distance, per_layer = options.num_buckets, options.max_distance, options.per_layer
    bidirectional = options.bidirectional
    self.built = _require_geometry(self.name, geometry)
    self.num_layers, self.per_layer = num_layers, per_layer
    self.bias_shared_by_layers = not per_layer and options.bias_once_per_forward
    self.num_buckets, self.max_distance = num_buckets, max_distance
    # T5: bidirectional buckets in the encoder, unidirectional in the (causal) decoder.
    self.bidirectional = (not causal) if bidirectional is None else bool(bidirectional)
    if self.built.ndim == 1:
      exact = num_buckets // 4 if self.bidirectional else num_buckets // 2
      if num_buckets < 4 or num_buckets % 2 or max_distance <= exact:
        raise ValueError(f"rel_bias needs an even num_buckets >= 4 and max_distance > "
                         f"{exact} (its exact buckets); got num_buckets={num_buckets}, "
                         f"max_distance={max_distance}.")
      rows = num_buckets
    else:
      h, w = self.built.shape
      rows = (2 * h - 1) * (2 * w - 1)
    shape, names = (rows, num_heads), ("posn", "heads")
    if per_layer:
      shape, names = (num_layers, *shape), ("layers", *names)
    self.table = nnx.Param(_trunc_normal(rngs.params(), shape, param_dtype),
                           out_sharding=names)

  def check(self, geometry: Geometry) -> None:
    super().check(geometry)
    if geometry.ndim != self.built.ndim:
      raise ValueError(f"rel_bias was built for {self.built} and cannot serve {geometry}; "
                       f"build it at a {geometry.ndim}D geometry.")
    if geometry.ndim == 2 and any(n > b for n, b in zip(geometry.shape, self.built.shape)):
      raise ValueError(
          f"rel_bias was built for the {self.built} grid; its table has no entries for the "
          f"offsets of the larger {geometry} grid. Transfer the parameters to the new grid "
          f"with posenc.transfer (or --config.init_from), which resamples the table.")

  def attention_bias(self, geometry, positions, layer):
    self.check(geometry)
    relative = self.built.ndim == 2
    positions = table_positions(self, positions, self.built.shape if relative else None, relative=True)
    table = layer_params(self.table[...], self.per_layer, layer).astype(jnp.float32)
    offsets = pair_offsets(positions)  # [B, N, N, ndim], query - key
    if relative:
      bias = lookup(table, *table_index(offsets, self.built.shape))  # [B, N, N, H]
    else:
      bias = jnp.take(table, t5_bucket(-offsets[..., 0], self.num_buckets, self.max_distance, self.bidirectional),
                      axis=0)
    return pad_prefix_bias(jnp.moveaxis(bias, -1, 1), geometry)

  @classmethod
  def transfer(cls, params, source, target, options):
    """2D: resample the ``(2h-1) x (2w-1)`` table (Swin); 1D buckets fit any length."""
    if source.ndim == 1:
      return params
    return {"table": resize_table(params["table"], source.shape, target.shape,
                                  method=options.method, antialias=options.antialias)}


@dataclasses.dataclass(frozen=True)
class ContinuousPositionBiasOptions(SharedBiasOptions):
  hidden_dim: int = option(512, "width of the MLP (Swin-V2's 512)", at_least(1))
  per_layer: bool = option(False, "an MLP per layer (else one shared by the layers)")


@register("cpb")
class ContinuousPositionBias(Encoding):
  """Swin-V2's log-spaced continuous position bias (2D only, any grid).

  The offset ``(dy, dx) = query - key`` is divided by ``(built grid - 1)`` per
  axis (1 where the built size is 1), times 8, then mapped to
  ``sign(x) * log2(|x| + 1) / log2(8)``; an MLP ``2 -> hidden_dim (ReLU) -> H``
  (no bias on the last layer) gives the bias, squashed to ``16 * sigmoid``.
  At another grid the offsets stay normalised by the BUILT grid, as Swin-V2
  does with ``pretrained_window_size`` when it transfers, so a larger grid
  extrapolates the MLP in log space. Init: truncated normal 0.02, zero bias
  (as Swin-V2). ``per_layer=True`` gives each layer its own MLP.
  ``bias_once_per_forward`` (with parameters shared by the layers): the model computes the bias once
  per forward and gives it to every layer (default), or, ``False``, recomputes it in every layer: the
  same numbers (``benchmarks.bias_sharing`` times what computing it once saves).
  """

  Options = ContinuousPositionBiasOptions
  supported_ndims = (2,)

  def __init__(self, options: ContinuousPositionBiasOptions, *, num_heads: int,
               geometry: Geometry | None = None, num_layers: int = 1, param_dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(options)
    hidden_dim, per_layer = options.hidden_dim, options.per_layer
    self.built = _require_geometry(self.name, geometry)
    self.check(self.built)
    self.num_layers, self.per_layer = num_layers, per_layer
    self.bias_shared_by_layers = not per_layer and options.bias_once_per_forward
    lead, lead_name = ((num_layers,), ("layers",)) if per_layer else ((), ())

    def param(shape, names, init):
      return nnx.Param(init(rngs.params(), (*lead, *shape), param_dtype),
                       out_sharding=(*lead_name, *names))

    zeros = nnx.initializers.zeros
    self.w1 = param((2, hidden_dim), (None, "mlp"), _trunc_normal)
    self.b1 = param((hidden_dim,), ("mlp",), zeros)
    self.w2 = param((hidden_dim, num_heads), ("mlp", "heads"), _trunc_normal)

  def check(self, geometry: Geometry) -> None:
    if geometry.ndim != 2:
      raise ValueError(f"position encoding 'cpb' (Swin-V2 continuous bias) supports 2D grids "
                       f"only, not {geometry}; for 1D use rel_bias, alibi or rope.")

  def attention_bias(self, geometry, positions, layer):
    self.check(geometry)
    params = [layer_params(p[...], self.per_layer, layer).astype(jnp.float32)
              for p in (self.w1, self.b1, self.w2)]
    offsets = pair_offsets(positions)  # [B, N, N, 2]
    if jnp.issubdtype(positions.dtype, jnp.integer):
      # Swin-V2's order: the MLP over the grid's (2h-1)(2w-1) distinct offsets, then a gather per
      # pair (far fewer rows than N^2); offsets outside the grid's table take the per-pair path.
      h, w = geometry.shape
      grid = jnp.stack(jnp.meshgrid(jnp.arange(1 - h, h), jnp.arange(1 - w, w), indexing="ij"), -1)
      index, valid = table_index(offsets, (h, w))
      bias = jax.lax.cond(jnp.all(valid),
                          lambda: jnp.take(self._bias(grid.reshape(-1, 2), *params), index, axis=0),
                          lambda: self._bias(offsets, *params))
    else:
      bias = self._bias(offsets, *params)  # [B, N, N, H]
    return pad_prefix_bias(jnp.moveaxis(bias, -1, 1), geometry)

  def _bias(self, offsets: jax.Array, w1: jax.Array, b1: jax.Array, w2: jax.Array) -> jax.Array:
    """``[..., 2]`` offsets -> ``[..., H]`` biases: log-spaced coordinates, the MLP, 16 sigmoid."""
    scale = jnp.asarray([max(n - 1, 1) for n in self.built.shape], jnp.float32)
    coords = offsets.astype(jnp.float32) / scale * 8.0
    coords = jnp.sign(coords) * jnp.log2(jnp.abs(coords) + 1.0) / math.log2(8.0)
    return 16.0 * jax.nn.sigmoid(pair_mlp(coords, w1, b1, w2))


@register("alibi")
class ALiBi(Encoding):
  """ALiBi: ``bias[h, i, j] = -slope_h * distance(pos_i, pos_j)``, no parameters.

  Distance is ``|i - j|`` in 1D (symmetric, for a bidirectional encoder) and
  the Euclidean distance between patch coordinates in 2D.
  The bias is the same in every layer: with ``bias_once_per_forward`` (default) the model computes
  it once per forward and gives it to every layer; ``False`` recomputes it in every layer (the same
  numbers; ``benchmarks.bias_sharing`` times what computing it once saves).
  """

  Options = SharedBiasOptions

  def __init__(self, options: Options, *, num_heads: int):
    super().__init__(options)
    if num_heads < 1:
      raise ValueError(f"alibi needs num_heads >= 1; got {num_heads}.")
    self.num_heads = num_heads
    self.bias_shared_by_layers = options.bias_once_per_forward

  def attention_bias(self, geometry, positions, layer):
    self.check(geometry)
    offsets = pair_offsets(positions.astype(jnp.float32))
    squared = jnp.sum(offsets * offsets, axis=-1)  # [B, N, N]
    # sqrt has an infinite slope at 0: keep the gradient w.r.t. positions finite on the diagonal.
    distance = jnp.where(squared > 0, jnp.sqrt(jnp.where(squared > 0, squared, 1.0)), 0.0)
    slopes = jnp.asarray(alibi_slopes(self.num_heads))
    return pad_prefix_bias(-slopes[:, None, None] * distance[:, None], geometry)
