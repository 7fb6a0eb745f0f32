"""Tests for rope's variants beyond the integer grid: 1D context extension (NTK, YaRN; against HF's
rope utils, posenc/encodings/rope_scaling.py) and DINOv3's normalised coordinates
(posenc/encodings/rope_normalized.py), and the rules between rope's options (RoPEOptions.variant)."""
from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np
import pytest
from rotary_helpers import DH, logits, make_rope, qk, real_positions, rotate, to_interleaved

from posenc.encodings import Geometry, make
from posenc.encodings.rope_scaling import rope_frequencies


# ---------------------------------------------------------------- context extension: ntk, yarn
def _hf_rope_config(kind, head_dim, theta, n, length, factor):
  """HF config for the same extension, and its (inv_freq, attention factor) at ``n`` positions."""
  pytest.importorskip("transformers", reason="no transformers (pip install -e .[test])")
  from transformers import LlamaConfig
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  if kind == "ntk":  # HF's dynamic NTK; our factor=None is its factor 1
    params = {"rope_type": "dynamic", "rope_theta": theta, "factor": 1.0 if factor is None else factor}
    max_len = length
  else:
    s = max(1.0, n / length) if factor is None else factor
    params = {"rope_type": "yarn", "rope_theta": theta, "factor": s,
              "original_max_position_embeddings": length}
    max_len = round(length * s)
  config = LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                       max_position_embeddings=max_len, rope_parameters=params)
  init = ROPE_INIT_FUNCTIONS["dynamic" if kind == "ntk" else "yarn"]
  inv_freq, attention_factor = init(config, None, seq_len=n) if kind == "ntk" else init(config, None)
  return config, inv_freq.numpy(), attention_factor


EXTEND = [(8, 16, None), (16, 16, None), (16, 16, 4.0), (40, 16, None), (300, 64, 3.5),
          (8192, 2048, None), (1000, 2048, 2.0)]


@pytest.mark.parametrize("head_dim,theta", [(16, 10000.0), (64, 500000.0), (64, 10000.0)])
@pytest.mark.parametrize("n,length,factor", EXTEND, ids=str)
@pytest.mark.parametrize("kind", ["ntk", "yarn"])
def test_rope_scaling_frequencies_match_hf(kind, n, length, factor, head_dim, theta):
  ours, attention = rope_frequencies(head_dim, theta, n, kind, length, factor)
  _, theirs, hf_attention = _hf_rope_config(kind, head_dim, theta, n, length, factor)
  np.testing.assert_allclose(ours, theirs, rtol=1e-6)
  assert attention == pytest.approx(hf_attention, rel=1e-12)
  plain = theta ** -(np.arange(0, head_dim, 2) / head_dim)
  if n <= length and (factor is None or kind == "ntk"):  # within the trained length: no change
    np.testing.assert_allclose(ours, plain, rtol=1e-12)
    assert attention == 1.0
  else:
    assert not np.allclose(ours, plain, rtol=1e-3)
    s = max(1.0, n / length) if factor is None else factor
    assert attention == (pytest.approx(0.1 * math.log(s) + 1) if kind == "yarn" else 1.0)
  if kind == "yarn" and (n, length, head_dim, theta) == (8192, 2048, 64, 10000.0):
    ratio = ours / plain  # fast pairs kept, slow pairs divided by s = 4, a ramp between
    np.testing.assert_allclose(ratio[:8], 1.0, rtol=1e-12)
    np.testing.assert_allclose(ratio[21:], 0.25, rtol=1e-12)
    assert np.all((ratio[9:20] < 1) & (ratio[9:20] > 0.25))


@pytest.mark.parametrize("kind,n,length,factor", [
    ("ntk", 40, 16, None), ("ntk", 40, 16, 2.0), ("yarn", 40, 16, None), ("yarn", 12, 16, 2.0)], ids=str)
