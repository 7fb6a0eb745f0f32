"""Functional relative biases (1D): ``fire`` and ``kerple``, learned functions of the distance.

Both return ``attention_bias(geometry, positions, layer) -> [B or 1, H, T, T]``
float32, zero in the rows and columns of prefix tokens, and take real-valued
positions. Both use the distance ``|i - j|`` on either side of the query, so
the same bias serves a bidirectional encoder and a causal decoder (whose mask
hides the keys after the query anyway).

- ``kerple``: KERPLE's logarithmic kernel (Chi et al. 2022), a per-head
  function of the offset only (translation invariant).
- ``fire``: FIRE (Li et al. 2023), an MLP of the log distance divided by the
  log of the query position (progressive interpolation); it depends on the
  query position as well, through the normaliser, so it is not translation
  invariant once the query passes the learned threshold.

1D only: a 2D geometry is a clear error.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from posenc.encodings.base import Encoding, pad_prefix_bias, pair_offsets
from posenc.encodings.options import SharedBiasOptions, at_least, greater, option
from posenc.encodings.registry import register
from posenc.encodings.relative import layer_params, pair_mlp

FIRE_EPS = 1e-6  # added to FIRE's normaliser (the paper's eps)
# FIRE's MLP activations ([rows, N, hidden] float32) are built in query-row chunks of about
# this many bytes: all at once they are [B, N, N, hidden] (4 GiB at B=32, N=1024, hidden 32).
FIRE_CHUNK_BYTES = 1 << 28
KERPLE_INIT_MIN = 1e-2  # KERPLE's clamp floor, used here for the initial values only


def _positive_int(name: str, option: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"position encoding '{name}': {option} must be a positive int, got {value!r}.")
  return value


def _distance(positions: jax.Array) -> jax.Array:
  """``[B, N, N]`` float32 ``|pos_i - pos_j|`` of ``[B, N, 1]`` positions."""
  return jnp.abs(pair_offsets(positions.astype(jnp.float32))[..., 0])


def _uniform(low: float, high: float):
  def init(key, shape, dtype):
    return jax.random.uniform(key, shape, jnp.float32, low, high).astype(dtype)
  return init


def inverse_softplus(y: jax.Array) -> jax.Array:
  """``x`` with ``softplus(x) = y`` for ``y > 0``."""
  return y + jnp.log(-jnp.expm1(-y))


@dataclasses.dataclass(frozen=True)
class KerpleOptions(SharedBiasOptions):
  per_layer: bool = option(False, "an r1, r2 per layer (else one set shared by the layers)")


@register("kerple")
class Kerple(Encoding):
  """KERPLE-log: ``bias[h, i, j] = -r1_h * log(1 + r2_h * |pos_i - pos_j|)``.

  ``r1, r2 > 0`` per head, kept positive by a softplus: the parameters
  ``raw_r1``, ``raw_r2`` ``(H,)`` (``(num_layers, H)`` with ``per_layer``)
  store ``softplus^-1(r)``. (The paper's code clamps ``r`` at 0.01 after each
  step; a softplus keeps every gradient alive instead.) Init as the paper's
  code: ``r1 ~ U(0, 2)``, ``r2 ~ U(0, 1)``, floored at 0.01. One ``r1, r2``
  per head shared by all layers, as in the paper's GPT-NeoX code (one module
  passed to every layer); ``per_layer=True`` gives each layer its own. The
  paper's causal bias uses ``i - j >= 0``; here ``|i - j|`` on both sides.
  ``bias_once_per_forward`` (with parameters shared by the layers): the model computes the bias once
  per forward and gives it to every layer (default), or, ``False``, recomputes it in every layer: the
  same numbers (``benchmarks.bias_sharing`` times what computing it once saves).
  """

  Options = KerpleOptions
  supported_ndims = (1,)

  def __init__(self, options: KerpleOptions, *, num_heads: int, num_layers: int = 1,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(options)
    _positive_int(self.name, "num_heads", num_heads)
    self.num_layers = _positive_int(self.name, "num_layers", num_layers)
    per_layer = self.per_layer = options.per_layer
    self.bias_shared_by_layers = not self.per_layer and options.bias_once_per_forward
    shape, names = ((num_layers, num_heads), ("layers", "heads")) if per_layer else ((num_heads,), ("heads",))

    def param(high):
      r = jnp.maximum(jax.random.uniform(rngs.params(), shape, jnp.float32, 0.0, high), KERPLE_INIT_MIN)
      return nnx.Param(inverse_softplus(r).astype(param_dtype), out_sharding=names)

    self.raw_r1, self.raw_r2 = param(2.0), param(1.0)

  def coefficients(self, layer) -> tuple[jax.Array, jax.Array]:
    """``(r1, r2)``, each ``(H,)`` float32, of ``layer``."""
    return tuple(jax.nn.softplus(layer_params(p[...], self.per_layer, layer)
                                 .astype(jnp.float32)) for p in (self.raw_r1, self.raw_r2))

  def attention_bias(self, geometry, positions, layer):
    self.check(geometry)
    r1, r2 = (r[:, None, None] for r in self.coefficients(layer))
    bias = -r1 * jnp.log1p(r2 * _distance(positions)[:, None])  # [B, H, N, N]
    return pad_prefix_bias(bias, geometry)


@dataclasses.dataclass(frozen=True)
class FIREOptions(SharedBiasOptions):
  hidden_dim: int = option(32, "width of the MLP", at_least(1))
  init_c: float = option(0.1, "initial c of psi(x) = log(c x + 1)", greater(0))
  init_threshold: float | None = option(None, "initial threshold L", greater(0),
                                        none="a quarter of the built length")
  per_layer: bool = option(True, "an MLP, c and L per layer (else one set shared by the layers)")


@register("fire")
class FIRE(Encoding):
  """FIRE: ``bias[h, i, j] = f(psi(|i - j|) / psi(max(L, i)))_h``, ``i`` the query.

  ``psi(x) = log(|c| x + 1)`` and ``L = |threshold_scale| * threshold_init``, with
  ``c`` and ``threshold_scale`` learned scalars (absolute values keep them
  positive, as the paper's code does); the normaliser gets ``+ 1e-6``. ``f`` is
  an MLP ``1 -> hidden_dim (ReLU) -> H``. Defaults are the paper's reference
  code's: ``hidden_dim=32``, ``init_c=0.1``, MLP initialised like torch's
  ``nn.Linear`` (``U(+-1/sqrt(fan_in))`` for weights and biases), ``L`` starting
  at ``init_threshold`` with ``threshold_scale`` at 1.

  ``init_threshold`` defaults to a quarter of the length the model is built at
  (the reference code's 512 for its 2,048-token pre-training): most training
  queries then sit past ``L``, so training exercises the progressive
  interpolation that lets FIRE extrapolate, and the MLP's input spans [0, 1]
  in training as at any longer length. A threshold above the training length
  would leave the normaliser at the constant ``psi(L)`` for every training
  query and the MLP's input on a sub-range it then leaves at longer lengths.
  Like the reference code's ``init_L`` (a parameter without gradient), the
  value is stored as a parameter, ``threshold_init``, under ``stop_gradient``:
  a checkpoint carries it, so a model rebuilt at another length (evaluation,
  ``init_from``) keeps the trained threshold.

  ``per_layer=True`` (default, the paper's main setting) gives each layer its
  own MLP, ``c`` and ``L``; ``per_layer=False`` shares one set across layers
  (the paper's layer-shared ablation). Parameters: ``w1 (1, W)``, ``b1 (W,)``,
  ``w2 (W, H)``, ``b2 (H,)``, ``c ()``, ``threshold_scale ()``,
  ``threshold_init ()``, each with a leading ``num_layers`` axis when
  ``per_layer``: ``2W + W*H + H + 3`` per set.
  ``bias_once_per_forward`` (with parameters shared by the layers): the model computes the bias once
  per forward and gives it to every layer (default), or, ``False``, recomputes it in every layer: the
  same numbers (``benchmarks.bias_sharing`` times what computing it once saves).

  Keys after the query (``j > i``) use the distance ``|i - j|`` with the same
  query normaliser (the paper's code takes ``|c (i - j)|``), so for a
  bidirectional encoder the bias is symmetric in the offset up to the
  normaliser. The bias depends on the query position only through
  ``max(L, i)``: it is translation invariant while every query position
  stays below ``L``.
  """

  Options = FIREOptions
  supported_ndims = (1,)

  def __init__(self, options: FIREOptions, *, num_heads: int, geometry=None, num_layers: int = 1,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(options)
    _positive_int(self.name, "num_heads", num_heads)
    self.num_layers = _positive_int(self.name, "num_layers", num_layers)
    hidden_dim, init_c, init_threshold = options.hidden_dim, options.init_c, options.init_threshold
    if geometry is not None:
      self.check(geometry)  # 1D only: a clear error before the default below reads its length
    if init_threshold is None:
      if geometry is None:
        raise ValueError(f"position encoding '{self.name}': give init_threshold, or build it at a 1D "
                         f"geometry (its default is a quarter of the built length).")
      init_threshold = max(1.0, geometry.shape[0] / 4)
    per_layer = self.per_layer = options.per_layer
    self.bias_shared_by_layers = not self.per_layer and options.bias_once_per_forward
    lead, lead_name = ((num_layers,), ("layers",)) if per_layer else ((), ())

    def param(shape, names, init):
      return nnx.Param(init(rngs.params(), (*lead, *shape), param_dtype),
                       out_sharding=(*lead_name, *names))

    bound = 1.0 / math.sqrt(hidden_dim)
    self.w1 = param((1, hidden_dim), (None, "mlp"), _uniform(-1.0, 1.0))  # fan_in 1
    self.b1 = param((hidden_dim,), ("mlp",), _uniform(-1.0, 1.0))
    self.w2 = param((hidden_dim, num_heads), ("mlp", "heads"), _uniform(-bound, bound))
    self.b2 = param((num_heads,), ("heads",), _uniform(-bound, bound))
    self.c = param((), (), nnx.initializers.constant(init_c))
    self.threshold_scale = param((), (), nnx.initializers.constant(1.0))
    self.threshold_init = param((), (), nnx.initializers.constant(init_threshold))

  def threshold(self, layer) -> jax.Array:
    """``L = |threshold_scale| * threshold_init`` of ``layer``, float32."""
    scale, base = (layer_params(p[...], self.per_layer, layer).astype(jnp.float32)
                   for p in (self.threshold_scale, self.threshold_init))
    return jnp.abs(scale) * jax.lax.stop_gradient(base)

  def normalized_distance(self, positions, layer) -> jax.Array:
    """``psi(|i - j|) / psi(max(L, i))``, ``[B, N, N]`` float32: the MLP's input."""
    c = jnp.abs(layer_params(self.c[...], self.per_layer, layer).astype(jnp.float32))
    query = positions[..., 0].astype(jnp.float32)  # [B, N]
    # log1p, not log(c x + 1): a multiply-add XLA may fuse or not gives other bits per program.
    normaliser = jnp.log1p(c * jnp.maximum(query, self.threshold(layer))) + FIRE_EPS
    return jnp.log1p(c * _distance(positions)) / normaliser[:, :, None]

  def attention_bias(self, geometry, positions, layer):
    self.check(geometry)
    w1, b1, w2, b2 = (layer_params(p[...], self.per_layer, layer).astype(jnp.float32)
                      for p in (self.w1, self.b1, self.w2, self.b2))
    x = self.normalized_distance(positions, layer)  # [B, N, N]

    def mlp(rows):  # [..., N] -> [..., N, H]
      return pair_mlp(rows[..., None], w1, b1, w2) + b2

    b, n, _ = x.shape
    row_bytes = n * w1.shape[-1] * 4
    if b * n * row_bytes <= FIRE_CHUNK_BYTES:
      bias = mlp(x)  # [B, N, N, H]
    else:  # query rows in chunks, recomputed for the backward pass: memory of one chunk
      chunk = max(1, FIRE_CHUNK_BYTES // row_bytes)
      bias = jax.lax.map(jax.checkpoint(mlp), x.reshape(b * n, n), batch_size=chunk).reshape(b, n, n, -1)
    return pad_prefix_bias(jnp.moveaxis(bias, -1, 1), geometry)
