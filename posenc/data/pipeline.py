"""Deterministic, resumable grain input pipelines for images and masked-LM text.

`make_loader` returns a `grain.IterDataset`: `iter(loader)` is a grain
DatasetIterator whose get_state()/set_state() (a small JSON-able dict) resume it
exactly; orbax saves it with `grain.checkpoint.CheckpointSave(iterator)`.

Order and sharding. Train reads a fresh permutation of the split every epoch
(grain's index shuffle, from `seed`); evaluation reads the split in order, once,
padded to a multiple of the global batch size (padding rows repeat the last
example and have valid=False). Process p of P takes the global records p, p+P,
p+2P, ... and batches batch_size // P of them, so row j of process p's k-th batch
is row j*P + p of global batch k. Randomness (augmentation, train masks) is drawn
for the whole global batch from (seed, k) and each process keeps its rows: a run
on P processes sees exactly the batches of a single-process run.

Images (float32 [b, H, W, C]): uint8 -> [0, 1] -> (training) random-resized crop +
flip -> the output size: resampled to it (protocol "zoom"), or resized to a fixed object
size and placed on / cropped from a canvas of it at a seeded position (protocol
"canvas") -> normalised (x - mean) / std with the train split's statistics
(Fashion-MNIST: mean 0.2858, std 0.3529 over its 55,000 train images; other datasets
0.5 / 0.5). Training at several sizes draws one per global batch from (seed, batch
index). Details: posenc.data.images.

Text (int32 [b, L]): each split's paragraphs, in corpus order, are packed into
rows "[CLS] p1 [SEP] p2 [SEP] ..." of exactly max_len tokens: a paragraph that does
not fit fills the row and continues in the next one; [SEP] ends every paragraph
that ends inside a row; only the split's last row has padding. The
segment_ids alternate 0/1 per packed paragraph (BERT's sentence A/B types).
BERT masking: each non-special token is selected with probability 0.15; a selected
token becomes [MASK] (80%), a random regular vocabulary token (10%) or stays
(10%). mlm_targets holds the original ids everywhere; mlm_weights is 1 exactly
where a token was selected. [CLS], [SEP] and [PAD] are never selected. Train
masks are new for every batch (so every epoch); evaluation masks are drawn once
per token of the split's token stream from `seed`, so the same tokens are masked
at every max_len (length-extrapolation evaluation).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re

import grain
from absl import flags
import jax
import numpy as np

from posenc.data import datasets, text
from posenc.data.images import (  # noqa: F401  (image preprocessing lives in images.py)
    DEFAULT_CROP_SCALE, DEFAULT_IMAGE_STATS, IMAGE_STATS, PROTOCOLS, ImagePreprocess, ImageRecords,
    image_preprocess, resize_images)

DEFAULT_MAX_LEN = 128
MASK_RATE, MASK_TOKEN_RATE, RANDOM_TOKEN_RATE = 0.15, 0.8, 0.1
PAD, CLS, SEP, MASK = 0, 101, 102, 103  # all-MiniLM-L6-v2 (BERT uncased) vocabulary
# One background thread prepares up to 4 batches ahead (benchmarks/data_speed.py).
READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


class PackedText:
  """A split's token stream packed into rows of max_len: input_ids, segment_ids and
  stream_pos (index of the token in the split's stream; -1 for special tokens/padding)."""

  def __init__(self, paragraphs: list[np.ndarray], max_len: int):
    rows: list[tuple[list[int], list[int], list[int]]] = []
    ids, seg, pos, kind, offset = [CLS], [0], [-1], 0, 0
    for paragraph in paragraphs:
      start = 0
      while start < len(paragraph):
        piece = paragraph[start:start + max_len - len(ids)].tolist()
        ids += piece
        seg += [kind] * len(piece)
        pos += range(offset + start, offset + start + len(piece))
        start += len(piece)
        if start == len(paragraph) and len(ids) < max_len:  # the paragraph ends in this row
          ids, seg, pos, kind = ids + [SEP], seg + [kind], pos + [-1], 1 - kind
        if len(ids) == max_len:
          rows.append((ids, seg, pos))
          ids, seg, pos, kind = [CLS], [0], [-1], 0
      offset += len(paragraph)
    if len(ids) > 1:
      rows.append((ids, seg, pos))
    self.num_tokens = offset
    shape = (len(rows), max_len)
    self.input_ids, self.segment_ids = np.full(shape, PAD, np.int32), np.zeros(shape, np.int32)
    self.stream_pos = np.full(shape, -1, np.int64)
    for r, (ids, seg, pos) in enumerate(rows):
      self.input_ids[r, :len(ids)], self.segment_ids[r, :len(ids)] = ids, seg
      self.stream_pos[r, :len(ids)] = pos

  def __len__(self) -> int:
    return len(self.input_ids)

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": self.input_ids[indices], "segment_ids": self.segment_ids[indices],
            "stream_pos": self.stream_pos[indices]}


