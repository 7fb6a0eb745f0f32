"""Transformer layers that call every position hook (the stack of them: ``posenc.models.block_stack``).

Parameters carry logical axis names (``embed``, ``mlp``, ``heads``, ``kv``,
``layers``) in their ``out_sharding`` metadata; ``posenc.training.sharding``
maps them to a mesh by the config's rules. ``dtype`` is the compute dtype,
``param_dtype`` the storage dtype; attention logits and softmax are always float32.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from posenc.encodings.base import Encoding, Geometry

Initializer = Callable[..., jax.Array]
# Where a mask is False the logit becomes this; exp() of it (after the row max is
# subtracted) is exactly 0 in float32, so masked keys get exactly zero weight.
MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)


def param(init: Initializer, rngs: nnx.Rngs, shape: tuple[int, ...], dtype, names: tuple) -> nnx.Param:
  """An ``nnx.Param`` initialised by ``init`` whose axes carry logical ``names``."""
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names)


def layer_norm(dim: int, eps: float, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm over ``embed``; statistics in float32 (one fused pass: var = E[x^2] - E[x]^2)."""
  names = {"out_sharding": ("embed",)}
  return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=True,
                       scale_metadata=names, bias_metadata=names, rngs=rngs)


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *, in_dims: int = 1) -> jax.Array:
  """Contract the last ``in_dims`` axes of ``x`` with the first ones of ``kernel`` as ONE 2D matmul.

  XLA:CPU runs dots on 3D operands (and their gradients) more slowly than the
  same dot on operands flattened to 2D (benchmarks/speed.py); reshapes of
  contiguous arrays are free.
  """
  lead, k_in, k_out = x.shape[:x.ndim - in_dims], kernel.shape[:in_dims], kernel.shape[in_dims:]
  y = x.reshape(-1, math.prod(k_in)) @ kernel.reshape(math.prod(k_in), -1)
  if bias is not None:
    y = y + bias.reshape(-1)
  return y.reshape(*lead, *k_out)


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


def apply_dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; the identity when ``key`` is None (evaluation) or ``rate`` is 0."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def apply_drop_path(x: jax.Array, rate, key: jax.Array | None) -> jax.Array:
  """Stochastic depth: drop a whole residual branch per example. ``rate`` may be traced."""
  if key is None:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


ATTENTION_IMPLS = ("auto", "xla", "per_head", "dot_product_attention")


def resolve_attention_impl(impl: str, backend: str | None = None) -> str:
  """``"auto"`` -> the implementation for ``backend`` (default: JAX's): per-head on CPU (the
  fastest measured there, benchmarks/speed.py), ``jax.nn.dot_product_attention`` elsewhere
  (cuDNN's fused kernel on GPUs where it applies: ``fused_kernel``; XLA's on TPU)."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl {impl!r} is unknown; choose one of {ATTENTION_IMPLS}.")
  if impl != "auto":
    return impl
  return "per_head" if (backend or jax.default_backend()) == "cpu" else "dot_product_attention"


def fused_kernel(dtype, head_dim: int, backend: str | None = None) -> str:
  """The ``implementation`` that ``dot_product_attention`` hands to ``jax.nn.dot_product_attention``:
  ``"cudnn"`` on a GPU for 16-bit inputs with a head dimension that cuDNN's flash attention takes
  (a multiple of 8, at most 128), else ``"xla"``. Chosen here, at trace time, because JAX's own
  default (``implementation=None``) runs XLA's unfused attention on every backend."""
  if (backend or jax.default_backend()) != "gpu":
    return "xla"
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16) or head_dim % 8 or head_dim > 128:
    return "xla"
  return "cudnn"


def _pad_axis(x: jax.Array, axis: int, extra: int, full: int, **kwargs) -> jax.Array:
  """``x`` with ``extra`` more entries at the end of ``axis``, where that axis is ``full`` long
  (a broadcast axis of size 1 stays as it is)."""
  if not extra or x.shape[axis] != full:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, **kwargs)


