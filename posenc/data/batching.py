"""The one batching chain of every pipeline: grain's order, process shard and batch, then a read and
an optional random transform.

Order and sharding. Train reads a fresh permutation of the records every epoch (grain's index
shuffle, from ``seed``); evaluation reads them in order, once, padded to a multiple of the global
batch size (padding indices point past the end: the read marks those rows invalid). Process p of P
takes the global records p, p+P, p+2P, ... and batches batch_size // P of them, so row j of process
p's k-th batch is row j*P + p of global batch k. A random transform draws for the whole global
batch from (seed, k) and each process keeps its rows: a run on P processes sees exactly the
batches of a single-process run. ``iter(dataset)`` is a grain DatasetIterator whose
get_state()/set_state() (a small JSON-able dict) resume it exactly; orbax saves it with
``grain.checkpoint.CheckpointSave(iterator)``.
"""
from __future__ import annotations

import dataclasses
import math

import grain
import jax
import numpy as np
from absl import flags

# One background thread prepares up to 4 batches ahead (benchmarks/data_speed.py).
READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


def check_int(name: str, value, low: int, high: int | None = None) -> int:
  """``value`` as an int in [low, high) (high None: no bound); a ValueError naming ``name`` otherwise."""
  if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low or (
      high is not None and value >= high):
    bound = f"in [{low}, {high})" if high is not None else f">= {low}"
    raise ValueError(f"{name} must be an integer {bound}, got {value!r}.")
  return int(value)


@dataclasses.dataclass(frozen=True)
class Batching:
  """How records become this process's batches (checked on construction). ``batch_size`` is
  global; ``process_index`` / ``process_count`` None: JAX's own. ``num_epochs`` (training only)
  None: endless. ``worker_count`` > 0 reads in that many grain worker processes."""
  batch_size: int
  train: bool
  seed: int = 0
  num_epochs: int | None = None
  process_index: int | None = None
  process_count: int | None = None
  worker_count: int = 0

  def __post_init__(self):
    count = check_int("process_count", jax.process_count() if self.process_count is None
                      else self.process_count, 1)
    index = check_int("process_index", jax.process_index() if self.process_index is None
                      else self.process_index, 0, count)
    batch_size = check_int("batch_size", self.batch_size, 1)
    if batch_size % count:
      raise ValueError(f"batch_size {batch_size} (global) must be divisible by process_count {count}.")
    if self.num_epochs is not None:
      check_int("num_epochs", self.num_epochs, 1)
      if not self.train:
        raise ValueError("num_epochs is for training; evaluation (train=False) is one pass.")
    check_int("seed", self.seed, 0, 2**32)
    check_int("worker_count", self.worker_count, 0)
    object.__setattr__(self, "process_count", count)
    object.__setattr__(self, "process_index", index)

  @property
  def shard(self) -> dict[str, int]:
    return {"process_index": self.process_index, "process_count": self.process_count}


@dataclasses.dataclass
class ReadBatch(grain.transforms.Map):
  """Global record indices -> a batch of records, their "index" and "valid"; indices past the
  end are padding (they repeat the last record)."""
  records: object  # len() and read(indices) -> dict of arrays

  def map(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = np.asarray(indices)
    valid = indices < len(self.records)
    index = np.where(valid, indices, len(self.records) - 1)
    return {**self.records.read(index), "index": index, "valid": valid}


def batches(num_records: int, batching: Batching, read: grain.transforms.Map,
            transform: grain.transforms.RandomMap | None = None, *, what: str = "The data") -> grain.IterDataset:
  """This process's batches of ``num_records`` records: ``read`` maps a batch of global indices to
  arrays, then ``transform`` (seeded per global batch) changes them. ``what`` names the records
  in the error raised when training has fewer than one batch of them."""
  b = batching
  if num_records < (b.batch_size if b.train else 1):
    raise ValueError(f"{what} has {num_records} examples, fewer than one batch of {b.batch_size}.")
  order = grain.MapDataset.range(num_records if b.train else math.ceil(num_records / b.batch_size) * b.batch_size)
  if b.train:
    order = order.shuffle(b.seed).repeat(b.num_epochs)
    if b.num_epochs is not None:  # whole global batches only, so every process gets as many
      order = order[:len(order) // b.batch_size * b.batch_size]
  out = (order[b.process_index::b.process_count]
         .batch(b.batch_size // b.process_count, drop_remainder=b.train)
         .map(read))
  if transform is not None:
    out = out.random_map(transform, seed=b.seed)
  out = out.to_iter_dataset(READ_OPTIONS)
  if b.worker_count:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app: defaults
      flags.FLAGS.mark_as_parsed()
    out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=b.worker_count))
  return out
