"""REFERENCE ONLY: a straightforward Flax linen ViT + train step, for speed comparisons.

This is not part of posenc. It is the plain way to write the model with stock
Flax pieces (``nn.Conv`` patch embedding, ``nn.MultiHeadDotProductAttention``,
``nn.Dense`` MLP, a Python loop over blocks, ``jax.jit``, ``optax.adamw``), so
``benchmarks/speed.py`` can show how posenc's own train step compares with what a
researcher would write in an afternoon. Same architecture as posenc's ViT with
``posenc="learned"``: pre-LN blocks, class token, learned position table,
tanh-GELU, LayerNorm eps 1e-6, float32 parameters; ``dtype`` is the compute dtype (float32, or
bfloat16 for the accelerator profile, as posenc's ``config.dtype``), the logits float32.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


class Block(nn.Module):
  width: int
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype)(y, y)
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
    y = nn.Dense(self.width, dtype=self.dtype)(nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype)(y)))
    return x + y


class LinenViT(nn.Module):
  num_classes: int = 10
  patch_size: int = 4
  width: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_dim: int = 768
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype)(images)
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
    x = (x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w + 1, d))).astype(self.dtype)
    for _ in range(self.depth):
      x = Block(self.width, self.num_heads, self.mlp_dim, self.dtype)(x)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x[:, 0]).astype(jnp.float32)


def make_train_step(model: LinenViT, images, labels, *, lr: float = 1e-3, weight_decay: float = 0.05):
  """(jitted step, initial (params, opt_state)); ``step(params, opt_state, images, labels)``."""
  params = jax.jit(model.init)(jax.random.key(0), images)
  tx = optax.adamw(lr, weight_decay=weight_decay)

  @jax.jit
  def step(params, opt_state, images, labels):
    def loss_fn(params):
      logits = model.apply(params, images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step, (params, tx.init(params))
