"""The dataset ``algorithmic``: generated copy, reverse, addition and lookup sequences for length generalisation.

As in Kazemnejad et al. 2023 and Ruoss et al. 2023: a causal decoder is trained on problems of size
n <= N and tested by exact match at larger n. One example per row, right-padded:

    copy     [BOS] x_1..x_n [SEP] x_1..x_n [EOS]
    reverse  [BOS] x_1..x_n [SEP] x_n..x_1 [EOS]
    add      [BOS] a_0..a_{n-1} [PLUS] b_0..b_{n-1} [SEP] c_0..c_n [EOS]   (c = a + b)
    lookup   [BOS] k_1 v_1..k_n v_n [SEP] q v_q [EOS]                       (q = k_i, v_q = v_i)

x_i are drawn uniformly from ``num_symbols`` tokens; addition's digits are least-significant first
(the order in which a decoder can align digits, Zhou et al. 2024), every digit uniform in 0-9
(leading zeros allowed, so every length is exact). Lookup (associative recall) draws n distinct keys
from ``LOOKUP_KEYS`` key tokens, each value from ``num_symbols`` value tokens (ids after the keys) and
the query uniformly among the n keys; its answer is v_q. The special tokens follow the regular tokens
in the vocabulary. Rows are in the causal LM's batch format (``posenc.tasks.causal_lm``): inputs are
the sequence without its EOS, targets the next token; weights are 1 exactly on the answer and EOS
(lookup: v_q and EOS, not the query).
Batch ``i`` of process ``p`` is drawn from ``(seed, i, p)``; evaluation seeds are fixed per split
and size, independent of the training seed, so every model is scored on the same examples.
"""
from __future__ import annotations

import zlib

import grain
import numpy as np

from posenc.data import datasets, registry
from posenc.data.synthetic import ENDLESS

NAME = "algorithmic"
TASKS = ("copy", "reverse", "add", "lookup")
LOOKUP_KEYS = 64        # lookup's key tokens: up to 64 distinct keys (n <= 64) per row
EVAL_EXAMPLES = 1_000   # the default per evaluated size; the split sizes below are nominal
registry.register(registry.Dataset(
    name=NAME, split_sizes={"train": ENDLESS, "validation": EVAL_EXAMPLES, "test": EVAL_EXAMPLES}))
INFO = datasets.info(NAME)
SPECIALS = ("BOS", "SEP", "EOS", "PLUS", "PAD")


def num_symbols(task: str, symbols: int) -> int:
  """Regular tokens: ``symbols`` for copy / reverse, the 10 digits for add, keys then values for lookup."""
  return {"add": 10, "lookup": LOOKUP_KEYS + symbols}.get(task, symbols)


def vocab_size(task: str, symbols: int) -> int:
  return num_symbols(task, symbols) + len(SPECIALS)


def special(task: str, symbols: int, name: str) -> int:
  """The id of special token ``name`` (after the regular tokens)."""
  return num_symbols(task, symbols) + SPECIALS.index(name)


def seq_len(task: str, n: int) -> int:
  """Tokens per row for size ``n``: the whole sequence but its EOS (copy / reverse 2n+2, add 3n+4, lookup 2n+4)."""
  if task not in TASKS:
    raise ValueError(f"unknown algorithmic task {task!r}; choose one of {TASKS}.")
  return {"add": 3 * n + 4, "lookup": 2 * n + 4}.get(task, 2 * n + 2)


def max_size(task: str) -> int | None:
  """The largest n a task can draw (lookup: one distinct key per pair), None where unbounded."""
  return LOOKUP_KEYS if task == "lookup" else None


