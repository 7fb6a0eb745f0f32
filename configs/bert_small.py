"""BERT-style encoder, masked-LM on the text corpus (Austen's six novels + Moby Dick).

    python train.py --config=configs/bert_small.py                     # default (short) run
    python train.py --config=configs/bert_small.py:full                # full length
    python train.py --config=configs/bert_small.py:posenc=alibi,max_len=256
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from posenc.training.config import get_config_with_arg


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # --- model -------------------------------------------------------------------------
  c.model = "bert-mini"           # posenc.models name: bert-mini | bert-small | bert-base
  c.model_options = ml_collections.ConfigDict(dict(  # extra kwargs for posenc.models.create
      width=128, depth=2, num_heads=2, mlp_dim=512, dropout=0.0, attention_dropout=0.0))
  c.posenc = "learned"            # position encoding (posenc.encodings.names()), 1D-capable
  c.posenc_options = ml_collections.ConfigDict()  # its options: --config.posenc_options.NAME=VALUE
  c.dtype = "float32"             # compute dtype: float32 | bfloat16 (parameters stay float32)
  # --- data ----------------------------------------------------------------------------
  c.dataset = "text"              # the packed, BERT-masked text corpus (WordPiece of MiniLM)
  c.augment = False               # images only (text masking is always on for training)
  c.max_len = 64                  # tokens per packed row = the length the model is built at
  c.image_size = config_dict.placeholder(int)  # images only (unused for text)
  c.patch_size = config_dict.placeholder(int)  # images only (unused for text)
  c.eval_image_sizes = ()         # images only; must stay () for text
  # --- optimisation ----------------------------------------------------------------------
  c.batch_size = 16               # GLOBAL batch (divisible by mesh data x fsdp and by processes)
  c.eval_batch_size = 64          # GLOBAL eval batch (the last one is padded; padding is masked)
  c.eval_max_batches = 8          # evaluate on this many batches of the split (0 = all of it)
  c.total_steps = 600             # optimizer steps; 0 with init_from: evaluate a checkpoint only
  c.warmup_steps = 60             # linear warmup steps, then cosine decay to 0 at total_steps
  c.lr = 1e-3                     # peak AdamW learning rate
  c.weight_decay = 0.01           # AdamW decoupled decay (matrices only; not biases/norms/posenc)
  c.grad_clip_norm = 1.0          # clip gradients to this global norm (0 = no clipping)
  c.posenc_lr_mult = 1.0          # learning-rate multiplier for position-encoding parameters
  c.seed = 0                      # seeds parameters, dropout, masking and data order
  # --- loop, logging, checkpoints ----------------------------------------------------------
  c.log_every = 50                # steps between train-metric logs (console, TensorBoard, JSONL)
  c.eval_every = 300              # steps between evaluations: MLM loss + accuracy (0 = at the end)
  c.checkpoint_every = 300        # steps between async checkpoints (0 = only at the end)
  c.keep_checkpoints = 2          # keep the last K checkpoints (plus the best by MLM accuracy)
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
  """Full size (for an accelerator): bert-mini (256 wide, 4 layers) at length 128."""
  c.model_options = ml_collections.ConfigDict(dict(dropout=0.1, attention_dropout=0.1))
  c.max_len = 128
  c.batch_size = 128
  c.eval_batch_size = 128
  c.eval_max_batches = 0
  c.total_steps = 10000
  c.warmup_steps = 500
  c.eval_every = 1000
  c.checkpoint_every = 1000


PRESETS = {"full": _full}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return get_config_with_arg(base, PRESETS, arg)
