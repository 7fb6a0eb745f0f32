"""Relative (rel_bias, cpb, alibi) and conditional (cpe) position encodings.

Checked against HF transformers' T5 / Swin / Swin-V2 / BLOOM code, torch's
depthwise conv2d and numpy closed forms, plus translation invariance.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="no torch (pip install -e .[test])")
pytest.importorskip("transformers", reason="no transformers (pip install -e .[test])")
from transformers import Swinv2Config, T5Config  # noqa: E402
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes  # noqa: E402
from transformers.models.swin.modeling_swin import SwinRelativePositionBias  # noqa: E402
from transformers.models.swinv2.modeling_swinv2 import Swinv2SelfAttention  # noqa: E402
from transformers.models.t5.modeling_t5 import T5Attention  # noqa: E402

from posenc.encodings import Geometry, make
from posenc.encodings.relative import alibi_slopes, t5_bucket

H, C = 4, 8
GRID = Geometry.grid(3, 4, num_prefix=1)
SEQ = Geometry.seq(9, num_prefix=1)


def build(name, geometry=GRID, **options):
  return make(name, dim=C, num_heads=H, num_layers=3, geometry=geometry,
              rngs=nnx.Rngs(0), **options)


@functools.partial(nnx.jit, static_argnums=(1, 2))
def _bias(enc, geometry, layer, positions):
  return enc.attention_bias(geometry, positions, layer)


def bias_of(enc, geometry, layer=0, positions=None):
  """The bias of ``layer`` (a Python int here), computed in one compiled call; ``positions``
  (default: the geometry's grid) are traced data, as in a model."""
  return _bias(enc, geometry, layer,
               geometry.positions() if positions is None else jnp.asarray(positions))


@functools.partial(nnx.jit, static_argnums=(2, 3))
def _peg(enc, x, geometry, layer, positions):
  return enc.after_block(x, geometry, positions, layer)


def peg_of(enc, x, geometry, layer=0):
  return _peg(enc, x, geometry, layer, geometry.positions())


def num_params(enc) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(enc, nnx.Param)))


def randomize(enc, seed=1, scale=1.0):
  """Give every parameter random values, so no check passes by a flat init."""
  rng = np.random.default_rng(seed)
  for _, p in nnx.iter_graph(enc):
    if isinstance(p, nnx.Param):
      p[...] = jnp.asarray(scale * rng.normal(size=p.shape), p.dtype)
  return enc


def positions(bias, geometry, batch=None):
  """Drop the prefix rows/cols after checking they are zero. A bias shared by the batch
  (``[1, H, T, T]``) gives ``[H, N, N]``; with ``batch`` a ``[batch, H, N, N]`` one."""
  n = geometry.num_prefix
  bias = np.asarray(bias)
  assert bias.shape == (batch or 1, H, geometry.num_tokens, geometry.num_tokens)
  assert not bias[..., :n, :].any() and not bias[..., :, :n].any()
  bias = bias[..., n:, n:]
  return bias if batch else bias[0]


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


# --- rel_bias -----------------------------------------------------------------

@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 64), (8, 20)])
def test_t5_buckets_match_transformers(num_buckets, max_distance):
  rel = np.arange(-400, 401)
  ours = np.asarray(jax.jit(t5_bucket, static_argnums=(1, 2))(jnp.asarray(rel), num_buckets,
                                                              max_distance))
  theirs = T5Attention._relative_position_bucket(torch.from_numpy(rel), bidirectional=True,
                                                 num_buckets=num_buckets,
                                                 max_distance=max_distance).numpy()
  np.testing.assert_array_equal(ours, theirs)
  # Every bucket is used but num_buckets // 2 (offset 0 always falls in the lower half).
  assert len(np.unique(ours)) == num_buckets - 1 and num_buckets // 2 not in ours


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (32, 64), (16, 64), (8, 20)])
def test_unidirectional_t5_buckets_match_transformers(num_buckets, max_distance):
  """T5's decoder buckets (``bidirectional=False``): every bucket for keys at or before the query."""
  rel = np.arange(-400, 401)
  ours = np.asarray(jax.jit(t5_bucket, static_argnums=(1, 2, 3))(jnp.asarray(rel), num_buckets, max_distance,
                                                                 False))
  theirs = T5Attention._relative_position_bucket(torch.from_numpy(rel), bidirectional=False,
                                                 num_buckets=num_buckets, max_distance=max_distance).numpy()
  np.testing.assert_array_equal(ours, theirs)
  assert len(np.unique(ours[rel <= 0])) == num_buckets and not ours[rel > 0].any()


