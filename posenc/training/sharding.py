"""Mesh, logical-axis rules and the shardings of parameters and batches.

Parameters carry logical axis names (``nnx.Param(..., out_sharding=("posn", "embed"))``).
Rules from the config map each logical name to mesh axes; a dimension whose size the
mesh axes do not divide, or whose mesh axes another dimension already uses, stays
replicated, so any model fits any mesh.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from posenc.training.config import MESH_AXES

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def make_mesh(shape: tuple[int, ...]) -> Mesh:
  """A ``(data, fsdp, model)`` mesh over all devices (of all processes)."""
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], rules: Rules,
                    mesh: Mesh) -> PartitionSpec:
  """Logical axis names of an array of ``shape`` -> a PartitionSpec on ``mesh``."""
  if not names:
    return PartitionSpec()
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(names, shape):
    axes = table.get(name)
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
      used.update(axes)
      spec.append(axes[0] if len(axes) == 1 else axes)
    else:
      spec.append(None)
  return PartitionSpec(*spec)


def state_shardings(state: nnx.State, rules: Rules, mesh: Mesh) -> dict:
  """NamedShardings (as a pure dict) for an (abstract) nnx state of Variables."""

  def one(v):
    names = v.get_metadata().get("out_sharding")
    return NamedSharding(mesh, logical_to_spec(names, v.shape, rules, mesh))

  is_var = lambda x: isinstance(x, nnx.Variable)
  return nnx.to_pure_dict(jax.tree.map(lambda v: v.replace(one(v)), state, is_leaf=is_var))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Leading (batch) axis over the mesh axes the rules give ``batch``."""
  axes = dict(rules).get("batch") or ()
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return NamedSharding(mesh, PartitionSpec(axes or None))


def global_batch(local: dict, sharding: NamedSharding) -> dict:
  """This process's rows -> one global array per field, laid out by ``sharding``."""

  def one(x):
    x = np.asarray(x)
    spec = PartitionSpec(*sharding.spec, *([None] * (x.ndim - len(sharding.spec))))
    return jax.make_array_from_process_local_data(NamedSharding(sharding.mesh, spec), x)

  return jax.tree.map(one, local)
