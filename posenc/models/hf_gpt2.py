"""Load a Hugging Face GPT-2 checkpoint (safetensors, never pickle) into ``posenc.models.GPT``.

    model = load_hf_gpt2("path/to/gpt2")          # config.json + model.safetensors
    tokens = posenc.models.generate(model, prompt_ids, 20)

The model is built from ``config.json`` with ``posenc="learned"`` (``wpe``, a
table of ``n_positions`` rows), GELU tanh approximation and LayerNorm eps 1e-5.
Every tensor must be present with the shape the config implies; otherwise one
ValueError lists the missing, misshapen and unknown tensors. Nothing is
silently re-initialised.
A weights file that is truncated or not safetensors, and a config.json that is
not JSON or lacks a key the importer reads, are one ValueError naming the file
(and the key).

Layout: GPT-2's ``Conv1D`` stores weights as ``[in, out]`` (no transpose, unlike
``nn.Linear``); ``c_attn`` is q|k|v fused along ``out``, each ``heads x head_dim``,
which becomes our ``qkv`` kernel ``[in, heads, 3, head_dim]``. Tensors may sit
under ``transformer.`` (``GPT2LMHeadModel``) or at the top (``GPT2Model``). The
causal-mask buffers ``attn.bias`` / ``attn.masked_bias`` of older files are
skipped; an ``lm_head.weight`` must equal ``wte`` (the head is tied).
"""
from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from posenc.models.gpt import GPT
from posenc.models.hf_common import (build_loaded, check_tensors, checkpoint_files, layer_norm, load_tensors,
                                     read_json_config, require_keys, stacked_blocks)

CONFIG_KEYS = ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions")  # read without a default
_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")
_SUPPORTED = (("activation_function", ("gelu_new", "gelu_pytorch_tanh")), ("layer_norm_epsilon", (1e-5,)),
              ("scale_attn_weights", (True,)), ("scale_attn_by_inverse_layer_idx", (False,)),
              ("reorder_and_upcast_attn", (False,)), ("add_cross_attention", (False,)))


def _read_config(config_file) -> dict:
  cfg = read_json_config(config_file, "GPT-2")
  wrong = {k: cfg.get(k) for k, ok in (("model_type", ("gpt2",)),) + _SUPPORTED if cfg.get(k, ok[0]) not in ok}
  if wrong:
    raise ValueError(f"{config_file} is not a GPT-2 config this importer supports (needs model_type='gpt2', "
                     f"activation_function='gelu_new', layer_norm_epsilon=1e-5, standard attention "
                     f"scaling, no cross-attention); got {wrong}.")
  require_keys(cfg, config_file, CONFIG_KEYS, "GPT-2")
  return cfg


def _mlp_dim(cfg: dict) -> int:
  return cfg.get("n_inner") or 4 * cfg["n_embd"]


def expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
  """HF tensor name (without ``transformer.``) -> shape, for a GPT-2 ``config.json``."""
  d, m = cfg["n_embd"], _mlp_dim(cfg)
  shapes = {"wte.weight": (cfg["vocab_size"], d), "wpe.weight": (cfg["n_positions"], d),
            "ln_f.weight": (d,), "ln_f.bias": (d,)}
  for i in range(cfg["n_layer"]):
    p = f"h.{i}."
    shapes.update({f"{p}{ln}.{w}": (d,) for ln in ("ln_1", "ln_2") for w in ("weight", "bias")})
    shapes.update({f"{p}attn.c_attn.weight": (d, 3 * d), f"{p}attn.c_attn.bias": (3 * d,),
                   f"{p}attn.c_proj.weight": (d, d), f"{p}attn.c_proj.bias": (d,),
                   f"{p}mlp.c_fc.weight": (d, m), f"{p}mlp.c_fc.bias": (m,),
                   f"{p}mlp.c_proj.weight": (m, d), f"{p}mlp.c_proj.bias": (d,)})
  return shapes


def _ours(t: dict[str, np.ndarray], cfg: dict) -> dict:
  """HF tensors -> our parameter tree (nested dict of numpy arrays)."""
  d, h = cfg["n_embd"], cfg["n_head"]
  layers = []
  for i in range(cfg["n_layer"]):
    p = f"h.{i}."
    layers.append({
        "attn": {"qkv": t[f"{p}attn.c_attn.weight"].reshape(d, 3, h, d // h).transpose(0, 2, 1, 3),
                 "qkv_bias": t[f"{p}attn.c_attn.bias"].reshape(3, h, d // h).transpose(1, 0, 2),
                 "out": t[f"{p}attn.c_proj.weight"].reshape(h, d // h, d),
                 "out_bias": t[f"{p}attn.c_proj.bias"]},
        "ln1": layer_norm(t, f"{p}ln_1"), "ln2": layer_norm(t, f"{p}ln_2"),
        "mlp": {"fc1": t[f"{p}mlp.c_fc.weight"], "fc1_bias": t[f"{p}mlp.c_fc.bias"],
                "fc2": t[f"{p}mlp.c_proj.weight"], "fc2_bias": t[f"{p}mlp.c_proj.bias"]}})
  return {"token_embed": t["wte.weight"], "posenc": {"table": t["wpe.weight"]},
          "final_norm": layer_norm(t, "ln_f"), "blocks": stacked_blocks(layers)}


def load_hf_gpt2(path, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None) -> GPT:
  """A ``GPT`` holding the weights of the HF GPT-2 checkpoint at ``path`` (see the module docstring)."""
  weights_file, config_file = checkpoint_files(path, "GPT-2")
  cfg = _read_config(config_file)
  loaded = load_tensors(weights_file, "GPT-2")
  tensors = {k.removeprefix("transformer."): v for k, v in loaded.items() if not _BUFFERS.search(k)}
  check_tensors(tensors, expected_shapes(cfg), weights_file, known=("lm_head.weight",), what="GPT-2")
  head = tensors.get("lm_head.weight")
  if head is not None and not np.array_equal(head, tensors["wte.weight"]):
    raise ValueError(f"{weights_file}: lm_head.weight differs from wte.weight; our head is tied to the "
                     f"token embedding, so an untied head cannot be loaded.")

  make = lambda rngs: GPT(  # noqa: E731
      posenc="learned", rngs=rngs, vocab_size=cfg["vocab_size"], max_len=cfg["n_positions"],
      width=cfg["n_embd"], depth=cfg["n_layer"], num_heads=cfg["n_head"], mlp_dim=_mlp_dim(cfg),
      dropout=cfg.get("resid_pdrop", 0.1), attention_dropout=cfg.get("attn_pdrop", 0.1), dtype=dtype,
      param_dtype=param_dtype)
  return build_loaded(make, _ours(tensors, cfg), param_dtype, rngs)