def test_rel_bias_in_a_causal_model_uses_the_decoders_buckets():
  """A causal model (``causal=True``, which the GPT passes) gets T5's decoder buckets by default; an
  encoder keeps the bidirectional ones; ``bidirectional`` overrides either."""
  geometry = Geometry.seq(40)
  for kwargs, bidirectional in (({}, True), ({"causal": True}, False),
                                ({"causal": True, "bidirectional": True}, True)):
    enc = randomize(make("rel_bias", num_heads=H, geometry=SEQ, rngs=nnx.Rngs(0), num_buckets=16, max_distance=20,
                         **kwargs))
    assert enc.bidirectional is bidirectional
    config = T5Config(d_model=16, d_kv=4, num_heads=H, relative_attention_num_buckets=16,
                      relative_attention_max_distance=20, is_decoder=not bidirectional)
    t5 = T5Attention(config, has_relative_attention_bias=True)
    with torch.no_grad():
      t5.relative_attention_bias.weight.copy_(torch.tensor(np.asarray(enc.table[...])))
      theirs = t5.compute_bias(40, 40)[0].numpy()
    np.testing.assert_array_equal(positions(bias_of(enc, geometry), geometry), theirs)
  from posenc import models
  gpt = models.create("gpt-nano", posenc="rel_bias", rngs=nnx.Rngs(0), vocab_size=16, max_len=32)
  bert = models.create("bert-tiny", posenc="rel_bias", rngs=nnx.Rngs(0), vocab_size=16, max_len=32)
  assert not gpt.posenc.bidirectional and bert.posenc.bidirectional


def test_rel_bias_1d_matches_t5_compute_bias():
  enc = randomize(build("rel_bias", SEQ, num_buckets=16, max_distance=20))
  geometry = Geometry.seq(40, num_prefix=2)  # any length, longer than built
  ours = positions(bias_of(enc, geometry), geometry)
  config = T5Config(d_model=16, d_kv=4, num_heads=H, relative_attention_num_buckets=16,
                    relative_attention_max_distance=20, is_decoder=False)
  t5 = T5Attention(config, has_relative_attention_bias=True)
  with torch.no_grad():
    t5.relative_attention_bias.weight.copy_(torch.tensor(np.asarray(enc.table[...])))
    theirs = t5.compute_bias(40, 40)[0].numpy()
  np.testing.assert_array_equal(ours, theirs)


def test_rel_bias_2d_matches_swin():
  enc = randomize(build("rel_bias"))
  ours = positions(bias_of(enc, GRID, 0), GRID)
  swin = SwinRelativePositionBias(H, GRID.shape)
  with torch.no_grad():
    swin.relative_position_bias_table.copy_(torch.tensor(np.asarray(enc.table[...])))
    theirs = swin()[0].numpy()
  np.testing.assert_array_equal(ours, theirs)


def test_rel_bias_smaller_grid_uses_same_offsets():
  enc = randomize(build("rel_bias"))
  full = positions(bias_of(enc, GRID, 0), GRID)
  small = Geometry.grid(2, 3)
  coords = np.asarray(GRID.coords())
  keep = np.flatnonzero((coords[:, 0] < 2) & (coords[:, 1] < 3))
  np.testing.assert_array_equal(positions(bias_of(enc, small, 0), small),
                                full[:, keep][:, :, keep])


def test_rel_bias_per_layer_traced_layer():
  enc = randomize(build("rel_bias", per_layer=True))
  traced = nnx.jit(lambda e, layer: e.attention_bias(GRID, GRID.positions(), layer))
  biases = [np.asarray(traced(enc, jnp.int32(l))) for l in range(3)]
  for l in range(3):
    np.testing.assert_array_equal(biases[l], np.asarray(bias_of(enc, GRID, l)))
  assert not np.allclose(biases[0], biases[1])
  shared = randomize(build("rel_bias"))
  np.testing.assert_array_equal(bias_of(shared, GRID, 0), bias_of(shared, GRID, 2))


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


# --- cpe ------------------------------------------------------------------------

