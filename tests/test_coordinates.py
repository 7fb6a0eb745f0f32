"""Coordinates as the encoding's own transform: posenc/encodings/coordinates.py (normalisation,
DINOv3 and CAPE augmentation), ``Encoding.coordinates`` and how the models call it."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import posenc  # noqa: F401  (flax config)
from posenc import encodings, models
from posenc.encodings import Geometry, make
from posenc.encodings import coordinates as C
from posenc.encodings.rope_normalized import period_frequencies

GRID = Geometry.grid(3, 5)  # rectangular: the normalisation modes differ
DH = 8


def grid_positions(geometry, batch=1):
  return jnp.broadcast_to(geometry.positions(), (batch, geometry.num_positions, 2))


# ---------------------------------------------------------------- normalisation
@pytest.mark.parametrize("mode,rows,cols", [
    ("separate", [-2 / 3, 0, 2 / 3], [-0.8, -0.4, 0.0, 0.4, 0.8]),
    ("max", [-0.8, -0.4, 0.0], [-0.8, -0.4, 0.0, 0.4, 0.8]),        # both axes over the longer side, 5
    ("min", [-2 / 3, 0, 2 / 3], [-2 / 3, 0, 2 / 3, 4 / 3, 2.0]),    # both over the shorter side, 3
])
def test_normalize_matches_dinov3_closed_form(mode, rows, cols):
  # DINOv3: coords = arange(0.5, n) / d, then 2 * coords - 1 (d = n, max(h, w) or min(h, w)).
  u = np.asarray(C.normalize(GRID.positions(), GRID.shape, mode))[0]
  want = np.stack(np.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)
  np.testing.assert_allclose(u, want, rtol=0, atol=1e-6)
  assert u.dtype == np.float32


def test_normalize_of_real_positions_and_inverse():
  p = np.random.default_rng(0).uniform(-2, 6, (2, GRID.num_positions, 2)).astype(np.float32)
  u = np.asarray(C.normalize(p, GRID.shape))
  np.testing.assert_allclose(u, 2 * (p + 0.5) / np.array([3.0, 5.0]) - 1, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(C.to_grid(jnp.asarray(u), GRID.shape), p, rtol=1e-6, atol=1e-5)
  with pytest.raises(ValueError, match=r"normalize_coords must be one of .*'sep'"):
    C.normalize(p, GRID.shape, "sep")


# ---------------------------------------------------------------- DINOv3 augmentation
B = 256  # examples: enough to see the ranges filled, still tiny


def _u(batch=B):
  return C.normalize(grid_positions(GRID, batch), GRID.shape)


def test_dinov3_shift_is_uniform_per_example_and_axis_shared_by_patches():
  u, key = _u(), jax.random.key(0)
  d = np.asarray(C.dinov3_augment(u, key, shift=0.3) - u)  # [B, N, 2]
  np.testing.assert_allclose(d, np.broadcast_to(d[:, :1], d.shape), atol=1e-6)  # one shift per example
  s = d[:, 0]
  assert np.all(np.abs(s) <= 0.3) and np.all(np.abs(s).max(axis=0) > 0.28)  # fills [-0.3, 0.3]
  assert len(np.unique(s[:, 0])) == B and not np.allclose(s[:, 0], s[:, 1])  # per example, per axis


def test_dinov3_jitter_is_log_uniform_per_example_and_axis():
  u = np.asarray(_u())
  out = np.asarray(C.dinov3_augment(jnp.asarray(u), jax.random.key(1), jitter=1.5))
  f = out[:, 0] / u[:, 0]  # patch (0, 0): u = (-2/3, -0.8); [B, 2] factors
  np.testing.assert_allclose(out, u * f[:, None, :], rtol=1e-5, atol=1e-6)  # one factor per example and axis
  logs = np.log(f)
  assert np.all(np.abs(logs) <= np.log(1.5) + 1e-6) and np.all(np.abs(logs).max(axis=0) > 0.95 * np.log(1.5))
  assert not np.allclose(f[:, 0], f[:, 1]) and len(np.unique(f[:, 0])) == B


def test_dinov3_rescale_is_one_log_uniform_factor_per_example():
  u = _u()
  out = np.asarray(C.dinov3_augment(u, jax.random.key(2), rescale=2.0))
  r = out[:, 0] / np.asarray(u)[:, 0]
  np.testing.assert_allclose(r[:, 0], r[:, 1], rtol=1e-5)  # shared by the axes
  np.testing.assert_allclose(out, np.asarray(u) * r[:, :1, None], rtol=1e-5, atol=1e-6)
  assert np.all((r >= 0.5 - 1e-6) & (r <= 2 + 1e-5)) and r.min() < 0.55 and r.max() > 1.8


def test_dinov3_composition_is_shift_then_jitter_then_rescale():
  u, key = _u(8), jax.random.key(3)
  s = C.dinov3_augment(u, key, shift=0.2) - u
  j = C.dinov3_augment(u, key, jitter=1.3)[:, :1] / u[:, :1]
  r = (C.dinov3_augment(u, key, rescale=2.0) / u)[:, :1, :1]
  np.testing.assert_allclose(C.dinov3_augment(u, key, shift=0.2, jitter=1.3, rescale=2.0),
                             ((u + s) * j) * r, rtol=1e-5, atol=1e-6)
  # Off (None, or neutral values): exactly the input.
  np.testing.assert_array_equal(C.dinov3_augment(u, key), u)
  np.testing.assert_array_equal(C.dinov3_augment(u, key, shift=0.0, jitter=1.0, rescale=1.0), u)


# ---------------------------------------------------------------- CAPE augmentation
def test_cape_global_shift_local_shift_and_scaling():
  u, key = _u(), jax.random.key(4)
  shift = np.asarray(C.cape_augment(u, key, GRID.shape, global_shift=0.5) - u)
  np.testing.assert_allclose(shift, np.broadcast_to(shift[:, :1], shift.shape), atol=1e-6)
  assert np.all(np.abs(shift) <= 0.5) and not np.allclose(shift[:, 0, 0], shift[:, 0, 1])

  local = np.asarray(C.cape_augment(u, key, GRID.shape, local_shift=0.5) - u)  # per patch and axis
  bound = 0.5 * 2 / np.array([3.0, 5.0])  # half a patch spacing per axis
  assert np.all(np.abs(local) <= bound + 1e-6) and np.all(np.abs(local).max(axis=(0, 1)) > 0.95 * bound)
  assert len(np.unique(local[0, :, 0])) == GRID.num_positions and not np.allclose(local[0], local[1])
  rows = np.asarray(u + local)[..., 0].reshape(B, 3, 5)
  assert np.all(np.diff(rows, axis=1) >= -1e-6)  # half a spacing each way: the order is kept

  scaled = np.asarray(C.cape_augment(u, key, GRID.shape, global_scaling=1.4))
  lam = scaled[:, 0] / np.asarray(u)[:, 0]
  np.testing.assert_allclose(lam[:, 0], lam[:, 1], rtol=1e-5)
  assert np.all((lam >= 1 / 1.4 - 1e-6) & (lam <= 1.4 + 1e-5))

  full = C.cape_augment(u, key, GRID.shape, global_shift=0.5, local_shift=0.5, global_scaling=1.4)
  np.testing.assert_allclose(full, lam[:, :1, None] * (np.asarray(u) + shift + local), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(C.cape_augment(u, key, GRID.shape), u)


# ---------------------------------------------------------------- the encodings' coordinates
def _rope(**kw):
  return make("rope", dim=2 * DH, num_heads=2, geometry=Geometry.grid(4, 4, num_prefix=1), **kw)


def test_default_coordinates_are_the_identity():
  pos = GRID.positions()
  for name in ("learned", "rope", "sincos2d", "alibi", "rel_bias"):
    enc = make(name, dim=16, num_heads=2, num_layers=1, geometry=GRID, rngs=nnx.Rngs(0))
    assert not enc.augments
    assert enc.coordinates(pos, GRID) is pos
  assert not encodings.Encoding.augments


def test_evaluation_is_deterministic_and_unaugmented():
  g = Geometry.grid(4, 4, num_prefix=1)
  pos = grid_positions(g, 2)
  rope = _rope(normalize_coords="separate", augment=True, shift_coords=0.1, jitter_coords=1.2)
  assert rope.augments
  for _ in range(2):
    np.testing.assert_array_equal(rope.coordinates(pos, g), C.normalize(pos, g.shape))
  cape = make("cape", dim=16, geometry=g)
  assert cape.augments
  np.testing.assert_array_equal(cape.coordinates(pos, g), C.normalize(pos, g.shape))  # no key: patch centres
  augmented = np.asarray(cape.coordinates(pos, g, jax.random.key(0)))
  assert augmented.dtype == np.float32 and not np.allclose(augmented, C.normalize(pos, g.shape))


def test_cape_trains_on_augmented_patch_centres_and_evaluates_on_plain_ones():
  g = Geometry.grid(4, 6)
  pos, key = grid_positions(g, 64), jax.random.key(5)
  enc = make("cape", dim=16, geometry=g)
  want = C.cape_augment(C.normalize(pos, g.shape), key, g.shape, global_shift=0.5, local_shift=0.5,
                        global_scaling=1.4)
  np.testing.assert_allclose(enc.coordinates(pos, g, key), want, rtol=1e-6, atol=1e-6)
  # Only local shifts: at most half a patch spacing (2 / n per axis) from each centre.
  local = make("cape", dim=16, geometry=g, global_shift=0.0, global_scaling=1.0)
  d = np.asarray(local.coordinates(pos, g, key)) - np.asarray(C.normalize(pos, g.shape))
  spacing = 2.0 / np.array([4.0, 6.0])
  assert np.all(np.abs(d) <= 0.5 * spacing + 1e-6) and np.all(np.abs(d).max(axis=(0, 1)) > 0.45 * spacing)
  with pytest.raises(ValueError, match="global_scaling must be a number >= 1"):
    make("cape", dim=16, geometry=g, global_scaling=0.5)
  with pytest.raises(ValueError, match="needs an even dim"):
    make("cape", dim=15, geometry=g)


def test_cape_is_size_free_and_matches_its_closed_form():
  """Patch centres in [-1, 1] on every grid: a 12x12 grid's patches 1, 4, 7, 10 per axis sit at the 4x4 grid's
  centres (+-0.25, +-0.75) and get the same embedding; the table is CAPE's 2D one (numpy, float64)."""
  dim = 12
  embed = lambda g: np.asarray(make("cape", dim=dim, geometry=g).embed(  # noqa: E731
      jnp.zeros((1, g.num_tokens, dim)), g, C.normalize(g.positions(), g.shape)))[0]
  small, large = embed(Geometry.grid(4, 4)), embed(Geometry.grid(12, 12)).reshape(12, 12, dim)
  np.testing.assert_allclose(large[1::3, 1::3].reshape(16, dim), small, rtol=1e-5, atol=1e-5)
  u = (2 * (np.arange(4) + 0.5) / 4 - 1)
  y, x = np.meshgrid(u, u, indexing="ij")
  k = np.arange(dim // 2)
  rho = 10.0 ** ((k + 1) / (dim // 2))
  phase = np.pi * (y.reshape(-1, 1) * rho * np.cos(k) + x.reshape(-1, 1) * rho * np.sin(k))
  np.testing.assert_allclose(small, np.concatenate([np.cos(phase), np.sin(phase)], axis=-1), rtol=1e-5,
                             atol=1e-5)


def _angles(enc, geometry):
  """RoPE's angles [N, Dh/2] as ``rotate`` computes them, from the encoding's own coordinates."""
  pos = np.asarray(enc.coordinates(geometry.positions(), geometry), np.float64)[0][:, ::-1]  # (x, y)
  freqs = np.asarray(enc._frequencies(geometry, 0, DH, 2), np.float64)  # [2, 1, Dh/2]
  return pos @ freqs[:, 0, :]


def test_normalized_rope_angles_at_twice_the_grid_stay_in_the_trained_range():
  trained, double = Geometry.grid(4, 4, num_prefix=1), Geometry.grid(8, 8, num_prefix=1)
  omega = period_frequencies(DH)[0, 0, :DH // 4]  # 2 pi / period along x
  enc = _rope(normalize_coords="separate")
  a_t, a_2 = _angles(enc, trained), _angles(enc, double)
  # Every angle lies in the [-1, 1] box's range, i.e. the trained range widened by half a trained
  # patch (the outermost patch centres move from +-(1 - 1/4) to +-(1 - 1/8)).
  for a in (a_t, a_2):
    assert np.all(np.abs(a[:, :DH // 4]) <= omega + 1e-6)
  lo, hi = a_t.min(axis=0), a_t.max(axis=0)
  half_patch = np.concatenate([omega, omega]) / trained.shape[0]
  assert np.all(a_2.min(axis=0) >= lo - half_patch - 1e-6) and np.all(a_2.max(axis=0) <= hi + half_patch + 1e-6)
  # The integer grid reaches twice as far: 7 vs 3 steps of each frequency.
  grid = _rope()
  g_t, g_2 = _angles(grid, trained), _angles(grid, double)
  step = np.concatenate([100.0 ** (-np.arange(0, DH, 4) / DH)] * 2)
  assert np.all(g_2.max(axis=0) >= g_t.max(axis=0) + 4 * step - 1e-6)


# ---------------------------------------------------------------- through the models
VIT = dict(num_classes=3, image_size=8, patch_size=4, channels=1, width=16, depth=1, num_heads=2, mlp_dim=16)


def _vit_model(posenc_name, options, **kw):
  """A tiny ViT with N(0, 0.3^2) parameters (the same for the same shapes): far from flat logits."""
  model = models.create("vit-mu", posenc=posenc_name, posenc_options=options, rngs=nnx.Rngs(0), **{**VIT, **kw})
  rng = np.random.default_rng(0)
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype), params))
  return model


@nnx.jit(static_argnames="train")
def _vit(model, images, train):
  return model(images, train=train)


def _images(batch=2):
  x = np.random.default_rng(0).standard_normal((1, 8, 8, 1)).astype(np.float32)
  return jnp.asarray(np.repeat(x, batch, axis=0))  # identical examples: only the draws tell them apart


@pytest.mark.parametrize("posenc_name,on,off", [
    ("rope", dict(normalize_coords="separate", augment=True, shift_coords=0.2, jitter_coords=1.2),
     dict(normalize_coords="separate")),
    ("cape", {}, dict(global_shift=0.0, local_shift=0.0, global_scaling=1.0)),
], ids=["rope-dinov3", "cape"])
def test_augmentation_through_a_vit(posenc_name, on, off):
  images = _images()
  model, plain = _vit_model(posenc_name, on, patch_size=2), _vit_model(posenc_name, off, patch_size=2)
  seeded = nnx.clone(model)  # the same seeded state (parameters and the rngs' counts), kept aside

  eval_1, eval_2 = _vit(model, images, False), _vit(model, images, False)
  np.testing.assert_array_equal(eval_1, eval_2)  # evaluation: no draws, deterministic
  np.testing.assert_array_equal(eval_1, _vit(plain, images, False))  # and unaugmented

  step_1, step_2 = _vit(model, images, True), _vit(model, images, True)
  assert not np.allclose(step_1, step_2)  # a new draw each step
  assert not np.allclose(step_1[0], step_1[1])  # and per example (the two images are identical)
  assert not np.allclose(step_1, eval_1)
  again = seeded  # the same seeded state: the same draws, step by step
  np.testing.assert_array_equal(_vit(again, images, True), step_1)
  np.testing.assert_array_equal(_vit(again, images, True), step_2)
  np.testing.assert_array_equal(_vit(model, images, False), eval_1)  # training steps change no evaluation


def test_every_model_calls_coordinates_once_before_the_hooks(monkeypatch):
  calls = []

  def spy(self, positions, geometry, key=None):
    calls.append((positions.shape, key is not None))
    return positions

  monkeypatch.setattr(encodings.get("none"), "coordinates", spy)
  monkeypatch.setattr(encodings.get("none"), "augments", True)
  ids = jnp.zeros((2, 6), jnp.int32)
  vit = models.create("vit-mu", posenc="none", rngs=nnx.Rngs(0), **VIT)
  bert = models.create("bert-tiny", posenc="none", rngs=nnx.Rngs(0), vocab_size=8, max_len=6, width=16,
                       depth=1, num_heads=2, mlp_dim=16)
  gpt = models.create("gpt-nano", posenc="none", rngs=nnx.Rngs(0), vocab_size=8, max_len=6, width=16,
                      depth=1, num_heads=2, mlp_dim=16)
  for train in (True, False):  # traced only (nothing runs)
    nnx.eval_shape(lambda m, x: m(x, train=train), vit, _images())
    nnx.eval_shape(lambda m, x: m(x, train=train), bert, ids)
    nnx.eval_shape(lambda m, x: m(x, train=train), gpt, ids)
  nnx.eval_shape(lambda m, x, c: m.decode(x, c), gpt, ids[:, :2], gpt.init_cache(2, 6))
  # Training: a key, positions broadcast to the batch; evaluation and decoding: no key.
  assert calls == [((2, 4, 2), True), ((2, 6, 1), True), ((2, 6, 1), True),
                   ((1, 4, 2), False), ((1, 6, 1), False), ((1, 6, 1), False), ((1, 2, 1), False)]