def test_scaled_rope_rotation_matches_hf_llama(kind, n, length, factor):
  """The whole rotation, attention factor on cos and sin included, against HF's Llama rope."""
  torch = pytest.importorskip("torch", reason="no torch (pip install -e .[test])")
  pytest.importorskip("transformers", reason="no transformers (pip install -e .[test])")
  from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

  config, _, _ = _hf_rope_config(kind, DH, 10000.0, n, length, factor)
  geometry = Geometry.seq(n, num_prefix=1)
  enc = make_rope(scaling=kind, original_length=length, **({} if factor is None else {"factor": factor}))
  q, k = qk(geometry)
  qr, kr = rotate(enc, q, k, geometry, 0)
  tq, tk = (torch.from_numpy(np.array(x[:, 1:])) for x in (q, k))
  cos, sin = LlamaRotaryEmbedding(config)(tq, torch.arange(n)[None])
  hq, hk = apply_rotary_pos_emb(tq, tk, cos, sin, unsqueeze_dim=2)
  np.testing.assert_allclose(qr[:, 1:], hq.numpy(), atol=3e-5)
  np.testing.assert_allclose(kr[:, 1:], hk.numpy(), atol=3e-5)
  np.testing.assert_array_equal(qr[:, :1], q[:, :1])  # the prefix token is not turned (nor scaled)


@pytest.mark.parametrize("kind", ["ntk", "yarn"])
def test_scaled_rope_logits_depend_only_on_offsets(kind):
  geometry = Geometry.seq(24)
  enc, plain = make_rope(scaling=kind, original_length=8), make_rope()
  q0, k0 = qk(Geometry.seq(1), seed=1, batch=1)  # the same content at every position
  q, k = jnp.tile(q0, (2, 24, 1, 1)), jnp.tile(k0, (2, 24, 1, 1))
  base = logits(*rotate(enc, q, k, geometry, 0))
  scale = np.abs(base).max()
  at100 = logits(*rotate(enc, q, k, geometry, 0, geometry.positions() + 100))
  np.testing.assert_allclose(at100, base, atol=1e-4 * scale)
  i, j = np.meshgrid(np.arange(24), np.arange(24), indexing="ij")
  for offset in (-5, 0, 3, 23):
    values = base[0][:, i - j == offset]
    np.testing.assert_allclose(values, np.broadcast_to(values[:, :1], values.shape), atol=1e-4 * scale)
  p = real_positions(geometry, low=0.0, high=24.0)
  real = logits(*rotate(enc, q, k, geometry, 0, p))
  np.testing.assert_allclose(logits(*rotate(enc, q, k, geometry, 0, p + np.float32(37.25))), real,
                             atol=2e-4 * scale)
  unscaled = logits(*rotate(plain, q, k, geometry, 0))
  assert np.abs(base - unscaled).max() > 1e-2 * scale  # N = 24 > L = 8: the extension acts
  # q.k at offset 0 is the unrotated q.k times the attention factor squared (1 for ntk).
  mscale = 0.1 * math.log(3.0) + 1 if kind == "yarn" else 1.0
  diagonal = functools.partial(np.diagonal, axis1=-2, axis2=-1)
  np.testing.assert_allclose(diagonal(base), mscale ** 2 * diagonal(unscaled), rtol=1e-5)
  # Within the trained length nothing changes.
  short = Geometry.seq(8)
  np.testing.assert_array_equal(rotate(enc, q[:, :8], k[:, :8], short, 0)[0],
                                rotate(plain, q[:, :8], k[:, :8], short, 0)[0])


def test_scaling_clear_errors():
  with pytest.raises(ValueError, match=r"scaling must be one of \('none', 'linear', 'ntk', 'yarn', 'llama3', "
                                     r"'longrope'\), got 'su'"):
    make_rope(scaling="su")
  with pytest.raises(ValueError, match=r"scaling='yarn' needs original_length"):
    make_rope(scaling="yarn")
  with pytest.raises(ValueError, match=r"original_length is not an option of RoPE on the integer grid.*belongs to 1D context extension"):
    make_rope(original_length=8)
  with pytest.raises(ValueError, match=r"factor must be None \(ntk, yarn, longrope: from the sequence length\) or a number >= 1"):
    make_rope(scaling="ntk", original_length=8, factor=0.5)
  with pytest.raises(ValueError, match=r"beta_fast > beta_slow > 0"):
    make_rope(scaling="yarn", original_length=8, beta_fast=1, beta_slow=2)
  with pytest.raises(ValueError, match=r"scaling='yarn' extends 1D sequences only, not 2D 2x2"):
    make_rope(scaling="yarn", original_length=8, geometry=Geometry.grid(2, 2))
  q, k = qk(Geometry.grid(2, 2))
  with pytest.raises(ValueError, match=r"1D sequences only"):
    make("rope", scaling="ntk", original_length=8).rotate(q, k, Geometry.grid(2, 2),
                                                          Geometry.grid(2, 2).positions(), 0)
  q, k = qk(Geometry.seq(5), dh=2)
  with pytest.raises(ValueError, match=r"scaling='ntk' needs head_dim >= 4"):
    make("rope", scaling="ntk", original_length=4).rotate(q, k, Geometry.seq(5),
                                                          Geometry.seq(5).positions(), 0)