def grid_input(geometry, seed=0, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(2, geometry.num_tokens, C)), dtype)


def test_cpe_matches_torch_depthwise_conv():
  enc = randomize(build("cpe"))
  geometry = Geometry.grid(5, 6, num_prefix=2)
  x = grid_input(geometry)
  out = np.asarray(peg_of(enc, x, geometry))
  np.testing.assert_array_equal(out[:, :2], np.asarray(x)[:, :2])  # prefix passes through
  grid = torch.from_numpy(np.array(x)[:, 2:].reshape(2, 5, 6, C)).permute(0, 3, 1, 2)
  kernel = torch.from_numpy(np.asarray(enc.kernel[...]).transpose(3, 2, 0, 1).copy())
  bias = torch.from_numpy(np.array(enc.bias[...]))
  conv = torch.nn.functional.conv2d(grid, kernel, bias, padding=1, groups=C)
  expected = (grid + conv).permute(0, 2, 3, 1).reshape(2, 30, C).numpy()
  np.testing.assert_allclose(out[:, 2:], expected, rtol=1e-5, atol=1e-5)


def test_cpe_depthwise_conv_gradients_match_torch_autograd():
  from posenc.encodings.conditional import depthwise_conv3x3  # hand-written backward
  rng = np.random.default_rng(3)
  grid, kernel, cot = rng.normal(size=(2, 5, 6, C)), rng.normal(size=(3, 3, C)), rng.normal(size=(2, 5, 6, C))
  loss = lambda g, k: jnp.sum(jnp.sin(depthwise_conv3x3(g, k)) * cot)
  d_grid, d_kernel = jax.grad(loss, (0, 1))(jnp.asarray(grid, jnp.float32), jnp.asarray(kernel, jnp.float32))
  tg = torch.tensor(grid.transpose(0, 3, 1, 2), requires_grad=True)
  tk = torch.tensor(kernel.transpose(2, 0, 1)[:, None], requires_grad=True)
  out = torch.nn.functional.conv2d(tg, tk, padding=1, groups=C)
  (torch.sin(out) * torch.tensor(cot.transpose(0, 3, 1, 2))).sum().backward()
  np.testing.assert_allclose(d_grid, tg.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(d_kernel, tk.grad.numpy()[:, 0].transpose(1, 2, 0), rtol=1e-4, atol=1e-4)


def test_cpe_translation_equivariant_away_from_borders():
  enc = randomize(build("cpe"))
  geometry, (h, w), (sy, sx) = Geometry.grid(7, 8), (7, 8), (1, 2)
  x = grid_input(geometry)
  shifted = jnp.roll(x.reshape(2, h, w, C), (sy, sx), axis=(1, 2)).reshape(x.shape)
  out = np.asarray(peg_of(enc, x, geometry)).reshape(2, h, w, C)
  out_shifted = np.asarray(peg_of(enc, shifted, geometry)).reshape(2, h, w, C)
  # Interior of the shifted grid whose 3x3 windows touch neither border nor wrap.
  np.testing.assert_allclose(out_shifted[:, sy + 1:h - 1, sx + 1:w - 1],
                             out[:, 1:h - 1 - sy, 1:w - 1 - sx], rtol=1e-6, atol=1e-6)
  # At the border the zero padding breaks equivariance: that is where position enters.
  assert not np.allclose(out_shifted[:, sy:sy + 1, sx:], out[:, :1, :w - sx], atol=1e-3)


@pytest.mark.parametrize("layers", [(0,), (0, 2)])
def test_cpe_acts_only_in_chosen_layers(layers):
  enc = randomize(build("cpe", layers=layers))
  x = grid_input(GRID)
  peg = lambda v: peg_of(enc, v, GRID)  # noqa: E731
  for layer in range(3):  # Python ints
    got = peg_of(enc, x, GRID, layer)
    np.testing.assert_array_equal(got, peg(x) if layer in layers else x)
  traced = nnx.jit(lambda e, v, layer: e.after_block(v, GRID, GRID.positions(), layer))
  for layer in range(3):  # traced scalar under jit
    np.testing.assert_allclose(traced(enc, x, jnp.int32(layer)),
                               peg(x) if layer in layers else x, rtol=1e-6, atol=1e-6)

  @nnx.jit
  def scanned(e, v):  # blocks under scan: the layer is a traced loop index
    step = lambda carry, layer: (e.after_block(carry, GRID, GRID.positions(), layer), None)  # noqa: E731
    return jax.lax.scan(step, v, jnp.arange(3))[0]

  expected = x
  for layer in range(3):
    expected = peg_of(enc, expected, GRID, layer)
  assert not np.allclose(expected, x)
  np.testing.assert_allclose(scanned(enc, x), expected, rtol=1e-5, atol=1e-5)


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
  with pytest.raises(ValueError, match=r"layer 3 is out of range for 3"):
    build("rel_bias", per_layer=True).attention_bias(GRID, GRID.positions(), 3)
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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpe_jit_dtypes_and_gradients(dtype):
  enc = randomize(build("cpe", param_dtype=dtype))
  reference = randomize(build("cpe"))
  # bfloat16 rounds the input, the parameters and the output to 8 bits of mantissa; float32 only sums
  # the 3x3 taps in another order than the reference.
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=5e-2, atol=1e-1)
  for geometry in [GRID, Geometry.grid(9, 7, num_prefix=0)]:
    x = grid_input(geometry).astype(dtype)

    def loss(e, v):
      out = e.after_block(v, geometry, geometry.positions(), jnp.int32(0))
      return jnp.sum(out.astype(jnp.float32) ** 2), out

    (grads, dx), out = nnx.jit(nnx.grad(loss, argnums=(0, 1), has_aux=True))(enc, x)
    assert out.dtype == dtype and out.shape == x.shape
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               peg_of(reference, x.astype(jnp.float32), geometry), **tol)
    assert dx.dtype == dtype
    for g in [*jax.tree.leaves(grads), dx]:
      g = np.asarray(g, np.float32)
      assert np.isfinite(g).all() and np.abs(g).sum() > 0


