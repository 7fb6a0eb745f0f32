"""Causal (next-token) language modelling with a GPT-style decoder, and its length evaluation.

Training rows pack the train split's documents (byte-level BPE, joined by an
end-of-text token) with positions that restart per document and packing ids
that keep documents apart. Evaluation scores the split's token stream in
windows of every length in ``eval_lengths`` (the ALiBi paper's protocol): non-
overlapping windows, and, with ``eval_stride`` S, sliding windows that score
only their last S tokens. Every length and mode scores exactly the same tokens:
the first ``scored_tokens`` targets of the stream, a multiple of every window
and stride.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from posenc.config import ConfigError
from posenc.config_fields import INT, INTS, Field, Rule, at_least
from posenc.geometry import Geometry
from posenc.tasks.base import Task, build_model, cross_entropy, dataset_info


class CausalLM(Task):
  name = "causal_lm"
  FIELDS = {
      "max_len": Field(128, "tokens per training row = the length the model is built at (L)", INT, at_least(2)),
      "vocab_size": Field(4096, "byte-level BPE vocabulary, trained on the train split (stored and reused); "
                          "at least the 256 bytes and the end-of-text token", INT, at_least(257)),
      "eval_lengths": Field((), "also evaluate windows of these lengths (e.g. 2L, 4L, ...); () = only L", INTS,
                            Rule(lambda v: all(n >= 2 for n in v), "each >= 2")),
      "eval_stride": Field(0, "sliding-window stride S for those lengths (scores the last S of each); 0 = none",
                           INT, at_least(0)),
      "eval_tokens": Field(16384, "score at most this many tokens of the split per evaluation (0 = all that fit)",
                           INT, at_least(0)),
  }
  NDIM = 1
  CAUSAL = True
  ITEMS = "tokens"
  BEST_METRIC = ("loss", "min")  # lower loss (and perplexity) is better

  def validate(self, config) -> None:
    lengths, stride = list(config.eval_lengths), config.eval_stride
    if stride and any(stride > n for n in lengths):
      raise ConfigError(f"config field 'eval_stride' ({stride}) exceeds an evaluated length {lengths}; a "
                        f"sliding window scores its last S tokens, so S <= every length.")
    if config.eval_max_batches:
      raise ConfigError("config field 'eval_max_batches' must be 0 for causal_lm: every length must score "
                        "the same tokens; cap them with eval_tokens instead.")

  def check_dataset(self, config) -> None:
    dataset_info(config, "vocab_size", "it holds no text; use 'text'")

  def size_label(self, config) -> str:
    return f"len{config.max_len}"

  def eval_sizes(self, config) -> tuple:
    """(length, stride) pairs: non-overlapping (stride None) and, with eval_stride, sliding."""
    sizes = [(n, None) for n in config.eval_lengths]
    if config.eval_stride:
      sizes += [(n, config.eval_stride) for n in (config.max_len, *config.eval_lengths)]
    return tuple(sizes)

  def size_suffix(self, size) -> str:
    length, stride = size
    return f"_{length}" + (f"_s{stride}" if stride else "")

  def geometry(self, config, size=None) -> Geometry:
    return Geometry.seq(config.max_len if size is None else size[0])

  def create_model(self, config, size=None):
    return build_model(config, vocab_size=config.vocab_size, max_len=config.max_len if size is None else size[0])

  def scored_tokens(self, config, split: str) -> int:
    """How many targets every evaluation of ``split`` scores: a multiple of every window and stride."""
    from posenc.data import lm
    unit = math.lcm(config.max_len, *config.eval_lengths, config.eval_stride or 1)
    fits = (lm.stream_length(split, config.vocab_size, dataset=config.dataset) - 1) // unit * unit
    cap = config.eval_tokens // unit * unit if config.eval_tokens else fits
    if min(fits, cap) < unit:
      raise ConfigError(f"the {split} split is too short to score one window of {unit} tokens; lower "
                        f"eval_lengths / eval_stride or raise eval_tokens.")
    return min(fits, cap)

  def loader(self, config, split, *, train, batch_size, size=None):
    from posenc.data import lm
    if train:
      return lm.loader(split, self.batching(config, batch_size, True), max_len=config.max_len,
                       vocab_size=config.vocab_size, dataset=config.dataset)
    length, stride = (config.max_len, None) if size is None else size
    return lm.loader(split, self.batching(config, batch_size, False), max_len=length, vocab_size=config.vocab_size,
                     scored_tokens=self.scored_tokens(config, split), stride=stride, dataset=config.dataset)

  def random_batch(self, config, rng, rows, *, train, size=None):
    """One document per row; an evaluation window with a stride scores its last ``stride`` tokens."""
    length, stride = (config.max_len, None) if size is None else size
    tokens = rng.integers(0, config.vocab_size, (rows, length + 1), dtype=np.int32)
    weights = np.ones((rows, length), np.float32)
    if stride:
      weights[:, :length - stride] = 0.0
    return {"input_ids": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights,
            "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
            "packing_ids": np.ones((rows, length), np.int32), "valid": np.ones(rows, np.float32)}

  def forward(self, model, batch, *, train, position_scale=1.0, label_smoothing=0.0):
    positions = batch["positions"]
    if position_scale != 1.0:
      positions = positions * position_scale
    logits = model(batch["input_ids"], positions=positions, packing_ids=batch["packing_ids"], train=train)
    weights = batch["weights"] * batch["valid"].astype(jnp.float32)[:, None]
    return cross_entropy(logits, batch["targets"], weights, label_smoothing)

  def metrics(self, stats: dict) -> dict:
    out = super().metrics(stats)
    return {**out, "perplexity": jnp.exp(out["loss"])}

  def items(self, batch) -> int:
    return int(batch["input_ids"].size)
