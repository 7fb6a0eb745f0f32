"""The text-length half of the study: GPT-style causal LMs trained at length L, test perplexity at L..16L.

Per encoding and seed, one model is trained at L (configs/gpt_tiny.py), then one evaluation run
(``init_from``, ``total_steps=0``) scores the test split's stream in windows of every length,
non-overlapping and sliding (stride S: only the last S tokens of each window are scored), the
same tokens at every length and in both modes (``posenc.tasks.causal_lm``). Variants are
evaluated from another encoding's trained run without training: RoPE with position
interpolation, NTK-aware scaling and YaRN; the learned table extended by copying instead of
interpolating. Two context-free-or-nearly baselines on the same tokens, from train-split counts:
unigram (no context) and bigram (the previous token only).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time

import numpy as np


@dataclasses.dataclass(frozen=True)
class LMFamily:
  """The GPT part of the study."""

  name: str                 # "gpt"
  config: object            # configs/gpt_tiny.py
  overrides: str            # its get_config argument (besides posenc and seed)
  base: int                 # L, the training length
  factors: tuple            # evaluated lengths are L x these
  stride: int               # S of the sliding windows
  eval_tokens: int          # scored tokens per length and mode (a multiple of 16L)
  encodings: tuple          # labels; each trained unless it is an evaluation variant
  variants: tuple = ()      # (label, trained label, overrides): evaluated from that label's run
  trained_variants: tuple = ()  # (label, overrides): trained under its own label (e.g. encoding options)
  seeds: tuple = ()         # () = the profile's
  failed: tuple = ()        # labels whose training failed (reported, never ranked)
  superseded: tuple = ()    # (label, why): cells of an earlier protocol's setting, reported apart

  @property
  def sizes(self) -> tuple:
    return tuple(self.base * f for f in self.factors)

  @property
  def budget(self) -> str:
    """Everything that makes its numbers comparable; recorded with each cell."""
    return (f"{self.overrides};L={self.base},factors={self.factors},stride={self.stride},"
            f"eval_tokens={self.eval_tokens}")

  def trained_label(self, label: str) -> str:
    return next((base for name, base, _ in self.variants if name == label), label)

  def eval_overrides(self, label: str) -> str:
    return next((args for name, _, args in self.variants if name == label), "")

  def posenc_args(self, label: str) -> str:
    return dict(self.trained_variants).get(label, f"posenc={label}")


def study(family: LMFamily, seeds, cells, root: str, log, run) -> None:
  """Train each encoding once per seed and record every (label, mode, length) cell."""
  lengths = tuple(n for n in family.sizes if n != family.base)
  trained = [e for e in family.encodings if family.trained_label(e) == e]
  for posenc in trained:
    labels = [e for e in family.encodings if family.trained_label(e) == posenc]
    for seed in seeds:
      name = f"{family.name}-{posenc}-s{seed}-{hashlib.sha1(family.budget.encode()).hexdigest()[:8]}"
      todo = [label for label in labels if any((family.name, label, seed, mode, n) not in cells
                                               for mode in ("nonoverlap", "sliding") for n in family.sizes)]
      if not todo:
        continue
      start = time.time()
      base_dir = os.path.join(root, name, f"train{family.base}")
      run(family, f"{family.posenc_args(posenc)},seed={seed}", base_dir)
      train_seconds = time.time() - start
      for label in todo:
        began = time.time()
        metrics = run(family, f"{family.posenc_args(posenc)},seed={seed},init_from={base_dir},total_steps=0,"
                      f"eval_lengths={lengths},eval_stride={family.stride},eval_tokens={family.eval_tokens}"
                      + (f",{family.eval_overrides(label)}" if family.eval_overrides(label) else ""),
                      os.path.join(root, name, f"eval-{label}"))
        seconds = time.time() - began + (train_seconds if label == posenc else 0.0)
        for mode in ("nonoverlap", "sliding"):
          for n in family.sizes:
            suffix = "" if (n == family.base and mode == "nonoverlap") else f"_{n}" + (
                f"_s{family.stride}" if mode == "sliding" else "")
            cells.add(dict(family=family.name, budget=family.budget, posenc=label, seed=seed, mode=mode, size=n,
                           loss=metrics[f"loss{suffix}"], perplexity=metrics[f"perplexity{suffix}"],
                           accuracy=metrics[f"accuracy{suffix}"], seconds=seconds / 10))
      log(f"{name}: {2 * len(family.sizes) * len(todo)} cells in {time.time() - start:.0f}s")


def baselines(family: LMFamily) -> dict[str, float]:
  """Perplexity of unigram and interpolated-bigram models (train-split counts; the interpolation
  weight chosen on the validation split) on exactly the tokens the study scores."""
  from posenc import tasks
  from posenc.data import lm
  config = family.config.get_config(family.overrides)
  config.update(eval_lengths=tuple(n for n in family.sizes if n != family.base), eval_stride=family.stride,
                eval_tokens=family.eval_tokens)
  causal = tasks.get("causal_lm")
  vocab = config.vocab_size
  train = lm.stream("train", vocab).astype(np.int64)
  unigram = (np.bincount(train, minlength=vocab) + 1.0) / (len(train) + vocab)  # add-one
  pairs = np.bincount(train[:-1] * vocab + train[1:], minlength=vocab * vocab).reshape(vocab, vocab)
  context = pairs.sum(1, keepdims=True)

  def scored(split):
    tokens = lm.stream(split, vocab).astype(np.int64)[:causal.scored_tokens(config, split) + 1]
    return tokens[:-1], tokens[1:]

  def bigram_nll(previous, target, weight):
    counts, totals = pairs[previous, target], context[previous, 0]
    p = weight * np.where(totals > 0, counts / np.maximum(totals, 1), 0.0) + (1 - weight) * unigram[target]
    return -np.mean(np.log(p))

  weight = min((*np.linspace(0.05, 0.95, 19), 0.97, 0.99, 0.995), key=lambda w: bigram_nll(*scored("validation"), w))
  previous, target = scored("test")
  return {"unigram": math.exp(-np.mean(np.log(unigram[target]))),
          "bigram": math.exp(bigram_nll(previous, target, weight)), "bigram_weight": float(weight)}
