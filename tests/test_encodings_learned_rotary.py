"""Tests for posenc/encodings/learned_rotary.py: string, comrope and liere as encodings (the maths:
test_learned_rotations.py). At initialisation each is RoPE-Axial; string and comrope stay relative in
2D and 3D for any parameters; liere's rotations are orthogonal; gradients match finite differences;
ViT and GPT run with each."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from rotary_helpers import H, L, logits, make_rope, qk, real_positions, rotate, to_interleaved

from posenc import models
from posenc.config import ConfigError
from posenc.encodings import Geometry, make
from posenc.encodings import learned_rotary as lrot
from posenc.encodings import rotation

DH = 16  # head dim in 1D and 2D (block 8: two blocks)
DH3 = 24  # head dim in 3D: four pairs per axis
FORMS = [("string", {}), ("string", dict(form="commuting")), ("comrope", {}), ("liere", {})]
RELATIVE = FORMS[:3]


def build(name, geometry=None, dh=DH, **kw):
  kw = kw if geometry is None else dict(kw, geometry=geometry)
  return make(name, dim=H * dh, num_heads=H, num_layers=L, **kw)


def flat3d(t, h, w, num_prefix=0):
  """A flattened (t, h, w) grid: a 1D geometry of t*h*w tokens and its ``[1, N, 3]`` positions."""
  coords = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 3)
  return Geometry.seq(t * h * w, num_prefix), jnp.asarray(coords[None], jnp.int32)


def randomise(enc, seed, scale=0.3):
  """Every parameter moved away from its initialisation (so nothing below holds only at RoPE)."""
  rng = np.random.default_rng(seed)
  for path, param in nnx.to_flat_state(nnx.state(enc, nnx.Param)):
    value = np.asarray(param[...])
    param[...] = jnp.asarray(value + scale * rng.standard_normal(value.shape), value.dtype)


def _id(case):
  name, kw = case
  return "-".join([name, *(f"{k}={v}" for k, v in kw.items())])


# ---------------------------------------------------------------- initialisation = RoPE-Axial
@pytest.mark.parametrize("per_layer", [True, False])
@pytest.mark.parametrize("geometry", [Geometry.seq(11, num_prefix=1), Geometry.grid(3, 4, num_prefix=2)], ids=str)
@pytest.mark.parametrize("case", FORMS, ids=_id)
def test_initialisation_is_rope_axial(case, geometry, per_layer):
  name, kw = case
  enc, rope = build(name, geometry, per_layer=per_layer, **kw), make_rope()
  q, k = qk(geometry)
  exact = name == "string" and not kw  # Cayley: P = I exactly, then rope's own turn
  for positions in (None, real_positions(geometry)):
    for got, want in zip(rotate(enc, q, k, geometry, L - 1, positions), rotate(rope, q, k, geometry, 0, positions)):
      np.testing.assert_allclose(got, want, atol=0 if exact else 2e-5, rtol=0 if exact else 1e-5)
  # theta is the initial frequencies' base: another one is another rotation.
  other = build(name, geometry, theta=10.0, **kw)
  assert np.abs(np.asarray(rotate(other, q, k, geometry, 0)[0] - rotate(rope, q, k, geometry, 0)[0])).max() > 1e-2


def test_axial_frequencies_extend_rope_axial_to_three_axes():
  for ndim in (1, 2):
    np.testing.assert_allclose(lrot.axial_frequencies(DH, ndim, 100.0), rotation.axial_frequencies(DH, ndim, 100.0))


@pytest.mark.parametrize("case", FORMS, ids=_id)
def test_3d_initialisation_is_rope_axial_in_closed_form(case):
  """(t, h, w) -> (w, h, t): pairs 0..3 turn with w, 4..7 with h, 8..11 with t, at 100**(-6k/Dh)."""
  name, kw = case
  geometry, positions = flat3d(2, 3, 4, num_prefix=1)
  enc = build(name, dh=DH3, axes=3, **kw)
  q, k = qk(geometry, dh=DH3)
  qr, _ = rotate(enc, q, k, geometry, 0, positions)
  mag = 100.0 ** (-np.arange(0, DH3, 6) / DH3)
  xyz = np.asarray(positions[0, :, ::-1], np.float64)
  angles = np.concatenate([np.outer(xyz[:, a], mag) for a in range(3)], axis=-1)  # [N, Dh/2]
  np.testing.assert_allclose(to_interleaved(qr[:, 1:]), to_interleaved(q[:, 1:]) * np.exp(1j * angles)[None, :, None],
                             atol=3e-5)
  np.testing.assert_array_equal(qr[:, :1], q[:, :1])


# ---------------------------------------------------------------- relative property
def _shift_changes(enc, geometry, positions, seed):
  """Largest change of the position-position logits when every position moves by one real shift."""
  q, k = qk(geometry, seed=seed, dh=enc.head_dim)
  n = geometry.num_prefix
  shift = np.random.default_rng(seed).uniform(-9, 9, (1, 1, positions.shape[-1])).astype(np.float32)
  base = logits(*rotate(enc, q, k, geometry, 1, positions))[..., n:, n:]
  moved = logits(*rotate(enc, q, k, geometry, 1, positions + shift))[..., n:, n:]
  return np.abs(moved - base).max() / np.abs(base).max()


# "3D": a flattened 1D geometry with axes=3; "3D grid": Geometry.grid3d (the parameters learn from its axes).
GEOMETRIES = {"2D": lambda: (Geometry.grid(3, 4, num_prefix=1), None), "3D": lambda: flat3d(2, 2, 3, num_prefix=1),
              "3D grid": lambda: (Geometry.grid3d(2, 2, 3, num_prefix=1), None)}


def build_at(name, ndim, geometry, **kw):
  """``name`` built for the ``GEOMETRIES[ndim]`` case."""
  if ndim == "3D":
    return build(name, dh=DH3, axes=3, **kw)
  return build(name, geometry, dh=DH if ndim == "2D" else DH3, **kw)


@pytest.mark.parametrize("ndim", list(GEOMETRIES))
@pytest.mark.parametrize("case", RELATIVE, ids=_id)
def test_string_and_comrope_logits_depend_on_offsets_only(case, ndim):
  name, kw = case
  geometry, positions = GEOMETRIES[ndim]()
  enc = build_at(name, ndim, geometry, **kw)
  randomise(enc, seed=1)
  axes = 2 if ndim == "2D" else 3
  positions = np.random.default_rng(2).uniform(-5, 5, (2, geometry.num_positions, axes)).astype(np.float32)
  assert _shift_changes(enc, geometry, jnp.asarray(positions), seed=3) < 1e-4


@pytest.mark.parametrize("ndim", list(GEOMETRIES))
def test_liere_is_not_relative_beyond_1d_so_the_shift_test_can_fail(ndim):
  geometry, positions = GEOMETRIES[ndim]()
  enc = build_at("liere", ndim, geometry)
  randomise(enc, seed=1)
  positions = geometry.positions() if positions is None else positions
  assert _shift_changes(enc, geometry, positions.astype(jnp.float32), seed=3) > 1e-2
  one_d = build("liere", Geometry.seq(9))  # one generator commutes with itself
  randomise(one_d, seed=1)
  assert _shift_changes(one_d, Geometry.seq(9), Geometry.seq(9).positions().astype(jnp.float32), seed=3) < 1e-4


# ---------------------------------------------------------------- orthogonality
@pytest.mark.parametrize("block", [2, 8, 16])
def test_liere_rotations_are_orthogonal_with_determinant_one(block):
  geometry = Geometry.grid(2, 3, num_prefix=1)
  enc = build("liere", geometry, block=block)
  randomise(enc, seed=4, scale=1.0)
  basis = jnp.broadcast_to(jnp.eye(DH)[:, None, None, :], (DH, geometry.num_tokens, H, DH))
  turned, _ = rotate(enc, basis, basis, geometry, 2, real_positions(geometry, batch=1, low=-5, high=5, seed=5))
  rot = np.moveaxis(np.asarray(turned, np.float64), 0, -1)  # [T, H, Dh, Dh]: columns R e_i
  eye = np.broadcast_to(np.eye(DH), rot.shape)
  np.testing.assert_allclose(np.swapaxes(rot, -1, -2) @ rot, eye, atol=1e-4)
  np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-4)
  np.testing.assert_array_equal(rot[0], eye[0])  # the prefix token is not turned
  assert np.abs(rot[1:] - eye[1:]).max() > 0.1


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("case", FORMS, ids=_id)
def test_gradients_match_central_differences(case):
  name, kw = case
  geometry = Geometry.grid(2, 3, num_prefix=1)
  enc = build(name, geometry, **kw)
  randomise(enc, seed=6, scale=0.2)
  graphdef, state = nnx.split(enc)
  q, k = qk(geometry, seed=7)
  positions = jnp.asarray(real_positions(geometry, seed=8, low=-3, high=3))
  weights = jnp.asarray(np.random.default_rng(9).standard_normal((2, H, geometry.num_tokens, geometry.num_tokens)))

  @jax.jit
  def loss(state):
    qr, kr = nnx.merge(graphdef, state).rotate(q, k, geometry, positions, 1)
    return jnp.sum(jnp.einsum("bnhd,bmhd->bhnm", qr, kr, precision="highest") * weights)

  grads = jax.grad(loss)(state)
  rng = np.random.default_rng(10)
  direction = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), state)
  eps = 1e-2
  step = lambda sign: jax.tree.map(lambda x, d: x + sign * eps * d, state, direction)  # noqa: E731
  numeric = (float(loss(step(1))) - float(loss(step(-1)))) / (2 * eps)
  analytic = sum(float(jnp.sum(g * d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
  assert abs(analytic) > 1.0
  np.testing.assert_allclose(analytic, numeric, rtol=5e-3)
  for leaf in jax.tree.leaves(grads):  # every parameter learns
    assert np.abs(np.asarray(leaf)).max() > 0


# ---------------------------------------------------------------- models, counts, transfer, errors
VIT = dict(num_classes=5, image_size=28, patch_size=7, channels=1, width=32, depth=2, num_heads=2, mlp_dim=64)
GPT = dict(vocab_size=64, max_len=12, width=32, depth=2, num_heads=2, mlp_dim=64)


@pytest.mark.parametrize("case", FORMS + [("liere", dict(per_layer=False, block=4))], ids=_id)
def test_vit_and_gpt_build_and_run_a_forward(case):
  name, kw = case
  vit = models.create("vit-mu", posenc=name, posenc_options=kw, rngs=nnx.Rngs(0), **VIT)
  images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 28, 28, 1)), jnp.float32)
  out = nnx.jit(lambda m, x: m(x))(vit, images)
  assert out.shape == (2, 5) and bool(jnp.all(jnp.isfinite(out)))
  gpt = models.create("gpt-nano", posenc=name, posenc_options=kw, rngs=nnx.Rngs(0), **GPT)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 12)), jnp.int32)
  out = nnx.jit(lambda m, x: m(x))(gpt, tokens)
  assert out.shape == (2, 12, 64) and bool(jnp.all(jnp.isfinite(out)))


def count(enc):
  return sum(x.size for x in jax.tree.leaves(nnx.state(enc, nnx.Param)))


def test_parameter_counts_in_closed_form():
  """Per layer and head: Cayley ``Dh(Dh-1)/2 + ndim Dh/2``; liere ``ndim (Dh/b) b(b-1)/2``; comrope
  keeps, per block and axis, the ``n(n-1)/2`` entries among the ``n = b/ndim`` features of that axis."""
  import benchmarks.param_counts as pc  # the README's measured columns
  grid, seq, *_ = pc.GEOMETRIES.values()
  dh, per = pc.D // pc.HEADS, pc.HEADS * pc.LAYERS
  assert pc.count("string", grid) == per * (dh * (dh - 1) // 2 + 2 * dh // 2) == 299_520
  assert pc.count("string", seq) == per * (dh * (dh - 1) // 2 + dh // 2) == 294_912
  assert pc.count("liere", grid) == per * 2 * (dh // 8) * 28 == 64_512
  assert pc.count("liere", seq) == pc.count("comrope", seq) == per * (dh // 8) * 28 == 32_256
  assert pc.count("comrope", grid) == per * 2 * (dh // 8) * 6 == 13_824
  assert count(build("liere", Geometry.seq(4), per_layer=False)) == H * (DH // 8) * 28
  assert count(build("string", Geometry.grid(2, 2), form="commuting")) == L * H * 2 * (DH // 8) * 6


def test_transfer_keeps_parameters_and_refuses_another_number_of_axes():
  cls = type(build("string", Geometry.grid(2, 2)))
  params = {"skew": jnp.ones((2, 3)), "freqs": jnp.ones((2, 2, 4))}
  assert cls.transfer(params, Geometry.grid(7, 7, 1), Geometry.grid(14, 9, 1), None) is params
  assert cls.transfer(params, Geometry.grid3d(2, 7, 7, 1), Geometry.grid3d(4, 14, 9, 1), None) is params
  with pytest.raises(ValueError, match=r"'string' has generators for 2D positions; they cannot serve 3D 2x3x3"):
    cls.transfer(params, Geometry.grid(3, 3), Geometry.grid3d(2, 3, 3), None)
  with pytest.raises(ValueError, match=r"'string' has generators for 1D positions; they cannot serve 2D 3x3"):
    cls.transfer(params, Geometry.seq(8), Geometry.grid(3, 3), None)


def test_clear_errors():
  with pytest.raises(ConfigError, match=r"^position encoding 'string': form must be one of \('cayley', 'commuting'\)"):
    build("string", Geometry.seq(4), form="dense")
  with pytest.raises(ConfigError, match=r"'string': block is an option of form='commuting'"):
    build("string", Geometry.seq(4), block=4)
  with pytest.raises(ConfigError, match=r"'liere': block must be an int >= 2 and even, got 3"):
    build("liere", Geometry.seq(4), block=3)
  with pytest.raises(ValueError, match=r"'comrope': block=32 must divide the head dimension 16"):
    build("comrope", Geometry.seq(4), block=32)
  with pytest.raises(ConfigError, match=r"'liere': axes must be None .* one of \(1, 2, 3\), got 4"):
    build("liere", axes=4)
  with pytest.raises(ValueError, match=r"'liere' needs geometry=Geometry\(\.\.\.\) or the option axes"):
    build("liere")
  with pytest.raises(ValueError, match=r"'comrope' needs a head dimension divisible by 6 .* head_dim=16"):
    build("comrope", axes=3)
  with pytest.raises(ValueError, match=r"'string' was built for 1D positions, not 2D 2x2"):
    build("string", Geometry.seq(4)).rotate(*qk(Geometry.grid(2, 2)), Geometry.grid(2, 2),
                                            Geometry.grid(2, 2).positions(), 0)
  geometry, positions = flat3d(1, 2, 2)
  with pytest.raises(ValueError, match=r"'liere' was built for positions of 2 coordinates .* shape \(1, 4, 3\)"):
    build("liere", axes=2).rotate(*qk(geometry), geometry, positions, 0)
