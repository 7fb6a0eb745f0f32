"""Relative biases and their common checks: cpb and alibi (cpb against HF transformers' Swin-V2 and
torch's autograd, alibi against BLOOM's slopes and the closed form), then for every bias
(rel_bias, cpb, alibi, and cpe's errors) parameter counts, translation invariance, clear errors,
jit, gradients and bfloat16. rel_bias's T5 / Swin parity is in test_encodings_rel_bias.py, cpe's
in test_encodings_cpe.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="no torch (pip install -e .[test])")
pytest.importorskip("transformers", reason="no transformers (pip install -e .[test])")
from transformers import Swinv2Config  # noqa: E402
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes  # noqa: E402
from transformers.models.swinv2.modeling_swinv2 import Swinv2SelfAttention  # noqa: E402

from conftest import BIAS_DIM as C, BIAS_HEADS as H, BIAS_SEQ as SEQ, GRID, bias_of, int_positions  # noqa: E402
from conftest import bias_positions as positions, build_bias as build, num_params, randomize  # noqa: E402
from posenc.encodings import Geometry, make  # noqa: E402
from posenc.encodings.relative import alibi_slopes  # noqa: E402


# --- parameter counts -------------------------------------------------------

def test_parameter_counts():
  h, w = GRID.shape
  count = lambda *a, **k: num_params(nnx.eval_shape(lambda: build(*a, **k)))  # noqa: E731
  assert count("rel_bias") == (2 * h - 1) * (2 * w - 1) * H
  assert count("rel_bias", per_layer=True) == 3 * (2 * h - 1) * (2 * w - 1) * H
  assert count("rel_bias", SEQ) == 32 * H
  assert count("rel_bias", SEQ, num_buckets=16) == 16 * H
  assert count("cpe") == 9 * C + C
  assert count("cpb") == 2 * 512 + 512 + 512 * H
  assert count("cpb", hidden_dim=16, per_layer=True) == 3 * (2 * 16 + 16 + 16 * H)
  assert count("alibi") == 0


# --- cpb ------------------------------------------------------------------------

def swinv2_cpb(enc, grid):
  """HF Swin-V2's bias ``[H, n, n]`` (torch, differentiable) with ``enc``'s MLP, and that MLP."""
  attn = Swinv2SelfAttention(Swinv2Config(), dim=16, num_heads=H, window_size=list(grid),
                             pretrained_window_size=list(GRID.shape))
  mlp = attn.continuous_position_bias_mlp
  with torch.no_grad():
    mlp[0].weight.copy_(torch.from_numpy(np.array(enc.w1[...]).T))
    mlp[0].bias.copy_(torch.from_numpy(np.array(enc.b1[...])))
    mlp[2].weight.copy_(torch.from_numpy(np.array(enc.w2[...]).T))
  table = mlp(attn.relative_coords_table).view(-1, H)
  n = grid[0] * grid[1]
  theirs = table[attn.relative_position_index.view(-1)].view(n, n, H).permute(2, 0, 1)
  return 16 * torch.sigmoid(theirs), mlp


@pytest.mark.parametrize("grid", [(3, 4), (5, 6), (2, 3)])
def test_cpb_matches_swinv2(grid):
  """Built at 3x4; at another grid Swin-V2 normalises by pretrained_window_size."""
  enc = randomize(build("cpb"), scale=0.3)  # pre-sigmoid values O(1), not saturated
  geometry = Geometry.grid(*grid, num_prefix=1)
  ours = positions(bias_of(enc, geometry), geometry)
  with torch.no_grad():
    theirs = swinv2_cpb(enc, grid)[0].numpy()
  assert np.ptp(theirs) > 1.0
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grid", [(3, 4), (5, 6)])
def test_cpb_gradients_match_swinv2_autograd(grid):
  """cpb's gradients (its MLP over every pair, ``relative.pair_mlp``) against torch's autograd of HF
  Swin-V2's bias (the MLP on its offset table, then gathered)."""
  enc = randomize(build("cpb"), scale=0.3)
  geometry = Geometry.grid(*grid, num_prefix=1)
  n = grid[0] * grid[1]
  weights = np.random.default_rng(2).normal(size=(H, n, n)).astype(np.float32)
  pad = np.pad(weights, ((0, 0), (1, 0), (1, 0)))[None]  # the prefix row and column: zero bias
  loss = lambda e: jnp.sum(e.attention_bias(geometry, geometry.positions(), 0) * pad)  # noqa: E731
  grads = nnx.to_pure_dict(nnx.jit(nnx.grad(loss))(enc))
  theirs, mlp = swinv2_cpb(enc, grid)
  (theirs * torch.from_numpy(weights)).sum().backward()
  for key, param in (("w1", mlp[0].weight), ("b1", mlp[0].bias), ("w2", mlp[2].weight)):
    want = param.grad.numpy().T if param.ndim == 2 else param.grad.numpy()
    assert np.abs(want).max() > 1e-3, key
    # float32 sums over n^2 pairs (both sides): absolute error relative to the largest entry
    np.testing.assert_allclose(grads[key], want, rtol=1e-4, atol=1e-5 * np.abs(want).max(), err_msg=key)


