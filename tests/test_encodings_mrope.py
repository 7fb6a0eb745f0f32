"""Tests for posenc/encodings/mrope.py: M-RoPE against transformers' Qwen2-VL (chunked) and Qwen3-VL
(interleaved) rotary embeddings, its 1D form against rope, relative positions, its sections."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from rotary_helpers import H, logits, qk, rotate

from posenc.config import ConfigError
from posenc.encodings import Geometry, make
from posenc.encodings.mrope import default_sections, pair_axes


def make_mrope(dh=16, **kw):
  return make("mrope", dim=H * dh, num_heads=H, **kw)


def random_thw(n, batch=2, seed=0, high=40):
  """Integer (t, h, w) positions ``[batch, n, 3]``, each axis drawn on its own (no t = h = w)."""
  return np.random.default_rng(seed).integers(0, high, (batch, n, 3)).astype(np.int32)


def hf_rotate(q, k, positions, embedding, apply_rotary_pos_emb):
  """transformers' M-RoPE on our ``[B, N, H, Dh]`` q, k at ``[B, N, 3]`` positions."""
  import torch

  tq, tk = (torch.from_numpy(np.array(x)) for x in (q, k))
  position_ids = torch.from_numpy(np.moveaxis(positions, -1, 0).astype(np.int64))  # [3, B, N]
  cos, sin = embedding(tq, position_ids)
  hq, hk = apply_rotary_pos_emb(tq, tk, cos, sin, unsqueeze_dim=2)
  return hq.numpy(), hk.numpy()


@pytest.mark.parametrize("dh,section", [(128, (16, 24, 24)), (32, (6, 5, 5)), (32, (2, 8, 6))])
def test_chunked_matches_qwen2_vl(dh, section):
  pytest.importorskip("torch", reason="no torch (pip install -e .[test])")
  from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
  from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding, apply_rotary_pos_emb

  config = Qwen2VLTextConfig(hidden_size=H * dh, num_attention_heads=H, rope_parameters={
      "rope_type": "default", "rope_theta": 1e6, "mrope_section": list(section)})
  geometry = Geometry.grid3d(2, 3, 4, num_prefix=1)
  q, k = qk(geometry, dh=dh)
  positions = random_thw(geometry.num_positions)
  enc = make_mrope(dh, theta=1e6, mrope_section=None if section == (16, 24, 24) else section)
  qr, kr = rotate(enc, q, k, geometry, 0, positions)
  hq, hk = hf_rotate(q[:, 1:], k[:, 1:], positions, Qwen2VLRotaryEmbedding(config), apply_rotary_pos_emb)
  np.testing.assert_allclose(qr[:, 1:], hq, atol=3e-5)
  np.testing.assert_allclose(kr[:, 1:], hk, atol=3e-5)
  np.testing.assert_array_equal(qr[:, 0], q[:, 0])  # the prefix token is not turned


@pytest.mark.parametrize("dh,section", [(128, (24, 20, 20)), (32, (6, 5, 5)), (32, (8, 4, 4))])
def test_interleaved_matches_qwen3_vl(dh, section):
  pytest.importorskip("torch", reason="no torch (pip install -e .[test])")
  from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
  from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding, apply_rotary_pos_emb

  config = Qwen3VLTextConfig(hidden_size=H * dh, num_attention_heads=H, head_dim=dh, rope_parameters={
      "rope_type": "default", "rope_theta": 5e5, "mrope_section": list(section), "mrope_interleaved": True})
  geometry = Geometry.grid3d(3, 2, 4)
  q, k = qk(geometry, dh=dh, seed=1)
  positions = random_thw(geometry.num_positions, seed=1)
  enc = make_mrope(dh, theta=5e5, mrope_interleaved=True,
                   mrope_section=None if section == (24, 20, 20) else section)
  qr, kr = rotate(enc, q, k, geometry, 0, positions)
  hq, hk = hf_rotate(q, k, positions, Qwen3VLTextRotaryEmbedding(config), apply_rotary_pos_emb)
  np.testing.assert_allclose(qr, hq, atol=3e-5)
  np.testing.assert_allclose(kr, hk, atol=3e-5)


