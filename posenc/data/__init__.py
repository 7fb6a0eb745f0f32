"""Real data offline: TFDS builders over Debian-packaged datasets, grain input pipelines.

  make_loader(dataset, split, *, batch_size, train, seed, ...) -> grain.DataLoader
  info(dataset) -> DatasetInfo(name, splits, num_classes, vocab_size, channels, image_size)
  lm_loader / lm_eval_loader(split, ...) -> grain.IterDataset  (causal LM, byte-level BPE: lm)
"""
from posenc.data.datasets import DatasetInfo, data_dir, debian_dir, info
from posenc.data.lm import lm_eval_loader, lm_loader
from posenc.data.pipeline import make_loader

__all__ = ["DatasetInfo", "data_dir", "debian_dir", "info", "lm_eval_loader", "lm_loader",
           "make_loader"]