# --- translation invariance -------------------------------------------------------

@pytest.mark.parametrize("name,geometry", [
    ("rel_bias", Geometry.seq(40, num_prefix=1)), ("alibi", Geometry.seq(12)),
    ("rel_bias", GRID), ("alibi", GRID), ("cpb", GRID), ("cpb", Geometry.grid(5, 6))])


def test_bias_depends_only_on_offset(name, geometry):
  enc = randomize(build(name, geometry if name != "cpb" else GRID), scale=0.3)
  bias = positions(bias_of(enc, geometry, 0), geometry)
  coords = np.asarray(geometry.coords())
  offsets = (coords[:, None, :] - coords[None, :, :]).reshape(-1, geometry.ndim)
  _, first, group = np.unique(offsets, axis=0, return_index=True, return_inverse=True)
  flat = bias.reshape(H, -1)
  # Every pair takes the value of the first pair with its offset: any shift, same bias.
  np.testing.assert_array_equal(flat, flat[:, first[group.reshape(-1)]])
  assert len(np.unique(flat[:, first], axis=1)) > 1  # and the bias does vary with offset


# --- alibi ------------------------------------------------------------------------

@pytest.mark.parametrize("num_heads", [1, 2, 3, 6, 8, 12, 16])
def test_alibi_slopes_follow_paper(num_heads):
  ours = alibi_slopes(num_heads)
  np.testing.assert_allclose(ours, _get_alibi_slopes(num_heads, "cpu").numpy(), rtol=1e-6)
  if num_heads & (num_heads - 1) == 0:  # power of 2: 2**(-8 i / H)
    np.testing.assert_allclose(ours, 2.0 ** (-8.0 * np.arange(1, num_heads + 1) / num_heads))


def test_alibi_slopes_non_power_of_two():
  # H = 6: the 4-head slopes 2^-2, 2^-4, 2^-6, 2^-8, then 8-head slopes 1 and 3: 2^-1, 2^-3.
  expected = [2.0 ** (-8 * i / 4) for i in (1, 2, 3, 4)] + [2.0 ** (-8 * i / 8) for i in (1, 3)]
  np.testing.assert_allclose(alibi_slopes(6), expected)


def test_alibi_matches_closed_form():
  enc = build("alibi")
  slopes = 2.0 ** (-8.0 * np.arange(1, H + 1) / H)
  coords = np.asarray(GRID.coords(), np.float64)
  euclid = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
  np.testing.assert_allclose(positions(bias_of(enc, GRID, 0), GRID),
                             -slopes[:, None, None] * euclid, rtol=1e-6)
  i = np.arange(SEQ.shape[0])
  np.testing.assert_allclose(positions(bias_of(enc, SEQ, 0), SEQ),
                             -slopes[:, None, None] * np.abs(i[:, None] - i[None]), rtol=1e-6)


# --- errors ---------------------------------------------------------------------

