"""Models that take any position encoding by name: a ViT, a BERT-style encoder and a GPT-style decoder.

    vit = posenc.models.create("vit-ti", posenc="rope_mixed", rngs=nnx.Rngs(0), num_classes=10,
                               image_size=32, patch_size=4)
    bert = posenc.models.create("bert-mini", posenc="alibi", rngs=nnx.Rngs(0), vocab_size=30522)
    gpt = posenc.models.create("gpt-nano", posenc="rope", rngs=nnx.Rngs(0), vocab_size=4096, max_len=128)
    tokens = posenc.models.generate(gpt, prompt_ids, max_new_tokens=32)

Sizes: ``vit-mu`` (CPU-sized), ``vit-ti``, ``vit-s``, ``vit-b``; ``bert-tiny``,
``bert-mini``, ``bert-small``, ``bert-base`` (Turc et al. 2019); ``gpt-nano``,
``gpt-mini`` (CPU-sized), ``gpt-small`` (GPT-2 small). ``width`` / ``depth`` /
``num_heads`` / ``mlp_dim`` keyword arguments override the named size.
"""
from __future__ import annotations

import inspect

import jax.numpy as jnp
from flax import nnx

from posenc.config import did_you_mean
from posenc.models.block_stack import KVCache
from posenc.models.bert import BERT, BERT_SIZES
from posenc.models.generate import generate
from posenc.models.gpt import GPT, GPT_SIZES
from posenc.models.stems import STEMS, ConvStem, PatchStem, make_stem
from posenc.models.vit import VIT_SIZES, ViT, vit_with_stem

# family -> (sizes, what create calls, then the class it hands its other keywords to, if any)
_FAMILIES = {"vit": (VIT_SIZES, vit_with_stem, ViT), "bert": (BERT_SIZES, BERT), "gpt": (GPT_SIZES, GPT)}
MODEL_NAMES = tuple(f"{family}-{size}" for family, (sizes, *_) in _FAMILIES.items() for size in sizes)


def check_name(name: str) -> None:
  """ValueError unless ``name`` is a model; it lists the sizes of the family named (all models if
  none is) and the closest name."""
  if name not in MODEL_NAMES:
    family = str(name).partition("-")[0]
    valid = [n for n in MODEL_NAMES if n.startswith(f"{family}-")] or MODEL_NAMES
    raise ValueError(f"unknown model {name!r}{did_you_mean(name, valid)}; choose one of: {', '.join(valid)}.")


def _options(family: str) -> list[str]:
  """The keyword options of a family's builders, in order (without posenc, rngs and ``**kwargs``)."""
  options = []
  for builder in _FAMILIES[family][1:]:
    for p in inspect.signature(builder.__init__ if isinstance(builder, type) else builder).parameters.values():
      if p.kind is p.KEYWORD_ONLY and p.name not in ("posenc", "rngs", *options):
        options.append(p.name)
  return options


def create(name: str, *, posenc: str, rngs: nnx.Rngs, posenc_options: dict | None = None,
           dtype=jnp.float32, param_dtype=jnp.float32, **kwargs) -> nnx.Module:
  """Build model ``name`` (e.g. ``"vit-ti"``) with position encoding ``posenc``."""
  check_name(name)
  family, _, size = name.partition("-")
  sizes, build_family, *_ = _FAMILIES[family]
  options = _options(family)
  unknown = sorted(set(kwargs) - set(options))
  if unknown:
    raise ValueError(f"model {name!r} has no option(s) {unknown}; its options are {options}.")

  def build(rngs):
    return build_family(posenc=posenc, rngs=rngs, posenc_options=posenc_options, dtype=dtype,
                        param_dtype=param_dtype, **{**sizes[size], **kwargs})

  # One compiled initialiser instead of one eager dispatch (and compile) per parameter.
  return nnx.jit(build)(rngs)


__all__ = ["BERT", "BERT_SIZES", "GPT", "GPT_SIZES", "KVCache", "MODEL_NAMES", "STEMS", "VIT_SIZES", "ConvStem",
           "PatchStem", "ViT", "check_name", "create", "generate", "make_stem"]
