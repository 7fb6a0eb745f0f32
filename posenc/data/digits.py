"""scikit-learn's handwritten digits as a TFDS builder: 1,797 8x8 grayscale images of the digits 0-9.

The data ship inside the scikit-learn wheel (``sklearn/datasets/data/digits.csv.gz``, the file
``sklearn.datasets.load_digits`` reads: per row 64 pixel counts 0..16, then the label), so the
dataset is offline once ``pip install -r requirements.txt`` has run. The builder stores the rows
in file order as one TFDS split "train" of uint8 images, each count c as round(c * 255 / 16). The
registry entry at the end carves posenc's splits from it: the first 1,437 rows are "train", the
next 180 "validation", the last 180 "test".
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import tensorflow_datasets as tfds

from posenc.data import registry

FILE = "digits.csv.gz"
NUM_IMAGES, SIDE, LEVELS = 1797, 8, 16
INSTALL_HINT = "Install scikit-learn (`pip install -r requirements.txt`, or run `bash install.sh`)."


def source_dir() -> str:
  """scikit-learn's bundled data directory (found without importing scikit-learn)."""
  spec = importlib.util.find_spec("sklearn")
  root = os.path.dirname(spec.origin) if spec and spec.origin else "<scikit-learn not installed>"
  return os.path.join(root, "datasets", "data")


def read_digits(directory: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [1797, 8, 8, 1], labels uint8 [1797]) from ``digits.csv.gz``, checked."""
  path = os.path.join(directory, FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Digits file {path} does not exist. {INSTALL_HINT}")
  try:
    rows = np.loadtxt(path, delimiter=",", ndmin=2)
  except (OSError, EOFError, ValueError) as e:
    raise ValueError(f"Digits file {path} is not a readable CSV ({e}). {INSTALL_HINT}") from e
  counts, labels = rows[:, :-1], rows[:, -1]
  if rows.shape != (NUM_IMAGES, SIDE * SIDE + 1) or counts.min() < 0 or counts.max() > LEVELS \
      or set(np.unique(labels)) != set(range(10)):
    raise ValueError(f"Digits file {path} holds {rows.shape} values, expected {NUM_IMAGES} rows of "
                     f"{SIDE * SIDE} counts in 0..{LEVELS} and a label 0..9. {INSTALL_HINT}")
  images = np.rint(counts * 255 / LEVELS).astype(np.uint8).reshape(-1, SIDE, SIDE, 1)
  return images, labels.astype(np.uint8)


def check_source(directory: str | os.PathLike) -> None:
  read_digits(directory)


class ScikitLearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits (manual_dir: its bundled data directory)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "The 1,797 digits of scikit-learn's digits.csv.gz, in file order."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"manual_dir holds {FILE} (scikit-learn's datasets/data). {INSTALL_HINT}"

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="Handwritten digits 0-9 as 8x8 grayscale images (UCI optdigits, as in scikit-learn).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(SIDE, SIDE, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,  # stored in file order: the slices of the splits are exact
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    images, labels = read_digits(dl_manager.manual_dir)
    return {"train": self._generate_examples(images, labels)}

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": int(label)}


registry.register(registry.Dataset(
    name="digits", builder=ScikitLearnDigits, source_dir=source_dir, check_source=check_source,
    splits={"train": "train[:1437]", "validation": "train[1437:1617]", "test": "train[1617:]"},
    features=registry.Features(num_classes=10, channels=1, image_size=(SIDE, SIDE)),
    stats=(0.3054, 0.3753)))  # mean, std of the 1,437 train images' pixels in [0, 1]