def test_clear_errors():
  with pytest.raises(ValueError, match=r"'cpe'.*2D.*not 1D 9.*rel_bias"):
    build("cpe").after_block(jnp.zeros((1, 10, C)), SEQ, SEQ.positions(), 0)
  with pytest.raises(ValueError, match=r"'cpe'.*2D"):
    build("cpe", SEQ)
  with pytest.raises(ValueError, match=r"'cpb'.*2D.*not 1D"):
    build("cpb", SEQ)
  with pytest.raises(ValueError, match=r"larger .*5x4.*posenc.transfer"):
    build("rel_bias").attention_bias(Geometry.grid(5, 4), Geometry.grid(5, 4).positions(), 0)
  with pytest.raises(ValueError, match=r"built for 2D 3x4.*cannot serve 1D"):
    build("rel_bias").attention_bias(SEQ, SEQ.positions(), 0)
  with pytest.raises(ValueError, match=r"layers=\(5,\).*num_layers=3"):
    build("cpe", layers=(5,))
  with pytest.raises(ValueError, match=r"even num_buckets"):
    build("rel_bias", SEQ, num_buckets=7)
  with pytest.raises(ValueError, match=r"'rel_bias' needs geometry"):
    make("rel_bias", num_heads=H, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"num_heads >= 1"):
    make("alibi", num_heads=0)


# --- jit, gradients, bfloat16 -----------------------------------------------------

CASES = [("rel_bias", GRID, [GRID, Geometry.grid(2, 3)]),
         ("rel_bias", SEQ, [SEQ, Geometry.seq(300, num_prefix=1)]),
         ("cpb", GRID, [GRID, Geometry.grid(6, 5, num_prefix=2)]),
         ("alibi", GRID, [GRID, Geometry.grid(6, 5)]),
         ("alibi", SEQ, [SEQ, Geometry.seq(20)])]


@pytest.mark.parametrize("name,built,geometries", CASES)
def test_bias_jit_finite_and_differentiable(name, built, geometries):
  enc = build(name, built, per_layer=True) if name != "alibi" else build(name, built)
  for geometry in geometries:
    weights = jnp.asarray(np.random.default_rng(0).normal(
        size=(1, H, geometry.num_tokens, geometry.num_tokens)), jnp.float32)

    def loss(e, layer):
      bias = e.attention_bias(geometry, geometry.positions(), layer)
      return jnp.sum(bias * weights), bias

    grads, bias = nnx.jit(nnx.grad(loss, has_aux=True))(enc, jnp.int32(1))
    assert bias.shape == weights.shape and bias.dtype == jnp.float32
    assert np.isfinite(np.asarray(bias)).all()
    leaves = jax.tree.leaves(grads)
    assert (not leaves) == (name == "alibi")  # alibi has no parameters
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert all(np.abs(np.asarray(g)).sum() > 0 for g in leaves)


@pytest.mark.parametrize("name,built", [("rel_bias", GRID), ("rel_bias", SEQ), ("cpb", GRID)])
def test_bias_bf16_params_give_float32_bias(name, built):
  f32 = randomize(build(name, built), scale=0.3)
  bf16 = randomize(build(name, built, param_dtype=jnp.bfloat16), scale=0.3)
  bias = nnx.jit(lambda e: e.attention_bias(built, built.positions(), 0))(bf16)
  assert bias.dtype == jnp.float32
  np.testing.assert_allclose(bias, bias_of(f32, built, 0), rtol=2e-2, atol=2e-2)


# --- positions as data ------------------------------------------------------------

def real_positions(geometry, batch=2, low=-20.0, high=20.0, seed=0):
  """``[batch, N, ndim]`` float32 coordinates, uniform in ``[low, high)``."""
  rng = np.random.default_rng(seed)
  return rng.uniform(low, high, size=(batch, geometry.num_positions, geometry.ndim)).astype(np.float32)


