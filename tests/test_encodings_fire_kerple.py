"""FIRE and KERPLE-log (posenc/encodings/functional_bias.py), against per-entry closed forms."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import num_params
from posenc.encodings import Geometry, make

torch = pytest.importorskip("torch", reason="no torch (pip install -e .[test])")

H, LAYERS, W = 3, 3, 32
SEQ = Geometry.seq(7, num_prefix=1)


def build(name, geometry=SEQ, **options):
  return make(name, dim=4 * H, num_heads=H, num_layers=LAYERS, geometry=geometry, rngs=nnx.Rngs(0),
              **options)


@functools.partial(nnx.jit, static_argnums=(1, 2))
def _bias(enc, geometry, layer, positions):
  return enc.attention_bias(geometry, positions, layer)


def bias_of(enc, geometry, layer=0, positions=None):
  """``[B, H, N, N]`` float64 after checking the prefix rows and columns are zero."""
  positions = geometry.positions() if positions is None else jnp.asarray(positions)
  bias = np.asarray(_bias(enc, geometry, layer, positions), np.float64)
  n = geometry.num_prefix
  assert bias.shape == (positions.shape[0], H, geometry.num_tokens, geometry.num_tokens)
  assert not bias[..., :n, :].any() and not bias[..., :, :n].any()
  return bias[..., n:, n:]


def randomize(enc, seed=1, scale=1.0):
  """Random parameters, but FIRE's ``threshold_init``: a stored constant (``L`` before its learned scale)."""
  rng = np.random.default_rng(seed)
  for path, p in nnx.iter_graph(enc):
    if isinstance(p, nnx.Param) and path[-1] != "threshold_init":
      p[...] = jnp.asarray(scale * rng.normal(size=p.shape), p.dtype)
  return enc


def real_positions(n, batch=2, low=0.0, high=30.0, seed=0):
  return np.random.default_rng(seed).uniform(low, high, (batch, n, 1)).astype(np.float32)


def params64(enc, layer):
  """Every parameter of ``layer`` as float64 numpy (per-layer encodings)."""
  return {k: np.asarray(v, np.float64)[layer] for k, v in nnx.to_pure_dict(nnx.state(enc, nnx.Param)).items()}


def softplus(x):
  return math.log1p(math.exp(x))


def kerple_closed_form(enc, positions, layer):
  p = params64(enc, layer)
  pos = np.asarray(positions, np.float64)[..., 0]
  b, n = pos.shape
  out = np.zeros((b, H, n, n))
  for e, h, i, j in np.ndindex(b, H, n, n):
    r1, r2 = softplus(p["raw_r1"][h]), softplus(p["raw_r2"][h])
    out[e, h, i, j] = -r1 * math.log(1 + r2 * abs(pos[e, i] - pos[e, j]))
  return out


def fire_closed_form(enc, positions, layer):
  """b(i, j) = MLP(psi(|i - j|) / psi(max(L, i))), psi(x) = log(|c| x + 1), i the query."""
  p = params64(enc, layer)
  c, big_l = abs(p["c"]), abs(p["threshold_scale"]) * p["threshold_init"]
  psi = lambda x: math.log(c * x + 1)  # noqa: E731
  pos = np.asarray(positions, np.float64)[..., 0]
  b, n = pos.shape
  out = np.zeros((b, H, n, n))
  for e, i, j in np.ndindex(b, n, n):
    x = psi(abs(pos[e, i] - pos[e, j])) / (psi(max(big_l, pos[e, i])) + 1e-6)
    hidden = np.maximum(x * p["w1"][0] + p["b1"], 0.0)
    out[e, :, i, j] = hidden @ p["w2"] + p["b2"]
  return out


# --- parameter counts and initialisation ---------------------------------------------

