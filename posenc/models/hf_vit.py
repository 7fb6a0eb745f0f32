"""Load a Hugging Face ViT checkpoint (safetensors, never pickle) into ``posenc.models.ViT``.

    model = load_hf_vit("path/to/vit")          # config.json + model.safetensors
    logits = model(images)                      # images NHWC (HF's pixel_values are NCHW)
    bare = load_hf_vit(vit_model_dir, allow_missing_head=True)   # a ViTModel: fresh head (logged)

The model is built from ``config.json`` (``vit_kwargs``) with ``posenc="learned"``
on the ``h x w`` patch grid, HF's LayerNorm eps (``layer_norm_eps``, 1e-12 by
default) and its GELU (``hidden_act="gelu"`` is exact erf; ``"gelu_new"`` /
``"gelu_pytorch_tanh"`` the tanh approximation). Every tensor must be present
with the shape the config implies; otherwise one ValueError lists the missing,
misshapen and unknown tensors. Nothing is silently re-initialised.
A weights file that is truncated or not safetensors, and a config.json that is
not JSON or lacks a key the importer reads, are one ValueError naming the file
(and the key).

Layout: HF keeps the class token's position inside its table
(``embeddings.position_embeddings [1, 1 + h*w, D]``, added to ``[cls, patches]``
before the first block); our class token has no position, so row 0 is added
into ``cls_token`` (the same function) and rows ``1..h*w`` become the learned
grid ``posenc/table [h*w, D]`` (row-major, as HF flattens its conv output). The
patch convolution ``[D, C, p, p]`` becomes ``patch_embed [p, p, C, D]``; q/k/v
``nn.Linear``s become the fused ``qkv`` kernel ``[D, heads, 3, head_dim]``.

Names: as on the Hub and as ``save_pretrained`` writes them
(``encoder.layer.N.attention.attention.query``, ...), under ``vit.``
(``ViTForImageClassification``) or at the top (``ViTModel``); transformers 5's
module names (``layers.N.attention.q_proj``, ``mlp.fc1``, ...) are accepted too.
Skipped: ``pooler.*`` (``ViTForImageClassification`` does not use it) and
``embeddings.mask_token`` (masked image modelling). The head is ``classifier.*``;
a checkpoint without it (a ``ViTModel``) is refused unless
``allow_missing_head=True``, which keeps a freshly initialised head of
``num_labels`` classes (logged).

A new resolution is a ``posenc.transfer`` of the learned grid, e.g. to match
HF's ``interpolate_pos_encoding=True`` (torch bicubic, ``align_corners=False``,
to exactly the new patch grid; tests/test_hf_vit.py):

    target = nnx.eval_shape(lambda: ViT(**dict(vit_kwargs(path), image_size=48), rngs=nnx.Rngs(0)))
    move = jit_transfer("learned", model.geometry, target.geometry,
                        nnx.to_pure_dict(nnx.state(target, nnx.Param)),
                        TransferOptions(method="bicubic_torch", antialias=False))
    new_params = move(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from posenc.models.hf_common import (build_loaded, check_tensors, checkpoint_files, layer_norm, linear_attention,
                                     load_tensors, read_json_config, require_keys, stacked_blocks)
from posenc.models.vit import ViT

IGNORED_PREFIXES = ("pooler.", "embeddings.mask_token")
HEAD_TENSORS = ("classifier.weight", "classifier.bias")
GELU_APPROXIMATE = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}
# transformers 5 module names -> the Hub's (what save_pretrained writes).
_RENAMES = [(re.compile(rf"^layers\.(\d+)\.{new}\."), rf"encoder.layer.\1.{old}.") for new, old in (
    (r"attention\.q_proj", "attention.attention.query"), (r"attention\.k_proj", "attention.attention.key"),
    (r"attention\.v_proj", "attention.attention.value"), (r"attention\.o_proj", "attention.output.dense"),
    (r"mlp\.fc1", "intermediate.dense"), (r"mlp\.fc2", "output.dense"),
    ("(layernorm_before|layernorm_after)", r"\2"))]


def _hw(value, name: str) -> tuple[int, int]:
  hw = tuple(value) if isinstance(value, (list, tuple)) else (value, value)
  if len(hw) != 2 or not all(isinstance(v, int) and v > 0 for v in hw):
    raise ValueError(f"config field {name} must be a positive int or [height, width]; got {value!r}.")
  return hw


def _read_config(config_file: Path) -> dict:
  cfg = read_json_config(config_file, "ViT")
  require_keys(cfg, config_file, ("model_type",), "ViT")  # every other key has HF's default
  d, heads = cfg.get("hidden_size", 768), cfg.get("num_attention_heads", 12)
  checks = [("model_type", cfg.get("model_type"), cfg.get("model_type") == "vit"),
            ("hidden_act", cfg.get("hidden_act", "gelu"), cfg.get("hidden_act", "gelu") in GELU_APPROXIMATE),
            ("qkv_bias", cfg.get("qkv_bias", True), cfg.get("qkv_bias", True) is True),
            ("head_dim", cfg.get("head_dim"), cfg.get("head_dim") in (None, d // heads) and d % heads == 0)]
  patch = _hw(cfg.get("patch_size", 16), "patch_size")
  checks.append(("patch_size", cfg.get("patch_size"), patch[0] == patch[1]))
  wrong = {name: value for name, value, ok in checks if not ok}
  if wrong:
    raise ValueError(f"{config_file} is not a ViT config this importer supports (needs model_type='vit', "
                     f"hidden_act in {sorted(GELU_APPROXIMATE)}, qkv_bias=true, head_dim = hidden_size / "
                     f"num_attention_heads, square patches); got {wrong}.")
  image = _hw(cfg.get("image_size", 224), "image_size")
  if image[0] % patch[0] or image[1] % patch[0]:
    raise ValueError(f"{config_file}: image_size {image} is not a multiple of patch_size {patch[0]}.")
  return cfg


def _num_labels(cfg: dict) -> int:
  return len(cfg["id2label"]) if cfg.get("id2label") else cfg.get("num_labels", 2)


def vit_kwargs(cfg_or_path) -> dict:
  """``ViT`` constructor arguments for an HF ViT ``config.json`` (a dict, the file, or its
  directory), without ``rngs``; e.g. ``ViT(**dict(vit_kwargs(path), image_size=48), rngs=...)``."""
  cfg = cfg_or_path
  if not isinstance(cfg, dict):
    path = Path(cfg_or_path)
    cfg = _read_config(path / "config.json" if path.is_dir() else path)
  return dict(posenc="learned", image_size=_hw(cfg.get("image_size", 224), "image_size"),
              patch_size=_hw(cfg.get("patch_size", 16), "patch_size")[0], channels=cfg.get("num_channels", 3),
              width=cfg.get("hidden_size", 768), depth=cfg.get("num_hidden_layers", 12),
              num_heads=cfg.get("num_attention_heads", 12), mlp_dim=cfg.get("intermediate_size", 3072),
              num_classes=_num_labels(cfg), dropout=cfg.get("hidden_dropout_prob", 0.0),
              attention_dropout=cfg.get("attention_probs_dropout_prob", 0.0),
              ln_eps=cfg.get("layer_norm_eps", 1e-12),
              gelu_approximate=GELU_APPROXIMATE[cfg.get("hidden_act", "gelu")])


def expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
  """HF tensor name (without ``vit.``) -> shape, for the encoder of a ViT ``config.json`` (no head)."""
  kw = vit_kwargs(cfg)
  d, m, c, p = kw["width"], kw["mlp_dim"], kw["channels"], kw["patch_size"]
  (h, w) = (s // p for s in kw["image_size"])
  shapes = {"embeddings.cls_token": (1, 1, d), "embeddings.position_embeddings": (1, 1 + h * w, d),
            "embeddings.patch_embeddings.projection.weight": (d, c, p, p),
            "embeddings.patch_embeddings.projection.bias": (d,), "layernorm.weight": (d,), "layernorm.bias": (d,)}
  for i in range(kw["depth"]):
    q = f"encoder.layer.{i}."
    for name in ("query", "key", "value"):
      shapes.update({f"{q}attention.attention.{name}.weight": (d, d), f"{q}attention.attention.{name}.bias": (d,)})
    shapes.update({f"{q}attention.output.dense.weight": (d, d), f"{q}attention.output.dense.bias": (d,),
                   f"{q}intermediate.dense.weight": (m, d), f"{q}intermediate.dense.bias": (m,),
                   f"{q}output.dense.weight": (d, m), f"{q}output.dense.bias": (d,)})
    shapes.update({f"{q}{ln}.{x}": (d,) for ln in ("layernorm_before", "layernorm_after")
                   for x in ("weight", "bias")})
  return shapes


def _head_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
  return dict(zip(HEAD_TENSORS, [(_num_labels(cfg), cfg.get("hidden_size", 768)), (_num_labels(cfg),)]))


def _ours(t: dict[str, np.ndarray], cfg: dict) -> dict:
  """HF tensors -> our parameter tree (nested dict of numpy arrays)."""
  kw = vit_kwargs(cfg)
  layers = []
  for i in range(kw["depth"]):
    p = f"encoder.layer.{i}."
    layers.append({
        "attn": linear_attention(t, tuple(f"{p}attention.attention.{n}" for n in ("query", "key", "value")),
                                 f"{p}attention.output.dense", kw["num_heads"]),
        "ln1": layer_norm(t, f"{p}layernorm_before"), "ln2": layer_norm(t, f"{p}layernorm_after"),
        "mlp": {"fc1": t[f"{p}intermediate.dense.weight"].T, "fc1_bias": t[f"{p}intermediate.dense.bias"],
                "fc2": t[f"{p}output.dense.weight"].T, "fc2_bias": t[f"{p}output.dense.bias"]}})
  positions = t["embeddings.position_embeddings"][0]
  tree = {"patch_embed": t["embeddings.patch_embeddings.projection.weight"].transpose(2, 3, 1, 0),
          "patch_bias": t["embeddings.patch_embeddings.projection.bias"],
          # HF adds position row 0 to its class token before the first block: the same function.
          "cls_token": t["embeddings.cls_token"][0] + positions[:1],
          "posenc": {"table": positions[1:]}, "norm": layer_norm(t, "layernorm"),
          "blocks": stacked_blocks(layers)}
  if HEAD_TENSORS[0] in t:
    tree.update(head=t["classifier.weight"].T, head_bias=t["classifier.bias"])
  return tree


def _hub_name(name: str) -> str:
  for pattern, old in _RENAMES:
    name = pattern.sub(old, name)
  return name


def load_hf_vit(path, *, allow_missing_head: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
                rngs: nnx.Rngs | None = None) -> ViT:
  """A ``ViT`` holding the weights of the HF ViT checkpoint at ``path`` (see the module docstring)."""
  weights_file, config_file = checkpoint_files(path, "ViT")
  cfg = _read_config(config_file)
  tensors = {_hub_name(k.removeprefix("vit.")): v for k, v in load_tensors(weights_file, "ViT").items()}
  has_head = any(k in tensors for k in HEAD_TENSORS)
  want = expected_shapes(cfg) | (_head_shapes(cfg) if has_head else {})
  check_tensors(tensors, want, weights_file, known=IGNORED_PREFIXES, what="ViT")
  if not has_head:
    if not allow_missing_head:
      raise ValueError(f"{weights_file} has no classification head ({', '.join(HEAD_TENSORS)}; a ViTModel "
                       f"rather than a ViTForImageClassification); pass allow_missing_head=True to keep a "
                       f"freshly initialised head of {_num_labels(cfg)} classes (the features before it are "
                       f"exact; the logits then need training).")
    logging.warning("%s has no classification head; %s are freshly initialised (%d classes).", weights_file,
                    ", ".join(HEAD_TENSORS), _num_labels(cfg))

  make = lambda rngs: ViT(rngs=rngs, dtype=dtype, param_dtype=param_dtype, **vit_kwargs(cfg))  # noqa: E731
  return build_loaded(make, _ours(tensors, cfg), param_dtype, rngs,
                      fresh=lambda path: not has_head and path[0] in ("head", "head_bias"))
