"""Backend-specific kernels behind one interface; the model code above them is plain.

    y = dense(x, kernel, bias, in_dims=2)                       # one 2D matmul
    out = attend(q, k, v, bias, mask, impl="auto", dtype=dt)    # per head, einsum or fused
    carry, ys = iterate_layers(body, stacked_blocks, carry, xs, scan=None)

Each choice that depends on the backend is made here, at trace time: how attention
runs (``resolve_attention_impl``, ``fused_kernel``), whether the layers are scanned or
unrolled (``resolve_scan_layers``), and the hand-written gradients that make XLA:CPU
fast (``unstack_layers``). Which is fastest where: benchmarks/speed.py.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

# Where a mask is False the logit becomes this; exp() of it (after the row max is
# subtracted) is exactly 0 in float32, so masked keys get exactly zero weight.
MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)
ATTENTION_IMPLS = ("auto", "xla", "per_head", "dot_product_attention")


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *, in_dims: int = 1) -> jax.Array:
  """Contract the last ``in_dims`` axes of ``x`` with the first ones of ``kernel`` as ONE 2D matmul.

  XLA:CPU runs dots on 3D operands (and their gradients) more slowly than the
  same dot on operands flattened to 2D; reshapes of contiguous arrays are free.
  """
  lead, k_in, k_out = x.shape[:x.ndim - in_dims], kernel.shape[:in_dims], kernel.shape[in_dims:]
  y = x.reshape(-1, math.prod(k_in)) @ kernel.reshape(math.prod(k_in), -1)
  if bias is not None:
    y = y + bias.reshape(-1)
  return y.reshape(*lead, *k_out)


def apply_dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; the identity when ``key`` is None (evaluation) or ``rate`` is 0."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


# --- attention -----------------------------------------------------------------------------------

def resolve_attention_impl(impl: str, backend: str | None = None) -> str:
  """``"auto"`` -> the implementation for ``backend`` (default: JAX's): per-head on CPU (the
  fastest measured there), ``jax.nn.dot_product_attention`` elsewhere (cuDNN's fused kernel on
  GPUs where it applies: ``fused_kernel``; XLA's on TPU)."""
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


def _softmax(logits, bias, mask, dtype, dropout: float, key) -> jax.Array:
  """float32 ``logits`` + ``bias``, masked, softmax, cast to ``dtype``, dropped out."""
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, MASKED_LOGIT)
  return apply_dropout(jax.nn.softmax(logits, axis=-1).astype(dtype), dropout, key)


def _einsum_attention(q, k, v, bias, mask, dtype, dropout, key) -> jax.Array:
  """One batched einsum over heads."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  probs = _softmax(logits, bias, None if mask is None else mask[:, None], dtype, dropout, key)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _per_head_attention(q, k, v, bias, mask, dtype, dropout, key) -> jax.Array:
  """One head at a time: on CPU, per-head ``[B, T, T]`` matmuls and softmaxes beat one batched
  einsum, whose operands XLA must transpose."""
  heads = []
  for h in range(q.shape[2]):
    logits = jnp.einsum("bqk,btk->bqt", q[:, :, h], k[:, :, h], preferred_element_type=jnp.float32)
    probs = _softmax(logits, None if bias is None else bias[:, h], mask, dtype, dropout,
                     None if key is None else jax.random.fold_in(key, h))
    heads.append(jnp.einsum("bqt,btk->bqk", probs, v[:, :, h]))
  return jnp.stack(heads, axis=2)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None, mask: jax.Array | None, *,
           impl: str = "auto", dtype=jnp.float32, dropout: float = 0.0, key: jax.Array | None = None) -> jax.Array:
  """Attention of (already scaled) queries ``[B, T, H, Dh]`` over keys/values ``[B, S, H, Dh]``:
  ``[B, T, H, Dh]``. ``bias [B or 1, H, T, S]`` is added to the float32 logits; where ``mask``
  (broadcastable to ``[B, T, S]``) is False a key gets zero weight; ``dropout`` on the weights
  when a ``key`` is given. ``impl`` (``resolve_attention_impl``): every one computes the same;
  the fused kernel has no dropout, so training with attention dropout takes the einsum."""
  impl = resolve_attention_impl(impl)
  if impl == "dot_product_attention" and (key is None or not dropout):
    return dot_product_attention(q, k, v, bias, mask, dtype)
  run = _per_head_attention if impl == "per_head" else _einsum_attention
  return run(q, k, v, bias, mask, dtype, dropout, key)


# --- layer iteration -----------------------------------------------------------------------------

def resolve_scan_layers(scan_layers: bool | None, backend: str | None = None) -> bool:
  """None -> per backend: unrolled on CPU and GPU (the faster step on both, and on an H200 the
  faster compile too: benchmarks/results/speed_gpu.md), scanned on TPU (compile time independent
  of depth, as maxtext; not measured here)."""
  if scan_layers is None:
    return (backend or jax.default_backend()) == "tpu"
  return bool(scan_layers)


@jax.custom_vjp
def unstack_layers(leaves: list[jax.Array]) -> list[list[jax.Array]]:
  """Arrays stacked on a leading layer axis -> one list of slices per layer.

  Its gradient stacks the per-layer gradients in one op (plain indexing would
  pad and add a full-size gradient per layer).
  """
  return [[a[i] for a in leaves] for i in range(leaves[0].shape[0])]


def _unstack_fwd(leaves):
  return unstack_layers(leaves), None


def _unstack_bwd(_, grads):
  return ([jnp.stack(per_leaf) for per_leaf in zip(*grads)],)


unstack_layers.defvjp(_unstack_fwd, _unstack_bwd)


def iterate_layers(body: Callable[..., tuple[Any, Any]], layers: nnx.Module, carry, xs=None, *shared,
                   scan: bool | None = None):
  """Fold ``body(block, layer, carry, x, *shared) -> (carry, y)`` over the blocks of ``layers``
  (one module whose parameters are stacked on a leading ``layers`` axis); returns the last carry
  and the ``y`` stacked on a new leading axis.

  ``layer`` is always an int32 array scalar, never a Python int; ``xs`` (a pytree of arrays with a leading layer
  axis, or None) are sliced per layer; ``shared`` (modules, arrays) reach every layer whole.
  ``scan`` (``resolve_scan_layers``): ``nnx.scan``, whose compile time does not grow with depth,
  or a Python loop over per-layer slices (no scan bookkeeping of residuals and gradients), where
  the index is a constant that XLA folds into static slices. The parameters are the same.
  """
  graphdef, state = nnx.split(layers)
  leaves, treedef = jax.tree.flatten(state)
  num_layers = leaves[0].shape[0]
  if resolve_scan_layers(scan):
    @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0) + (None,) * len(shared), out_axes=(nnx.Carry, 0),
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def run(carry, block, layer, x, *shared):
      return body(block, layer, carry, x, *shared)

    return run(carry, layers, jnp.arange(num_layers, dtype=jnp.int32), xs, *shared)
  ys = []
  for i, layer_leaves in enumerate(unstack_layers(leaves)):
    block = nnx.merge(graphdef, jax.tree.unflatten(treedef, layer_leaves))
    carry, y = body(block, jnp.asarray(i, jnp.int32), carry, jax.tree.map(lambda a: a[i], xs), *shared)
    ys.append(y)
  return carry, jax.tree.map(lambda *per_layer: jnp.stack(per_layer), *ys)
