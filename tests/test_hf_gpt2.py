"""Tests for posenc/models/hf_gpt2.py: a random Hugging Face GPT-2 vs the imported GPT."""
from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import posenc  # noqa: F401  (flax config)
from posenc import models
from posenc.models.hf_gpt2 import load_hf_gpt2
from hf_files import DAMAGES, damaged_copy

torch = pytest.importorskip("torch", reason="no torch (pip install -e .[test])")
transformers = pytest.importorskip("transformers", reason="no transformers (pip install -e .[test])")

TINY = dict(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def run_jit(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """A random GPT2LMHeadModel saved as config.json + model.safetensors, and its directory."""
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY)).eval()
  with torch.no_grad():  # non-zero biases and LayerNorm parameters, so every tensor is checked
    for name, p in model.named_parameters():
      if name.endswith(("bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
        p.add_(0.1 * torch.randn_like(p))
  directory = tmp_path_factory.mktemp("gpt2")
  model.save_pretrained(str(directory), safe_serialization=True)
  return model, directory


def logits_of(model, ids):
  graphdef, state = nnx.split(model)
  return np.asarray(run_jit(lambda s, x: nnx.merge(graphdef, s)(x), state, ids))


def test_logits_match_transformers(reference):
  hf, directory = reference
  ours = load_hf_gpt2(directory)
  assert isinstance(ours, models.GPT)
  ids = np.random.default_rng(0).integers(0, 100, (3, 20))
  with torch.no_grad():
    expected = hf(input_ids=torch.tensor(ids)).logits.numpy()
  got = logits_of(ours, ids.astype(np.int32))
  assert np.abs(got - expected).max() <= 1e-4
  assert np.std(expected) > 0.1  # the comparison is not between flat logits


def test_greedy_generation_matches_transformers(reference):
  hf, directory = reference
  ours = load_hf_gpt2(directory)
  prompt = np.random.default_rng(1).integers(0, 100, (2, 4))
  with torch.no_grad():
    expected = hf.generate(torch.tensor(prompt), attention_mask=torch.ones(2, 4, dtype=torch.long),
                           max_new_tokens=6, do_sample=False, pad_token_id=0).numpy()
  np.testing.assert_array_equal(models.generate(ours, prompt.astype(np.int32), 6), expected)


def edited_copy(directory, tmp_path, edit):
  (tmp_path / "config.json").write_text((directory / "config.json").read_text())
  tensors = load_file(str(directory / "model.safetensors"))
  edit(tensors)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  return tmp_path


def test_damaged_checkpoints_are_named(reference, tmp_path):
  _, directory = reference

  def damage(t):
    t.pop("transformer.h.1.attn.c_proj.weight")
    t["transformer.h.0.mlp.c_fc.weight"] = np.zeros((64, 255), np.float32)
    t["transformer.h.0.attn.extra"] = np.zeros(3, np.float32)
    t["transformer.h.0.attn.bias"] = np.zeros((1, 1, 64, 64), np.float32)  # an old causal-mask buffer: fine

  with pytest.raises(ValueError) as err:
    load_hf_gpt2(edited_copy(directory, tmp_path, damage))
  message = str(err.value)
  assert "does not fit the GPT-2" in message and "nothing was loaded" in message
  assert "missing (1): h.1.attn.c_proj.weight" in message
  assert "wrong shape (1): h.0.mlp.c_fc.weight: (64, 255) (expected (64, 256))" in message
  assert "unknown (1): h.0.attn.extra" in message


def test_untied_head_and_other_configs_are_refused(reference, tmp_path):
  _, directory = reference
  (tmp_path / "untied").mkdir()
  untied = edited_copy(directory, tmp_path / "untied",
                       lambda t: t.__setitem__("lm_head.weight", np.ones((100, 64), np.float32)))
  with pytest.raises(ValueError, match="untied head"):
    load_hf_gpt2(untied)
  (tmp_path / "relu").mkdir()
  relu = edited_copy(directory, tmp_path / "relu", lambda t: None)
  (relu / "config.json").write_text((directory / "config.json").read_text().replace('"gelu_new"', '"relu"'))
  with pytest.raises(ValueError, match="not a GPT-2 config.*activation_function"):
    load_hf_gpt2(relu)
  with pytest.raises(ValueError, match="config.json and model.safetensors"):
    load_hf_gpt2(tmp_path / "nowhere")


@pytest.mark.parametrize("damage", DAMAGES)
def test_unreadable_files_are_one_error_naming_them(reference, tmp_path, damage):
  """A truncated or non-safetensors weights file, a config.json without a key or not JSON: one ValueError
  naming the file (and the key), not safetensors' or json's own error."""
  message = damaged_copy(reference[1], tmp_path, damage, "wte.weight", "n_embd")
  with pytest.raises(ValueError, match=re.escape(message)):
    load_hf_gpt2(tmp_path)