@functools.lru_cache(maxsize=8)
def split_paragraphs(split: str, directory: str) -> tuple[np.ndarray, ...]:
  """Token ids of a text split's paragraphs, in corpus order (document, paragraph)."""
  src = datasets.source("text", split, directory)
  records = src.__getitems__(range(len(src)))
  records.sort(key=lambda r: (int(r["document"]), int(r["paragraph"])))
  return tuple(r["input_ids"] for r in records)


@functools.lru_cache(maxsize=8)
def packed_text(split: str, max_len: int, directory: str) -> PackedText:
  return PackedText(list(split_paragraphs(split, directory)), max_len)


@functools.cache
def regular_token_ids() -> np.ndarray:
  """Ids a random replacement may use: every token but [PAD], [unusedN], [CLS], [MASK], ..."""
  vocab = text.tokenizer().get_vocab()
  return np.array(sorted(i for t, i in vocab.items() if not re.fullmatch(r"\[.*\]", t)), np.int32)


def mlm_capacity(length: int) -> int:
  """Static number of predicted positions per row of ``length`` tokens (the MLM head's input).

  The selected count is Binomial(length, MASK_RATE); this is its mean plus 6 standard
  deviations (a row overflows with probability < 1e-8), capped at ``length``.
  """
  mean = length * MASK_RATE
  return min(length, math.ceil(mean + 6 * math.sqrt(mean * (1 - MASK_RATE))) + 1)


def draw_masks(rng: np.random.Generator, shape, regular_ids: np.ndarray):
  """Uniforms deciding selection and action, and a random replacement id, per token."""
  return rng.random(shape), rng.random(shape), regular_ids[rng.integers(0, len(regular_ids), shape)]


@dataclasses.dataclass
class ReadBatch(grain.transforms.Map):
  """Global record indices -> a batch of records, their "index" and "valid"; indices past the
  end are padding (they repeat the last record)."""
  records: ImageRecords | PackedText

  def map(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = np.asarray(indices)
    valid = indices < len(self.records)
    index = np.where(valid, indices, len(self.records) - 1)
    return {**self.records.read(index), "index": index, "valid": valid}


@dataclasses.dataclass
class MaskTokens(grain.transforms.RandomMap):
  """BERT masked-LM corruption of packed rows (see the module docstring)."""
  regular_ids: np.ndarray
  fixed_draws: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # per stream token
  process_index: int = 0
  process_count: int = 1

  def random_map(self, batch: dict[str, np.ndarray], rng: np.random.Generator):
    ids, pos = batch["input_ids"], batch["stream_pos"]
    if self.fixed_draws is not None:
      select, action, random_ids = (d[np.maximum(pos, 0)] for d in self.fixed_draws)
    else:  # drawn for the global batch; this process keeps its rows
      b, length = ids.shape
      draws = draw_masks(rng, (b * self.process_count, length), self.regular_ids)
      select, action, random_ids = (d[self.process_index::self.process_count] for d in draws)
    selected = (select < MASK_RATE) & (pos >= 0)
    corrupted = np.where(action < MASK_TOKEN_RATE, MASK,
                         np.where(action < MASK_TOKEN_RATE + RANDOM_TOKEN_RATE, random_ids, ids))
    return {"input_ids": np.where(selected, corrupted, ids).astype(np.int32),
            "segment_ids": batch["segment_ids"], "padding_mask": ids != PAD,
            "mlm_targets": ids, "mlm_weights": selected.astype(np.float32),
            "valid": batch["valid"]}


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
  if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low or (
      high is not None and value >= high):
    bound = f"in [{low}, {high})" if high is not None else f">= {low}"
    raise ValueError(f"{name} must be an integer {bound}, got {value!r}.")
  return int(value)


def process_shard(batch_size, process_index, process_count) -> tuple[int, int, int]:
  """(global batch size, this process's index, process count), checked; None: JAX's own."""
  process_count = _check_int("process_count", jax.process_count() if process_count is None
                             else process_count, 1)
  process_index = _check_int("process_index", jax.process_index() if process_index is None
                             else process_index, 0, process_count)
  batch_size = _check_int("batch_size", batch_size, 1)
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} (global) must be divisible by process_count "
                     f"{process_count}.")
  return batch_size, process_index, process_count


