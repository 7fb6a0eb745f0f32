"""Dataset names -> prepared TFDS builders, random-access sources and `info()`.

posenc names: "fashion_mnist" (Debian IDX files), "text" (Austen + Moby Dick),
"synthetic" (random batches of a task's shapes: posenc.data.synthetic), or any TFDS name (prepared as array_record in the data dir; downloading needs internet).

Directories (environment variables, with defaults):
  POSENC_DATA_DIR    prepared TFDS data (default: TFDS's, i.e. $TFDS_DATA_DIR or
                     ~/tensorflow_datasets). Prepared once, reused by every run.
  POSENC_DEBIAN_DIR  where install.sh unpacks the R packages of the text corpus
                     (default ~/.cache/posenc/debian).

Split names: "train", "validation", "test" (table SPLITS). Fashion-MNIST's
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

from posenc.data import fashion_mnist, text

OURS = {"fashion_mnist": fashion_mnist.FashionMnistDebian, "text": text.GutenbergNovels}
CHECK_SOURCE = {"fashion_mnist": fashion_mnist.check_source, "text": text.check_source}
SPLITS = {
    "fashion_mnist": {"train": "train[:55000]", "validation": "train[55000:]", "test": "test"},
    "text": {"train": "train", "validation": "validation", "test": "test"},
}
VOCAB_SIZE = 30522  # all-MiniLM-L6-v2's WordPiece vocabulary


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


def data_dir() -> str:
  return os.path.expanduser(os.environ.get("POSENC_DATA_DIR") or tfds.core.constants.DATA_DIR)


def debian_dir() -> str:
  return os.path.expanduser(os.environ.get("POSENC_DEBIAN_DIR") or "~/.cache/posenc/debian")


def fashion_mnist_dir() -> str:
  """The installed Debian package, or the same files unpacked under POSENC_DEBIAN_DIR."""
  unpacked = os.path.join(debian_dir(), fashion_mnist.DEBIAN_DIR.lstrip("/"))
  return unpacked if not os.path.isdir(fashion_mnist.DEBIAN_DIR) and os.path.isdir(unpacked) \
      else fashion_mnist.DEBIAN_DIR


def resolve_split(dataset: str, split: str) -> str:
  """posenc split name -> TFDS split string (raw TFDS split strings pass through)."""
  table = SPLITS.get(dataset, {})
  if split in table:
    return table[split]
  if dataset in SPLITS and "[" not in split and "+" not in split:
    raise ValueError(f"Unknown split {split!r} of {dataset!r}: use one of {sorted(table)} or a "
                     "TFDS split string such as 'train[:1000]'.")
  return split


@contextlib.contextmanager
def _lock(path: str):
  """An exclusive file lock, so concurrent processes prepare a dataset only once."""
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

  `source_dir` overrides where our builders read raw files (Fashion-MNIST IDX
  directory / dpkg -x root of the R packages).
  """
  gcs_utils._is_gcs_disabled = True  # pylint: disable=protected-access  # never look up gs://tfds-data
  directory = directory or data_dir()
  if dataset in OURS:
    make = functools.partial(OURS[dataset], data_dir=directory)
    source_dir = source_dir or (fashion_mnist_dir() if dataset == "fashion_mnist" else debian_dir())
  else:
    make = functools.partial(tfds.builder, dataset, data_dir=directory)
  try:
    b = make()
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"Unknown dataset {dataset!r}: use 'fashion_mnist', 'text' or a TFDS "
                     f"dataset name (see tfds.list_builders()).") from e
  if b.is_prepared():
    return b
  with _lock(os.path.join(directory, f".{b.name}.lock")):
    b = make()  # another process may have prepared it while we waited
    if b.is_prepared():
      return b
    if dataset in OURS:
      CHECK_SOURCE[dataset](source_dir)  # the one clear error, before TFDS starts
      config = tfds.download.DownloadConfig(manual_dir=source_dir)
    elif not _online():
      raise RuntimeError(
          f"TFDS dataset {dataset!r} is not prepared in {directory} and this machine cannot "
          "reach the internet to download it. Prepare it where there is internet access "
          f"(`python -c \"import tensorflow_datasets as tfds; tfds.builder('{dataset}', "
          f"data_dir='{directory}').download_and_prepare(file_format='array_record')\"`) "
          "and copy the directory over, or set POSENC_DATA_DIR to where it is prepared.")
    else:
      config = None
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


def info(dataset: str, directory: str | None = None) -> DatasetInfo:
  """Number of classes / vocabulary size, channels, image size and split sizes."""
  if dataset == "synthetic":  # random batches of any task's shapes (posenc.data.synthetic)
    from posenc.data import synthetic
    return synthetic.INFO
  if dataset == "algorithmic":  # generated copy / reverse / addition / lookup sequences
    from posenc.data import algorithmic
    return algorithmic.INFO
  b = builder(dataset, directory)
  names = SPLITS.get(dataset) or {s: s for s in b.info.splits}
  splits = {name: b.info.splits[tfds_split].num_examples for name, tfds_split in names.items()}
  if dataset == "text":
    return DatasetInfo(name=dataset, splits=splits, vocab_size=VOCAB_SIZE)
  features = b.info.features
  if "image" not in features or "label" not in features:
    raise ValueError(f"Dataset {dataset!r} has features {sorted(features)}; posenc reads image "
                     "datasets with 'image' and 'label' features.")
  shape = features["image"].shape
  if len(shape) != 3 or None in shape:
    raise ValueError(f"Dataset {dataset!r} has images of shape {shape}; posenc's pipeline needs "
                     "one fixed (height, width, channels).")
  height, width, channels = shape
  return DatasetInfo(name=dataset, splits=splits, num_classes=features["label"].num_classes,
                     channels=channels, image_size=(height, width))