def _sequences(task: str, ns: np.ndarray, rng: np.random.Generator, symbols: int, width: int) -> tuple:
  """Whole sequences of sizes ``ns``, one a row (``width`` tokens, PAD after EOS), the indices of their
  first answer token and of their EOS (``symbols``: the regular tokens, ``num_symbols``'s)."""
  ids = {name: symbols + i for i, name in enumerate(SPECIALS)}  # special(): after the regular tokens
  rows, top = len(ns), int(ns.max())
  n, j = ns[:, None], np.arange(width)[None, :]
  out = np.full((rows, width), ids["PAD"], np.int32)

  def put(where, source, index=None):  # out[r, j] = source[r, index[r, j]] (or the id ``source``) where true
    value = source if index is None else np.take_along_axis(source, np.clip(index, 0, source.shape[1] - 1), 1)
    np.copyto(out, value, where=where, casting="unsafe")

  if task == "add":  # digits past a row's n are zero, so its c_n is the last carry
    a, b = (rng.integers(0, 10, (rows, top)) * (np.arange(top) < n) for _ in range(2))
    c, carry = np.zeros((rows, top + 1), np.int64), np.zeros(rows, np.int64)
    for i in range(top):
      carry, c[:, i] = np.divmod(a[:, i] + b[:, i] + carry, 10)
    c[:, top] = carry
    put((j >= 1) & (j <= n), a, j - 1)
    put(j == n + 1, ids["PLUS"])
    put((j >= n + 2) & (j <= 2 * n + 1), b, j - n - 2)
    sep = 2 * n + 2
    put((j > sep) & (j <= 3 * n + 3), c, j - sep - 1)
  elif task == "lookup":  # keys: the first n of a random permutation of the key tokens; values after them
    keys = np.argsort(rng.random((rows, LOOKUP_KEYS)), axis=1)[:, :top]
    values = LOOKUP_KEYS + rng.integers(0, symbols - LOOKUP_KEYS, (rows, top))
    pick = rng.integers(0, ns)[:, None]  # the queried pair, uniform in 0..n-1
    put((j >= 1) & (j <= 2 * n) & (j % 2 == 1), keys, (j - 1) // 2)
    put((j >= 2) & (j <= 2 * n) & (j % 2 == 0), values, (j - 2) // 2)
    sep = 2 * n + 1
    put(j == sep + 1, np.take_along_axis(keys, pick, 1))
    put(j == sep + 2, np.take_along_axis(values, pick, 1))
  else:
    x = rng.integers(0, symbols, (rows, top))
    put((j >= 1) & (j <= n), x, j - 1)
    sep = n + 1
    put((j > sep) & (j <= 2 * n + 1), x, j - n - 2 if task == "copy" else 2 * n + 1 - j)
  eos = sep + {"add": n + 2, "lookup": 3}.get(task, n + 1)
  put(j == 0, ids["BOS"])
  put(j == sep, ids["SEP"])
  put(j == eos, ids["EOS"])
  return out, sep + 1 + (task == "lookup"), eos  # lookup's query after SEP is not the answer


def batch(task: str, n, rows: int, rng: np.random.Generator, *, symbols: int, length: int) -> dict:
  """``rows`` examples of size ``n`` (an int, or a range ``(low, high)``: uniform per row, both
  included), right-padded to ``length`` tokens, in the causal LM's batch format."""
  ns = np.full(rows, n) if np.ndim(n) == 0 else rng.integers(n[0], n[1] + 1, rows)
  if max_size(task) is not None and int(ns.max()) > max_size(task):
    raise ValueError(f"{task} draws n <= {max_size(task)} (distinct keys); got n = {int(ns.max())}.")
  if length < seq_len(task, int(ns.max())):
    raise ValueError(f"{task} of size {int(ns.max())} needs {seq_len(task, int(ns.max()))} tokens; got {length}.")
  seqs, first, eos = _sequences(task, ns, rng, num_symbols(task, symbols), length + 1)
  t = np.arange(length)[None, :]
  return {"input_ids": seqs[:, :-1], "targets": seqs[:, 1:],
          "weights": ((t >= first - 1) & (t < eos)).astype(np.float32),  # the targets: the answer..EOS
          "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
          "packing_ids": np.ones((rows, length), np.int32), "valid": np.ones(rows, np.float32)}


def loader(task: str, split: str, *, batch_size: int, train: bool, seed: int, size: int, symbols: int,
           examples: int = EVAL_EXAMPLES, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """This process's batches: training rows draw n in [1, ``size``] and never end; evaluation rows
  are exactly ``size``, ``examples`` of them in ceil(examples / batch) batches (padding rows:
  valid 0), drawn from seeds fixed by ``split`` and ``size`` (not ``seed``)."""
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} is not divisible by the {process_count} processes.")
  rows, length = batch_size // process_count, seq_len(task, size)
  split_seed = zlib.crc32(split.encode())

  def make(i):
    i = int(i)
    if train:
      return batch(task, (1, size), rows, np.random.default_rng((seed, i, process_index)), symbols=symbols,
                   length=length)
    out = batch(task, size, rows, np.random.default_rng((split_seed, size, i, process_index)), symbols=symbols,
                length=length)
    out["valid"] = (i * batch_size + process_index * rows + np.arange(rows) < examples).astype(np.float32)
    return out

  return grain.MapDataset.range(ENDLESS if train else -(-examples // batch_size)).map(make).to_iter_dataset()
