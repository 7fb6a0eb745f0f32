"""The one dataset registry: ``get(name)`` -> its ``Dataset`` entry.

An entry holds everything posenc knows about a dataset: its TFDS builder, where that builder reads
its raw files and the offline check of them, its split names, its features and its normalisation
statistics. Each dataset module registers its own entry (``register(Dataset(...))``), as each
encoding family registers its encodings; a name that is not registered is a TFDS catalogue dataset
(prepared in the data dir, or downloaded where there is internet).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from posenc.config import did_you_mean

DEFAULT_IMAGE_STATS = (0.5, 0.5)  # maps pixels in [0, 1] to [-1, 1]


@dataclasses.dataclass(frozen=True)
class Features:
  """What a model is built for: labelled images (classes, channels, size) or token ids (vocabulary)."""
  num_classes: int | None = None
  channels: int | None = None
  image_size: tuple[int, int] | None = None
  vocab_size: int | None = None


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a model needs to know about a dataset. Split sizes count examples
  (images; paragraphs for "text")."""
  name: str
  splits: dict[str, int]
  num_classes: int | None = None
  vocab_size: int | None = None
  channels: int | None = None
  image_size: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class Dataset:
  """One dataset. ``builder(data_dir=...)``: its (unprepared) TFDS builder, None for a dataset
  generated in memory. ``source_dir()``: where the builder reads its raw files (TFDS's manual_dir),
  and ``check_source(dir)`` raises the one clear error if they are missing or damaged; both None
  for a TFDS download. ``splits``: posenc split name -> TFDS split string (None: TFDS's own names).
  ``features``: None reads them from the builder (an "image" and a "label" feature).
  ``stats``: (mean, std) of the train split's pixels in [0, 1], for normalisation.
  ``tokenizer()``: the tokenizer of a text dataset's ``input_ids`` (HF ``tokenizers``).
  ``split_sizes``: a generated dataset's nominal split sizes. ``random_batches``: batches are the
  task's own random rows (``Task.random_batch``), not read from anywhere."""
  name: str
  builder: Callable[..., Any] | None = None
  source_dir: Callable[[], str] | None = None
  check_source: Callable[[str], None] | None = None
  splits: Mapping[str, str] | None = None
  features: Features | None = None
  stats: tuple[float, float] = DEFAULT_IMAGE_STATS
  tokenizer: Callable[[], Any] | None = None
  split_sizes: Mapping[str, int] | None = None
  random_batches: bool = False


_REGISTRY: dict[str, Dataset] = {}


def register(entry: Dataset) -> Dataset:
  if entry.name in _REGISTRY:
    raise ValueError(f"dataset '{entry.name}' is registered twice")
  _REGISTRY[entry.name] = entry
  return entry


def names() -> list[str]:
  return sorted(_REGISTRY)


def tfds_catalogue(name: str) -> Dataset:
  """The entry of a TFDS catalogue dataset: its own builder, splits and features."""

  def builder(data_dir: str):
    import tensorflow_datasets as tfds  # imported late: TFDS is heavy
    return tfds.builder(name, data_dir=data_dir)

  return Dataset(name=name, builder=builder)


def get(name: str) -> Dataset:
  """Dataset ``name``'s entry (an unregistered name: the TFDS catalogue's dataset of that name)."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"dataset name {name!r}{did_you_mean(str(name), names())}: use one of {names()} "
                     "or a TFDS dataset name.")
  return _REGISTRY.get(name) or tfds_catalogue(name)
