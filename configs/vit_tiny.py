"""ViT on Fashion-MNIST: a short default run and named presets.

    python train.py --config=configs/vit_tiny.py                       # default (short) run
    python train.py --config=configs/vit_tiny.py:full                  # full length (benchmarks, study)
    python train.py --config=configs/vit_tiny.py:hybrid                # conv stem, the best measured accuracy
    python train.py --config=configs/vit_tiny.py:digits                # scikit-learn's 8x8 digits instead
    python train.py --config=configs/vit_tiny.py:posenc=rope_mixed     # short overrides, comma-separated
    python train.py --config=configs/vit_tiny.py --config.lr=1e-3      # or any field as a flag

Every field, its default and its checks: python -m posenc.config_fields image_classification.
"""
from __future__ import annotations

import ml_collections

from configs import common


def base() -> ml_collections.ConfigDict:
  c = common.base("image_classification")
  c.model = "vit-mu"              # 64 wide, 4 layers, 4 heads (posenc.models.VIT_SIZES)
  c.dataset = "fashion_mnist"     # posenc.data dataset name (or any TFDS image dataset online)
  # the task's fields keep their declared defaults: 28 x 28, patch 7, no augmentation, zoom protocol
  # --- optimisation (overrides of the declared defaults) ----------------------------------
  c.total_steps = 1200            # 128 x 1200 = 2.8 epochs; 0 + init_from: evaluate only
  c.lr = 2e-3                     # peak AdamW learning rate
  return c


def _full(c: ml_collections.ConfigDict) -> None:
  """Full length (~14 epochs, augmented)."""
  c.total_steps = 6000
  c.warmup_steps = 300
  c.augment = True
  c.eval_every = 1000
  c.checkpoint_every = 1000


def _hybrid(c: ml_collections.ConfigDict) -> None:
  """The most accurate measured recipe within the presets' time budget (README, Presets): a hybrid ViT, ``vit-mu``
  with Xiao et al.'s convolutional stem (28 -> 14 -> 7) run wider than the transformer (1 -> 64 -> 128
  channels), two more 3x3 convolutions at 128 on the 7x7 token grid, 1x1 to 64, patch 4; random
  erasing (p = 1/4), dropout and drop-path; no random-resized crops (on 28 px Fashion-MNIST they
  slowed it more than they regularised)."""
  c.patch_size = 4
  c.model_options.stem = "conv"
  c.model_options.stem_width = 128
  c.model_options.stem_extra_convs = 2
  c.model_options.dropout = 0.1
  c.model_options.drop_path = 0.1
  c.random_erasing = 0.25
  c.total_steps = 3400
  c.warmup_steps = 300
  c.eval_every = 1000
  c.checkpoint_every = 1000


def _digits(c: ml_collections.ConfigDict) -> None:
  """scikit-learn's 8x8 handwritten digits (1,437 train images; posenc.data.digits): patch 2, a 4x4 grid."""
  c.dataset = "digits"
  c.image_size = 8
  c.patch_size = 2
  c.total_steps = 600
  c.warmup_steps = 50


PRESETS = {"full": _full, "hybrid": _hybrid, "digits": _digits}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.get_config_with_arg(base, PRESETS, arg)
