"""The optimizer: AdamW with warmup + cosine, gradient clipping, and a separate
learning-rate multiplier for position-encoding parameters.

Parameters are a pure dict; position-encoding parameters are those under the
model's ``posenc`` attribute (path ``("posenc", ...)``). Weight decay applies to
matrices (ndim >= 2) outside ``posenc`` — not to biases, norm scales or position
tables (as timm and big_vision do).
"""
from __future__ import annotations

import jax
import optax

from posenc.encodings.base import POSENC_KEY


def _is_posenc(path) -> bool:
  return any(getattr(k, "key", None) == POSENC_KEY for k in path)


def posenc_mask(params) -> dict:
  """True for every leaf under the model's ``posenc`` attribute."""
  return jax.tree_util.tree_map_with_path(lambda p, _: _is_posenc(p), params)


def decay_mask(params) -> dict:
  return jax.tree_util.tree_map_with_path(lambda p, x: x.ndim >= 2 and not _is_posenc(p), params)


def make_schedule(config) -> optax.Schedule:
  """Linear warmup from 0 to ``lr`` then cosine decay to 0 at ``total_steps``."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.lr, warmup_steps=config.warmup_steps,
      decay_steps=max(config.total_steps, config.warmup_steps + 1), end_value=0.0)


def make_optimizer(config) -> optax.GradientTransformation:
  """clip -> AdamW(schedule) -> scale position-encoding updates by ``posenc_lr_mult``.

  Scaling the final update of a parameter is exactly scaling its learning rate
  (AdamW's update, decay included, is linear in the learning rate).
  """
  parts = []
  if config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts.append(optax.adamw(make_schedule(config), b1=0.9, b2=0.999,
                           weight_decay=config.weight_decay, mask=decay_mask))
  if config.posenc_lr_mult != 1.0:
    parts.append(optax.masked(optax.scale(config.posenc_lr_mult), posenc_mask))
  return optax.chain(*parts)
