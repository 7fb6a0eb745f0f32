"""What ``python -m benchmarks.speed`` measures: its profiles, and the model families it times.

A profile names, per family, the model and the (size, global batch) pairs it is timed at; the
family registry (``FAMILIES``) says how each family builds a run's config and how its report
states sizes and rates. Adding a family means one ``SpeedFamily`` entry and its sizes in a profile.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import ml_collections

from configs import bert_small, gpt_tiny, vit_tiny
from posenc import encodings


@dataclasses.dataclass(frozen=True, kw_only=True)
class Models:
  """One family's model in a profile and the (size, global batch) pairs it is timed at."""

  model: str
  options: dict = dataclasses.field(default_factory=dict)  # model options over the config's
  sizes: tuple = ()               # ((image side or max_len, batch), ...)
  encodings: tuple | None = None  # None: every encoding the model supports


@dataclasses.dataclass(frozen=True, kw_only=True)
class Profile:
  """What to measure: models, (size, global batch) pairs, encodings, repeats."""

  models: dict                    # {family name: Models}, the families of ``FAMILIES``
  patch: int                      # the ViT's patch size
  dtype: str
  rounds: int                     # interleaved timing rounds (one call per entry per round)
  matmul_n: int                   # side of the reference matmul
  eval_sizes: tuple               # image sides for evaluation (ViT built at its first size); restores to the last
  eval_batch: int
  gpt_vocab: int = 4096           # the causal LM's vocabulary (GPT-2: 50,257, padded to 50,304)
  dataset: str | None = None      # None: each config's own; "synthetic": random batches (no data installed)
  headline: tuple = ()            # ((ViT model, image side, batch), ...): posenc vs timm vs linen; the first
                                  #   also compiles its step with the other layer mode (scanned / unrolled)
  restore_encodings: tuple | None = None  # None: those whose parameters change shape, and `none`
  goals: dict | None = None       # the goals for this machine (GOALS), checked in the report

  def with_encodings(self, names) -> Profile:
    """This profile with every family timing only ``names``."""
    return dataclasses.replace(self, models={f: dataclasses.replace(m, encodings=tuple(names))
                                             for f, m in self.models.items()})


def _options(config, models: Models) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({**config.model_options.to_dict(), **models.options})


def vit_config(p: Profile, posenc: str, size: int, batch: int, model: str | None = None) -> ml_collections.ConfigDict:
  """configs/vit_tiny.py:full with this profile's model (or ``model``), patch, size and batch."""
  c = vit_tiny.get_config("full")
  c.model, c.patch_size = model or p.models["vit"].model, p.patch
  c.model_options = _options(c, p.models["vit"])
  c.posenc, c.image_size, c.batch_size, c.eval_batch_size, c.dtype = posenc, size, batch, p.eval_batch, p.dtype
  c.dataset = p.dataset or c.dataset
  return c


def bert_config(p: Profile, posenc: str, length: int, batch: int,
                model: str | None = None) -> ml_collections.ConfigDict:
  """configs/bert_small.py:full with this profile's model (or ``model``), length and batch."""
  c = bert_small.get_config("full")
  c.model = model or p.models["bert"].model
  c.model_options = _options(c, p.models["bert"])
  c.posenc, c.max_len, c.batch_size, c.dtype = posenc, length, batch, p.dtype
  c.dataset = p.dataset or c.dataset
  return c


def gpt_config(p: Profile, posenc: str, length: int, batch: int, model: str | None = None) -> ml_collections.ConfigDict:
  """configs/gpt_tiny.py with this profile's model (or ``model``), vocabulary, length and batch."""
  c = gpt_tiny.get_config()
  c.model, c.vocab_size = model or p.models["gpt"].model, p.gpt_vocab
  c.model_options = _options(c, p.models["gpt"])
  c.posenc, c.max_len, c.batch_size, c.eval_batch_size, c.dtype = posenc, length, batch, batch, p.dtype
  c.dataset = p.dataset or c.dataset
  return c


