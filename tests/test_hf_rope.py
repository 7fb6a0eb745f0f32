"""HF rope configs in every dialect <-> posenc rope options (posenc.encodings.hf_rope): exact round
trips, and the same reading as transformers' own standardisation of each dialect."""
from __future__ import annotations

import copy
import logging

import pytest
import transformers

from posenc.config import ConfigError
from posenc.encodings import hf_rope, make

LLAMA31 = {"rope_theta": 500000.0, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
PHI3 = {"rope_theta": 10000.0, "partial_rotary_factor": 0.5,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.3], "long_factor": [2.0, 3.0, 4.0, 5.0],
                         "original_max_position_embeddings": 4096}}
QWEN_YARN = {"rope_theta": 1000000.0, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                       "original_max_position_embeddings": 32768,
                                                       "beta_fast": 32.0, "beta_slow": 1.0}}
LEGACY_LINEAR = {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
LEGACY_DYNAMIC = {"rope_theta": 10000.0, "rope_scaling": {"type": "dynamic", "factor": 2.0}}
PLAIN = {"rope_theta": 10000.0, "rope_scaling": None}
V5 = {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                          "original_max_position_embeddings": 2048, "attention_factor": 1.1}}
PER_LAYER = {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}
GEMMA4_PROPORTIONAL = {"rope_parameters": {"full_attention": {"rope_type": "proportional", "rope_theta": 1000000.0,
                                                              "partial_rotary_factor": 0.25},
                                           "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                           "nope_layer": None}}
CONFIGS = {"llama3.1": LLAMA31, "phi3-longrope": PHI3, "qwen-yarn": QWEN_YARN, "linear": LEGACY_LINEAR,
           "dynamic": LEGACY_DYNAMIC, "plain": PLAIN, "v5-yarn": V5, "per-layer": PER_LAYER,
           "proportional": GEMMA4_PROPORTIONAL}


# Every HF rope type, as rope_parameters; written below in every dialect.
TYPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "default-partial": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 2048,
             "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.2},
    "yarn-deepseek": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32.0, "beta_slow": 1.0,
                      "mscale": 1.0, "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096},
    "yarn-no-truncate": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "truncate": False,
                         "original_max_position_embeddings": 4096},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.5], "long_factor": [2.0, 4.0],
                 "factor": 8.0, "original_max_position_embeddings": 4096, "attention_factor": 1.1,
                 "partial_rotary_factor": 0.25},
    "llama3": LLAMA31["rope_scaling"] | {"rope_theta": 500000.0},
    "proportional": {"rope_type": "proportional", "rope_theta": 1000000.0, "partial_rotary_factor": 0.25},
    "proportional-linear": {"rope_type": "proportional", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                            "factor": 2.0},
    "proportional-all": {"rope_type": "proportional", "rope_theta": 10000.0},
}


def _in_dialect(params: dict, dialect: str) -> dict:
  """``params`` (rope_parameters) written in ``dialect``, by hand."""
  if dialect == "rope_parameters":
    return {"rope_parameters": dict(params)}
  rest = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
  top = {k: params[k] for k in ("rope_theta", "partial_rotary_factor") if k in params}
  if rest == {"rope_type": "default"}:
    return {**top, "rope_scaling": None}
  if dialect == "legacy":
    rest["type"] = rest.pop("rope_type")
  return {**top, "rope_scaling": rest}


DIALECT_CASES = [(t, d) for t in TYPES for d in hf_rope.DIALECTS]


@pytest.mark.parametrize("rope_type,dialect", DIALECT_CASES, ids=[f"{t}-{d}" for t, d in DIALECT_CASES])
def test_every_type_round_trips_in_every_dialect_and_reads_alike(rope_type, dialect):
  config = _in_dialect(TYPES[rope_type], dialect)
  plain = config.get("rope_scaling", {}) is None  # plain RoPE: legacy and rope_type write the same keys
  assert hf_rope.dialect_of(config) == ("legacy" if plain else dialect)
  options = hf_rope.from_hf(copy.deepcopy(config))
  assert hf_rope.to_hf(options, dialect) == config
  assert options == hf_rope.from_hf(_in_dialect(TYPES[rope_type], "rope_parameters"))  # one reading
  per_layer = {"rope_parameters": {"full_attention": TYPES[rope_type], "sliding_attention": None}}
  assert hf_rope.to_hf(hf_rope.from_hf(per_layer)) == per_layer
  logging.getLogger("transformers").setLevel(logging.ERROR)
  hf = transformers.LlamaConfig(max_position_embeddings=131072, **copy.deepcopy(config)).rope_parameters
  hf.pop("type", None)
  assert hf_rope.to_hf(options, "rope_parameters")["rope_parameters"] == hf  # as transformers standardises it


