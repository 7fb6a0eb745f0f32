"""Transformer layers that call every position hook (the stack of them: ``posenc.models.block_stack``).

Parameters carry logical axis names (``embed``, ``mlp``, ``heads``, ``kv``,
``layers``) in their ``out_sharding`` metadata; ``posenc.training.sharding``
maps them to a mesh by the config's rules. ``dtype`` is the compute dtype,
``param_dtype`` the storage dtype; attention logits and softmax are always float32.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from posenc.encodings.base import ContentInputs, Encoding, Geometry
from posenc.models.kernels import apply_dropout, attend, dense, resolve_attention_impl

Initializer = Callable[..., jax.Array]


def param(init: Initializer, rngs: nnx.Rngs, shape: tuple[int, ...], dtype, names: tuple) -> nnx.Param:
  """An ``nnx.Param`` initialised by ``init`` whose axes carry logical ``names``."""
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names)


def layer_norm(dim: int, eps: float, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm over ``embed``; statistics in float32 (one fused pass: var = E[x^2] - E[x]^2)."""
  names = {"out_sharding": ("embed",)}
  return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=True,
                       scale_metadata=names, bias_metadata=names, rngs=rngs)


def attention_mask(padding_mask: jax.Array | None, packing_ids: jax.Array | None, *,
                   causal: bool = False, length: int | None = None) -> jax.Array | None:
  """``[B or 1, L or 1, L]`` bool (True = query may attend to key), or None when nothing is masked.

  ``padding_mask [B, L]`` (True = real token) hides padded keys; ``packing_ids [B, L]``
  confines each token to the tokens of its own packed sequence; ``causal`` hides
  every later token (``length`` is L when neither array is given).
  """
  mask = None if padding_mask is None else padding_mask.astype(bool)[:, None, :]
  if packing_ids is not None:
    same = packing_ids[:, :, None] == packing_ids[:, None, :]
    mask = same if mask is None else mask & same
  if causal:
    given = [a.shape[1] for a in (padding_mask, packing_ids) if a is not None]
    if length is None and not given:
      raise ValueError("a causal attention_mask needs length= when no padding_mask or packing_ids is given.")
    n = given[0] if length is None else length
    order = jnp.tril(jnp.ones((n, n), bool))[None]
    mask = order if mask is None else mask & order
  return mask


def causal_cache_mask(start, num_queries: int, cache_len: int) -> jax.Array:
  """``[1, T, S]``: query ``i`` (cache slot ``start + i``) may see slots ``0..start + i``."""
  return (jnp.arange(cache_len)[None, :] <= start + jnp.arange(num_queries)[:, None])[None]


def rotate(encoding: Encoding, q: jax.Array, k: jax.Array, geometry: Geometry, positions: jax.Array, layer,
           length=None, max_length: int | None = None) -> tuple[jax.Array, jax.Array]:
  """``encoding.rotate``, told the ``length`` of the sequence (at most the static ``max_length``) when
  its frequencies depend on it (``length_dependent``: rope's ``ntk``, ``longrope``, ``yarn`` without
  ``factor``)."""
  if length is None or not getattr(encoding, "length_dependent", False):
    return encoding.rotate(q, k, geometry, positions, layer)
  return encoding.rotate(q, k, geometry, positions, layer, length=length, max_length=max_length)


def apply_drop_path(x: jax.Array, keep, key: jax.Array | None) -> jax.Array:
  """Stochastic depth: keep a whole residual branch per example with probability ``keep`` (may be
  traced), scaled by ``1 / keep``; the identity when ``key`` is None."""
  if key is None:
    return x
  kept = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(kept, x / jnp.asarray(keep, x.dtype), 0).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """What every block of a model is built from (hashable: blocks keep it as static data).

  Initialisers as numbers: kernels N(0, ``init_std``^2), or Glorot-uniform (over fan-in and
  fan-out) where None; biases N(0, ``bias_std``^2), zeros where 0; the two projections that write
  into the residual stream (attention output, second MLP layer) N(0, ``residual_std``^2), or as
  the other kernels where None (GPT-2 scales theirs by 1/sqrt(2 depth)). ``drop_path`` is the
  last block's stochastic-depth rate; it grows linearly from 0 at the first (DeiT / timm).
  """

  dim: int
  num_heads: int
  mlp_dim: int
  num_layers: int
  pre_ln: bool = True
  ln_eps: float = 1e-6
  gelu_approximate: bool = True
  init_std: float | None = None
  bias_std: float = 0.0
  residual_std: float | None = None
  dropout: float = 0.0
  attention_dropout: float = 0.0
  drop_path: float = 0.0
  attention_impl: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if self.dim % self.num_heads:
      raise ValueError(f"width {self.dim} is not divisible by num_heads {self.num_heads}; pick a width "
                       f"that is a multiple of num_heads.")
    for name in ("dropout", "attention_dropout", "drop_path"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}.")
    resolve_attention_impl(self.attention_impl)  # a clear error for an unknown name

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  def kernel_init(self, default, residual: bool = False):
    """The init of a kernel; ``default`` where the config names none."""
    std = self.residual_std if residual and self.residual_std is not None else self.init_std
    return default if std is None else jax.nn.initializers.normal(std)

  def bias_init(self):
    return jax.nn.initializers.normal(self.bias_std) if self.bias_std else jax.nn.initializers.zeros

  def path_keep(self, layer) -> jax.Array:
    """The probability that block ``layer`` (int32, may be traced) keeps its residual branches."""
    rates = self.drop_path * np.arange(self.num_layers) / max(self.num_layers - 1, 1)
    return jnp.asarray((1.0 - rates).astype(np.float32))[layer]


