"""The dataset ``synthetic``: random batches with the keys, shapes and dtypes of a task's real ones.

For speed benchmarks and device checks on machines where the real datasets are not installed
(``--config.dataset=synthetic``), as maxtext's synthetic dataset. Each task draws its own rows
(``Task.random_batch``); this module makes them a deterministic, resumable grain dataset: batch
``i`` of process ``p`` is drawn from ``(seed, i, p)``. Training batches never end; an evaluation
split is read once, in ``ceil(examples / batch)`` batches. Nothing here is learnable: losses
on synthetic data mean nothing.
"""
from __future__ import annotations

from typing import Callable

import grain
import numpy as np

from posenc.data import datasets, registry
from posenc.data.text import VOCAB_SIZE

NAME = "synthetic"
# 3-channel images and 1000 classes (ImageNet's head), BERT's WordPiece vocabulary.
registry.register(registry.Dataset(
    name=NAME, features=registry.Features(num_classes=1000, channels=3, vocab_size=VOCAB_SIZE),
    split_sizes={"train": 1_281_167, "validation": 8_192, "test": 8_192}, random_batches=True))
INFO = datasets.info(NAME)
ENDLESS = 2**62


def loader(draw_rows: Callable[[np.random.Generator, int], dict], *, split: str, batch_size: int, train: bool,
           seed: int, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Batches of ``draw_rows(rng, batch_size // process_count)`` for this process."""
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} is not divisible by the {process_count} processes.")
  rows = batch_size // process_count
  examples = INFO.splits.get(split, INFO.splits["test"])
  count = ENDLESS if train else -(-examples // batch_size)

  def batch(i):
    return draw_rows(np.random.default_rng((seed, int(i), process_index)), rows)

  return grain.MapDataset.range(count).map(batch).to_iter_dataset()
