"""rope against every HF rope type (transformers' ROPE_INIT_FUNCTIONS: inverse frequencies and attention
factor), configured through posenc.encodings.hf_rope.from_hf; the whole rotation against HF's Phi-3 and
Llama rotary code; p-RoPE (frequency_fraction) and partial_rotary_factor in closed form."""
from __future__ import annotations

import logging
import math

import jax
import numpy as np
import pytest
from flax import nnx
from rotary_helpers import H, qk, rotate

from posenc import models, transfer
from posenc.encodings import Geometry, hf_rope, make

transformers = pytest.importorskip("transformers", reason="no transformers (pip install -e .[test])")
torch = pytest.importorskip("torch", reason="no torch (pip install -e .[test])")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

logging.getLogger("transformers").setLevel(logging.ERROR)
RNG = np.random.default_rng(0)
SHORT16, LONG16 = [float(x) for x in RNG.uniform(1.0, 1.5, 8)], [float(x) for x in RNG.uniform(1.0, 9.0, 8)]
SHORT8, LONG8 = SHORT16[:4], LONG16[:4]
# (name, head_dim, max_position_embeddings, HF rope_parameters)
TYPES = [
    ("default", 16, 64, {"rope_type": "default", "rope_theta": 10000.0}),
    ("linear", 16, 64, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.5}),
    ("dynamic", 16, 32, {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
    ("yarn", 64, 4096, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                        "original_max_position_embeddings": 1024}),
    ("yarn-attention", 16, 128, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                                 "original_max_position_embeddings": 64, "attention_factor": 1.3,
                                 "beta_fast": 16.0, "beta_slow": 2.0}),
    ("yarn-no-factor", 16, 256, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": None,
                                 "original_max_position_embeddings": 64}),
    ("llama3.1", 128, 131072, {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}),
    ("llama3-small", 16, 256, {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 64}),
    ("longrope", 16, 256, {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": SHORT16,
                           "long_factor": LONG16, "original_max_position_embeddings": 32, "factor": 4.0}),
    ("longrope-attention", 16, 256, {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": SHORT16,
                                     "long_factor": LONG16, "original_max_position_embeddings": 32,
                                     "attention_factor": 0.9}),
    ("longrope-from-max", 16, 128, {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": SHORT16,
                                    "long_factor": LONG16, "original_max_position_embeddings": 32}),
    ("proportional", 256, 1024, {"rope_type": "proportional", "rope_theta": 1000000.0,
                                 "partial_rotary_factor": 0.25}),
    ("proportional-odd", 16, 64, {"rope_type": "proportional", "rope_theta": 10000.0,
                                  "partial_rotary_factor": 0.35, "factor": 2.0}),
    ("proportional-none", 16, 64, {"rope_type": "proportional", "rope_theta": 10000.0, "partial_rotary_factor": 0.0}),
    ("proportional-all", 16, 64, {"rope_type": "proportional", "rope_theta": 10000.0}),
    ("yarn-deepseek", 64, 4096, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32.0,
                                 "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 1.0,
                                 "original_max_position_embeddings": 1024}),
    ("yarn-no-truncate", 64, 4096, {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "truncate": False,
                                    "beta_fast": 32.0, "beta_slow": 1.0, "original_max_position_embeddings": 4096}),
    ("yarn-mscale-no-factor", 16, 256, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": None, "mscale": 1.0,
                                        "mscale_all_dim": 0.5, "truncate": False,
                                        "original_max_position_embeddings": 64}),
]
PARTIAL = [(f"{name}-partial", dh, max_len, {**params, "partial_rotary_factor": 0.5,
                                             **({"short_factor": SHORT8, "long_factor": LONG8}
                                                if "short_factor" in params else {})})
           for name, dh, max_len, params in TYPES if not name.startswith("proportional")]


