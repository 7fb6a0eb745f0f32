"""Real data offline: one dataset registry, TFDS builders over packaged files, grain pipelines.

  registry.get(name) -> Dataset(builder, splits, features, stats, ...)   (registry.names(): the registered)
  info(dataset) -> DatasetInfo(name, splits, num_classes, vocab_size, channels, image_size)
  images.loader(dataset, split, Batching(...), ImageOptions(...))        image classification
  masked_lm.loader(dataset, split, Batching(...), max_len=...)           BERT rows (WordPiece text)
  lm.loader(split, Batching(...), max_len=..., scored_tokens=...)       GPT rows (byte-level BPE)
"""
from posenc.data import registry
from posenc.data.batching import Batching
from posenc.data.datasets import DatasetInfo, data_dir, debian_dir, info

# Importing the dataset modules registers their datasets.
from posenc.data import algorithmic, digits, fashion_mnist, synthetic, text  # noqa: E402,F401

__all__ = ["Batching", "DatasetInfo", "data_dir", "debian_dir", "info", "registry"]