class Attention(nnx.Module):
  """Multi-head self-attention with one fused q/k/v projection and the position hooks.

  The query scale ``1/sqrt(head_dim)`` is folded into the query weights at
  compute time (a ``[D, D]`` multiply instead of a ``[B, H, T, T]`` one). The
  encoding's ``rotate`` therefore sees a scaled query; rotations are linear, so
  this changes nothing. How the scores are computed (``config.attention_impl``)
  is ``posenc.models.kernels.attend``'s business.
  """

  def __init__(self, config: BlockConfig, *, rngs: nnx.Rngs):
    c = config
    self.config, self.num_heads, self.head_dim = c, c.num_heads, c.head_dim
    # Kernels [in, heads, 3 (q/k/v), head_dim] and [heads, head_dim, out]: heads lead the flattened
    # output / input axis, so a "heads"-sharded kernel stays sharded when dense() flattens it.
    qkv_init = c.kernel_init(jax.nn.initializers.variance_scaling(
        1.0, "fan_avg", "uniform", in_axis=0, out_axis=(1, 3), batch_axis=(2,)))
    self.qkv = param(qkv_init, rngs, (c.dim, c.num_heads, 3, c.head_dim), c.param_dtype,
                     ("embed", "heads", None, "kv"))
    self.qkv_bias = param(c.bias_init(), rngs, (c.num_heads, 3, c.head_dim), c.param_dtype, ("heads", None, "kv"))
    out_init = c.kernel_init(jax.nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1),
                                                                  out_axis=2), residual=True)
    self.out = param(out_init, rngs, (c.num_heads, c.head_dim, c.dim), c.param_dtype, ("heads", "kv", "embed"))
    self.out_bias = param(c.bias_init(), rngs, (c.dim,), c.param_dtype, ("embed",))

  def _qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``x [B, T, D]`` -> q (scaled), k, v, each ``[B, T, H, Dh]``."""
    dt = self.config.dtype
    scale = jnp.array([self.head_dim ** -0.5, 1.0, 1.0], dt)[:, None]
    w = self.qkv[...].astype(dt) * scale
    b = self.qkv_bias[...].astype(dt) * scale
    qkv = dense(x.astype(dt), w, b)  # [B, T, H, 3, Dh]
    return qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]

  def _attend(self, q, k, v, bias, mask, key) -> jax.Array:
    c = self.config
    out = attend(q, k, v, bias, mask, impl=c.attention_impl, dtype=c.dtype, dropout=c.attention_dropout, key=key)
    return dense(out, self.out[...].astype(c.dtype), self.out_bias[...].astype(c.dtype), in_dims=2)

  def __call__(self, x: jax.Array, encoding: Encoding, geometry: Geometry, positions: jax.Array, layer,
               mask: jax.Array | None, key: jax.Array | None = None, shared_bias: jax.Array | None = None,
               length=None):
    """``x [B, T, D]``; ``positions [B or 1, N, ndim]``; ``layer`` int32; ``mask`` broadcastable to
    ``[B, T, T]`` (True = may attend) or None; ``shared_bias``: this layer's bias, computed once for
    all layers; ``length``: the sequence's length for a length-dependent ``rotate`` (default: the
    geometry's)."""
    q, k, v = self._qkv(x)
    q, k = rotate(encoding, q, k, geometry, positions, layer, length, geometry.num_positions)
    bias = encoding.attention_bias(geometry, positions, layer) if shared_bias is None else shared_bias
    content, _ = encoding.content_bias(ContentInputs(x, q, k, mask, 0, None), geometry, positions, layer)
    return self._attend(q, k, v, add_biases(bias, content), mask, key)

  def decode(self, x: jax.Array, encoding: Encoding, geometry: Geometry, positions: jax.Array, layer,
             cache: "LayerCache") -> tuple[jax.Array, tuple]:
    """Causal attention of ``T`` new tokens ``x [B, T, D]`` (at ``positions``, geometry ``(T,)``)
    over a cache of ``S`` slots; returns the output and the updated ``(k, v, state)`` of this layer
    (``state``: what ``content_bias`` keeps per layer, e.g. forget gates).

    The new k/v are rotated with the new positions (and, for a length-dependent ``rotate``, the
    sequence's length ``cache.length``), then written at ``cache.start``.
    ``attention_bias`` is called with the positions of all ``S`` slots and its rows
    of the new queries are kept: O(S^2) per call and layer, for any bias hook.
    """
    q, k, v = self._qkv(x)
    q, k = rotate(encoding, q, k, geometry, positions, layer, cache.length, cache.k.shape[1])
    k_cache = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), cache.start, axis=1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), cache.start, axis=1)
    num_slots, num_new = k_cache.shape[1], x.shape[1]
    bias = encoding.attention_bias(Geometry.seq(num_slots), cache.positions, layer)  # [., H, S, S]
    if bias is not None:
      bias = jax.lax.dynamic_slice_in_dim(bias, cache.start, num_new, axis=2)
    mask = causal_cache_mask(cache.start, num_new, num_slots)
    dt = self.config.dtype
    k_all = k_cache.astype(dt)
    content, state = encoding.content_bias(ContentInputs(x, q, k_all, mask, cache.start, cache.state), geometry,
                                           positions, layer)
    out = self._attend(q, k_all, v_cache.astype(dt), add_biases(bias, content), mask, None)
    return out, (k_cache, v_cache, state)


