"""Hugging Face rope configs <-> posenc's ``rope`` options, in every dialect HF has written.

HF ``transformers`` has stored rope settings three ways, and still reads all of them:

- ``"legacy"``: top-level ``rope_theta`` (and ``partial_rotary_factor``) beside a ``rope_scaling``
  dict keyed by ``"type"`` (or None for plain RoPE);
- ``"rope_type"``: the same, with ``rope_scaling["rope_type"]``;
- ``"rope_parameters"`` (transformers 5): one ``rope_parameters`` dict holding ``rope_type``,
  ``rope_theta`` and the scaling keys; or one such dict per layer type (``{"full_attention": {...},
  "sliding_attention": {...}}``, a layer type set to None having no RoPE).

``from_hf(config)`` reads any of them into posenc ``rope`` options (one dict, or one per layer
type); ``to_hf(options, dialect)`` writes them back, and ``to_hf(from_hf(c), dialect_of(c))`` gives
back ``c``'s rope keys exactly. The types map as:

| HF ``rope_type`` | posenc ``scaling`` | keys |
|---|---|---|
| ``default`` | ``none`` | |
| ``linear`` | ``linear`` | ``factor`` |
| ``dynamic`` | ``ntk`` | ``factor``, ``original_max_position_embeddings`` -> ``original_length`` |
| ``yarn`` | ``yarn`` | ``factor``, ``original_length``, ``beta_fast``, ``beta_slow``, ``attention_factor`` |
| ``longrope`` | ``longrope`` | ``short_factor``, ``long_factor``, ``factor``, ``original_length``, ``attention_factor`` |
| ``llama3`` | ``llama3`` | ``factor``, ``low_freq_factor``, ``high_freq_factor``, ``original_length`` |
| ``proportional`` | ``none`` with ``frequency_fraction`` (p-RoPE) | ``partial_rotary_factor`` -> ``frequency_fraction``, ``factor`` |

``rope_theta`` is ``theta``; elsewhere HF's ``partial_rotary_factor`` (rotate the first fraction of
each head over the whole spectrum) keeps its name. Keys posenc does not implement (e.g. YaRN's
``mscale``) are a clear error, never dropped.
"""
from __future__ import annotations

from posenc.config import ConfigError

SCALING_OF = {"default": "none", "linear": "linear", "dynamic": "ntk", "yarn": "yarn", "longrope": "longrope",
              "llama3": "llama3", "proportional": "none"}
KEYS = {  # HF key -> posenc option, per type (rope_theta and partial_rotary_factor go with every type)
    "default": {},
    "linear": {"factor": "factor"},
    "dynamic": {"factor": "factor", "original_max_position_embeddings": "original_length"},
    "yarn": {"factor": "factor", "original_max_position_embeddings": "original_length", "beta_fast": "beta_fast",
             "beta_slow": "beta_slow", "attention_factor": "attention_factor"},
    "longrope": {"short_factor": "short_factor", "long_factor": "long_factor", "factor": "factor",
                 "original_max_position_embeddings": "original_length", "attention_factor": "attention_factor"},
    "llama3": {"factor": "factor", "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor",
               "original_max_position_embeddings": "original_length"},
    "proportional": {"factor": "factor", "partial_rotary_factor": "frequency_fraction"},
}
COMMON = {"rope_theta": "theta", "partial_rotary_factor": "partial_rotary_factor"}
DIALECTS = ("legacy", "rope_type", "rope_parameters")


def dialect_of(config: dict) -> str:
  if "rope_parameters" in config:
    return "rope_parameters"
  scaling = config.get("rope_scaling")
  return "rope_type" if isinstance(scaling, dict) and "rope_type" in scaling else "legacy"


def _layer_types(params: dict) -> bool:
  """Whether ``rope_parameters`` is one dict per layer type."""
  return bool(params) and all(v is None or (isinstance(v, dict) and ("rope_type" in v or "rope_theta" in v))
                              for v in params.values())


def _options(rope: dict, where: str) -> dict:
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in KEYS:
    raise ConfigError(f"{where}: rope type {rope_type!r} is not one posenc implements; "
                      f"choose one of {sorted(KEYS)}.")
  names = {**COMMON, **KEYS[rope_type]}
  unknown = sorted(set(rope) - set(names) - {"rope_type", "type"})
  if unknown:
    raise ConfigError(f"{where}: rope type {rope_type!r} with key(s) {unknown}, which posenc does not "
                      f"implement; it reads {sorted(names)}.")
  options = {"scaling": SCALING_OF[rope_type]}
  options.update({names[k]: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in rope.items() if k in names})
  return options


def from_hf(config: dict) -> dict:
  """posenc ``rope`` options from an HF config dict (``config.json``'s contents): one options dict,
  or ``{layer_type: options or None}`` for per-layer-type ``rope_parameters``."""
  kind = dialect_of(config)
  if kind == "rope_parameters":
    params = config["rope_parameters"]
    if _layer_types(params):
      return {t: None if p is None else _options(p, f"rope_parameters[{t!r}]") for t, p in params.items()}
    return _options(params, "rope_parameters")
  rope = dict(config.get("rope_scaling") or {})
  for key in COMMON:
    if key in config:
      rope[key] = config[key]
  return _options(rope, "rope_scaling")


def _hf_keys(options: dict) -> dict:
  if options.get("frequency_fraction") is not None:
    rope_type = "proportional"
  else:
    rope_type = next(t for t, s in SCALING_OF.items() if s == options.get("scaling", "none"))
  names = {v: k for k, v in {**COMMON, **KEYS[rope_type]}.items()}
  out = {"rope_type": rope_type}
  out.update({names[k]: v for k, v in options.items() if k in names})
  return out


def to_hf(options: dict, dialect: str = "rope_parameters") -> dict:
  """The HF config keys for posenc ``rope`` options (the inverse of ``from_hf``), in ``dialect``."""
  if dialect not in DIALECTS:
    raise ConfigError(f"dialect {dialect!r} is unknown; choose one of {DIALECTS}.")
  per_layer = all(v is None or isinstance(v, dict) for v in options.values()) and options and \
      "scaling" not in options
  if per_layer:
    if dialect != "rope_parameters":
      raise ConfigError("per-layer-type rope settings exist only in the 'rope_parameters' dialect.")
    return {"rope_parameters": {t: None if o is None else _hf_keys(o) for t, o in options.items()}}
  keys = _hf_keys(options)
  if dialect == "rope_parameters":
    return {"rope_parameters": keys}
  out = {k: keys.pop(k) for k in list(keys) if k in COMMON}
  if keys["rope_type"] == "default" and len(keys) == 1:
    out["rope_scaling"] = None
  else:
    if dialect == "legacy":
      keys["type"] = keys.pop("rope_type")
    out["rope_scaling"] = keys
  return out
