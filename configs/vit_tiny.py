"""ViT on Fashion-MNIST: the default run finishes in a few minutes on 2 CPU cores.

    python train.py --config=configs/vit_tiny.py                       # default (short) run
    python train.py --config=configs/vit_tiny.py:full                  # full length (benchmarks, study)
    python train.py --config=configs/vit_tiny.py:posenc=rope_mixed     # short overrides, comma-separated
    python train.py --config=configs/vit_tiny.py --config.lr=1e-3      # or any field as a flag
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from posenc.training.config import get_config_with_arg


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # --- model -------------------------------------------------------------------------
  c.model = "vit-mu"              # posenc.models name: vit-mu | vit-ti | vit-s | vit-b
  c.model_options = ml_collections.ConfigDict(dict(  # extra kwargs for posenc.models.create
      width=64, depth=4, num_heads=4, mlp_dim=256, pool="cls",
      scan_layers=False))         # unrolled layers: a faster CPU step (longer compile)
  c.posenc = "learned"            # position encoding (posenc.encodings.names())
  c.posenc_options = ml_collections.ConfigDict()  # its options: --config.posenc_options.NAME=VALUE
  c.dtype = "float32"             # compute dtype: float32 | bfloat16 (parameters stay float32)
  # --- data ----------------------------------------------------------------------------
  c.dataset = "fashion_mnist"     # posenc.data dataset name (or any TFDS image dataset online)
  c.augment = False               # train-time random crop (pad size//8) + flip (helps long runs)
  c.image_size = 28               # size the model is built and trained at: int or (h, w)
  c.patch_size = 7                # patch side; must divide image_size and every eval_image_sizes
  c.max_len = config_dict.placeholder(int)  # text only: sequence length (unused for images)
  c.eval_image_sizes = ()         # also evaluate at these sizes (parameters transferred on the fly)
  # --- optimisation ----------------------------------------------------------------------
  c.batch_size = 128              # GLOBAL batch (divisible by mesh data x fsdp and by processes)
  c.eval_batch_size = 512         # GLOBAL eval batch (the last one is padded; padding is masked)
  c.eval_max_batches = 0          # evaluate on this many batches of the split (0 = all of it)
  c.total_steps = 1200            # optimizer steps (128 x 1200 = 2.8 epochs); 0 + init_from: evaluate only
  c.warmup_steps = 100            # linear warmup steps, then cosine decay to 0 at total_steps
  c.lr = 2e-3                     # peak AdamW learning rate
  c.weight_decay = 0.05           # AdamW decoupled decay (matrices only; not biases/norms/posenc)
  c.grad_clip_norm = 1.0          # clip gradients to this global norm (0 = no clipping)
  c.posenc_lr_mult = 1.0          # learning-rate multiplier for position-encoding parameters
  c.seed = 0                      # seeds parameters, dropout and data order
  # --- loop, logging, checkpoints ----------------------------------------------------------
  c.log_every = 50                # steps between train-metric logs (console, TensorBoard, JSONL)
  c.eval_every = 500              # steps between evaluations (0 = only at the end)
  c.checkpoint_every = 500        # steps between async checkpoints (0 = only at the end)
  c.keep_checkpoints = 2          # keep the last K checkpoints (plus the best by eval accuracy)
  c.init_from = config_dict.placeholder(str)  # start from another run's params (workdir or step dir)
  c.transfer = ml_collections.ConfigDict(dict(  # how init_from / eval sizes move position params
      method="bicubic",           # posenc.resize method: bicubic | bicubic_torch | bilinear | ...
      antialias=True,             # torch's antialias flag (bicubic / bilinear)
      extend="interpolate",       # learned 1D tables growing to a longer max_len: interpolate | copy
      interpolate_positions=False))  # RoPE: scale positions into the trained range (else extrapolate)
  # --- devices -------------------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))  # axis sizes; -1 = the rest
  c.logical_axis_rules = (        # logical parameter/batch axis -> mesh axes (None = replicated)
      ("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "model"), ("heads", "model"),
      ("kv", None), ("vocab", "model"), ("posn", None), ("layers", None))
  return c


def _full(c: ml_collections.ConfigDict) -> None:
  """Full length: what benchmarks/ and the study train (~14 epochs, augmented)."""
  c.total_steps = 6000
  c.warmup_steps = 300
  c.augment = True
  c.eval_every = 1000
  c.checkpoint_every = 1000


PRESETS = {"full": _full}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return get_config_with_arg(base, PRESETS, arg)
