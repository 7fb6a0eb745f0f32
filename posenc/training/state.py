"""The model and train state of a run, built sharded on the mesh.

The train state is a pure dict ``{"step", "params", "opt_state", "model_state"}``
(``model_state`` is the model's non-parameter state: dropout RNG key + counter).
It is created by one jitted init whose ``out_shardings`` place every array, so
nothing is materialised unsharded on one device first.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from posenc.training import sharding


@dataclasses.dataclass
class StateSpec:
  """How a run's train state is laid out: graphdef, optimizer, shapes and shardings, and its init."""

  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  abstract: dict        # ShapeDtypeStructs of the train state, with their shardings
  shardings: dict       # NamedShardings of the train state
  init: Callable[[], dict]  # jitted: builds the initial (sharded) train state


def abstract_params(create: Callable[[], nnx.Module], rules, mesh) -> tuple[nnx.GraphDef, dict, dict]:
  """(graphdef, abstract params with shardings, abstract model_state with shardings)."""
  graphdef, params, rest = nnx.split(nnx.eval_shape(create), nnx.Param, ...)
  out = []
  for st in (params, rest):
    shard = sharding.state_shardings(st, rules, mesh)
    out.append(jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            nnx.to_pure_dict(st), shard))
  return graphdef, out[0], out[1]


def _init_state(create, tx) -> dict:
  _, params, rest = nnx.split(create(), nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
          "model_state": nnx.to_pure_dict(rest)}


def build(create: Callable[[], nnx.Module], tx: optax.GradientTransformation, rules, mesh) -> StateSpec:
  graphdef, params, rest = abstract_params(create, rules, mesh)
  init = functools.partial(_init_state, create, tx)
  shapes = jax.eval_shape(init)
  get_sharding = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  repl = sharding.replicated(mesh)
  opt = optax.tree_map_params(tx, lambda _, s: s, shapes["opt_state"], get_sharding(params),
                              transform_non_params=lambda _: repl,
                              is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
  shardings = {"step": repl, "params": get_sharding(params), "opt_state": opt,
               "model_state": get_sharding(rest)}
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, shardings)
  return StateSpec(graphdef, tx, abstract, shardings, jax.jit(init, out_shardings=shardings))


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