class LayerCache(NamedTuple):
  """One layer's view of a KV cache: ``k``/``v`` ``[B, S, H, Dh]`` (k already rotated),
  the positions of all ``S`` slots ``[B or 1, S, ndim]`` (new ones included),
  ``start``, the slot of the first new token, ``length``, the tokens of the sequence
  once the new ones are in (int32 scalars), and the encoding's ``content_bias`` state."""

  k: jax.Array
  v: jax.Array
  positions: jax.Array
  start: jax.Array
  length: jax.Array
  state: Any = None


def add_biases(a: jax.Array | None, b: jax.Array | None) -> jax.Array | None:
  """``a + b`` where either may be None (absent)."""
  return b if a is None else a if b is None else a + b


class Mlp(nnx.Module):
  """Dense -> GELU -> Dense (GELU exact/erf or tanh-approximate, ``config.gelu_approximate``)."""

  def __init__(self, config: BlockConfig, *, rngs: nnx.Rngs):
    c = config
    init = c.kernel_init(jax.nn.initializers.xavier_uniform())
    self.fc1 = param(init, rngs, (c.dim, c.mlp_dim), c.param_dtype, ("embed", "mlp"))
    self.fc1_bias = param(c.bias_init(), rngs, (c.mlp_dim,), c.param_dtype, ("mlp",))
    self.fc2 = param(c.kernel_init(init, residual=True), rngs, (c.mlp_dim, c.dim), c.param_dtype, ("mlp", "embed"))
    self.fc2_bias = param(c.bias_init(), rngs, (c.dim,), c.param_dtype, ("embed",))
    self.config = c

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.config.dtype
    h = dense(x.astype(dt), self.fc1[...].astype(dt), self.fc1_bias[...].astype(dt))
    h = jax.nn.gelu(h, approximate=self.config.gelu_approximate)
    return dense(h, self.fc2[...].astype(dt), self.fc2_bias[...].astype(dt))


class Block(nnx.Module):
  """Attention + MLP with residuals; pre-LN (ViT, GPT) or post-LN (original BERT), by ``config``."""

  def __init__(self, config: BlockConfig, *, rngs: nnx.Rngs):
    c = config
    self.attn = Attention(c, rngs=rngs)
    self.mlp = Mlp(c, rngs=rngs)
    self.ln1 = layer_norm(c.dim, c.ln_eps, c.dtype, c.param_dtype, rngs)
    self.ln2 = layer_norm(c.dim, c.ln_eps, c.dtype, c.param_dtype, rngs)
    self.config = c

  def __call__(self, x: jax.Array, encoding: Encoding, geometry: Geometry, positions, layer, mask, key,
               shared_bias=None, length=None):
    attend_ = lambda y, k: self.attn(y, encoding, geometry, positions, layer, mask, k, shared_bias, length)
    return self._residuals(x, attend_, encoding, geometry, positions, layer, key)

  def decode(self, x: jax.Array, encoding: Encoding, geometry: Geometry, positions, layer,
             cache: LayerCache) -> tuple[jax.Array, tuple]:
    """New tokens ``x`` through the block with a KV cache (inference: no dropout)."""
    updated = []

    def attend_(y, _):
      out, kv = self.attn.decode(y, encoding, geometry, positions, layer, cache)
      updated.append(kv)
      return out

    x = self._residuals(x, attend_, encoding, geometry, positions, layer, None)
    return x, updated[0]

  def _residuals(self, x, attend_, encoding: Encoding, geometry: Geometry, positions, layer, key):
    c = self.config
    keys = [None] * 5 if key is None else list(jax.random.split(key, 5))
    path_keys = keys[3:] if c.drop_path else [None, None]
    keep = c.path_keep(layer) if c.drop_path and key is not None else 1.0

    def branch(y, k_drop, k_path):
      return apply_drop_path(apply_dropout(y, c.dropout, k_drop), keep, k_path)

    if c.pre_ln:
      x = x + branch(attend_(self.ln1(x), keys[0]), keys[1], path_keys[0])
      x = x + branch(self.mlp(self.ln2(x)), keys[2], path_keys[1])
    else:
      x = self.ln1(x + branch(attend_(x, keys[0]), keys[1], path_keys[0]))
      x = self.ln2(x + branch(self.mlp(x), keys[2], path_keys[1]))
    return encoding.after_block(x, geometry, positions, layer)
