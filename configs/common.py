"""Defaults every config shares: the task, model and encoding fields, the loop, checkpoints,
transfer and devices. Each config file starts from ``base(task)`` and sets its task's own fields.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from posenc.config import get_config_with_arg  # noqa: F401  (what config files' get_config use)


def base(task: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # --- task and model -----------------------------------------------------------------
  c.task = task                   # posenc.tasks name: image_classification | masked_lm | causal_lm
  c.model = ""                    # posenc.models name, e.g. vit-mu | vit-ti | bert-tiny | gpt-nano
  c.model_options = ml_collections.ConfigDict()  # overrides of the named size and model kwargs
  c.attention_impl = "auto"       # auto (per backend) | per_head | xla | dot_product_attention
  c.posenc = "learned"            # position encoding (posenc.encodings.names())
  c.posenc_options = ml_collections.ConfigDict()  # its options: --config.posenc_options.NAME=VALUE
  c.dtype = "float32"             # compute dtype: float32 | bfloat16 (parameters stay float32)
  c.dataset = ""                  # posenc.data dataset name (or any TFDS dataset online)
  # --- optimisation ----------------------------------------------------------------------
  c.batch_size = 128              # GLOBAL batch (divisible by mesh data x fsdp and by processes)
  c.eval_batch_size = 512         # GLOBAL eval batch (the last one is padded; padding is masked)
  c.eval_max_batches = 0          # evaluate on this many batches of the split (0 = all of it)
  c.total_steps = 1000            # optimizer steps; 0 with init_from: evaluate a checkpoint only
  c.warmup_steps = 100            # linear warmup steps, then cosine decay to 0 at total_steps
  c.lr = 1e-3                     # peak AdamW learning rate
  c.weight_decay = 0.05           # AdamW decoupled decay (matrices only; not biases/norms/posenc)
  c.grad_clip_norm = 1.0          # clip gradients to this global norm (0 = no clipping)
  c.label_smoothing = 0.0         # training loss only: targets (1 - a) one-hot + a / classes (Szegedy et al.)
  c.posenc_lr_mult = 1.0          # learning-rate multiplier for position-encoding parameters
  c.seed = 0                      # seeds parameters, dropout, augmentation/masking and data order
  # --- loop, logging, checkpoints ----------------------------------------------------------
  c.log_every = 50                # steps between train-metric logs (console, TensorBoard, JSONL)
  c.eval_every = 500              # steps between evaluations (0 = only at the end)
  c.checkpoint_every = 500        # steps between async checkpoints (0 = only at the end)
  c.keep_checkpoints = 2          # keep the last K checkpoints (plus the best: Task.BEST_METRIC)
  c.restore_step = config_dict.placeholder(int)  # resume from this kept step, not the newest (later ones set aside)
  c.restart = False               # start afresh in a workdir that holds a run (its checkpoints set aside, kept)
  c.divergence_factor = 10.0      # stop when a step's loss > this x its recent median (guard.py); 0 = finite only
  c.init_from = config_dict.placeholder(str)  # start from another run's params (workdir or step dir)
  c.transfer = ml_collections.ConfigDict(dict(  # how init_from / eval sizes move position params
      method="bicubic",           # posenc.resize method: bicubic | bicubic_torch | bilinear | ...
      antialias=True,             # torch's antialias flag (bicubic / bilinear)
      extend="interpolate",       # learned 1D tables growing to a longer max_len: interpolate | copy
      interpolate_positions=False))  # continuous encodings (rope, ...): positions scaled into the trained range
  # --- devices -------------------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))  # axis sizes; -1 = the rest
  c.logical_axis_rules = (        # logical parameter/batch axis -> mesh axes (None = replicated)
      ("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "model"), ("heads", "model"),
      ("kv", None), ("vocab", "model"), ("posn", None), ("layers", None))
  return c