# --- positions as data ------------------------------------------------------------

def real_positions(geometry, batch=2, low=-20.0, high=20.0, seed=0):
  """``[batch, N, ndim]`` float32 coordinates, uniform in ``[low, high)``."""
  rng = np.random.default_rng(seed)
  return rng.uniform(low, high, size=(batch, geometry.num_positions, geometry.ndim)).astype(np.float32)


def int_positions(geometry, high, batch=2, low=0, seed=0):
  """``[batch, N, ndim]`` int32 coordinates, uniform in ``[low, high)`` per axis."""
  rng = np.random.default_rng(seed)
  size = (batch, geometry.num_positions, geometry.ndim)
  return rng.integers(low, np.asarray(high), size=size).astype(np.int32)


def alibi_numpy(coords, num_heads):
  """``-slope_h * |p_i - p_j|`` (Euclidean) for ``coords [B, N, ndim]``, float64."""
  coords = np.asarray(coords, np.float64)
  distance = np.linalg.norm(coords[:, :, None] - coords[:, None, :], axis=-1)  # [B, N, N]
  return -alibi_slopes(num_heads).astype(np.float64)[None, :, None, None] * distance[:, None]


def t5_bias_numpy(table, coords, num_buckets, max_distance):
  """T5: ``table[bucket(key - query), h]`` per pair, buckets from transformers."""
  p = np.asarray(coords)[..., 0].astype(np.int64)
  rel = torch.from_numpy(p[:, None, :] - p[:, :, None])  # [B, query, key]: key - query
  bucket = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=num_buckets,
                                                 max_distance=max_distance).numpy()
  return np.moveaxis(np.asarray(table)[bucket], -1, 1)  # [B, H, N, N]


def swin_bias_numpy(table, coords, hw):
  """Swin: row ``(dy + h-1)(2w-1) + dx + w-1`` of offset ``query - key``; NaN outside the table."""
  h, w = hw
  c = np.asarray(coords).astype(np.int64)
  dy, dx = np.moveaxis(c[:, :, None] - c[:, None, :], -1, 0)
  inside = (np.abs(dy) < h) & (np.abs(dx) < w)
  index = np.where(inside, (dy + h - 1) * (2 * w - 1) + dx + w - 1, 0)
  bias = np.where(inside[..., None], np.asarray(table, np.float32)[index], np.nan)
  return np.moveaxis(bias, -1, 1)  # [B, H, N, N]


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


REL_BIAS = [("1d", SEQ), ("2d", GRID)]


