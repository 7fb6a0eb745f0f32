"""ViT on Fashion-MNIST: a short default run and named presets.

    python train.py --config=configs/vit_tiny.py                       # default (short) run
    python train.py --config=configs/vit_tiny.py:full                  # full length (benchmarks, study)
    python train.py --config=configs/vit_tiny.py:hybrid                # conv stem, the best measured accuracy
    python train.py --config=configs/vit_tiny.py:digits                # scikit-learn's 8x8 digits instead
    python train.py --config=configs/vit_tiny.py:posenc=rope_mixed     # short overrides, comma-separated
    python train.py --config=configs/vit_tiny.py --config.lr=1e-3      # or any field as a flag

Shared fields and their defaults: configs/common.py.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from configs import common


def base() -> ml_collections.ConfigDict:
  c = common.base("image_classification")
  c.model = "vit-mu"              # 64 wide, 4 layers, 4 heads (posenc.models.VIT_SIZES)
  c.dataset = "fashion_mnist"     # posenc.data dataset name (or any TFDS image dataset online)
  c.train_split = "train"         # or a TFDS split string: "train[:100%]" = all 60,000 (validation included)
  # --- task: image classification ---------------------------------------------------------
  c.image_size = config_dict.FieldReference(28, field_type=object)  # built/trained at: int or (h, w)
  c.patch_size = 7                # patch side; must divide image_size, eval_ and train_image_sizes
  c.augment = False               # train-time random-resized crop (crop_scale) + flip (helps long runs)
  c.crop_scale = (0.35, 1.0)      # crop area fraction, uniform in (low, high); aspect log-uniform in [3/4, 4/3]
  c.flip = False                  # train-time horizontal flip (p = 1/2; augment flips too)
  c.translate = 0                 # train-time random shift by up to this many pixels per axis (zero fill)
  c.random_erasing = 0.0          # train-time probability of erasing one box with noise (timm's reprob)
  c.train_image_sizes = ()        # e.g. (24, 32, 40): one per step from (seed, step), resampled; () = image_size
  c.eval_image_sizes = ()         # also evaluate at these sizes (parameters transferred on the fly)
  c.eval_protocol = "zoom"        # eval sizes (and image_size) != object_size: zoom (resample) | canvas
                                  #   (the object at object_size, at a seeded place on a blank canvas / crop)
  c.object_size = 0               # canvas: the object's size, the trained scale (0 = image_size; init_from
                                  #   runs on canvas images: the source run's image_size)
  # --- optimisation (overrides of configs/common.py) --------------------------------------
  c.total_steps = 1200            # 128 x 1200 = 2.8 epochs; 0 + init_from: evaluate only
  c.lr = 2e-3
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