@dataclasses.dataclass(frozen=True)
class SpeedFamily:
  """A model family of the speed report: how its runs are configured and how its table reads."""

  name: str
  title: str        # the report's heading
  unit: str         # items/s, as the table says it
  size_name: str    # what a size is
  ndim: int         # 2: images; 1: sequences
  config: Callable  # (profile, posenc, size, batch, model=None) -> the run's config
  causal: bool = False  # a causal decoder: causal-only encodings are timed too

  def encodings(self, p: Profile) -> list[str]:
    """The encodings timed: the profile's for this family, among those its inputs (and its attention's
    direction) support."""
    chosen = p.models[self.name].encodings
    usable = encodings.names(self.ndim, causal=None if self.causal else False)
    return [n for n in usable if chosen is None or n in chosen]


FAMILIES = {f.name: f for f in (
    SpeedFamily("vit", "ViT (configs/vit_tiny.py:full)", "img/s", "image side", 2, vit_config),
    SpeedFamily("bert", "BERT (configs/bert_small.py:full)", "tok/s", "max_len", 1, bert_config),
    SpeedFamily("gpt", "GPT (configs/gpt_tiny.py)", "tok/s", "max_len", 1, gpt_config, causal=True))}

TINY = dict(width=16, depth=1, num_heads=2, mlp_dim=32)
SECTIONS = ("headline", *FAMILIES, "eval", "restore")
# What benchmarks/device_check.sh measures on an accelerator: one encoding per mechanism.
DEVICE_ENCODINGS = ("none", "learned", "rope", "rope_mixed", "alibi", "rel_bias")
# The issue "a measured lead over timm", for 2 CPU cores: images/s ratios at the first headline group
# (and the same order at the others), compile seconds of the scanned ViT-Ti step, and restore with
# transfer over a plain restore.
GOALS = dict(timm=1.25, linen=1.15, compile_scanned_s=5.0, restore_ratio=1.1)
PROFILES = {
    # 2-core CPU: ViT-Ti/4 at 32 (the headline) and 64 pixels, ViT-S/4 at 32; BERT-mini and GPT-nano at
    # 4096 tokens/step.
    "cpu": Profile(
        models=dict(vit=Models(model="vit-ti", sizes=((32, 128), (64, 32))),
                    bert=Models(model="bert-mini", sizes=((128, 32), (256, 16), (512, 8))),
                    gpt=Models(model="gpt-nano", sizes=((512, 8),))),
        patch=4, dtype="float32", rounds=5, matmul_n=2048, eval_sizes=(16, 32, 48, 64), eval_batch=128,
        headline=(("vit-ti", 32, 128), ("vit-s", 32, 128), ("vit-ti", 64, 32)), goals=GOALS),
    # Accelerators: ViT-B/16 at 224 / 384, GPT-2 small at 1,024 tokens and BERT-base, in bfloat16, on
    # synthetic batches (3-channel images, 1,000 classes; no dataset needs installing on the device).
    "gpu": Profile(
        models=dict(vit=Models(model="vit-b", sizes=((224, 256), (384, 64)), encodings=DEVICE_ENCODINGS),
                    bert=Models(model="bert-base", sizes=((512, 64),), encodings=DEVICE_ENCODINGS),
                    gpt=Models(model="gpt-small", sizes=((1024, 32),), encodings=DEVICE_ENCODINGS)),
        patch=16, dtype="bfloat16", rounds=8, matmul_n=8192, eval_sizes=(160, 224, 320, 384), eval_batch=256,
        gpt_vocab=50304, dataset="synthetic", headline=(("vit-b", 224, 256),),
        restore_encodings=("learned", "rel_bias", "none")),
    # CI only (tests/test_benchmarks.py): one-layer models and the fewest compiles that fill every
    # table (the headline's posenc step is the ViT table's `learned` one: a cache hit under the
    # tests' persistent compilation cache); its numbers mean nothing, the goals' verdicts neither.
    "quick": Profile(
        models=dict(vit=Models(model="vit-mu", options=TINY, sizes=((8, 8),), encodings=("none", "learned")),
                    bert=Models(model="bert-tiny", options=TINY, sizes=((16, 8),), encodings=("learned",)),
                    gpt=Models(model="gpt-nano", options=TINY, sizes=((16, 8),), encodings=("alibi",))),
        patch=4, dtype="float32", rounds=2, matmul_n=64, eval_sizes=(8, 16), eval_batch=8, gpt_vocab=512,
        headline=(("vit-mu", 8, 8),), restore_encodings=("learned",), goals=GOALS),
}
