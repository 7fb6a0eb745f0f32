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
| ``yarn`` | ``yarn`` | ``factor``, ``original_length``, ``beta_fast``, ``beta_slow``, ``attention_factor``,
  ``mscale``, ``mscale_all_dim``, ``truncate`` |
| ``longrope`` | ``longrope`` | ``short_factor``, ``long_factor``, ``factor``, ``original_length``,
  ``attention_factor`` |
| ``llama3`` | ``llama3`` | ``factor``, ``low_freq_factor``, ``high_freq_factor``, ``original_length`` |
| ``proportional`` | ``none``, or ``linear`` with ``factor``; and ``frequency_fraction`` (p-RoPE) |
  ``partial_rotary_factor`` -> ``frequency_fraction``, ``factor`` |

M-RoPE (Qwen2-VL, Qwen3-VL) is a ``mrope_section`` beside type ``default`` (``mrope`` in the hub's
``rope_scaling``, which ``to_hf`` writes in the older dialects): it reads into posenc ``mrope``
options (``theta``, ``mrope_section``, ``mrope_interleaved``); ``encoding_from_hf`` says which
encoding a config's options are for.

``rope_theta`` is ``theta``; elsewhere HF's ``partial_rotary_factor`` (rotate the first fraction of
each head over the whole spectrum) keeps its name. ``proportional`` options always hold the key
``frequency_fraction`` (None where HF's ``partial_rotary_factor`` is missing, HF's 1.0), which is
how ``to_hf`` knows the type. Keys posenc does not implement are a clear error, never dropped; so are options ``to_hf`` cannot write.

Layer schedules (``posenc.encodings.layer_schedule``) are top-level keys in every dialect: SmolLM3's and
Llama 4's ``no_rope_layers`` (one flag per layer, 1 = RoPE) -> ``rotate_layers``, or ``nope_every`` where
``no_rope_layer_interval`` gives that very list (HF: layer ``i`` is NoPE when ``(i + 1) % interval == 0``; a
list wins over the interval, so an interval beside a list it does not give is not read); an interval alone
-> ``nope_every``; Llama 4's ``attn_temperature_tuning``, ``attn_scale``, ``floor_scale`` -> ``nope_temperature``,
``nope_attn_scale``, ``nope_floor_scale``. ``to_hf(..., num_layers=n)`` writes the list of ``n`` flags
(``rotate_layers`` needs it; ``nope_every`` writes the interval and, given ``n``, the list too).

HF fills some keys from the model's config: a missing ``original_max_position_embeddings`` is
``max_position_embeddings`` (Phi-3 keeps it top-level, and that wins), and a missing yarn or
longrope ``factor`` is ``max_position_embeddings / original_max_position_embeddings`` (posenc's
``factor=None`` is dynamic instead: the sequence's length over ``original_length``). ``from_hf(config,
max_position_embeddings=n)`` fills them the same way (``to_hf`` then writes them out); without it
they stay missing, and HF's ``dynamic``, which takes its trained length from
``max_position_embeddings``, has no ``original_length``.
"""
from __future__ import annotations

from posenc.config import ConfigError
from posenc.encodings.layer_schedule import SCHEDULE_OPTIONS

SCALING_OF = {"default": "none", "linear": "linear", "dynamic": "ntk", "yarn": "yarn", "longrope": "longrope",
              "llama3": "llama3"}  # and "proportional": "none", or "linear" with a factor
TYPE_OF = {scaling: rope_type for rope_type, scaling in SCALING_OF.items()}
KEYS = {  # HF key -> posenc option, per type (rope_theta and partial_rotary_factor go with every type)
    "default": {},
    "linear": {"factor": "factor"},
    "dynamic": {"factor": "factor", "original_max_position_embeddings": "original_length"},
    "yarn": {"factor": "factor", "original_max_position_embeddings": "original_length", "beta_fast": "beta_fast",
             "beta_slow": "beta_slow", "attention_factor": "attention_factor", "mscale": "mscale",
             "mscale_all_dim": "mscale_all_dim", "truncate": "truncate"},
    "longrope": {"short_factor": "short_factor", "long_factor": "long_factor", "factor": "factor",
                 "original_max_position_embeddings": "original_length", "attention_factor": "attention_factor"},
    "llama3": {"factor": "factor", "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor",
               "original_max_position_embeddings": "original_length"},
    "proportional": {"factor": "factor", "partial_rotary_factor": "frequency_fraction"},
}
COMMON = {"rope_theta": "theta", "partial_rotary_factor": "partial_rotary_factor"}
DIALECTS = ("legacy", "rope_type", "rope_parameters")
TEMPERATURE = {"attn_temperature_tuning": "nope_temperature", "attn_scale": "nope_attn_scale",
               "floor_scale": "nope_floor_scale"}  # Llama 4's top-level keys -> posenc's schedule options


def interval_flags(interval: int, num_layers: int) -> list[int]:
  """HF's ``no_rope_layers`` from ``no_rope_layer_interval``: 1 (RoPE) unless ``(i + 1) % interval == 0``."""
  return [int((i + 1) % interval != 0) for i in range(num_layers)]


