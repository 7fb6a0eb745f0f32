"""HF rope configs in every dialect <-> posenc rope options (posenc.encodings.hf_rope): exact round
trips, and the same reading as transformers' own standardisation of each dialect."""
from __future__ import annotations

import copy
import logging

import pytest
import transformers

from posenc.config import ConfigError
from posenc.encodings import hf_rope

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
  with pytest.raises(ConfigError, match=r"\['mscale'\]"):
    hf_rope.from_hf({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "mscale": 0.7}})
  with pytest.raises(ConfigError, match="only in the 'rope_parameters' dialect"):
    hf_rope.to_hf(hf_rope.from_hf(PER_LAYER), "legacy")