def dot_product_attention(q, k, v, bias, mask, dtype) -> jax.Array:
  """``jax.nn.dot_product_attention`` with the kernel of ``fused_kernel``; queries already scaled.

  cuDNN takes the mask and bias as one additive bias (and returns its gradient). Its flash kernel
  trains a bias only on even lengths, so odd ones (a ViT's 196 patches + the class token) are
  padded by one masked key and one discarded query. Where cuDNN's own checks still refuse the
  inputs, XLA's kernel runs."""
  bias = None if bias is None else bias.astype(jnp.float32 if dtype == jnp.float32 else dtype)
  mask = None if mask is None else mask[:, None]  # [B or 1, 1, T or 1, S]
  if fused_kernel(dtype, q.shape[-1]) == "cudnn":
    t, s = q.shape[1], k.shape[1]
    pt, ps = t % 2, s % 2
    qp, kp, vp, bp, mp = q, k, v, bias, mask
    if pt or ps:
      qp, kp, vp = _pad_axis(q, 1, pt, t), _pad_axis(k, 1, ps, s), _pad_axis(v, 1, ps, s)
      bp = None if bias is None else _pad_axis(_pad_axis(bias, 2, pt, t), 3, ps, s)
      keys = jnp.arange(s + ps) < s  # the padded key is masked out
      mp = keys[None, None, None] if mask is None else \
          _pad_axis(_pad_axis(mask, 2, pt, t, mode="edge"), 3, ps, s, mode="edge") & keys
    if mp is not None:  # cuDNN broadcasts a bias over batch and heads only
      mp = jnp.broadcast_to(mp, mp.shape[:2] + (t + pt, s + ps))
    try:
      out = jax.nn.dot_product_attention(qp, kp, vp, bias=bp, mask=mp, scale=1.0, implementation="cudnn")
      return out[:, :t]
    except (NotImplementedError, ValueError, RuntimeError):
      pass
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=1.0, implementation="xla")


