"""Dataset names -> prepared TFDS builders, random-access sources and ``info()``, through the registry.

Datasets (``posenc.data.registry``): "fashion_mnist" (Debian IDX files), "digits" (scikit-learn's
handwritten digits), "text" (Austen + Moby Dick), "synthetic" (random batches of a task's shapes),
"algorithmic" (generated sequences), or any TFDS name (prepared as array_record in the data dir;
downloading needs internet).

Directories (environment variables, with defaults):
  POSENC_DATA_DIR    prepared TFDS data (default: TFDS's, i.e. $TFDS_DATA_DIR or
                     ~/tensorflow_datasets). Prepared once, reused by every run.
  POSENC_DEBIAN_DIR  where install.sh unpacks the R packages of the text corpus
                     (default ~/.cache/posenc/debian).

Split names: "train", "validation", "test" (each entry's ``splits``). Fashion-MNIST's
validation split is the LAST 5,000 of the official 60,000 training images and its
"train" the first 55,000. Any TFDS split string ("train[:10%]", "test") is
passed through unchanged, e.g. "train[:100%]" for all 60,000.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import os
import socket

import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import gcs_utils

from posenc.data import registry
from posenc.data.registry import DatasetInfo, Features

__all__ = ["DatasetInfo", "builder", "data_dir", "debian_dir", "file_lock", "info", "resolve_split", "source"]


def data_dir() -> str:
  return os.path.expanduser(os.environ.get("POSENC_DATA_DIR") or tfds.core.constants.DATA_DIR)


def debian_dir() -> str:
  return os.path.expanduser(os.environ.get("POSENC_DEBIAN_DIR") or "~/.cache/posenc/debian")


def resolve_split(dataset: str, split: str) -> str:
  """posenc split name -> TFDS split string (raw TFDS split strings pass through)."""
  table = registry.get(dataset).splits
  if table is None:
    return split
  if split in table:
    return table[split]
  if "[" not in split and "+" not in split:
    raise ValueError(f"Unknown split {split!r} of {dataset!r}: use one of {sorted(table)} or a "
                     "TFDS split string such as 'train[:1000]'.")
  return split


@contextlib.contextmanager
def file_lock(path: str):
  """An exclusive file lock, so concurrent processes prepare a dataset (or a file) only once."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _online(host: str = "storage.googleapis.com", timeout: float = 3.0) -> bool:
  try:
    socket.create_connection((host, 443), timeout=timeout).close()
    return True
  except OSError:
    return False


@functools.lru_cache(maxsize=32)
def builder(dataset: str, directory: str | None = None, source_dir: str | None = None):
  """The prepared TFDS builder of a dataset (prepared on first use, once per data dir).

  `source_dir` overrides where an offline builder reads its raw files (the entry's ``source_dir()``).
  """
  gcs_utils._is_gcs_disabled = True  # pylint: disable=protected-access  # never look up gs://tfds-data
  entry = registry.get(dataset)
  if entry.builder is None:
    raise ValueError(f"Dataset {dataset!r} is generated in memory: it has no files to read.")
  directory = directory or data_dir()
  make = functools.partial(entry.builder, data_dir=directory)
  try:
    b = make()
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"Unknown dataset {dataset!r}: use one of {registry.names()} or a TFDS "
                     f"dataset name (see tfds.list_builders()).") from e
  if b.is_prepared():
    return b
  with file_lock(os.path.join(directory, f".{b.name}.lock")):
    b = make()  # another process may have prepared it while we waited
    if b.is_prepared():
      return b
    config = None
    if entry.check_source is not None:
      source_dir = source_dir or entry.source_dir()
      entry.check_source(source_dir)  # the one clear error, before TFDS starts
      config = tfds.download.DownloadConfig(manual_dir=source_dir)
    elif not _online():
      raise RuntimeError(
          f"TFDS dataset {dataset!r} is not prepared in {directory} and this machine cannot "
          "reach the internet to download it. Prepare it where there is internet access "
          f"(`python -c \"import tensorflow_datasets as tfds; tfds.builder('{dataset}', "
          f"data_dir='{directory}').download_and_prepare(file_format='array_record')\"`) "
          "and copy the directory over, or set POSENC_DATA_DIR to where it is prepared.")
    try:
      b.download_and_prepare(file_format="array_record", download_config=config)
    except ImportError as e:  # e.g. TFDS encodes some image datasets with TensorFlow
      raise RuntimeError(f"Preparing TFDS dataset {dataset!r} needs a package that is not "
                         f"installed ({e}). Install it (for TensorFlow: `pip install "
                         "tensorflow-cpu`) or prepare the dataset elsewhere and copy it to "
                         f"{directory}.") from e
  return b


def source(dataset: str, split: str, directory: str | None = None):
  """A random-access (array_record) source of one split: `len()` and `[i]` -> dict."""
  b = builder(dataset, directory)
  try:
    return b.as_data_source(split=resolve_split(dataset, split))
  except (ValueError, KeyError, NotImplementedError) as e:
    raise ValueError(f"Cannot read split {split!r} of {dataset!r} from {b.data_dir} as "
                     f"array_record ({e}). Splits: {sorted(b.info.splits)}.") from e


def image_features(dataset: str, features) -> Features:
  """The Features of a TFDS builder's "image" and "label" features (ValueError unless it has them)."""
  if "image" not in features or "label" not in features:
    raise ValueError(f"Dataset {dataset!r} has features {sorted(features)}; posenc reads image "
                     "datasets with 'image' and 'label' features.")
  shape = features["image"].shape
  if len(shape) != 3 or None in shape:
    raise ValueError(f"Dataset {dataset!r} has images of shape {shape}; posenc's pipeline needs "
                     "one fixed (height, width, channels).")
  height, width, channels = shape
  return Features(num_classes=features["label"].num_classes, channels=channels, image_size=(height, width))


def info(dataset: str, directory: str | None = None) -> DatasetInfo:
  """Number of classes / vocabulary size, channels, image size and split sizes."""
  entry = registry.get(dataset)
  if entry.builder is None:
    return DatasetInfo(name=dataset, splits=dict(entry.split_sizes),
                       **dataclasses.asdict(entry.features or Features()))
  b = builder(dataset, directory)
  names = entry.splits or {s: s for s in b.info.splits}
  splits = {name: b.info.splits[tfds_split].num_examples for name, tfds_split in names.items()}
  features = entry.features or image_features(dataset, b.info.features)
  return DatasetInfo(name=dataset, splits=splits, **dataclasses.asdict(features))