def _schedule_options(config: dict) -> dict:
  """The layer-schedule options of an HF config's top-level keys (HF: a list of flags wins over the interval)."""
  flags, interval = config.get("no_rope_layers"), config.get("no_rope_layer_interval")
  options = {}
  if flags:
    if interval and list(flags) == interval_flags(interval, len(flags)):
      options["nope_every"] = interval
    else:
      options["rotate_layers"] = [i for i, flag in enumerate(flags) if flag]
  elif interval is not None:
    options["nope_every"] = interval
  options.update({option: config[key] for key, option in TEMPERATURE.items() if key in config})
  return options


def _schedule_keys(options: dict, num_layers: int | None) -> dict:
  """HF's top-level keys of posenc's layer-schedule ``options`` (``num_layers``: the length of ``no_rope_layers``)."""
  keys = {key: options[option] for key, option in TEMPERATURE.items() if option in options}
  if options.get("nope_every") is not None:
    keys["no_rope_layer_interval"] = options["nope_every"]
    if num_layers is not None:
      keys["no_rope_layers"] = interval_flags(options["nope_every"], num_layers)
  elif options.get("rotate_layers") is not None:
    layers = list(options["rotate_layers"])
    if num_layers is None or any(i >= num_layers for i in layers):
      raise ConfigError(f"rotate_layers={layers} is written as HF's no_rope_layers, one flag per layer: pass "
                        f"num_layers (more than every index), got num_layers={num_layers}.")
    keys["no_rope_layers"] = [int(i in layers) for i in range(num_layers)]
  return keys


def dialect_of(config: dict) -> str:
  if "rope_parameters" in config:
    return "rope_parameters"
  scaling = config.get("rope_scaling")
  return "rope_type" if isinstance(scaling, dict) and "rope_type" in scaling else "legacy"


def _layer_types(params: dict) -> bool:
  """Whether ``rope_parameters`` is one dict per layer type."""
  return bool(params) and all(v is None or (isinstance(v, dict) and ("rope_type" in v or "rope_theta" in v))
                              for v in params.values())


MROPE_KEYS = {"rope_theta": "theta", "mrope_section": "mrope_section", "mrope_interleaved": "mrope_interleaved"}


def _mrope_options(rope: dict, where: str) -> dict:
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  unknown = sorted(set(rope) - set(MROPE_KEYS) - {"rope_type", "type"})
  if rope_type not in ("default", "mrope") or unknown:
    raise ConfigError(f"{where}: M-RoPE (mrope_section) with rope type {rope_type!r} and key(s) {unknown}: posenc's "
                      f"mrope reads type 'default' or 'mrope' with {sorted(MROPE_KEYS)}.")
  return {MROPE_KEYS[k]: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in rope.items() if k in MROPE_KEYS}


def _options(rope: dict, where: str, max_position_embeddings: int | None = None,
             original_max: int | None = None) -> dict:
  if "mrope_section" in rope:
    return _mrope_options(rope, where)
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in KEYS:
    raise ConfigError(f"{where}: rope type {rope_type!r} is not one posenc implements; "
                      f"choose one of {sorted(KEYS)}.")
  names = {**COMMON, **KEYS[rope_type]}
  unknown = sorted(set(rope) - set(names) - {"rope_type", "type"})
  if unknown:
    raise ConfigError(f"{where}: rope type {rope_type!r} with key(s) {unknown}, which posenc does not "
                      f"implement; it reads {sorted(names)}.")
  if rope_type == "proportional":
    options = {"scaling": "linear" if "factor" in rope else "none", "frequency_fraction": None}
  else:
    options = {"scaling": SCALING_OF[rope_type]}
  options.update({names[k]: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in rope.items() if k in names})
  if max_position_embeddings is not None or original_max is not None:  # HF's fallbacks
    if rope_type in ("llama3", "yarn", "longrope"):
      options["original_length"] = original_max or options.get("original_length") or max_position_embeddings
    elif rope_type == "dynamic":
      options.setdefault("original_length", max_position_embeddings)
    if rope_type in ("yarn", "longrope") and options.get("factor") is None and max_position_embeddings:
      options["factor"] = max_position_embeddings / options["original_length"]
  return options


