"""BERT-style encoder, masked-LM on the text corpus (Austen's six novels + Moby Dick).

    python train.py --config=configs/bert_small.py                     # default (short) run
    python train.py --config=configs/bert_small.py:full                # full length
    python train.py --config=configs/bert_small.py:posenc=alibi,max_len=256

Every field, its default and its checks: python -m posenc.config_fields masked_lm.
"""
from __future__ import annotations

import ml_collections

from configs import common


def base() -> ml_collections.ConfigDict:
  c = common.base("masked_lm")
  c.model = "bert-tiny"           # 128 wide, 2 layers, 2 heads (posenc.models.BERT_SIZES)
  c.model_options = ml_collections.ConfigDict(dict(dropout=0.0, attention_dropout=0.0))
  c.posenc = "learned"            # a 1D-capable encoding
  c.dataset = "text"              # the packed, BERT-masked text corpus (WordPiece of MiniLM)
  # the task's one field keeps its declared default: max_len = 64
  # --- optimisation and loop (overrides of the declared defaults) -------------------------
  c.batch_size = 16
  c.eval_batch_size = 64
  c.eval_max_batches = 8
  c.total_steps = 600
  c.warmup_steps = 60
  c.weight_decay = 0.01
  c.eval_every = 300
  c.checkpoint_every = 300
  return c


def _full(c: ml_collections.ConfigDict) -> None:
  """Full size (for an accelerator): bert-mini (256 wide, 4 layers) at length 128."""
  c.model = "bert-mini"
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
  return common.get_config_with_arg(base, PRESETS, arg)