class Attention(nnx.Module):
  """Multi-head self-attention with one fused q/k/v projection and the position hooks.

  The query scale ``1/sqrt(head_dim)`` is folded into the query weights at
  compute time (a ``[D, D]`` multiply instead of a ``[B, H, T, T]`` one). The
  encoding's ``rotate`` therefore sees a scaled query; rotations are linear, so
  this changes nothing. ``attention_impl`` (``resolve_attention_impl``) chooses how
  scores are computed, all with float32 logits and the same result:
  ``"per_head"`` attends one head at a time (on CPU, per-head ``[B, T, T]``
  matmuls and softmaxes beat one batched einsum, whose operands XLA must
  transpose); ``"xla"`` is one batched einsum over heads;
  ``"dot_product_attention"`` is ``jax.nn.dot_product_attention`` with the
  encoding's bias and the mask passed to the (on GPU, fused) kernel. Attention
  dropout in training is applied by the einsum paths (the fused kernel has none).
  ``out_init``: the output projection's kernel init (default: ``kernel_init``'s).
  """

  def __init__(self, dim: int, num_heads: int, *, kernel_init: Initializer, bias_init: Initializer,
               dtype, param_dtype, rngs: nnx.Rngs, attention_dropout: float = 0.0,
               attention_impl: str = "auto", out_init: Initializer | None = None):
    if dim % num_heads:
      raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}; pick a width that is "
                       f"a multiple of num_heads.")
    head_dim = dim // num_heads
    self.num_heads, self.head_dim = num_heads, head_dim
    self.dtype, self.attention_dropout = dtype, attention_dropout
    self.attention_impl = resolve_attention_impl(attention_impl)
    # Kernels [in, heads, 3 (q/k/v), head_dim] and [heads, head_dim, out]: heads lead the flattened
    # output / input axis, so a "heads"-sharded kernel stays sharded when dense() flattens it.
    qkv_init = jax.nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=0, out_axis=(1, 3),
                                                    batch_axis=(2,)) if kernel_init is None else kernel_init
    self.qkv = param(qkv_init, rngs, (dim, num_heads, 3, head_dim), param_dtype, ("embed", "heads", None, "kv"))
    self.qkv_bias = param(bias_init, rngs, (num_heads, 3, head_dim), param_dtype, ("heads", None, "kv"))
    out_init = out_init or kernel_init or jax.nn.initializers.variance_scaling(
        1.0, "fan_avg", "uniform", in_axis=(0, 1), out_axis=2)
    self.out = param(out_init, rngs, (num_heads, head_dim, dim), param_dtype, ("heads", "kv", "embed"))
    self.out_bias = param(bias_init, rngs, (dim,), param_dtype, ("embed",))

  def _qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``x [B, T, D]`` -> q (scaled), k, v, each ``[B, T, H, Dh]``."""
    dt = self.dtype
    scale = jnp.array([self.head_dim ** -0.5, 1.0, 1.0], dt)[:, None]
    w = self.qkv[...].astype(dt) * scale
    b = self.qkv_bias[...].astype(dt) * scale
    qkv = dense(x.astype(dt), w, b)  # [B, T, H, 3, Dh]
    return qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]

  def _attend(self, q, k, v, bias, mask, key) -> jax.Array:
    """Queries ``[B, T, H, Dh]`` over keys/values ``[B, S, H, Dh]``; ``bias [B or 1, H, T, S]``;
    ``mask`` broadcastable to ``[B, T, S]``."""
    dt, impl = self.dtype, self.attention_impl
    if impl == "dot_product_attention" and (key is None or not self.attention_dropout):
      out = dot_product_attention(q, k, v, bias, mask, dt)
      return dense(out, self.out[...].astype(dt), self.out_bias[...].astype(dt), in_dims=2)
    if impl != "per_head":  # one batched einsum over heads (also the dropout path of the fused kernel)
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
      if bias is not None:
        logits = logits + bias.astype(jnp.float32)
      if mask is not None:
        logits = jnp.where(mask[:, None], logits, MASKED_LOGIT)
      probs = jax.nn.softmax(logits, axis=-1).astype(dt)
      if key is not None:
        probs = apply_dropout(probs, self.attention_dropout, key)
      out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
      return dense(out, self.out[...].astype(dt), self.out_bias[...].astype(dt), in_dims=2)
    heads = []
    for h in range(self.num_heads):
      logits = jnp.einsum("bqk,btk->bqt", q[:, :, h], k[:, :, h], preferred_element_type=jnp.float32)
      if bias is not None:
        logits = logits + bias[:, h].astype(jnp.float32)
      if mask is not None:
        logits = jnp.where(mask, logits, MASKED_LOGIT)
      probs = jax.nn.softmax(logits, axis=-1).astype(dt)
      if key is not None:
        probs = apply_dropout(probs, self.attention_dropout, jax.random.fold_in(key, h))
      heads.append(jnp.einsum("bqt,btk->bqk", probs, v[:, :, h]))
    out = jnp.stack(heads, axis=2)
    return dense(out, self.out[...].astype(dt), self.out_bias[...].astype(dt), in_dims=2)

  def __call__(self, x: jax.Array, encoding: Encoding, geometry: Geometry, positions: jax.Array, layer,
               mask: jax.Array | None, key: jax.Array | None = None, shared_bias: jax.Array | None = None,
               length=None):
    """``x [B, T, D]``; ``positions [B or 1, N, ndim]``; ``mask`` broadcastable to ``[B, T, T]``
    (True = may attend) or None; ``shared_bias``: this layer's bias, computed once for all layers;
    ``length``: the sequence's length for a length-dependent ``rotate`` (default: the geometry's)."""
    q, k, v = self._qkv(x)
    q, k = rotate(encoding, q, k, geometry, positions, layer, length, geometry.num_positions)
    bias = encoding.attention_bias(geometry, positions, layer) if shared_bias is None else shared_bias
    return self._attend(q, k, v, bias, mask, key)

  def decode(self, x: jax.Array, encoding: Encoding, geometry: Geometry, positions: jax.Array, layer,
             cache: "LayerCache") -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Causal attention of ``T`` new tokens ``x [B, T, D]`` (at ``positions``, geometry ``(T,)``)
    over a cache of ``S`` slots; returns the output and the updated ``(k, v)`` of this layer.

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
    return self._attend(q, k_cache.astype(self.dtype), v_cache.astype(self.dtype), bias, mask, None), (
        k_cache, v_cache)


class LayerCache(NamedTuple):
  """One layer's view of a KV cache: ``k``/``v`` ``[B, S, H, Dh]`` (k already rotated),
  the positions of all ``S`` slots ``[B or 1, S, ndim]`` (new ones included),
  ``start``, the slot of the first new token, and ``length``, the tokens of the sequence
  once the new ones are in (int32 scalars)."""

  k: jax.Array
  v: jax.Array
  positions: jax.Array
  start: jax.Array
  length: jax.Array


class Mlp(nnx.Module):
  """Dense -> GELU -> Dense (GELU exact/erf or tanh-approximate). ``out_init``: the second
  layer's kernel init (default: ``kernel_init``)."""

  def __init__(self, dim: int, mlp_dim: int, *, kernel_init: Initializer, bias_init: Initializer,
               gelu_approximate: bool, dtype, param_dtype, rngs: nnx.Rngs, out_init: Initializer | None = None):
    init = jax.nn.initializers.xavier_uniform() if kernel_init is None else kernel_init
    self.fc1 = param(init, rngs, (dim, mlp_dim), param_dtype, ("embed", "mlp"))
    self.fc1_bias = param(bias_init, rngs, (mlp_dim,), param_dtype, ("mlp",))
    self.fc2 = param(out_init or init, rngs, (mlp_dim, dim), param_dtype, ("mlp", "embed"))
    self.fc2_bias = param(bias_init, rngs, (dim,), param_dtype, ("embed",))
    self.dtype, self.gelu_approximate = dtype, gelu_approximate

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.dtype
    h = dense(x.astype(dt), self.fc1[...].astype(dt), self.fc1_bias[...].astype(dt))
    h = jax.nn.gelu(h, approximate=self.gelu_approximate)
    return dense(h, self.fc2[...].astype(dt), self.fc2_bias[...].astype(dt))