def make_loader(dataset: str, split: str, *, batch_size: int, train: bool, seed: int,
                image_size=None, max_len: int | None = None, process_index: int | None = None,
                process_count: int | None = None, num_epochs: int | None = None,
                augment: bool | None = None, crop_scale=DEFAULT_CROP_SCALE, flip: bool = False,
                translate: int = 0, random_erasing: float = 0.0, image_sizes=(), object_size=None,
                protocol: str = "zoom", worker_count: int = 0, data_dir: str | None = None) -> grain.IterDataset:
  """Batches of `dataset`/`split` for this process (batch_size // process_count rows
  of every global batch). See the module docstring for order, augmentation, masking.

  Images: `image_size` (int or (h, w); None: as stored) is the output size; `image_sizes`
  (training only) draws one of them per global batch instead. `augment` (default: train)
  is a random-resized crop of area fraction in `crop_scale` + flip; `flip` alone flips and
  `translate` t shifts by up to t pixels per axis and `random_erasing` p erases a box with
  probability p (training only). `protocol` "zoom"
  resamples the image to the output size; "canvas" resizes it to `object_size` and places
  it on (or crops it from) the output-size canvas at a seeded position (None: zoom).
  """
  batch_size, process_index, process_count = process_shard(batch_size, process_index, process_count)
  seed = _check_int("seed", seed, 0, 2**32)
  worker_count = _check_int("worker_count", worker_count, 0)
  if num_epochs is not None:
    num_epochs = _check_int("num_epochs", num_epochs, 1)
    if not train:
      raise ValueError("num_epochs is for training; evaluation (train=False) is one pass.")
  directory = data_dir or datasets.data_dir()
  shard = dict(process_index=process_index, process_count=process_count)

  if dataset == "text":
    if (image_size is not None or augment or flip or translate or random_erasing or image_sizes
        or object_size is not None or protocol != "zoom"):
      raise ValueError("image_size/image_sizes/augment/flip/translate/random_erasing/object_size/protocol are for "
                       "image datasets, not 'text'; use max_len.")
    max_len = _check_int("max_len", DEFAULT_MAX_LEN if max_len is None else max_len, 2)
    records = packed_text(split, max_len, directory)
    fixed = None
    if not train:  # one draw per token of the stream: the same masks at every max_len
      fixed = draw_masks(np.random.default_rng(seed), records.num_tokens, regular_token_ids())
    transform = MaskTokens(regular_token_ids(), fixed, **shard)
  else:
    if max_len is not None:
      raise ValueError(f"max_len is for dataset 'text', not {dataset!r}; use image_size.")
    datasets.info(dataset, directory)  # a clear error unless it has fixed-size images + labels
    records = ImageRecords(datasets.source(dataset, split, directory))
    transform = image_preprocess(dataset, num_records=len(records), train=train, seed=seed,
                                 image_size=image_size, image_sizes=image_sizes, object_size=object_size,
                                 protocol=protocol, augment=augment, crop_scale=crop_scale, flip=flip,
                                 translate=translate, random_erasing=random_erasing, **shard)

  if train and len(records) < batch_size:
    raise ValueError(f"Split {split!r} of {dataset!r} has {len(records)} examples, fewer than "
                     f"one batch of {batch_size}.")
  order = grain.MapDataset.range(len(records) if train else
                                 math.ceil(len(records) / batch_size) * batch_size)
  if train:
    order = order.shuffle(seed).repeat(num_epochs)
    if num_epochs is not None:  # whole global batches only, so every process gets as many
      order = order[:len(order) // batch_size * batch_size]
  batches = (order[process_index::process_count]
             .batch(batch_size // process_count, drop_remainder=train)
             .map(ReadBatch(records))
             .random_map(transform, seed=seed)
             .to_iter_dataset(READ_OPTIONS))
  if worker_count:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app: defaults
      flags.FLAGS.mark_as_parsed()
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return batches
