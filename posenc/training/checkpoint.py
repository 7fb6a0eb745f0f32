"""Orbax checkpoints of a run: parameters, optimizer + RNG state, data iterator, metadata.

Layout: ``<workdir>/checkpoints/<step>/{params, train, data, meta}``:
  params  the model's parameters (pure dict; shapes say the geometry),
  train   step, optimizer state and the model's RNG state,
  data    the grain iterator position of every process,
  meta    JSON: the run's config, task, geometry, encoding and its options (what a
          transfer needs to know of the stored model without building it).
Saves are async; the last ``keep`` checkpoints and the best one (by the task's
``BEST_METRIC``: the highest eval accuracy, or the lowest eval loss) are kept.
Restoring reads the stored shapes from the checkpoint's metadata first, so a
shape mismatch is a clear error, never a silent re-init. A
checkpoint that cannot be read (a truncated file, a half-written step) is moved
to ``checkpoints.damaged/`` and the previous one is used, with a warning.

Errors are ``CheckpointError``: they name the checkpoint and the problem, not
config fields (the training loop says which field led there).
"""
from __future__ import annotations

import contextlib
import functools
import logging as py_logging
import os
import shutil
import sys
import time
from typing import Callable

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from posenc.transfer import flat_shapes, shape_diff

BEST_DIRECTIONS = ("max", "min")
# Orbax splits a replicated array into one slice per replica and writes the slices in
# parallel; each slice of a new shape costs a compile, many of them for a small model on
# many CPU devices. Only arrays with slices of at least this size are split.
MIN_REPLICA_SLICE_BYTES = 1 << 20
TRAIN_KEYS = ("step", "opt_state", "model_state")


class CheckpointError(RuntimeError):
  """A checkpoint is missing, unreadable, or does not fit what it is restored into."""


class DamagedCheckpoint(CheckpointError):
  """A checkpoint's files cannot be read (truncated, half written, corrupt)."""


@contextlib.contextmanager
def _errors_only():
  """Silence Orbax's warnings about what we ask for on purpose (a handler override, read-only)."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)


class _DroppedShardReads(py_logging.Filter):
  """Drop the tracebacks of Orbax's abandoned shard reads of a damaged checkpoint.

  When one shard of a damaged array fails, Orbax's sibling reads fail too and are
  never awaited; asyncio prints each with a traceback when it is collected. A read
  that finishes after its event loop closed makes ``concurrent.futures`` log
  "exception calling callback" with ``RuntimeError: Event loop is closed`` (asyncio
  checks ``is_closed()`` before ``call_soon_threadsafe``, a race). The first failure
  is already reported as a DamagedCheckpoint.
  """

  def filter(self, record: py_logging.LogRecord) -> bool:
    text = record.getMessage()
    if "never retrieved" in text and "Encountered error while reading array" in text:
      return False
    error = record.exc_info[1] if record.exc_info else None
    return not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed")


class _StorageFailures(py_logging.Filter):
  """Drop Orbax's logged tracebacks of writer threads that failed on the file system (a full disk, a
  read-only mount): the loop stops with one message naming the path and the cause (guard.StorageError)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    from posenc.training.guard import os_error_in  # imported late: guard is a sibling
    error = record.exc_info[1] if record.exc_info else None
    if error is not None and os_error_in(error) is not None:
      return False
    return "thread (save_finalize) failed" not in record.getMessage()


def _drop_abandoned_reads(unraisable) -> None:
  """``sys.unraisablehook`` that drops what ``_DroppedShardReads`` drops when it reaches Python as an
  "Exception ignored in" a collected read coroutine (at exit, or when the garbage collector closes
  it); anything else goes to the hook that was installed before."""
  error, obj = unraisable.exc_value, unraisable.object
  if not ("_read_array_index" in getattr(obj, "__qualname__", "") and "Encountered error while reading array"
          in str(error)):
    _PREVIOUS_UNRAISABLEHOOK(unraisable)


_PREVIOUS_UNRAISABLEHOOK = sys.unraisablehook