def test_parameter_counts_names_and_init():
  count = lambda *a, **k: num_params(nnx.eval_shape(lambda: build(*a, **k)))  # noqa: E731
  assert count("kerple") == 2 * H  # shared by the layers, as in the paper's code
  assert count("kerple", per_layer=True) == LAYERS * 2 * H
  assert count("fire") == LAYERS * (2 * W + W * H + H + 3)
  assert count("fire", hidden_dim=8, per_layer=False) == 2 * 8 + 8 * H + H + 3
  fire, kerple = build("fire"), build("kerple", per_layer=True)
  assert fire.w2.get_metadata()["out_sharding"] == ("layers", "mlp", "heads")
  assert fire.c.get_metadata()["out_sharding"] == ("layers",)
  assert kerple.raw_r1.get_metadata()["out_sharding"] == ("layers", "heads")
  assert build("kerple").raw_r1.get_metadata()["out_sharding"] == ("heads",)
  # The reference code's initial values: c = 0.1, L = 512 at its 2,048-token training length (a
  # quarter of the built length); torch nn.Linear bounds for the MLP.
  np.testing.assert_allclose(fire.c[...], 0.1, rtol=1e-6)
  np.testing.assert_array_equal(fire.threshold_scale[...], 1.0)
  np.testing.assert_array_equal(fire.threshold_init[...], 7 / 4)  # SEQ: 7 positions
  np.testing.assert_array_equal(build("fire", Geometry.seq(2048)).threshold_init[...], 512.0)
  np.testing.assert_array_equal(build("fire", init_threshold=100).threshold_init[...], 100.0)
  assert np.abs(fire.w1[...]).max() <= 1.0 and np.abs(fire.w2[...]).max() <= 1 / math.sqrt(W)
  assert np.abs(fire.w2[...]).max() > 0.5 / math.sqrt(W)
  # KERPLE's r1 ~ U(0, 2), r2 ~ U(0, 1), floored at 0.01 (stored through a softplus).
  r1, r2 = (jax.nn.softplus(np.asarray(p[...])) for p in (kerple.raw_r1, kerple.raw_r2))
  assert 0.01 - 1e-6 <= r1.min() and r1.max() <= 2.0 and r1.max() > 1.0
  assert 0.01 - 1e-6 <= r2.min() and r2.max() <= 1.0
  assert fire.continuous and kerple.continuous


# --- closed forms -------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["int", "real"])
def test_kerple_matches_closed_form(kind):
  enc = randomize(build("kerple", per_layer=True))
  positions = (SEQ.positions() + 5 if kind == "int" else real_positions(SEQ.num_positions))
  biases = [bias_of(enc, SEQ, layer, positions) for layer in (0, 2)]
  for layer, bias in zip((0, 2), biases):
    np.testing.assert_allclose(bias, kerple_closed_form(enc, positions, layer), rtol=1e-5, atol=1e-6)
  assert not np.allclose(biases[0], biases[1])  # each layer its own r1, r2
  assert (biases[0] <= 0).all() and (biases[0][..., 0, 1:] < 0).all()  # a penalty growing with distance
  shared = randomize(build("kerple"))  # the default: one r1, r2 per head for every layer
  np.testing.assert_array_equal(bias_of(shared, SEQ, 0, positions), bias_of(shared, SEQ, 2, positions))


@pytest.mark.parametrize("threshold", [512.0, 4.0])
@pytest.mark.parametrize("kind", ["int", "real"])
def test_fire_matches_closed_form(kind, threshold):
  enc = randomize(build("fire", init_threshold=threshold), scale=0.5)
  enc.c[...] = jnp.asarray([-0.3, 0.1, 2.0])  # a negative c counts by its absolute value
  enc.threshold_scale[...] = jnp.ones((LAYERS,))  # L = 512: every query below; L = 4: some above
  positions = (SEQ.positions() + 3 if kind == "int" else real_positions(SEQ.num_positions))
  biases = [bias_of(enc, SEQ, layer, positions) for layer in (0, 2)]
  for layer, bias in zip((0, 2), biases):
    np.testing.assert_allclose(bias, fire_closed_form(enc, positions, layer), rtol=1e-5, atol=1e-5)
  assert not np.allclose(biases[0], biases[1])


def test_kerple_depends_only_on_the_distance():
  enc = randomize(build("kerple", per_layer=True))
  geometry = Geometry.seq(9, num_prefix=1)
  p = real_positions(9, low=-20, high=20)
  base = bias_of(enc, geometry, 1, p)
  for shift in (np.float32(7), np.float32(-300.25), np.float32(1e3 / 3)):
    np.testing.assert_allclose(bias_of(enc, geometry, 1, p + shift), base, rtol=1e-4, atol=1e-3)
  ints = np.arange(9, dtype=np.int32)[None, :, None]
  at0, at100 = bias_of(enc, geometry, 1, ints), bias_of(enc, geometry, 1, ints + 100)
  np.testing.assert_allclose(at100, at0, rtol=1e-6)
  # One value per distance, the same on both sides of the query; distances differ.
  i, j = np.meshgrid(np.arange(9), np.arange(9), indexing="ij")
  for d in range(9):
    values = at0[0][:, np.abs(i - j) == d]
    np.testing.assert_allclose(values, np.broadcast_to(values[:, :1], values.shape), rtol=1e-6)
  assert np.all(np.diff(at0[0, :, 0, :], axis=-1) < 0)