def test_hf_fallbacks_from_max_position_embeddings():
  """HF fills original_max_position_embeddings (Phi-3's top-level one first) and a yarn or longrope factor
  from the model's max_position_embeddings; from_hf does too when told it."""
  phi3 = {"rope_theta": 10000.0, "original_max_position_embeddings": 32,
          "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}}
  options = hf_rope.from_hf(phi3, max_position_embeddings=128)
  assert (options["original_length"], options["factor"]) == (32, 4.0)
  assert hf_rope.from_hf(phi3)["scaling"] == "longrope" and "factor" not in hf_rope.from_hf(phi3)
  assert hf_rope.from_hf(LEGACY_DYNAMIC, max_position_embeddings=2048)["original_length"] == 2048
  yarn = hf_rope.from_hf({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, max_position_embeddings=512)
  assert (yarn["original_length"], yarn["factor"]) == (512, 1.0)


def test_options_hf_cannot_hold_are_clear_errors():
  with pytest.raises(ConfigError, match=r"proportional rope .* takes scaling 'none' or 'linear', not 'yarn'"):
    hf_rope.to_hf({"scaling": "yarn", "original_length": 8, "frequency_fraction": 0.5})
  with pytest.raises(ConfigError, match=r"option\(s\) \['partial_rotary_factor'\] have no key in HF's 'proportional'"):
    hf_rope.to_hf({"scaling": "none", "frequency_fraction": 0.5, "partial_rotary_factor": 0.5})
  with pytest.raises(ConfigError, match=r"option\(s\) \['normalize_coords'\] have no key in HF's 'default'"):
    hf_rope.to_hf({"scaling": "none", "normalize_coords": "max"})


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_gives_back_the_same_keys(name):
  config = copy.deepcopy(CONFIGS[name])
  options = hf_rope.from_hf(config)
  assert config == CONFIGS[name]  # reading does not modify
  assert hf_rope.to_hf(options, hf_rope.dialect_of(config)) == config


def test_options_use_posenc_names():
  assert hf_rope.from_hf(LLAMA31) == {"scaling": "llama3", "theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_length": 8192}
  assert hf_rope.from_hf(LEGACY_DYNAMIC) == {"scaling": "ntk", "theta": 10000.0, "factor": 2.0}
  assert hf_rope.from_hf(PHI3)["partial_rotary_factor"] == 0.5  # HF's: fewer rotated features, whole spectrum
  layers = hf_rope.from_hf(GEMMA4_PROPORTIONAL)
  assert layers["full_attention"] == {"scaling": "none", "theta": 1000000.0, "frequency_fraction": 0.25}  # p-RoPE
  assert layers["nope_layer"] is None


@pytest.mark.parametrize("name", ["llama3.1", "phi3-longrope", "qwen-yarn", "linear", "dynamic", "plain"])
def test_older_dialects_read_as_transformers_standardises_them(name):
  """transformers moves every dialect into ``rope_parameters``; ours, written in that dialect, must agree."""
  config = copy.deepcopy(CONFIGS[name])
  logging.getLogger("transformers").setLevel(logging.ERROR)
  hf = transformers.LlamaConfig(max_position_embeddings=131072, **copy.deepcopy(config)).rope_parameters
  hf.pop("type", None)
  ours = hf_rope.to_hf(hf_rope.from_hf(config), "rope_parameters")["rope_parameters"]
  if "original_max_position_embeddings" not in ours and hf["rope_type"] in ("llama3", "yarn", "longrope"):
    ours["original_max_position_embeddings"] = 131072  # HF's fallback: max_position_embeddings
  assert ours == hf


def test_per_layer_types_as_transformers_reads_them():
  logging.getLogger("transformers").setLevel(logging.ERROR)
  hf = transformers.Gemma3TextConfig(rope_parameters=copy.deepcopy(PER_LAYER["rope_parameters"])).rope_parameters
  ours = hf_rope.to_hf(hf_rope.from_hf(PER_LAYER))["rope_parameters"]
  assert {t: hf[t] for t in ours} == ours


def test_unknown_types_and_keys_are_clear_errors_never_dropped():
  with pytest.raises(ConfigError, match="'su'.*choose one of"):
    hf_rope.from_hf({"rope_scaling": {"type": "su", "factor": 2.0}})
  with pytest.raises(ConfigError, match=r"M-RoPE \(mrope_section\) with rope type 'yarn' and key\(s\) \['factor'\]"):
    hf_rope.from_hf({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "mrope_section": [2, 2]}})
  with pytest.raises(ConfigError, match="only in the 'rope_parameters' dialect"):
    hf_rope.to_hf(hf_rope.from_hf(PER_LAYER), "legacy")


SCHEDULE_KEYS = ("rope_parameters", "no_rope_layers", "no_rope_layer_interval", "attn_temperature_tuning",
                 "floor_scale", "attn_scale")


def _hf_config(cls, **kwargs) -> dict:
  """The rope and layer-schedule keys of an HF config class's ``to_dict``."""
  logging.getLogger("transformers").setLevel(logging.ERROR)
  config = getattr(transformers, cls)(**kwargs).to_dict()
  return {k: config[k] for k in SCHEDULE_KEYS if k in config}


@pytest.mark.parametrize("cls,kwargs,schedule", [
    ("Llama4TextConfig", dict(num_hidden_layers=6), dict(nope_every=4, nope_temperature=True)),
    ("Llama4TextConfig", dict(num_hidden_layers=5, no_rope_layer_interval=2, attn_temperature_tuning=False),
     dict(nope_every=2, nope_temperature=False)),
    ("SmolLM3Config", dict(num_hidden_layers=8), dict(nope_every=4)),
    ("SmolLM3Config", dict(num_hidden_layers=4, no_rope_layers=[1, 0, 1, 1]), dict(rotate_layers=[0, 2, 3])),
], ids=["llama4", "llama4-every-2", "smollm3", "smollm3-list"])
def test_layer_schedules_read_as_hf_builds_its_layers_and_round_trip(cls, kwargs, schedule):
  config = _hf_config(cls, **kwargs)
  options = hf_rope.from_hf(copy.deepcopy(config))
  assert {k: options[k] for k in schedule} == schedule
  num_layers = len(config["no_rope_layers"])
  enc = make("rope", dim=32, num_heads=2, num_layers=num_layers, **options)
  # HF: layer i uses RoPE iff config.no_rope_layers[i] (Llama4TextAttention, SmolLM3Attention)
  assert [bool(enc.options.rotates(i)) for i in range(num_layers)] == [bool(f) for f in config["no_rope_layers"]]
  back = hf_rope.to_hf(options, "rope_parameters", num_layers=num_layers)
  if "rotate_layers" in schedule:  # the interval HF does not use beside its own list is not read
    config.pop("no_rope_layer_interval")
  assert back == config
  for dialect in ("legacy", "rope_type"):
    written = hf_rope.to_hf(options, dialect, num_layers=num_layers)
    assert hf_rope.to_hf(hf_rope.from_hf(written), dialect, num_layers=num_layers) == written
  assert hf_rope.from_hf(back) == options


def test_layer_schedules_hf_cannot_hold_are_clear_errors():
  with pytest.raises(ConfigError, match=r"rotate_layers=\[0, 2\] is written as HF's no_rope_layers.*pass num_layers"):
    hf_rope.to_hf({"scaling": "none", "rotate_layers": [0, 2]})
  with pytest.raises(ConfigError, match=r"got num_layers=2"):
    hf_rope.to_hf({"scaling": "none", "rotate_layers": [0, 2]}, num_layers=2)
  with pytest.raises(ConfigError, match=r"per-layer-type rope_parameters beside the layer schedule keys"):
    hf_rope.from_hf({**PER_LAYER, "no_rope_layer_interval": 4})
  assert hf_rope.to_hf({"scaling": "none", "nope_every": 3}) == {"rope_parameters": {"rope_type": "default"},
                                                                 "no_rope_layer_interval": 3}


QWEN2_VL_HUB = {"rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}
QWEN3_VL = {"rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                "mrope_interleaved": True}}


@pytest.mark.parametrize("config,cls", [(QWEN2_VL_HUB, "Qwen2VLTextConfig"), (QWEN3_VL, "Qwen3VLTextConfig")],
                         ids=["qwen2-vl", "qwen3-vl"])
def test_mrope_configs_read_into_mrope_options_and_round_trip(config, cls):
  """Qwen2-VL's hub config (legacy ``type: mrope``) and Qwen3-VL's interleaved one: posenc's
  ``mrope`` options, written back as read and as transformers standardises them."""
  name, options = hf_rope.encoding_from_hf(copy.deepcopy(config))
  section = (config.get("rope_scaling") or config.get("rope_parameters"))["mrope_section"]
  assert name == "mrope" and options["mrope_section"] == section
  assert hf_rope.to_hf(options, hf_rope.dialect_of(config)) == config
  hf = dict(getattr(transformers, cls)(**copy.deepcopy(config)).rope_parameters)
  hf.pop("type", None)
  assert hf_rope.to_hf(options) == {"rope_parameters": hf}
  assert hf_rope.from_hf({"rope_parameters": hf}) == options
  enc = make(name, dim=256, num_heads=2, **options)  # head_dim 128: 64 pairs
  assert tuple(enc.options.mrope_section) == tuple(options["mrope_section"])
  assert hf_rope.encoding_from_hf({"rope_theta": 10000.0, "rope_scaling": None}) == ("rope", {"scaling": "none",
                                                                                           "theta": 10000.0})
