"""Pure train and eval steps over (graphdef, pure-dict state), for ``jax.jit``.

The NNX model is split once into a static graphdef, its parameters and the rest
of its state (dropout RNG counters). Steps merge them back inside the traced
function and return new pure dicts, so they are pure functions of arrays.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from posenc.data.pipeline import mlm_capacity

Batch = dict[str, jax.Array]


def masked_positions(weights: jax.Array, capacity: int) -> jax.Array:
  """``[B, capacity]`` indices of each row's weighted tokens, in order, then unweighted ones."""
  return jnp.argsort(weights <= 0, axis=1, stable=True)[:, :capacity]


def forward(model, batch: Batch, train: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(logits, integer targets, weights); targets and weights have the logits' shape minus classes.

  Masked-LM logits are computed only at the masked positions (``mlm_capacity`` per row).
  """
  valid = batch["valid"].astype(jnp.float32)
  if "image" in batch:
    return model(batch["image"], train=train), batch["label"], valid
  weights = batch["mlm_weights"] * valid[:, None]
  at = masked_positions(weights, mlm_capacity(weights.shape[1]))
  logits = model(batch["input_ids"], segment_ids=batch["segment_ids"], padding_mask=batch["padding_mask"],
                 predict_at=at, train=train)
  take = lambda x: jnp.take_along_axis(x, at, axis=1)  # noqa: E731
  return logits, take(batch["mlm_targets"]), take(weights)


def loss_and_stats(logits: jax.Array, targets: jax.Array, weights: jax.Array
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted mean cross-entropy and the summed statistics eval aggregates."""
  logits = logits.astype(jnp.float32)
  xent = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  stats = {"loss_sum": jnp.sum(xent * weights), "correct": jnp.sum(correct * weights),
           "count": jnp.sum(weights)}
  return stats["loss_sum"] / jnp.maximum(stats["count"], 1.0), stats


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation) -> Callable:
  """``(state, batch) -> (state, metrics)``; ``state`` has step/params/opt_state/model_state."""

  def train_step(state: dict[str, Any], batch: Batch):

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state["model_state"])
      loss, stats = loss_and_stats(*forward(model, batch, train=True))
      return loss, (stats, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))))

    (loss, (stats, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, "accuracy": stats["correct"] / jnp.maximum(stats["count"], 1.0),
               "grad_norm": optax.tree.norm(grads),
               "finite": jnp.isfinite(loss) & _all_finite(params)}
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                 "model_state": model_state}
    return new_state, metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable:
  """``(params, model_state, batch) -> summed stats`` (padding rows count zero)."""

  def eval_step(params, model_state, batch: Batch):
    model = nnx.merge(graphdef, params, model_state)
    return loss_and_stats(*forward(model, batch, train=False))[1]

  return eval_step
