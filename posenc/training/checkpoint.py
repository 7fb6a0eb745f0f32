"""Orbax checkpoints of a run: parameters, optimizer + RNG state, data iterator, metadata.

Layout: ``<workdir>/checkpoints/<step>/{params, train, data, meta}``:
  params  the model's parameters (pure dict; shapes say the geometry),
  train   step, optimizer state and the model's RNG state,
  data    the grain iterator position of every process,
  meta    JSON: the run's config (what a transfer needs to know the old geometry).
Saves are async; the last ``keep`` checkpoints and the best one (highest eval
``accuracy``) are kept. Restoring reads the stored shapes from the checkpoint's
metadata first, so a shape mismatch is a clear error, never a silent re-init.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as policies

from posenc.training.config import ConfigError

BEST_METRIC = "accuracy"
# Orbax splits a replicated array into one slice per replica and writes the slices in
# parallel; each slice of a new shape costs a compile, seconds of them for a small
# model on many CPU devices. Only arrays with slices of at least this size are split.
MIN_REPLICA_SLICE_BYTES = 1 << 20

# (restored params, stored run's config dict, target abstract params) -> params at the
# target shapes. Pure and traceable: it runs under jax.jit with the target shardings.
TransferFn = Callable[[dict, dict, dict], dict]


@contextlib.contextmanager
def _errors_only():
  """Silence Orbax's warnings about what we ask for on purpose (a handler override, read-only)."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)


@functools.cache
def _register_array_handler() -> None:
  with _errors_only():
    ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES), override=True)


def _name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def flat_shapes(tree) -> dict[str, tuple[int, ...]]:
  """``{"a/b/c": shape}`` for arrays, ShapeDtypeStructs or Orbax ArrayMetadata."""
  tree = getattr(tree, "tree", tree)  # Orbax TreeMetadata wraps the tree
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_name(p): tuple(x.shape) for p, x in leaves}


def shape_mismatches(stored: dict, target: dict) -> list[str]:
  """Human-readable differences between two ``flat_shapes`` dicts."""
  out = [f"'{k}' is in the checkpoint but not in the model" for k in sorted(stored.keys() - target.keys())]
  out += [f"'{k}' is in the model but not in the checkpoint" for k in sorted(target.keys() - stored.keys())]
  out += [f"'{k}': stored {stored[k]}, wanted {target[k]}"
          for k in sorted(stored.keys() & target.keys()) if stored[k] != target[k]]
  return out


class Checkpointer:
  """A run's Orbax ``CheckpointManager`` (async saves, keep last K + best)."""

  def __init__(self, directory: str, *, keep: int, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    _register_array_handler()
    keep_policy = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        policies.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    handlers = {"params": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    with _errors_only():  # read_only: Orbax warns that it will not save
      options = ocp.CheckpointManagerOptions(
          preservation_policy=keep_policy, enable_async_checkpointing=True, create=not read_only,
          cleanup_tmp_directories=not read_only, read_only=read_only)
      self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: dict, data_iter, meta: dict, metrics: dict | None = None) -> None:
    """Start an async save of ``state`` (step/params/opt_state/model_state) at ``step``."""
    train = {k: state[k] for k in ("step", "opt_state", "model_state")}
    self.manager.save(step, metrics=metrics, force=True, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]), train=ocp.args.StandardSave(train),
        data=grain.checkpoint.CheckpointSave(data_iter), meta=ocp.args.JsonSave(meta)))

  def stored_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    return flat_shapes(self.manager.item_metadata(step)["params"])

  def meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state: dict, data_iter) -> dict:
    """Resume: everything at its stored shape, straight into the target shardings."""
    problems = shape_mismatches(self.stored_shapes(step), flat_shapes(abstract_state["params"]))
    if problems:
      raise ConfigError(
          f"the checkpoint at step {step} in {self.directory} was made by a different model or "
          f"geometry than this config ({'; '.join(problems[:4])}). To start from it at the new "
          f"geometry use a fresh --workdir with --config.init_from={os.path.dirname(self.directory)}.")
    train = {k: abstract_state[k] for k in ("step", "opt_state", "model_state")}
    out = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_state["params"]),
        train=ocp.args.StandardRestore(train), data=grain.checkpoint.CheckpointRestore(data_iter)))
    return {"params": out["params"], **out["train"]}

  def restore_params(self, step: int, abstract_params: dict, transfer: TransferFn | None = None):
    """Parameters only (a new run starting from this one); optimizer state starts fresh.

    Leaves whose shape is unchanged restore straight into their target sharding.
    Leaves whose shape changed are restored at their stored shape (from the
    checkpoint's metadata), replicated, and ``transfer`` maps the tree to the
    target shapes. Without a ``transfer`` any change is a clear error.
    """
    stored = self.stored_shapes(step)
    target = flat_shapes(abstract_params)
    changed = {k for k in stored.keys() & target.keys() if stored[k] != target[k]}
    if stored.keys() != target.keys() or (changed and transfer is None):
      problems = shape_mismatches(stored, target)
      raise ConfigError(f"config field 'init_from': checkpoint {self.directory}/{step} does not fit "
                        f"this model ({'; '.join(problems[:6])}).")

    def read_as(path, x):
      name = _name(path)
      if name not in changed:
        return x
      replicated = jax.sharding.NamedSharding(x.sharding.mesh, jax.sharding.PartitionSpec())
      return jax.ShapeDtypeStruct(stored[name], x.dtype, sharding=replicated)

    read = jax.tree_util.tree_map_with_path(read_as, abstract_params)
    params = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(read)))["params"]
    if changed:
      source = self.meta(step).get("config", {})
      params = jax.jit(lambda p: transfer(p, source, abstract_params),
                       out_shardings=jax.tree.map(lambda x: x.sharding, abstract_params))(params)
    return params, [f"{k} {stored[k]} -> {target[k]}" for k in sorted(changed)]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def resolve_init_from(path: str) -> tuple[str, int]:
  """``init_from`` -> (checkpoint root, step): a workdir, its ``checkpoints`` dir, or a step dir."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  base = os.path.basename(path)
  if base.isdigit() and os.path.isdir(os.path.join(path, "params")):
    return os.path.dirname(path), int(base)
  step = Checkpointer(path, keep=1, read_only=True).latest_step()
  if step is None:
    raise ConfigError(f"config field 'init_from': no checkpoint under '{path}'; give a run's "
                      f"workdir, its checkpoints/ directory or one step directory in it.")
  return path, step


def abstract_with(tree: Any, shardings: Any) -> Any:
  """Arrays/ShapeDtypeStructs + shardings -> ShapeDtypeStructs carrying the shardings."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