def test_fire_is_translation_invariant_only_below_its_threshold():
  geometry = Geometry.seq(9)
  p = real_positions(9, high=20)
  enc = randomize(build("fire", geometry, init_threshold=512), scale=0.5)  # L = 512 * |threshold_scale|
  enc.threshold_scale[...] = jnp.ones((LAYERS,))
  base = bias_of(enc, geometry, 1, p)
  np.testing.assert_allclose(bias_of(enc, geometry, 1, p + np.float32(400.5)), base, rtol=1e-4, atol=1e-4)
  # Past L the query position normalises the distance: the same offsets, another bias.
  assert not np.allclose(bias_of(enc, geometry, 1, p + np.float32(1000.0)), base, atol=1e-3)
  ints = np.arange(9, dtype=np.int32)[None, :, None]
  np.testing.assert_allclose(bias_of(enc, geometry, 1, ints + 100), bias_of(enc, geometry, 1, ints),
                             rtol=1e-5, atol=1e-5)


# --- jit, gradients, dtypes, errors --------------------------------------------------

@pytest.mark.parametrize("threshold", [512.0, 4.0])
def test_fire_gradients_match_torch_autograd(threshold):
  """FIRE's gradients (its MLP as two matmuls, ``relative.pair_mlp``) against torch's autograd of
  the closed form in float64: every parameter of the layer, and the positions."""
  enc = randomize(build("fire", init_threshold=threshold), scale=0.5)
  enc.c[...] = jnp.asarray([-0.3, 0.1, 2.0])
  enc.threshold_scale[...] = jnp.ones((LAYERS,))  # L = 512: every query below; L = 4: some above
  layer, geometry = 1, Geometry.seq(9, num_prefix=1)
  positions = jnp.asarray(real_positions(9, high=12.0))  # [2, 9, 1], distinct: |i - j| > 0 off the diagonal
  weights = np.random.default_rng(3).normal(size=(2, H, 10, 10))

  def loss(e, pos):
    return jnp.sum(e.attention_bias(geometry, pos, layer) * jnp.asarray(weights, jnp.float32))

  grads, pos_grad = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(enc, positions)
  grads = nnx.to_pure_dict(grads)

  p = {k: torch.tensor(v, requires_grad=True) for k, v in params64(enc, layer).items()}
  pos = torch.tensor(np.asarray(positions, np.float64)[..., 0], requires_grad=True)
  big_l = p["threshold_scale"].abs() * p.pop("threshold_init").detach()  # a constant: no gradient
  c = p["c"].abs()
  x = torch.log1p(c * (pos[:, :, None] - pos[:, None, :]).abs())
  x = x / (torch.log1p(c * torch.maximum(pos, big_l)) + 1e-6)[:, :, None]
  bias = torch.relu(x[..., None] * p["w1"][0] + p["b1"]) @ p["w2"] + p["b2"]  # [B, N, N, H]
  (torch.moveaxis(bias, -1, 1) * torch.tensor(weights[:, :, 1:, 1:])).sum().backward()

  assert not np.asarray(grads["threshold_init"]).any()  # stored under stop_gradient, as init_L in the paper's code
  for key, value in p.items():
    np.testing.assert_allclose(grads[key][layer], value.grad.numpy(), rtol=2e-4, atol=1e-5, err_msg=key)
    others = np.delete(np.asarray(grads[key]), layer, axis=0)
    assert not others.any(), key  # the other layers' parameters get no gradient
  np.testing.assert_allclose(pos_grad[..., 0], pos.grad.numpy(), rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["fire", "kerple"])
def test_jit_at_two_lengths_with_finite_nonzero_gradients(name):
  enc = randomize(build(name, per_layer=True), scale=0.5)
  traced_layer = nnx.jit(lambda e, layer: e.attention_bias(SEQ, SEQ.positions(), layer))
  np.testing.assert_array_equal(traced_layer(enc, jnp.int32(2))[0, :, 1:, 1:], bias_of(enc, SEQ, 2)[0])
  for geometry in (Geometry.seq(6), Geometry.seq(40, num_prefix=1)):
    weights = jnp.asarray(np.random.default_rng(0).normal(
        size=(2, H, geometry.num_tokens, geometry.num_tokens)), jnp.float32)
    positions = jnp.asarray(real_positions(geometry.num_positions))

    def loss(e, positions, layer):
      bias = e.attention_bias(geometry, positions, layer)
      return jnp.sum(bias * weights), bias

    (grads, g_pos), bias = nnx.jit(nnx.grad(loss, argnums=(0, 1), has_aux=True))(enc, positions, jnp.int32(1))
    assert bias.shape == weights.shape and bias.dtype == jnp.float32 and np.isfinite(bias).all()
    leaves = nnx.to_pure_dict(grads)
    assert set(leaves) == ({"raw_r1", "raw_r2"} if name == "kerple" else
                           {"w1", "b1", "w2", "b2", "c", "threshold_scale", "threshold_init"})
    assert not np.asarray(leaves.pop("threshold_init", 0)).any()  # FIRE's stored constant
    for key, g in leaves.items():
      g = np.asarray(g)
      assert np.isfinite(g).all() and np.abs(g[1]).sum() > 0, key  # layer 1's slice
      assert not g[0].any(), key  # other layers untouched
    assert np.isfinite(g_pos).all() and np.abs(np.asarray(g_pos)).sum() > 0