# ---------------------------------------------------------------- DINOv3: normalised coordinates, periods
def _dinov3_angles(geometry, mode="separate", base=100.0, min_period=None, max_period=None):
  """DINOv3's RopePositionEmbedding angles, written from its formulas: coords = arange(0.5, n) / d,
  2 * coords - 1; periods base**(2k / (Dh/2)) (or min..max_period, geometric); angle = 2 pi u / period.
  Returned in this module's layout [N, Dh/2]: x (column) pairs first, then y (row)."""
  h, w = geometry.shape
  d = {"separate": (h, w), "max": (max(h, w),) * 2, "min": (min(h, w),) * 2}[mode]
  rows = 2 * np.arange(0.5, h) / d[0] - 1
  cols = 2 * np.arange(0.5, w) / d[1] - 1
  u = np.stack(np.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)
  if min_period is None:
    periods = base ** (2 * np.arange(DH // 4) / (DH // 2))
  else:
    periods = min_period * (max_period / min_period) ** np.linspace(0, 1, DH // 4)
  return np.concatenate([2 * np.pi * u[:, 1:] / periods, 2 * np.pi * u[:, :1] / periods], axis=-1)


@pytest.mark.parametrize("options", [
    dict(normalize_coords="separate"), dict(normalize_coords="max"), dict(normalize_coords="min", base=50.0),
    dict(normalize_coords="separate", min_period=0.5, max_period=20.0)], ids=str)
def test_normalized_rope_matches_dinov3_closed_form(options):
  geometry = Geometry.grid(3, 5, num_prefix=1)
  enc = make_rope(**options)
  q, k = qk(geometry)
  coords = enc.coordinates(geometry.positions(), geometry)  # as a model does, once per forward
  qr, kr = rotate(enc, q, k, geometry, 0, coords)
  opts = {key: v for key, v in options.items() if key != "normalize_coords"}
  angles = _dinov3_angles(geometry, options["normalize_coords"], **opts)
  for x, xr in ((q, qr), (k, kr)):
    np.testing.assert_array_equal(xr[:, :1], x[:, :1])  # the class token is not rotated
    expected = to_interleaved(x[:, 1:]) * np.exp(1j * angles)[None, :, None, :]
    np.testing.assert_allclose(to_interleaved(xr[:, 1:]), expected, atol=3e-5)


def test_normalized_rope_options_and_errors():
  enc = make_rope(normalize_coords="separate", augment=True)
  assert (enc.variant.base, enc.variant.shift_coords, enc.variant.jitter_coords, enc.variant.rescale_coords) == (100.0, None, None, 2.0)
  assert enc.augments and not make_rope(normalize_coords="separate").augments and not make_rope().augments
  with pytest.raises(ValueError, match=r"base is not an option of RoPE on the integer grid.*DINOv3's normalised coordinates"):
    make_rope(base=100.0)
  with pytest.raises(ValueError, match=r"theta is not an option of DINOv3's normalised"):
    make_rope(normalize_coords="separate", theta=100.0)
  with pytest.raises(ValueError, match=r"normalize_coords must be None or one of"):
    make_rope(normalize_coords="both")
  with pytest.raises(ValueError, match=r"min_period and max_period go together"):
    make_rope(normalize_coords="separate", min_period=1.0)
  with pytest.raises(ValueError, match=r"either base or min_period"):
    make_rope(normalize_coords="separate", base=10.0, min_period=1.0, max_period=4.0)
  with pytest.raises(ValueError, match=r"0 < min_period < max_period"):
    make_rope(normalize_coords="separate", min_period=4.0, max_period=1.0)
  with pytest.raises(ValueError, match=r"augment is not an option of RoPE on the integer grid.*augment=True"):
    make_rope(augment=True)
  with pytest.raises(ValueError, match=r"shift_coords is not an option of DINOv3's normalised coordinates without augmentation.*augment=True"):
    make_rope(normalize_coords="separate", shift_coords=0.1)
  with pytest.raises(ValueError, match=r"jitter_coords must be None \(off\) or a number >= 1"):
    make_rope(normalize_coords="separate", augment=True, jitter_coords=0.5)
  with pytest.raises(ValueError, match=r"normalises 2D grids, not 1D 8"):
    make_rope(normalize_coords="separate", geometry=Geometry.seq(8))