@functools.cache
def _register_array_handler() -> None:
  sys.unraisablehook = _drop_abandoned_reads
  for logger in ("asyncio", "concurrent.futures"):
    py_logging.getLogger(logger).addFilter(_DroppedShardReads())
  py_logging.getLogger("absl").addFilter(_StorageFailures())
  with _errors_only():
    ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES), override=True)


def _first_line(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


class Checkpointer:
  """A run's Orbax ``CheckpointManager`` (async saves, keep last K + best).

  ``best`` is (eval metric, "max" | "min"): the saved checkpoint whose metric is highest (lowest) is
  kept besides the last ``keep``; its tasks declare it (``Task.BEST_METRIC``).
  """

  def __init__(self, directory: str, *, keep: int = 1, best: tuple[str, str] = ("accuracy", "max"),
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    metric, direction = best
    if direction not in BEST_DIRECTIONS:
      raise ValueError(f"best={best!r}: the direction must be one of {BEST_DIRECTIONS}.")
    _register_array_handler()
    # BestN sorts by the metric (descending with reverse) and keeps the last n: the best.
    keep_policy = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        policies.BestN(get_metric_fn=lambda m: m[metric], reverse=direction == "min", n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    handlers = {"params": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    with _errors_only():  # read_only: Orbax warns that it will not save
      options = ocp.CheckpointManagerOptions(
          preservation_policy=keep_policy, enable_async_checkpointing=True, create=not read_only,
          cleanup_tmp_directories=not read_only, read_only=read_only)
      self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  @contextlib.contextmanager
  def _reading(self, step: int, what: str):
    """Any failure of Orbax to read checkpoint ``step`` becomes a DamagedCheckpoint naming it."""
    try:
      yield
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001 - whatever the reader raised, the files are the problem
      raise DamagedCheckpoint(f"cannot read the {what} of checkpoint {self.path(step)} "
                              f"({_first_line(e)}).") from None

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def damaged_steps(self) -> list[str]:
    """The checkpoints ``restore_latest`` set aside as damaged (``<directory>.damaged/``)."""
    damaged = self.directory + ".damaged"
    return sorted(os.listdir(damaged)) if os.path.isdir(damaged) else []

  def train_losses(self) -> dict[int, float | None]:
    """The training loss each kept checkpoint recorded at its step (None: not recorded)."""
    out = {}
    for step in self.all_steps():
      try:
        out[step] = self.meta(step).get("train_loss")
      except CheckpointError:
        out[step] = None
    return out

  def save(self, step: int, state: dict, data_iter, meta: dict, metrics: dict | None = None) -> None:
    """Start an async save of ``state`` (step/params/opt_state/model_state) at ``step``."""
    self.manager.save(step, metrics=metrics, force=True, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]),
        train=ocp.args.StandardSave({k: state[k] for k in TRAIN_KEYS}),
        data=grain.checkpoint.CheckpointSave(data_iter), meta=ocp.args.JsonSave(meta)))

  def stored_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    with self._reading(step, "parameter shapes"):
      return flat_shapes(self.manager.item_metadata(step)["params"])

  def meta(self, step: int) -> dict:
    with self._reading(step, "metadata"):
      return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state: dict, data_iter) -> dict:
    """Resume: everything at its stored shape, straight into the target shardings."""
    problems = shape_diff(self.stored_shapes(step), flat_shapes(abstract_state["params"]))
    if problems:
      raise CheckpointError(f"checkpoint {self.path(step)} holds a different model or geometry than "
                            f"the one being restored ({'; '.join(problems[:4])}).")
    with self._reading(step, "state"):
      out = self.manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract_state["params"]),
          train=ocp.args.StandardRestore({k: abstract_state[k] for k in TRAIN_KEYS}),
          data=grain.checkpoint.CheckpointRestore(data_iter)))
    return {"params": out["params"], **out["train"]}

  def restore_latest(self, abstract_state: dict, data_iter, warn: Callable[[str], None]
                     ) -> tuple[dict, int] | None:
    """The newest readable checkpoint as (state, step), or None when there is none.

    A checkpoint that cannot be read is moved to ``<directory>.damaged/`` (nothing
    is deleted) with a warning naming it, and the one before it is tried. A
    checkpoint that reads but does not fit ``abstract_state`` is a CheckpointError.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      try:
        return self.restore(step, abstract_state, data_iter), step
      except DamagedCheckpoint as e:
        moved = self._set_aside(step)
        rest = f"resuming from step {steps[i + 1]}" if i + 1 < len(steps) else "no checkpoint is left"
        warn(f"WARNING: {e} It is damaged: moved to {moved}; {rest}.")
    return None  # none, or every one damaged (set aside): the loop decides

  def restore_step(self, step: int, abstract_state: dict, data_iter, warn: Callable[[str], None]
                   ) -> tuple[dict, int]:
    """Resume from kept checkpoint ``step``; the later ones are set aside (``<directory>.abandoned/``),
    so that the next plain resume continues from this one."""
    steps = self.all_steps()
    if step not in steps:
      raise CheckpointError(f"restore_step={step} is not a kept checkpoint of {self.directory} (kept: "
                            f"{', '.join(map(str, steps)) or 'none'}); give one of them.")
    later = [s for s in steps if s > step]
    for s in later:
      moved = self._set_aside(s, "abandoned")
      warn(f"restore_step={step}: checkpoint {s} moved to {moved}.")
    return self.restore(step, abstract_state, data_iter), step

  def set_aside_all(self, why: str) -> str:
    """Move every kept checkpoint to ``<directory>.<why>/`` (nothing deleted); returns that directory."""
    for step in self.all_steps():
      self._set_aside(step, why)
    return self.directory + f".{why}"

  def _set_aside(self, step: int, why: str = "damaged") -> str:
    target = os.path.join(self.directory + f".{why}", f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(self.path(step), target)
    multihost_utils.sync_global_devices(f"posenc-set-aside-{why}-{step}")
    self.manager.reload()
    return target

  def restore_params(self, step: int, abstract_params: dict, move: Callable[[dict], dict] | None = None):
    """Parameters only (a new run starting from this one); optimizer state starts fresh.

    Leaves whose shape is unchanged restore straight into their target sharding.
    Leaves whose shape changed are restored at their stored shape (from the
    checkpoint's metadata), replicated, and ``move`` (a jitted transfer whose
    output has the target shapes and shardings) maps the tree. Without ``move``
    any change is a CheckpointError. Returns (params, one line per changed leaf).
    """
    stored, target = self.stored_shapes(step), flat_shapes(abstract_params)
    changed = {k for k in stored.keys() & target.keys() if stored[k] != target[k]}
    if stored.keys() != target.keys() or (changed and move is None):
      raise CheckpointError(f"checkpoint {self.path(step)} does not fit this model "
                            f"({'; '.join(shape_diff(stored, target)[:6])}).")

    def read_as(path, x):
      name = "/".join(str(getattr(k, "key", k)) for k in path)
      if name not in changed:
        return x
      replicated = jax.sharding.NamedSharding(x.sharding.mesh, jax.sharding.PartitionSpec())
      return jax.ShapeDtypeStruct(stored[name], x.dtype, sharding=replicated)

    read = jax.tree_util.tree_map_with_path(read_as, abstract_params)
    with self._reading(step, "parameters"):
      params = self.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(read)))["params"]
    if changed:
      params = move(params)
    return params, [f"{k} {stored[k]} -> {target[k]}" for k in sorted(changed)]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def resolve(path: str) -> tuple[str, int]:
  """A run's workdir, its ``checkpoints`` directory or one step directory -> (checkpoint root, step)."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  base = os.path.basename(path)
  if base.isdigit() and os.path.isdir(os.path.join(path, "params")):
    return os.path.dirname(path), int(base)
  step = Checkpointer(path, read_only=True).latest_step() if os.path.isdir(path) else None
  if step is None:
    raise CheckpointError(f"no checkpoint under '{path}'; give a run's workdir, its checkpoints/ "
                          f"directory or one step directory in it.")
  return path, step
