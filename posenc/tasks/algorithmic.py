"""Algorithmic length generalisation: copy, reverse, addition and lookup with a causal decoder, by exact match.

A GPT is trained on problems of size n in [1, ``train_max_len``] (``posenc.data.algorithmic``: one
example per row, right-padded to the tokens of the largest n) and evaluated at exactly n for
``train_max_len`` and each of ``eval_lengths``, each at its own sequence length (Kazemnejad et al.
2023; Ruoss et al. 2023). Under teacher forcing, a row is exactly right when the argmax at every
answer token (and EOS) is the target: that is what greedy decoding from [SEP] would reproduce.
Metrics: loss and accuracy per answer token, exact_match per row.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from posenc.config import ConfigError
from posenc.config_fields import INT, INTS, STR, Field, Rule, greater, known
from posenc.geometry import Geometry
from posenc.tasks.base import Task, build_model, cross_entropy


def _algo_task(name) -> None:
  from posenc.data import algorithmic  # imported late: data builders are heavy
  if name not in algorithmic.TASKS:
    raise ValueError(f"must be one of {algorithmic.TASKS}, got {name!r}.")


class Algorithmic(Task):
  name = "algorithmic"
  FIELDS = {
      "algo_task": Field("copy", "copy | reverse | add (two n-digit numbers, least-significant digit first) | "
                         "lookup (n key-value pairs, then a key: its value)", STR,
                         known(_algo_task, "one of posenc.data.algorithmic.TASKS")),
      "num_symbols": Field(16, "copy / reverse draw each x_i from this many tokens, lookup its values (add: the "
                           "digits 0-9)", INT, greater(0)),
      "train_max_len": Field(16, "the largest n trained on (rows draw n uniformly from 1..N); the model is built "
                             "for it", INT, greater(0)),
      "eval_lengths": Field((32, 64), "also evaluate at these n (exactly n per row), e.g. 2N, 4N; () = only N",
                            INTS, Rule(lambda v: all(n >= 1 for n in v), "each >= 1")),
      "eval_examples": Field(1000, "examples per evaluated n, from seeds fixed per split: the same for every model",
                             INT, greater(0)),
  }
  NDIM = 1
  CAUSAL = True
  ITEMS = "tokens"

  def validate(self, config) -> None:
    from posenc.data import algorithmic
    top = algorithmic.max_size(config.algo_task)
    for field, n in (("train_max_len", config.train_max_len), *(("eval_lengths", n) for n in config.eval_lengths)):
      if top is not None and n > top:
        raise ConfigError(f"config field '{field}': {config.algo_task} has {top} distinct keys, so n <= {top}; "
                          f"got {n}.")

  def check_dataset(self, config) -> None:
    from posenc.data import algorithmic, registry
    if config.dataset != algorithmic.NAME and not registry.get(config.dataset).random_batches:
      raise ConfigError(f"config field 'dataset': task algorithmic generates its sequences ('algorithmic'; "
                        f"or 'synthetic' for speed checks), not '{config.dataset}'.")

  def size_label(self, config) -> str:
    return f"{config.algo_task}{config.train_max_len}"

  def eval_sizes(self, config) -> tuple:
    return tuple(config.eval_lengths)

  def _n(self, config, size) -> int:
    return config.train_max_len if size is None else size

  def seq_len(self, config, size=None) -> int:
    from posenc.data import algorithmic
    return algorithmic.seq_len(config.algo_task, self._n(config, size))

  def geometry(self, config, size=None) -> Geometry:
    return Geometry.seq(self.seq_len(config, size))

  def create_model(self, config, size=None):
    from posenc.data import algorithmic
    return build_model(config, vocab_size=algorithmic.vocab_size(config.algo_task, config.num_symbols),
                       max_len=self.seq_len(config, size))

  def loader(self, config, split, *, train, batch_size, size=None):
    from posenc.data import algorithmic
    return algorithmic.loader(config.algo_task, split, batch_size=batch_size, train=train, seed=config.seed,
                              size=self._n(config, size), symbols=config.num_symbols,
                              examples=config.eval_examples, process_index=jax.process_index(),
                              process_count=jax.process_count())

  def random_batch(self, config, rng, rows, *, train, size=None):
    """The generator's rows (dataset 'synthetic': the same sequences, its own seeds and counts)."""
    from posenc.data import algorithmic
    n = (1, config.train_max_len) if train else self._n(config, size)
    return algorithmic.batch(config.algo_task, n, rows, rng, symbols=config.num_symbols,
                             length=self.seq_len(config, None if train else size))

  def forward(self, model, batch, *, train, position_scale=1.0, label_smoothing=0.0):
    """CausalLM's forward; the stats add the valid rows and those with every weighted token right."""
    positions = batch["positions"]
    if position_scale != 1.0:
      positions = positions * position_scale
    logits = model(batch["input_ids"], positions=positions, packing_ids=batch["packing_ids"], train=train)
    valid = batch["valid"].astype(jnp.float32)
    weights = batch["weights"] * valid[:, None]
    loss, stats = cross_entropy(logits, batch["targets"], weights, label_smoothing)
    wrong = (jnp.argmax(logits, -1) != batch["targets"]) & (weights > 0)
    exact = jnp.sum(valid * (~jnp.any(wrong, axis=-1)).astype(jnp.float32))
    return loss, {**stats, "rows": jnp.sum(valid), "exact": exact}

  def metrics(self, stats: dict) -> dict:
    return {**super().metrics(stats), "exact_match": stats["exact"] / jnp.maximum(stats["rows"], 1.0)}

  def items(self, batch) -> int:
    return int(batch["input_ids"].size)
