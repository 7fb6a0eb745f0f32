"""A video ViT on moving Fashion-MNIST clips: which way does the object move? (posenc.tasks.video_motion)

    python train.py --config=configs/video_tiny.py                        # default run, 3D learned table
    python train.py --config=configs/video_tiny.py:posenc=mrope           # any of posenc.encodings.names(3)
    python train.py --config=configs/video_tiny.py --config.eval_num_frames='(4, 16)'

Every field, its default and its checks: python -m posenc.config_fields video_motion.
"""
from __future__ import annotations

import ml_collections

from configs import common


def base() -> ml_collections.ConfigDict:
  c = common.base("video_motion")
  c.model = "vit-mu"              # 64 wide, 4 layers, 4 heads (posenc.models.VIT_SIZES)
  c.dataset = "fashion_mnist"     # the images that move (any posenc.data image dataset)
  # the task's fields keep their declared defaults: 8 frames of 32 x 32, the object at 16 px moving
  # 1 px per frame, tubelets of 2 frames x 4 x 4 px (a 4 x 8 x 8 token grid)
  c.eval_num_frames = (4, 16)     # half and twice the trained clip length
  # --- optimisation (overrides of the declared defaults) ----------------------------------
  c.batch_size = 64
  c.total_steps = 300
  c.warmup_steps = 30
  c.lr = 2e-3                     # peak AdamW learning rate
  c.eval_every = 100
  c.eval_batch_size = 256
  c.eval_max_batches = 4          # 1,024 test clips per evaluation
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.get_config_with_arg(base, {}, arg)
