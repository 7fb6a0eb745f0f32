"""Masked language modelling with a BERT-style encoder (Austen + Moby Dick, WordPiece)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from posenc.config_fields import INT, Field, at_least
from posenc.geometry import Geometry
from posenc.tasks.base import Task, build_model, cross_entropy, dataset_info


# Synthetic rows imitate BERT's uncased WordPiece vocabulary (the text dataset's): [CLS] and [MASK],
# and the first regular token (ids below are [PAD], [unusedN], [UNK], [CLS], [SEP], [MASK]).
SYNTHETIC_CLS, SYNTHETIC_MASK, FIRST_REGULAR_ID = 101, 103, 999


def masked_positions(weights: jax.Array, capacity: int) -> jax.Array:
  """``[B, capacity]`` indices of each row's weighted tokens, in order, then unweighted ones."""
  return jnp.argsort(weights <= 0, axis=1, stable=True)[:, :capacity]


class MaskedLM(Task):
  name = "masked_lm"
  FIELDS = {"max_len": Field(64, "tokens per packed row = the length the model is built at", INT, at_least(2))}
  NDIM = 1
  ITEMS = "tokens"

  def check_dataset(self, config) -> None:
    dataset_info(config, "vocab_size", "it holds no text; use 'text'")

  def size_label(self, config) -> str:
    return f"len{config.max_len}"

  def geometry(self, config, size=None) -> Geometry:
    return Geometry.seq(config.max_len if size is None else size)

  def create_model(self, config, size=None):
    info = dataset_info(config, "vocab_size", "")
    return build_model(config, vocab_size=info.vocab_size, max_len=config.max_len if size is None else size)

  def loader(self, config, split, *, train, batch_size, size=None):
    from posenc.data import masked_lm
    return masked_lm.loader(config.dataset, split, self.batching(config, batch_size, train),
                            max_len=config.max_len if size is None else size)

  def random_batch(self, config, rng, rows, *, train, size=None):
    """Regular WordPiece ids after [CLS], 15 % of them masked ([MASK]), one segment, no padding."""
    from posenc.data.masked_lm import MASK_RATE
    shape = (rows, config.max_len if size is None else size)
    targets = rng.integers(FIRST_REGULAR_ID, dataset_info(config, "vocab_size", "").vocab_size, shape, dtype=np.int32)
    targets[:, 0] = SYNTHETIC_CLS
    weights = (rng.random(shape) < MASK_RATE).astype(np.float32)
    weights[:, 0] = 0.0
    return {"input_ids": np.where(weights > 0, SYNTHETIC_MASK, targets).astype(np.int32),
            "segment_ids": np.zeros(shape, np.int32), "padding_mask": np.ones(shape, bool),
            "mlm_targets": targets, "mlm_weights": weights, "valid": np.ones(rows, bool)}

  def forward(self, model, batch, *, train, position_scale=1.0, label_smoothing=0.0):
    """Logits only at the masked tokens (``mlm_capacity`` per row): the head is most of the step."""
    from posenc.data.masked_lm import mlm_capacity
    ids = batch["input_ids"]
    weights = batch["mlm_weights"] * batch["valid"].astype(jnp.float32)[:, None]
    at = masked_positions(weights, mlm_capacity(ids.shape[1]))
    positions = None
    if position_scale != 1.0:
      positions = Geometry.seq(ids.shape[1]).positions() * position_scale
    logits = model(ids, positions=positions, segment_ids=batch["segment_ids"],
                   padding_mask=batch["padding_mask"], predict_at=at, train=train)
    take = lambda x: jnp.take_along_axis(x, at, axis=1)  # noqa: E731
    return cross_entropy(logits, take(batch["mlm_targets"]), take(weights), label_smoothing)

  def items(self, batch) -> int:
    return int(batch["input_ids"].size)
