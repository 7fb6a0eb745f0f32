"""Real data offline: TFDS builders over Debian-packaged datasets, grain input pipelines.

  make_loader(dataset, split, *, batch_size, train, seed, ...) -> grain.DataLoader
  info(dataset) -> DatasetInfo(name, splits, num_classes, vocab_size, channels, image_size)
"""
from posenc.data.datasets import DatasetInfo, data_dir, debian_dir, info
from posenc.data.pipeline import make_loader

__all__ = ["DatasetInfo", "data_dir", "debian_dir", "info", "make_loader"]
