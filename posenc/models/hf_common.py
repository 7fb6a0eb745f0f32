"""What the Hugging Face importers (``hf_bert``, ``hf_gpt2``, ``hf_vit``) share: finding and reading
a checkpoint's files (one ValueError naming the file), checking its tensors against the shapes its
config implies, mapping HF tensors onto our parameter tree, and building the model from them."""
from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file

Tensors = dict[str, np.ndarray]


def checkpoint_files(path, what: str) -> tuple[Path, Path]:
  """(weights, config.json) of an HF checkpoint directory, or of the ``.safetensors`` file in one."""
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


def load_tensors(weights_file: Path, what: str) -> Tensors:
  """The tensors of a safetensors file; one ValueError naming the file if it cannot be read."""
  try:
    return load_file(str(weights_file))
  except (SafetensorError, OSError) as e:
    raise ValueError(f"{weights_file} is not a readable safetensors file ({e}): it is truncated or in "
                     f"another format; download it again, or write it with save_pretrained(..., "
                     f"safe_serialization=True).") from None


def check_tensors(tensors: Tensors, want: dict[str, tuple[int, ...]], source: Path, *,
                  known: tuple[str, ...] = (), what: str) -> None:
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


# ----------------------------------------------------------------------------- tensor mapping

def layer_norm(t: Tensors, prefix: str) -> dict:
  """An HF LayerNorm (``<prefix>.weight`` / ``.bias``) as our ``{scale, bias}``."""
  return {"scale": t[prefix + ".weight"], "bias": t[prefix + ".bias"]}


def linear_attention(t: Tensors, qkv: tuple[str, str, str], out: str, heads: int) -> dict:
  """Our attention parameters from HF's ``nn.Linear`` q, k, v and output projections (weights
  ``[out, in]``): the fused ``qkv`` kernel ``[D, heads, 3, head_dim]`` and ``out`` ``[heads, head_dim, D]``."""
  d = t[out + ".weight"].shape[0]
  return {"qkv": np.stack([t[n + ".weight"].T.reshape(d, heads, d // heads) for n in qkv], axis=2),
          "qkv_bias": np.stack([t[n + ".bias"].reshape(heads, d // heads) for n in qkv], axis=1),
          "out": t[out + ".weight"].T.reshape(heads, d // heads, d), "out_bias": t[out + ".bias"]}


def stacked_blocks(layers: list[dict]) -> dict:
  """Per-layer parameter trees -> our block stack's ``{"layers": ...}``, each leaf stacked on axis 0."""
  def stack(trees: list):
    if isinstance(trees[0], dict):
      return {k: stack([tree[k] for tree in trees]) for k in trees[0]}
    return np.stack(trees)
  return {"layers": stack(layers)}


# ----------------------------------------------------------------------------- building

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