def alibi_numpy(coords, num_heads):
  """``-slope_h * |p_i - p_j|`` (Euclidean) for ``coords [B, N, ndim]``, float64."""
  coords = np.asarray(coords, np.float64)
  distance = np.linalg.norm(coords[:, :, None] - coords[:, None, :], axis=-1)  # [B, N, N]
  return -alibi_slopes(num_heads).astype(np.float64)[None, :, None, None] * distance[:, None]


@pytest.mark.parametrize("geometry", [Geometry.seq(7, num_prefix=1), Geometry.grid(2, 3, num_prefix=2)],
                         ids=["1d", "2d"])


def test_alibi_is_minus_slope_times_euclidean_distance_at_real_positions(geometry):
  enc = build("alibi", geometry)
  assert enc.continuous is True
  coords = real_positions(geometry)  # one set per example: [2, N, ndim]
  bias = positions(bias_of(enc, geometry, 0, coords), geometry, batch=2)
  want = alibi_numpy(coords, H)
  np.testing.assert_allclose(bias, want, rtol=1e-5, atol=1e-5)
  assert np.abs(bias[0] - bias[1]).max() > 1.0  # each example has its own bias
  assert np.abs(np.diff(np.round(want[0, 0], 3)[~np.eye(geometry.num_positions, dtype=bool)])).max() > 0
  # One set shared by the batch ([1, N, ndim]) gives one bias [1, H, T, T] for all.
  shared = positions(bias_of(enc, geometry, 0, coords[1:]), geometry)
  np.testing.assert_allclose(shared, want[1], rtol=1e-5, atol=1e-5)


def cpb_numpy(enc, coords):
  """Swin-V2's continuous bias at any (real) ``coords [B, N, 2]``, float64, from the formula."""
  w1, b1, w2 = (np.asarray(p[...], np.float64) for p in (enc.w1, enc.b1, enc.w2))
  c = np.asarray(coords, np.float64)
  offsets = (c[:, :, None] - c[:, None, :]) / np.maximum(np.asarray(enc.built.shape) - 1, 1) * 8.0
  x = np.sign(offsets) * np.log2(np.abs(offsets) + 1.0) / np.log2(8.0)
  logits = np.maximum(x @ w1 + b1, 0.0) @ w2  # [B, N, N, H]
  return np.moveaxis(16.0 / (1.0 + np.exp(-logits)), -1, 1)


def test_cpb_takes_real_positions():
  enc = randomize(build("cpb", hidden_dim=32), scale=0.3)
  geometry = Geometry.grid(3, 3, num_prefix=1)
  coords = real_positions(geometry, low=-6.0, high=6.0)
  bias = positions(bias_of(enc, geometry, 0, coords), geometry, batch=2)
  assert np.isfinite(bias).all() and np.abs(bias[0] - bias[1]).max() > 1e-2
  np.testing.assert_allclose(bias, cpb_numpy(enc, coords), rtol=1e-5, atol=1e-5)
  # A real shift of every coordinate leaves the bias (a function of offsets) unchanged.
  shifted = coords + np.float32([2.37, -4.61])
  np.testing.assert_allclose(positions(bias_of(enc, geometry, 0, shifted), geometry, batch=2), bias,
                             rtol=0, atol=1e-4)
  # Integer-valued float positions give exactly the int32 result.
  ints = int_positions(geometry, (9, 9), low=-9)
  np.testing.assert_array_equal(bias_of(enc, geometry, 0, ints.astype(np.float32)),
                                bias_of(enc, geometry, 0, ints))


def test_cpb_integer_positions_take_the_offset_table_where_it_has_them():
  """Integer positions whose offsets fit the grid's (2h-1)(2w-1) table run the MLP on that table and
  gather (Swin-V2's order); other integer positions run it per pair. Both give the closed form."""
  enc = randomize(build("cpb", hidden_dim=32), scale=0.3)
  geometry = Geometry.grid(4, 5, num_prefix=1)
  for ints in (int_positions(geometry, (4, 5)), int_positions(geometry, (9, 9), low=-9)):
    np.testing.assert_allclose(positions(bias_of(enc, geometry, 0, ints), geometry, batch=2),
                               cpb_numpy(enc, ints), rtol=1e-5, atol=1e-5)


