"""ViT on Fashion-MNIST: the default run finishes in a few minutes on 2 CPU cores.

    python train.py --config=configs/vit_tiny.py                       # default (short) run
    python train.py --config=configs/vit_tiny.py:full                  # full length (benchmarks, study)
    python train.py --config=configs/vit_tiny.py:posenc=rope_mixed     # short overrides, comma-separated
    python train.py --config=configs/vit_tiny.py --config.lr=1e-3      # or any field as a flag

Shared fields and their defaults: configs/common.py.
"""
from __future__ import annotations

import ml_collections

from configs import common


def base() -> ml_collections.ConfigDict:
  c = common.base("image_classification")
  c.model = "vit-mu"              # 64 wide, 4 layers, 4 heads (posenc.models.VIT_SIZES)
  c.model_options = ml_collections.ConfigDict(dict(
      scan_layers=False))         # unrolled layers: a faster CPU step (longer compile)
  c.dataset = "fashion_mnist"     # posenc.data dataset name (or any TFDS image dataset online)
  # --- task: image classification ---------------------------------------------------------
  c.image_size = 28               # size the model is built and trained at: int or (h, w)
  c.patch_size = 7                # patch side; must divide image_size and every eval_image_sizes
  c.augment = False               # train-time random crop (pad size//8) + flip (helps long runs)
  c.eval_image_sizes = ()         # also evaluate at these sizes (parameters transferred on the fly)
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


PRESETS = {"full": _full}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.get_config_with_arg(base, PRESETS, arg)