class Block(nnx.Module):
  """Attention + MLP with residuals; pre-LN (ViT) or post-LN (original BERT). ``residual_init``: the
  kernel init of the two projections that write into the residual stream (the attention output and
  the MLP's second layer; GPT-2 scales theirs by 1/sqrt(2 depth)); default ``kernel_init``'s."""

  def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, pre_ln: bool, ln_eps: float,
               gelu_approximate: bool, kernel_init: Initializer | None, bias_init: Initializer,
               dropout: float, attention_dropout: float, drop_path: float, num_layers: int,
               dtype, param_dtype, rngs: nnx.Rngs, attention_impl: str = "auto",
               residual_init: Initializer | None = None):
    self.attn = Attention(dim, num_heads, kernel_init=kernel_init, bias_init=bias_init, dtype=dtype,
                          param_dtype=param_dtype, attention_dropout=attention_dropout,
                          attention_impl=attention_impl, rngs=rngs, out_init=residual_init)
    self.mlp = Mlp(dim, mlp_dim, kernel_init=kernel_init, bias_init=bias_init,
                   gelu_approximate=gelu_approximate, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                   out_init=residual_init)
    self.ln1 = layer_norm(dim, ln_eps, dtype, param_dtype, rngs)
    self.ln2 = layer_norm(dim, ln_eps, dtype, param_dtype, rngs)
    self.pre_ln, self.dropout, self.drop_path = pre_ln, dropout, drop_path
    self.num_layers = num_layers

  def __call__(self, x: jax.Array, encoding: Encoding, geometry: Geometry, positions, layer, mask, key,
               shared_bias=None, length=None):
    attend = lambda y, k: self.attn(y, encoding, geometry, positions, layer, mask, k, shared_bias, length)
    return self._residuals(x, attend, encoding, geometry, positions, layer, key)

  def decode(self, x: jax.Array, encoding: Encoding, geometry: Geometry, positions, layer,
             cache: LayerCache) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """New tokens ``x`` through the block with a KV cache (inference: no dropout)."""
    updated = []

    def attend(y, _):
      out, kv = self.attn.decode(y, encoding, geometry, positions, layer, cache)
      updated.append(kv)
      return out

    x = self._residuals(x, attend, encoding, geometry, positions, layer, None)
    return x, updated[0]

  def _residuals(self, x, attend, encoding: Encoding, geometry: Geometry, positions, layer, key):
    keys = [None] * 5 if key is None else list(jax.random.split(key, 5))
    # Stochastic depth grows linearly with depth, 0 at the first block (as in DeiT / timm).
    path_rate = self.drop_path * layer / max(self.num_layers - 1, 1)
    path_keys = keys[3:] if self.drop_path else [None, None]

    def branch(y, k_drop, k_path):
      return apply_drop_path(apply_dropout(y, self.dropout, k_drop), path_rate, k_path)

    if self.pre_ln:
      x = x + branch(attend(self.ln1(x), keys[0]), keys[1], path_keys[0])
      x = x + branch(self.mlp(self.ln2(x)), keys[2], path_keys[1])
    else:
      x = self.ln1(x + branch(attend(x, keys[0]), keys[1], path_keys[0]))
      x = self.ln2(x + branch(self.mlp(x), keys[2], path_keys[1]))
    return encoding.after_block(x, geometry, positions, layer)