def from_hf(config: dict, max_position_embeddings: int | None = None) -> dict:
  """posenc ``rope`` options from an HF config dict (``config.json``'s contents): one options dict,
  or ``{layer_type: options or None}`` for per-layer-type ``rope_parameters``. With
  ``max_position_embeddings``, keys HF would fill in are filled in (module docstring)."""
  kind, schedule = dialect_of(config), _schedule_options(config)
  if kind == "rope_parameters":
    params = config["rope_parameters"]
    if _layer_types(params):
      if schedule:
        raise ConfigError(f"per-layer-type rope_parameters beside the layer schedule keys {sorted(schedule)}: "
                          f"posenc reads one or the other.")
      return {t: None if p is None else _options(p, f"rope_parameters[{t!r}]", max_position_embeddings)
              for t, p in params.items()}
    return _options(params, "rope_parameters", max_position_embeddings) | schedule
  rope = dict(config.get("rope_scaling") or {})
  for key in COMMON:
    if key in config:
      rope[key] = config[key]
  original_max = config.get("original_max_position_embeddings") if max_position_embeddings else None
  return _options(rope, "rope_scaling", max_position_embeddings, original_max) | schedule


def encoding_from_hf(config: dict, max_position_embeddings: int | None = None) -> tuple[str, dict]:
  """``(encoding name, options)`` for an HF config: ``"mrope"`` where it has an ``mrope_section``,
  else ``"rope"`` (``from_hf``'s options, per layer type where the config has them)."""
  options = from_hf(config, max_position_embeddings)
  return ("mrope" if "mrope_section" in options else "rope"), options


def _hf_keys(options: dict) -> dict:
  if "mrope_section" in options:
    names = {v: k for k, v in MROPE_KEYS.items()}
    stray = sorted(set(options) - set(names))
    if stray:
      raise ConfigError(f"mrope option(s) {stray} have no key in HF's M-RoPE; it writes {sorted(MROPE_KEYS)}.")
    return {"rope_type": "default", **{names[k]: v for k, v in options.items()}}
  scaling = options.get("scaling", "none")
  if "frequency_fraction" in options:
    if scaling not in ("none", "linear"):
      raise ConfigError(f"HF's proportional rope (frequency_fraction, p-RoPE) takes scaling 'none' or 'linear', "
                        f"not {scaling!r}.")
    rope_type = "proportional"
  elif scaling in TYPE_OF:
    rope_type = TYPE_OF[scaling]
  else:
    raise ConfigError(f"scaling={scaling!r} has no HF rope type; HF's are {sorted(TYPE_OF)}.")
  names = {v: k for k, v in {**COMMON, **KEYS[rope_type]}.items()}
  stray = sorted(k for k, v in options.items() if k not in names and k != "scaling" and v is not None)
  if stray:
    raise ConfigError(f"option(s) {stray} have no key in HF's {rope_type!r} rope; it writes {sorted(names)}.")
  out = {"rope_type": rope_type}
  out.update({names[k]: v for k, v in options.items() if k in names and (v is not None or k != "frequency_fraction")})
  return out


def to_hf(options: dict, dialect: str = "rope_parameters", num_layers: int | None = None) -> dict:
  """The HF config keys for posenc ``rope`` options (the inverse of ``from_hf``), in ``dialect``; ``num_layers``
  writes a layer schedule's ``no_rope_layers`` (one flag per layer; ``rotate_layers`` needs it)."""
  rope = {k: v for k, v in options.items() if k not in SCHEDULE_OPTIONS}
  schedule = {k: v for k, v in options.items() if k in SCHEDULE_OPTIONS}
  return _rope_keys(rope, dialect) | _schedule_keys(schedule, num_layers)


def _rope_keys(options: dict, dialect: str) -> dict:
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
  if "mrope_section" in keys:
    keys["rope_type"] = "mrope"  # as Qwen2-VL's config.json on the hub writes it
  out = {k: keys.pop(k) for k in list(keys) if k in COMMON}
  if keys["rope_type"] == "default" and len(keys) == 1:
    out["rope_scaling"] = None
  else:
    if dialect == "legacy":
      keys["type"] = keys.pop("rope_type")
    out["rope_scaling"] = keys
  return out