@pytest.mark.parametrize("name", ["fire", "kerple"])
def test_bf16_params_give_float32_bias(name):
  f32 = randomize(build(name, per_layer=False), scale=0.3)
  bf16 = randomize(build(name, per_layer=False, param_dtype=jnp.bfloat16), scale=0.3)
  bias = nnx.jit(lambda e: e.attention_bias(SEQ, SEQ.positions(), 0))(bf16)
  assert bias.dtype == jnp.float32
  np.testing.assert_allclose(bias[0, :, 1:, 1:], bias_of(f32, SEQ, 0)[0], rtol=3e-2, atol=3e-2)


def test_clear_errors():
  for name in ("fire", "kerple"):
    with pytest.raises(ValueError, match=rf"'{name}' supports 1D inputs, not 2D 2x3"):
      build(name, Geometry.grid(2, 3))
    with pytest.raises(ValueError, match=r"num_heads must be a positive int"):
      make(name, num_heads=0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"'fire': hidden_dim must be an int >= 1, got 0"):
    build("fire", hidden_dim=0)
  with pytest.raises(ValueError, match=r"init_c must be a number > 0"):
    build("fire", init_c=0.0)
  with pytest.raises(ValueError, match=r"init_threshold must be None \(a quarter of the built length\) or a number > 0"):
    build("fire", init_threshold=-1)
  with pytest.raises(ValueError, match=r"give init_threshold, or build it at a 1D geometry"):
    make("fire", num_heads=H, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"'kerple' has no option\(s\) \['hidden_dim'\]"):
    build("kerple", hidden_dim=8)


def test_fire_threshold_follows_the_trained_length_and_survives_a_rebuild_at_another():
  """The paper's rule: L at or below the training length, so that training queries pass it (progressive
  interpolation runs) and the MLP's input spans [0, 1] in training as at longer lengths. A model built at
  another length (evaluation, init_from) takes the trained parameters, threshold included."""
  from posenc import models
  def causal_span(enc, length):  # the MLP's inputs over keys at or before the query (a causal model's)
    x = np.asarray(nnx.jit(lambda e: e.normalized_distance(Geometry.seq(length).positions(), 0))(enc))[0]
    return x[np.tril_indices(length)].min(), x[np.tril_indices(length)].max()

  assert causal_span(build("fire", Geometry.seq(64)), 64)[1] > 0.97  # psi(63) / psi(63): all of [0, 1]
  assert causal_span(build("fire", Geometry.seq(64), init_threshold=512), 64)[1] < 0.55  # the old default's trap
  assert causal_span(build("fire", Geometry.seq(64)), 512) == (0.0, pytest.approx(1.0, abs=1e-5))
  trained = models.create("gpt-nano", posenc="fire", rngs=nnx.Rngs(0), vocab_size=16, max_len=64)
  rebuilt = models.create("gpt-nano", posenc="fire", rngs=nnx.Rngs(1), vocab_size=16, max_len=512)
  np.testing.assert_array_equal(trained.posenc.threshold_init[...], 16.0)
  np.testing.assert_array_equal(rebuilt.posenc.threshold_init[...], 128.0)
  nnx.update(rebuilt, nnx.state(trained, nnx.Param))  # what a restore at another length does: same shapes
  np.testing.assert_array_equal(rebuilt.posenc.threshold_init[...], 16.0)


def test_fire_in_query_row_chunks_equals_all_at_once_with_its_gradients(monkeypatch):
  """Long sequences build FIRE's MLP per chunk of query rows (bounded memory): same bias and grads."""
  from posenc.encodings import functional_bias
  enc = randomize(build("fire", per_layer=True), scale=0.5)
  geometry = Geometry.seq(40, num_prefix=1)
  positions = jnp.asarray(real_positions(40))  # [2, 40, 1]: two rows, real-valued
  weights = jnp.asarray(np.random.default_rng(0).normal(size=(2, H, 41, 41)), jnp.float32)

  def bias_and_grads():
    loss = lambda e: jnp.sum(e.attention_bias(geometry, positions, 1) * weights)  # noqa: E731
    return (nnx.jit(lambda e: e.attention_bias(geometry, positions, 1))(enc),
            nnx.to_pure_dict(nnx.jit(nnx.grad(loss))(enc)))

  whole, whole_grads = bias_and_grads()
  monkeypatch.setattr(functional_bias, "FIRE_CHUNK_BYTES", 7 * 40 * 32 * 4)  # 7 rows a chunk, uneven
  chunked, chunked_grads = bias_and_grads()
  np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)
  for key in whole_grads:
    np.testing.assert_allclose(chunked_grads[key], whole_grads[key], rtol=1e-5, atol=1e-6, err_msg=key)
