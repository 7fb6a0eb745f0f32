"""GPT-style causal LM on the text corpus (Austen's six novels + Moby Dick, byte-level BPE).

    python train.py --config=configs/gpt_tiny.py                       # default (short) run
    python train.py --config=configs/gpt_tiny.py:posenc=alibi          # any 1D encoding
    # perplexity of a trained run at 2L..16L, non-overlapping and sliding (stride L) windows:
    python train.py --config=configs/gpt_tiny.py --workdir=runs/gpt-eval \\
        --config.init_from=runs/gpt_tiny-learned-len128 --config.total_steps=0 \\
        --config.eval_lengths='(256,512,1024,2048)' --config.eval_stride=128
    python generate.py --workdir=runs/gpt_tiny-learned-len128 --prompt="It is a truth"

Every field, its default and its checks: python -m posenc.config_fields causal_lm.
"""
from __future__ import annotations

import ml_collections

from configs import common


def base() -> ml_collections.ConfigDict:
  c = common.base("causal_lm")
  c.model = "gpt-nano"            # 128 wide, 4 layers, 4 heads (posenc.models.GPT_SIZES)
  c.posenc = "learned"            # a 1D-capable encoding; learned 1D, like GPT-2, by default
  c.dataset = "text"              # the text corpus; the task tokenizes it with its own BPE
  # the task's fields keep their declared defaults: L = 128, a 4096-token BPE, evaluation at L only
  # --- optimisation and loop (overrides of the declared defaults) -------------------------
  c.batch_size = 32
  c.eval_batch_size = 32
  c.total_steps = 600
  c.warmup_steps = 60
  c.lr = 3e-3
  c.weight_decay = 0.1
  c.eval_every = 300
  c.checkpoint_every = 300
  return c


PRESETS = {}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.get_config_with_arg(base, PRESETS, arg)