@pytest.mark.parametrize("interleaved", [False, True])
def test_a_text_token_is_1d_rope_exactly(interleaved):
  geometry = Geometry.seq(9, num_prefix=1)
  q, k = qk(geometry)
  enc = make_mrope(mrope_interleaved=interleaved)
  rope = make("rope", dim=2 * 16, num_heads=2)
  positions = np.arange(5, 14, dtype=np.int32)[None, :, None]
  want = rotate(rope, q, k, geometry, 0, positions)
  for pos in (positions, np.repeat(positions, 3, axis=-1)):  # 1D, and (t, h, w) with t = h = w
    got = rotate(enc, q, k, geometry, 0, pos)
    for g, w in zip(got, want):
      np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("geometry", [Geometry.grid3d(2, 3, 3, num_prefix=1), Geometry.grid(3, 4)], ids=str)
def test_shifting_every_position_keeps_the_logits(geometry, interleaved):
  enc = make_mrope(mrope_interleaved=interleaved)
  q, k = qk(geometry, seed=2)
  positions = np.asarray(geometry.positions(), np.float32)
  p = geometry.num_prefix  # a prefix token does not turn: its logits with the others are not relative
  base = logits(*rotate(enc, q, k, geometry, 0, positions))[..., p:, p:]
  shift = np.array([7.0, -3.5, 11.25][-geometry.ndim:], np.float32)
  shifted = logits(*rotate(enc, q, k, geometry, 0, positions + shift))[..., p:, p:]
  np.testing.assert_allclose(shifted, base, atol=5e-4)
  # ... while moving one axis of one token changes its logits.
  moved = positions.copy()
  moved[0, 1, -1] += 1.0
  assert np.abs(logits(*rotate(enc, q, k, geometry, 0, moved))[..., p:, p:] - base).max() > 1e-2


def test_a_2d_grid_is_one_image_at_t_0():
  geometry = Geometry.grid(3, 4)
  enc = make_mrope()
  q, k = qk(geometry)
  hw = np.asarray(geometry.positions())
  thw = np.concatenate([np.zeros_like(hw[..., :1]), hw], axis=-1)
  for a, b in zip(rotate(enc, q, k, geometry, 0, hw), rotate(enc, q, k, Geometry.grid3d(1, 3, 4), 0, thw)):
    np.testing.assert_array_equal(a, b)


def test_layouts_and_default_sections():
  np.testing.assert_array_equal(pair_axes(8, (2, 3, 3), False), [0, 0, 1, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(pair_axes(8, (4, 2, 2), True), [0, 1, 2, 0, 1, 2, 0, 0])
  assert default_sections(64, False) == (16, 24, 24) and default_sections(64, True) == (24, 20, 20)
  for half in range(3, 80):
    for interleaved in (False, True):
      sections = make_mrope(2 * half, mrope_interleaved=interleaved).sections(2 * half)
      assert sum(sections) == half and min(sections) >= 1
      assert tuple(np.bincount(pair_axes(half, sections, interleaved), minlength=3)) == sections


def test_bad_sections_are_one_clear_error():
  with pytest.raises(ValueError, match=r"mrope_section=\(2, 2, 2\) sums to 6, but heads of head_dim=16 have 8 "
                                       r"feature pairs; give sections that sum to 8"):
    make_mrope(mrope_section=(2, 2, 2))
  with pytest.raises(ValueError, match=r"mrope_interleaved=True .* h can have at most 3 and w 2; got "
                                       r"mrope_section=\(2, 3, 3\)"):
    make_mrope(mrope_section=(2, 3, 3), mrope_interleaved=True)
  with pytest.raises(ConfigError, match=r"'mrope': mrope_section must be None .* of three entries, every one >= 1"):
    make_mrope(mrope_section=(8, 0))
  with pytest.raises(ValueError, match=r"'mrope' needs an even head dimension >= 6"):
    make("mrope", dim=8, num_heads=2)
  assert make("mrope").head_dim is None  # without dim, the sections are checked at the first rotate


def test_no_parameters():
  assert jax.tree.leaves(nnx.state(make_mrope(), nnx.Param)) == []