@pytest.mark.parametrize("label,geometry", REL_BIAS, ids=[c[0] for c in REL_BIAS])
def test_rel_bias_refuses_real_valued_positions(label, geometry):
  enc = build("rel_bias", geometry)
  assert enc.continuous is False
  match = r"'rel_bias' looks positions up in a table and needs integer positions; got float32"
  real = geometry.positions().astype(jnp.float32)  # even integer-valued floats
  with pytest.raises(ValueError, match=match):
    enc.attention_bias(geometry, real, 0)
  with pytest.raises(ValueError, match=match):  # the dtype is static: also under jit
    bias_of(enc, geometry, 0, real + 0.5)


def test_rel_bias_2d_refuses_concrete_offsets_outside_the_table():
  enc = build("rel_bias")  # built 3x4: offsets |dy| <= 2, |dx| <= 3
  small = Geometry.grid(2, 3)
  coords = np.asarray(small.positions())
  for n, coord in ((5, (3, 0)), (0, (-2, 0)), (4, (1, 4)), (2, (1, -2))):  # rows 3, cols 4 apart
    bad = coords.copy()
    bad[0, n] = coord
    with pytest.raises(ValueError, match=r"'rel_bias' has a table for offsets up to .* per axis; got "
                                         r"positions .* apart\. Transfer .*posenc\.transfer"):
      enc.attention_bias(small, jnp.asarray(bad), 0)
  # The largest offsets the table has are fine, and so are positions far from the origin
  # while their spread fits: offsets are what counts.
  edge = coords.copy()
  edge[0, 5] = (2, 3)
  enc.attention_bias(small, jnp.asarray(edge), 0)
  far = coords + np.int32([100, -50])
  np.testing.assert_array_equal(positions(enc.attention_bias(small, jnp.asarray(far), 0), small),
                                positions(bias_of(enc, small), small))


def test_rel_bias_2d_under_jit_gives_nan_outside_and_the_table_inside():
  enc = randomize(build("rel_bias"))
  coords = int_positions(GRID, (3, 4))  # [2, 12, 2], spread fits the table
  coords[0, 4] = (5, 1)    # 5 rows from everyone: outside (a flat index would alias a row)
  coords[1, 7] = (1, -3)   # 4 to 6 columns from most: outside for those pairs
  bias = positions(bias_of(enc, GRID, 0, coords), GRID, batch=2)  # traced: no concrete check
  want = swin_bias_numpy(enc.table[...], coords, GRID.shape)
  outside = np.isnan(want)
  assert outside[0].any() and outside[1].any() and (~outside).sum() > outside.sum()
  np.testing.assert_array_equal(np.isnan(bias), outside)  # never a clamp or a wrap
  np.testing.assert_array_equal(bias[~outside], want[~outside])


@pytest.mark.parametrize("shift", [(7,), (-300,), (2, 5), (-40, 13)], ids=str)
def test_rel_bias_translation_invariant_in_positions(shift):
  """Bias at ``p + c`` (integer shift) equals bias at ``p``, and both follow T5 / Swin."""
  if len(shift) == 1:
    geometry, options = Geometry.seq(10, num_prefix=1), dict(num_buckets=16, max_distance=20)
    coords = int_positions(geometry, 60)  # one set per example, spread beyond max_distance
    coords[1, :5, 0] = np.arange(5)  # a packed sequence restarting at 0
    coords[1, 5:, 0] = np.arange(5)
  else:
    geometry, options = GRID, {}
    coords = int_positions(geometry, GRID.shape)
  enc = randomize(build("rel_bias", geometry, **options))
  bias = positions(bias_of(enc, geometry, 0, coords), geometry, batch=2)
  moved = positions(bias_of(enc, geometry, 0, coords + np.int32(shift)), geometry, batch=2)
  np.testing.assert_array_equal(moved, bias)
  if len(shift) == 1:
    want = t5_bias_numpy(enc.table[...], coords, **options)
  else:
    want = swin_bias_numpy(enc.table[...], coords, GRID.shape)
  np.testing.assert_array_equal(bias, want)
  assert not np.array_equal(bias[0], bias[1])
  # And concrete positions give the same (checked, then looked up).
  eager = positions(enc.attention_bias(geometry, jnp.asarray(coords + np.int32(shift)), 0), geometry,
                    batch=2)
  np.testing.assert_array_equal(eager, bias)