def _hf(params, head_dim, max_len, n):
  """HF's (inv_freq, attention factor) for these rope parameters at ``n`` positions, and the config."""
  config = transformers.LlamaConfig(hidden_size=H * head_dim, num_attention_heads=H, head_dim=head_dim,
                                    max_position_embeddings=max_len, rope_parameters=dict(params))
  if params["rope_type"] == "default":
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding  # honours partial_rotary_factor
    inv_freq, attention = Phi3RotaryEmbedding.compute_default_rope_parameters(config)
  else:
    inv_freq, attention = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, None, seq_len=n)
  return inv_freq.numpy().astype(np.float64), attention, config


def _ours(params, head_dim, max_len, n):
  """The frequencies and attention factor of a rope built from ``from_hf``'s options, at ``n`` tokens."""
  options = hf_rope.from_hf({"rope_parameters": params}, max_position_embeddings=max_len)
  enc = make("rope", dim=H * head_dim, num_heads=H, **options)
  geometry = Geometry.seq(n)
  freqs = np.asarray(enc.variant.frequencies(geometry, head_dim)).reshape(-1)
  return freqs, float(enc.variant.attention_scale(geometry, head_dim)), enc


@pytest.mark.parametrize("name,head_dim,max_len,params", TYPES + PARTIAL, ids=[c[0] for c in TYPES + PARTIAL])
def test_frequencies_and_attention_factor_match_hf_at_every_length(name, head_dim, max_len, params):
  original = params.get("original_max_position_embeddings", max_len)
  for n in sorted({1, original // 2, original, original + 1, 2 * original, max_len}):
    theirs, hf_attention, _ = _hf(params, head_dim, max_len, n)
    ours, attention, enc = _ours(params, head_dim, max_len, n)
    rotated = int(head_dim * params.get("partial_rotary_factor", 1.0))
    assert ours.shape == theirs.shape == ((head_dim if name.startswith("proportional") else rotated) // 2,)
    np.testing.assert_allclose(ours, theirs, rtol=2e-6, atol=0, err_msg=f"n={n}")
    assert attention == pytest.approx(hf_attention, rel=1e-6), f"n={n}"
  assert enc.variant.length_dependent == (params["rope_type"] in ("dynamic", "longrope"))


def test_closed_forms_of_the_new_types():
  plain = 10000.0 ** -(np.arange(0, 16, 2) / 16)
  linear, _, _ = _ours(TYPES[1][3], 16, 64, 8)
  np.testing.assert_allclose(linear, plain / 4.5, rtol=1e-6)
  llama3, _, _ = _ours(TYPES[7][3], 16, 256, 8)  # wavelengths 2 pi / f against 64 / 4 = 16 and 64 / 1
  wavelength = 2 * np.pi / plain
  kept, divided = wavelength < 16, wavelength > 64
  assert kept.sum() and divided.sum() and (~kept & ~divided).sum()  # all three regions occur
  np.testing.assert_allclose(llama3[kept], plain[kept], rtol=1e-6)
  np.testing.assert_allclose(llama3[divided], plain[divided] / 4, rtol=1e-6)
  mid = ~kept & ~divided
  assert np.all((llama3[mid] < plain[mid]) & (llama3[mid] > plain[mid] / 4))
  for n, factors in ((32, SHORT16), (33, LONG16)):  # longrope switches past original_length = 32
    freqs, attention, _ = _ours(TYPES[8][3], 16, 256, n)
    np.testing.assert_allclose(freqs, plain / np.asarray(factors), rtol=1e-6)
    assert attention == pytest.approx(math.sqrt(1 + math.log(4.0) / math.log(32)))
  pruned, _, _ = _ours(TYPES[11][3], 256, 1024, 8)  # p-RoPE 0.25 of 128 pairs: the fastest 32 turn
  np.testing.assert_allclose(pruned[:32], 1e6 ** -(np.arange(0, 64, 2) / 256), rtol=1e-6)
  assert np.all(pruned[32:] == 0)


@pytest.mark.parametrize("name", ["longrope", "longrope-partial", "default-partial", "yarn-partial"])
def test_whole_rotation_matches_hf_phi3(name):
  """Partial rotation (the first R features, rotate-half within them) and longrope's switch, against
  HF's Phi-3 rotary embedding and apply_rotary_pos_emb, on both sides of original_length."""
  from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding, apply_rotary_pos_emb

  _, head_dim, max_len, params = next(c for c in TYPES + PARTIAL if c[0] == name)
  original = params.get("original_max_position_embeddings", max_len)
  for n in (original - 3, original + 5):
    geometry = Geometry.seq(n, num_prefix=1)
    _, _, config = _hf(params, head_dim, max_len, n)
    _, _, enc = _ours(params, head_dim, max_len, n)
    q, k = qk(geometry, dh=head_dim)
    qr, kr = rotate(enc, q, k, geometry, 0)
    tq, tk = (torch.from_numpy(np.array(x[:, 1:])) for x in (q, k))
    cos, sin = Phi3RotaryEmbedding(config)(tq, torch.arange(n)[None])
    hq, hk = apply_rotary_pos_emb(tq, tk, cos, sin, unsqueeze_dim=2)
    np.testing.assert_allclose(qr[:, 1:], hq.numpy(), atol=3e-5, err_msg=f"n={n}")
    np.testing.assert_allclose(kr[:, 1:], hk.numpy(), atol=3e-5, err_msg=f"n={n}")
    np.testing.assert_array_equal(qr[:, :1], q[:, :1])


def test_proportional_rotation_matches_hf_llama():
  from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

  params = {"rope_type": "proportional", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "factor": 2.0}
  _, _, config = _hf(params, 16, 64, 20)
  _, _, enc = _ours(params, 16, 64, 20)
  geometry = Geometry.seq(20)
  q, k = qk(geometry)
  qr, kr = rotate(enc, q, k, geometry, 0)
  tq, tk = (torch.from_numpy(np.array(x)) for x in (q, k))
  hq, hk = apply_rotary_pos_emb(tq, tk, *LlamaRotaryEmbedding(config)(tq, torch.arange(20)[None]), unsqueeze_dim=2)
  np.testing.assert_allclose(qr, hq.numpy(), atol=3e-5)
  np.testing.assert_allclose(kr, hk.numpy(), atol=3e-5)


@pytest.mark.parametrize("scaling", [{}, {"scaling": "yarn", "original_length": 8, "factor": 2.0}], ids=str)
def test_frequency_fraction_one_is_rope_and_zero_is_nope(scaling):
  geometry = Geometry.seq(12, num_prefix=1)
  q, k = qk(geometry)
  rope = rotate(make("rope", dim=H * 16, num_heads=H, **scaling), q, k, geometry, 0)
  full = rotate(make("rope", dim=H * 16, num_heads=H, frequency_fraction=1.0, **scaling), q, k, geometry, 0)
  for a, b in zip(rope, full):
    np.testing.assert_array_equal(a, b)
  if not scaling:  # no attention factor: q and k exactly unchanged
    for a, b in zip(rotate(make("rope", dim=H * 16, num_heads=H, frequency_fraction=0.0), q, k, geometry, 0),
                    (q, k)):
      np.testing.assert_array_equal(a, b)
  # A half: the fastest 4 pairs (features i, i + 8 for i < 4) turn as RoPE's, the other 4 not at all.
  half = rotate(make("rope", dim=H * 16, num_heads=H, frequency_fraction=0.5, **scaling), q, k, geometry, 0)
  turning = np.r_[0:4, 8:12]
  np.testing.assert_allclose(half[0][..., turning], rope[0][..., turning], rtol=1e-6, atol=1e-6)
  if not scaling:
    np.testing.assert_array_equal(half[0][..., np.r_[4:8, 12:16]], q[..., np.r_[4:8, 12:16]])


def test_partial_rotary_factor_rotates_the_first_features_over_the_whole_spectrum():
  geometry = Geometry.seq(10)
  q, k = qk(geometry, dh=16)
  partial = rotate(make("rope", dim=H * 16, num_heads=H, partial_rotary_factor=0.5), q, k, geometry, 0)
  q8, k8 = q[..., :8], k[..., :8]
  small = rotate(make("rope", dim=H * 8, num_heads=H), q8, k8, geometry, 0)  # RoPE of head_dim 8
  for whole, first, x in zip(partial, small, (q, k)):
    np.testing.assert_array_equal(whole[..., :8], first)
    np.testing.assert_array_equal(whole[..., 8:], x[..., 8:])


def test_clear_errors_name_the_option():
  def fails(match, **kw):
    with pytest.raises(ValueError, match=match):
      make("rope", dim=H * 16, num_heads=H, **kw)

  fails(r"low_freq_factor is not an option of scaling='yarn'.*belongs to scaling='llama3'",
        scaling="yarn", original_length=8, low_freq_factor=1.0)
  fails(r"scaling='linear' needs factor", scaling="linear")
  fails(r"scaling='llama3' needs low_freq_factor, high_freq_factor", scaling="llama3", factor=2.0, original_length=8)
  fails(r"high_freq_factor > low_freq_factor", scaling="llama3", factor=2.0, original_length=8,
        low_freq_factor=4.0, high_freq_factor=1.0)
  fails(r"scaling='longrope' needs long_factor", scaling="longrope", original_length=8, short_factor=SHORT16)
  fails(r"short_factor has 4 entries; it needs one per rotated pair, 8", scaling="longrope", original_length=8,
        short_factor=SHORT8, long_factor=LONG16)
  fails(r"short_factor must be None or a tuple of numbers of at least one entry, every one > 0, got \[1.0, -1.0\]",
        short_factor=[1.0, -1.0])
  fails(r"attention_factor is not an option of scaling='linear'", scaling="linear", factor=2.0, attention_factor=1.2)
  fails(r"yarn's mscale and mscale_all_dim set the attention factor together.*give both or neither",
        scaling="yarn", original_length=8, mscale=1.0)
  fails(r"attention_factor=1.2 and mscale/mscale_all_dim both set yarn's attention factor; give one",
        scaling="yarn", original_length=8, attention_factor=1.2, mscale=1.0, mscale_all_dim=0.5)
  fails(r"truncate is not an option of scaling='linear'", scaling="linear", factor=2.0, truncate=False)
  fails(r"mscale, mscale_all_dim are not options of RoPE on the integer grid", mscale=1.0, mscale_all_dim=0.5)
  fails(r"frequency_fraction must be None \(all\) or a number >= 0 and <= 1, got 1.5", frequency_fraction=1.5)
  fails(r"partial_rotary_factor must be None \(all\) or a number > 0 and <= 1, got 0", partial_rotary_factor=0)
  fails(r"give one", frequency_fraction=0.5, partial_rotary_factor=0.5)
  fails(r"partial_rotary_factor=0.1 rotates int\(16 \* 0.1\) = 1 of the head_dim=16 features; that must be an "
        r"even number >= 2", partial_rotary_factor=0.1)
  with pytest.raises(ValueError, match=r"frequency_fraction applies to 1D sequences only, not 2D"):
    make("rope", dim=H * 16, num_heads=H, frequency_fraction=0.5, geometry=Geometry.grid(2, 2))


@pytest.mark.parametrize("name,head_dim,max_len,params", TYPES, ids=[c[0] for c in TYPES])
def test_no_parameters_and_a_new_length_transfers_nothing(name, head_dim, max_len, params):
  """Like every scaling: no parameters, so a checkpoint moves to a new length unchanged (the frequencies at
  that length follow from the options: test_frequencies_and_attention_factor_match_hf_at_every_length)."""
  _, _, enc = _ours(params, head_dim, max_len, 8)
  assert not jax.tree.leaves(nnx.state(enc, nnx.Param))
  gpt = nnx.eval_shape(lambda: models.create("gpt-nano", posenc="rope", rngs=nnx.Rngs(0), vocab_size=32,
                                             max_len=16, width=H * head_dim, depth=1, num_heads=H, mlp_dim=8,
                                             posenc_options=hf_rope.from_hf({"rope_parameters": params},
                                                                            max_position_embeddings=max_len)))
  state = nnx.to_pure_dict(nnx.state(gpt, nnx.Param))
  assert transfer.transfer_params(state, "rope", Geometry.seq(16), Geometry.seq(64)) is state
