"""The masked-LM pipeline: ``loader(dataset, split, batching, max_len=...)`` -> BERT batches of a
text dataset (one whose records hold "document", "paragraph" and WordPiece "input_ids").
Order, sharding and resume: posenc.data.batching.

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
at every max_len (length-extrapolation evaluation). The special tokens' ids are the
dataset's tokenizer's.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re

import grain
import numpy as np

from posenc.data import batching as batching_, datasets, registry

DEFAULT_MAX_LEN = 128
MASK_RATE, MASK_TOKEN_RATE, RANDOM_TOKEN_RATE = 0.15, 0.8, 0.1


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """The ids of BERT's special tokens in a WordPiece vocabulary."""
  pad: int
  cls: int
  sep: int
  mask: int


@functools.cache
def special_ids(dataset: str) -> SpecialIds:
  """The special-token ids of ``dataset``'s tokenizer (its registry entry's)."""
  tok = tokenizer(dataset)
  ids = {name: tok.token_to_id(f"[{name.upper()}]") for name in ("pad", "cls", "sep", "mask")}
  missing = [f"[{n.upper()}]" for n, i in ids.items() if i is None]
  if missing:
    raise ValueError(f"The tokenizer of dataset {dataset!r} has no {missing}: masked LM needs BERT's special tokens.")
  return SpecialIds(**ids)


def tokenizer(dataset: str):
  entry = registry.get(dataset)
  if entry.tokenizer is None:
    raise ValueError(f"Dataset {dataset!r} has no tokenizer: masked LM reads a text dataset, e.g. 'text'.")
  return entry.tokenizer()


class PackedText:
  """A split's token stream packed into rows of max_len: input_ids, segment_ids and
  stream_pos (index of the token in the split's stream; -1 for special tokens/padding)."""

  def __init__(self, paragraphs: list[np.ndarray], max_len: int, special: SpecialIds):
    cls, sep = special.cls, special.sep
    rows: list[tuple[list[int], list[int], list[int]]] = []
    ids, seg, pos, kind, offset = [cls], [0], [-1], 0, 0
    for paragraph in paragraphs:
      start = 0
      while start < len(paragraph):
        piece = paragraph[start:start + max_len - len(ids)].tolist()
        ids += piece
        seg += [kind] * len(piece)
        pos += range(offset + start, offset + start + len(piece))
        start += len(piece)
        if start == len(paragraph) and len(ids) < max_len:  # the paragraph ends in this row
          ids, seg, pos, kind = ids + [sep], seg + [kind], pos + [-1], 1 - kind
        if len(ids) == max_len:
          rows.append((ids, seg, pos))
          ids, seg, pos, kind = [cls], [0], [-1], 0
      offset += len(paragraph)
    if len(ids) > 1:
      rows.append((ids, seg, pos))
    self.num_tokens = offset
    shape = (len(rows), max_len)
    self.input_ids, self.segment_ids = np.full(shape, special.pad, np.int32), np.zeros(shape, np.int32)
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
def split_paragraphs(dataset: str, split: str, directory: str) -> tuple[np.ndarray, ...]:
  """Token ids of a text split's paragraphs, in corpus order (document, paragraph)."""
  src = datasets.source(dataset, split, directory)
  records = src.__getitems__(range(len(src)))
  records.sort(key=lambda r: (int(r["document"]), int(r["paragraph"])))
  return tuple(r["input_ids"] for r in records)


@functools.lru_cache(maxsize=8)
def packed_text(dataset: str, split: str, max_len: int, directory: str) -> PackedText:
  return PackedText(list(split_paragraphs(dataset, split, directory)), max_len, special_ids(dataset))


@functools.cache
def regular_token_ids(dataset: str) -> np.ndarray:
  """Ids a random replacement may use: every token but [PAD], [unusedN], [CLS], [MASK], ..."""
  vocab = tokenizer(dataset).get_vocab()
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
class MaskTokens(grain.transforms.RandomMap):
  """BERT masked-LM corruption of packed rows (see the module docstring)."""
  regular_ids: np.ndarray
  special: SpecialIds
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
    corrupted = np.where(action < MASK_TOKEN_RATE, self.special.mask,
                         np.where(action < MASK_TOKEN_RATE + RANDOM_TOKEN_RATE, random_ids, ids))
    return {"input_ids": np.where(selected, corrupted, ids).astype(np.int32),
            "segment_ids": batch["segment_ids"], "padding_mask": ids != self.special.pad,
            "mlm_targets": ids, "mlm_weights": selected.astype(np.float32),
            "valid": batch["valid"]}


def loader(dataset: str, split: str, batching: batching_.Batching, *, max_len: int = DEFAULT_MAX_LEN,
           data_dir: str | None = None) -> grain.IterDataset:
  """Masked-LM batches of ``dataset``/``split`` for this process, rows of ``max_len`` tokens (see the
  module docstring)."""
  max_len = batching_.check_int("max_len", max_len, 2)
  directory = data_dir or datasets.data_dir()
  records = packed_text(dataset, split, max_len, directory)
  regular = regular_token_ids(dataset)
  fixed = None
  if not batching.train:  # one draw per token of the stream: the same masks at every max_len
    fixed = draw_masks(np.random.default_rng(batching.seed), records.num_tokens, regular)
  transform = MaskTokens(regular, special_ids(dataset), fixed, **batching.shard)
  return batching_.batches(len(records), batching, batching_.ReadBatch(records), transform,
                           what=f"Split {split!r} of {dataset!r}")
