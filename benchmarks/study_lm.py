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
import math
import os
import time

import numpy as np

from benchmarks.study_family import StudyFamily
from benchmarks.study_tables import cell_text, notes, ordering_lines, row_label, seeds_text, summary

LM_MODES = {"nonoverlap": "non-overlapping windows of the evaluated length",
            "sliding": "sliding windows of the evaluated length, scoring their last S tokens"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMFamily(StudyFamily):
  """The GPT part of the study: modes are window kinds, sizes evaluated lengths."""

  kind = "lm"
  metric = "loss"
  ylabel = "test log-perplexity (nats per token)"

  factors: tuple            # evaluated lengths are L x these (``base`` is L, the training length)
  stride: int               # S of the sliding windows
  eval_tokens: int          # scored tokens per length and mode (a multiple of 16L)
  variants: tuple = ()      # (label, trained label, overrides): evaluated from that label's run
  trained_variants: tuple = ()  # (label, overrides): trained under its own label (e.g. encoding options)
  title: tuple = ("GPT-style causal LM, length extrapolation", "test perplexity by evaluated length", "")

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

  def study(self, seeds, cells, root: str, log, run) -> None:
    """Train each encoding once per seed and record every (label, mode, length) cell."""
    lengths = tuple(n for n in self.sizes if n != self.base)
    trained = [e for e in self.encodings if self.trained_label(e) == e]
    for posenc in trained:
      labels = [e for e in self.encodings if self.trained_label(e) == posenc]
      for seed in seeds:
        name = self.run_name(posenc, seed)
        todo = [label for label in labels if any((self.name, label, seed, mode, n) not in cells
                                                 for mode in ("nonoverlap", "sliding") for n in self.sizes)]
        if not todo:
          continue
        start = time.time()
        base_dir = os.path.join(root, name, f"train{self.base}")
        run(self, f"{self.posenc_args(posenc)},seed={seed}", base_dir)
        train_seconds = time.time() - start
        for label in todo:
          began = time.time()
          metrics = run(self, f"{self.posenc_args(posenc)},seed={seed},init_from={base_dir},total_steps=0,"
                        f"eval_lengths={lengths},eval_stride={self.stride},eval_tokens={self.eval_tokens}"
                        + (f",{self.eval_overrides(label)}" if self.eval_overrides(label) else ""),
                        os.path.join(root, name, f"eval-{label}"))
          seconds = time.time() - began + (train_seconds if label == posenc else 0.0)
          for mode in ("nonoverlap", "sliding"):
            for n in self.sizes:
              suffix = "" if (n == self.base and mode == "nonoverlap") else f"_{n}" + (
                  f"_s{self.stride}" if mode == "sliding" else "")
              cells.add(dict(family=self.name, budget=self.budget, posenc=label, seed=seed, mode=mode, size=n,
                             loss=metrics[f"loss{suffix}"], perplexity=metrics[f"perplexity{suffix}"],
                             accuracy=metrics[f"accuracy{suffix}"], seconds=seconds / 10))
        log(f"{name}: {2 * len(self.sizes) * len(todo)} cells in {time.time() - start:.0f}s")

  def baselines(self) -> dict[str, float]:
    """Perplexity of unigram and interpolated-bigram models (train-split counts; the interpolation
    weight chosen on the validation split) on exactly the tokens the study scores."""
    from posenc import tasks
    from posenc.data import lm
    config = self.config.get_config(self.overrides)
    config.update(eval_lengths=tuple(n for n in self.sizes if n != self.base), eval_stride=self.stride,
                  eval_tokens=self.eval_tokens)
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

  def details(self) -> dict:
    variants = {label: f"evaluated from the `{base}` run with `{args}`" for label, base, args in self.variants}
    variants.update({label: f"trained with `{args}`" for label, args in self.trained_variants})
    return dict(field="max_len", stride=self.stride, eval_tokens=self.eval_tokens,
                variants={k: v for k, v in variants.items() if k in self.encodings})

  @classmethod
  def lines(cls, results: dict, f: dict) -> list[str]:
    title, what, _ = f["title"]
    base = results.get("baselines", {}).get(f["name"], {})
    lines = [f"## {title}: trained at length {f['base']}, {what}", "",
             f"Seeds recorded: {seeds_text(results, f)}. Config `{f['config_file']}:{f['overrides']}`; "
             f"every length and mode scores the same {f['eval_tokens']:,} test tokens; S = {f['stride']}."]
    lines += [f"`{label}`: {text}." for label, text in f.get("variants", {}).items()]
    if base:
      lines += ["", f"Baselines on the same tokens (train-split counts): unigram (no context) perplexity "
                    f"{base['unigram']:.1f}; bigram (the previous token only, interpolated with the unigram at "
                    f"weight {base['bigram_weight']:.2f}) {base['bigram']:.1f}."]
    lines.append("")
    for mode, caption in LM_MODES.items():
      if mode == "sliding":
        caption += f" (at {f['base']}, the trained length, the windows do not overlap: the same as above)"
      lines += [f"### {caption}: test perplexity", "",
                "| posenc | " + " | ".join(f"{n}" + (" (trained)" if n == f["base"] else "") for n in f["sizes"]) + " |",
                "|---|" + "---:|" * len(f["sizes"])]
      for posenc in f["encodings"] + list(f.get("superseded", {})):
        row = [cell_text(*summary(results["cells"], f["name"], posenc, mode, n, "perplexity"), 1) for n in f["sizes"]]
        lines.append(f"| {row_label(f, posenc)} | " + " | ".join(row) + " |")
      lines.append("")
    lines += notes(results, f) + ordering_lines(results, f, list(LM_MODES), "loss")
    return lines

  @classmethod
  def plot_modes(cls, f: dict) -> dict[str, str]:
    return LM_MODES

  @classmethod
  def decorate_panel(cls, ax, results: dict, f: dict) -> None:
    """The unigram and bigram baselines' log-perplexity."""
    baselines = results.get("baselines", {}).get(f["name"])
    for name, style in (("unigram", ":"), ("bigram", "-.")) if baselines else ():
      ax.axhline(math.log(baselines[name]), color="black", linestyle=style, linewidth=0.8, label=f"{name} baseline")
