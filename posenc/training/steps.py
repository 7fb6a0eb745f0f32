"""Pure train and eval steps over (graphdef, pure-dict state), for ``jax.jit``.

The NNX model is split once into a static graphdef, its parameters and the rest
of its state (dropout RNG counters). Steps merge them back inside the traced
function and return new pure dicts, so they are pure functions of arrays. What
a batch holds and how it is scored is the task's ``forward``; nothing here
knows the model family.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

# (model, batch, train=...) -> (mean loss, summed statistics)
Forward = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, forward: Forward,
                    metrics: Callable[[dict], dict]) -> Callable:
  """``(state, batch) -> (state, metrics)``; ``state`` has step/params/opt_state/model_state."""

  def train_step(state: dict[str, Any], batch):

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state["model_state"])
      loss, stats = forward(model, batch, train=True)
      return loss, (stats, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))))

    (loss, (stats, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    out = {**metrics(stats), "loss": loss, "grad_norm": optax.tree.norm(grads),
           "finite": jnp.isfinite(loss) & _all_finite(params)}
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                 "model_state": model_state}
    return new_state, out

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, forward: Forward) -> Callable:
  """``(params, model_state, batch) -> summed stats`` (padding rows count zero)."""

  def eval_step(params, model_state, batch):
    model = nnx.merge(graphdef, params, model_state)
    return forward(model, batch, train=False)[1]

  return eval_step


def task_forward(task, position_scale: float = 1.0, label_smoothing: float = 0.0) -> Forward:
  """The task's forward with this run's (static) position scale (and, training, label smoothing) bound."""
  return functools.partial(task.forward, position_scale=position_scale, label_smoothing=label_smoothing)
