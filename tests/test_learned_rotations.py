"""The maths of learned-generator rotations (posenc.encodings.learned_rotations): LieRE, ComRoPE-AP
and Cayley-STRING against RoPE, scipy's expm, closed forms and torch autograd."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import torch

from posenc.encodings import learned_rotations as lr
from posenc.encodings import rotation as rotary

HEAD_DIM = 16


def axial(ndim: int, heads: int = 2) -> np.ndarray:
  """RoPE-Axial frequencies per head (RoFormer in 1D), rotary's layout ``[ndim, H, Dh/2]``."""
  return np.repeat(rotary.axial_frequencies(HEAD_DIM, ndim, 100.0), heads, axis=1)


def rope(x, positions, freqs):
  angles = jnp.sum(positions[..., ::-1][..., None, None].astype(jnp.float32) * freqs, axis=-3)
  return rotary.turn(x, *rotary.cos_sin(angles))


def random_skew(rng, shape, scale=0.3):
  return np.asarray(lr.skew(jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)))


@pytest.mark.parametrize("ndim,block", [(1, 2), (1, 8), (2, 4), (2, 16)])
def test_rope_generators_reproduce_rope(ndim, block):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 5, 2, HEAD_DIM)), jnp.float32)
  positions = jnp.asarray(rng.uniform(-4, 9, (2, 5, ndim)), jnp.float32)
  gens = lr.rope_generators(axial(ndim), block)
  # positions are (row, col); rotary reverses them to (x, y), so the generators take (x, y) too
  turned = lr.apply_block_rotations(x, lr.generator_rotations(gens, positions[..., ::-1]),
                                    lr.pair_order(HEAD_DIM, ndim))
  np.testing.assert_allclose(turned, rope(x, positions, axial(ndim)), atol=2e-5)


def test_pair_order_interleaves_whole_pairs_of_every_axis():
  order = lr.pair_order(8, 2)  # half = 4: pairs 0, 1 turn with x; 2, 3 with y
  np.testing.assert_array_equal(order, [0, 4, 2, 6, 1, 5, 3, 7])
  np.testing.assert_array_equal(lr.pair_axes(8, 2), [0, 0, 1, 1, 0, 0, 1, 1])
  np.testing.assert_array_equal(np.sort(lr.pair_order(HEAD_DIM, 1)), np.arange(HEAD_DIM))


def test_block_rotations_are_orthogonal_and_match_scipy_expm():
  rng = np.random.default_rng(1)
  gens = random_skew(rng, (2, 2, 4, 4, 4), scale=1.0)
  positions = jnp.asarray(rng.uniform(-3, 3, (1, 3, 2)), jnp.float32)
  rot = np.asarray(lr.generator_rotations(jnp.asarray(gens), positions), np.float64)
  eye = np.broadcast_to(np.eye(4), rot.shape)
  np.testing.assert_allclose(rot @ np.swapaxes(rot, -1, -2), eye, atol=1e-5)
  np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-5)
  n, h, k = 2, 1, 3
  want = scipy.linalg.expm(sum(float(positions[0, n, a]) * gens[a, h, k].astype(np.float64) for a in range(2)))
  np.testing.assert_allclose(rot[0, n, h, k], want, atol=1e-5)


@pytest.mark.parametrize("offset", [0.0, 0.5, 7.0])
def test_packed_integer_positions_share_rotations_and_gradients_with_scipy(offset):
  """Rows of restarting integer positions take the table of 0..N-1 (offset 0); half-integer or
  out-of-range ones compute each token's: both give scipy's expm and the same gradient."""
  rng = np.random.default_rng(2)
  gens = jnp.asarray(random_skew(rng, (1, 2, 2, 4, 4), scale=1.0))
  positions = jnp.asarray(np.array([[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6]]) + offset, jnp.float32)[..., None]
  rot = np.asarray(lr.generator_rotations(gens, positions), np.float64)
  for b, n in [(0, 3), (1, 6), (1, 2)]:
    want = scipy.linalg.expm(float(positions[b, n, 0]) * np.asarray(gens[0, 1, 1], np.float64))
    np.testing.assert_allclose(rot[b, n, 1, 1], want, atol=1e-5)
  weights = jnp.asarray(rng.standard_normal(rot.shape), jnp.float32)
  loss = lambda g, pos, w: jnp.sum(w * lr.generator_rotations(g, pos))
  per_row = sum(jax.grad(loss)(gens, positions[b:b + 1], weights[b:b + 1]) for b in range(2))  # no table
  np.testing.assert_allclose(jax.grad(loss)(gens, positions, weights), per_row, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("angle", [0.3, 9.0, 60.0, 1000.0])
def test_expm_of_a_rotation_generator_is_as_precise_as_cos_and_sin(angle):
  gen = jnp.asarray([[0.0, -angle], [angle, 0.0]], jnp.float32)
  want = np.asarray([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  rounding = np.spacing(np.float32(angle)) + 1e-7  # float32 cannot hold the angle more exactly
  assert np.max(np.abs(np.asarray(lr.expm(gen)) - want)) < 4 * rounding * max(1.0, np.log2(angle))
  np.testing.assert_allclose(lr.expm(jnp.zeros((3, 3))), np.eye(3), atol=0)


def logits(gens, q, k, positions):
  order = lr.pair_order(HEAD_DIM, positions.shape[-1])
  rot = lr.generator_rotations(gens, positions)
  return jnp.einsum("bnhd,bmhd->bhnm", lr.apply_block_rotations(q, rot, order),
                    lr.apply_block_rotations(k, rot, order))


@pytest.mark.parametrize("ndim", [2, 3])
def test_axis_partition_generators_commute_so_logits_depend_on_offsets_only(ndim):
  rng = np.random.default_rng(2)
  head_dim, block = 12 if ndim == 3 else HEAD_DIM, 4 if ndim == 2 else 6
  mask = lr.axis_partition_mask(head_dim, ndim, block)
  gens = jnp.asarray(random_skew(rng, (ndim, 2, head_dim // block, block, block), 1.0) * mask)
  products = jnp.einsum("hkij,hkjl->hkil", gens[0], gens[1])
  np.testing.assert_allclose(products, jnp.einsum("hkij,hkjl->hkil", gens[1], gens[0]), atol=1e-6)
  q, k = (jnp.asarray(rng.standard_normal((1, 6, 2, head_dim)), jnp.float32) for _ in range(2))
  positions = jnp.asarray(rng.uniform(0, 5, (1, 6, ndim)), jnp.float32)
  order = lr.pair_order(head_dim, ndim)
  rot = lr.generator_rotations(gens, positions)
  shifted = lr.generator_rotations(gens, positions + jnp.asarray(rng.uniform(-7, 7, ndim), jnp.float32))
  a = jnp.einsum("bnhd,bmhd->bhnm", lr.apply_block_rotations(q, rot, order), lr.apply_block_rotations(k, rot, order))
  b = jnp.einsum("bnhd,bmhd->bhnm", lr.apply_block_rotations(q, shifted, order),
                 lr.apply_block_rotations(k, shifted, order))
  np.testing.assert_allclose(a, b, atol=1e-4)


def test_dense_generators_do_not_commute_in_2d_but_are_relative_in_1d():
  rng = np.random.default_rng(3)
  q, k = (jnp.asarray(rng.standard_normal((1, 5, 2, HEAD_DIM)), jnp.float32) for _ in range(2))
  for ndim, relative in ((1, True), (2, False)):
    gens = jnp.asarray(random_skew(rng, (ndim, 2, 2, 8, 8), 1.0))
    positions = jnp.asarray(rng.uniform(0, 4, (1, 5, ndim)), jnp.float32)
    shift = jnp.asarray(rng.uniform(2, 5, ndim), jnp.float32)
    same = np.allclose(logits(gens, q, k, positions), logits(gens, q, k, positions + shift), atol=1e-4)
    assert same == relative, ndim


def test_cayley_is_orthogonal_identity_at_zero_and_matches_the_closed_form():
  rng = np.random.default_rng(4)
  s = random_skew(rng, (3, 6, 6), scale=1.0)
  p = np.asarray(lr.cayley(jnp.asarray(s)), np.float64)
  np.testing.assert_allclose(p @ np.swapaxes(p, -1, -2), np.broadcast_to(np.eye(6), p.shape), atol=1e-5)
  eye = np.eye(6)
  np.testing.assert_allclose(p[1], (eye - s[1]) @ np.linalg.inv(eye + s[1]), atol=1e-5)
  np.testing.assert_array_equal(lr.cayley(jnp.zeros((6, 6))), np.eye(6))


def test_cayley_gradient_matches_torch_autograd_and_calls_no_lapack():
  """The Gauss-Jordan inverse and its hand-written VJP against torch's LU solve; the lowered grad
  holds no custom call (jaxlib's batched LU deadlocked a 2-core host with 12 concurrent layers)."""
  rng = np.random.default_rng(7)
  raw = rng.standard_normal((3, 16, 16)) * 0.7
  weights = rng.standard_normal((3, 16, 16))

  def loss(raw):
    return jnp.sum(lr.cayley(raw - jnp.swapaxes(raw, -1, -2)) * weights)

  got = jax.grad(loss)(jnp.asarray(raw, jnp.float32))
  t_raw = torch.tensor(raw, requires_grad=True)
  s = t_raw - t_raw.transpose(-1, -2)
  eye = torch.eye(16, dtype=torch.float64)
  (torch.linalg.solve(eye + s, eye - s) * torch.tensor(weights)).sum().backward()
  np.testing.assert_allclose(got, t_raw.grad.numpy(), rtol=1e-3, atol=1e-4)
  hlo = jax.jit(jax.grad(loss)).lower(jnp.asarray(raw, jnp.float32)).as_text()
  assert "custom_call" not in hlo


@pytest.mark.parametrize("ndim", [2, 3])
def test_string_rotations_keep_the_relative_property(ndim):
  """``RoPE(p) P^T``: P cancels in q.k, so only offsets matter, for any learned P and frequencies."""
  rng = np.random.default_rng(5)
  head_dim = 12 if ndim == 3 else HEAD_DIM
  p = lr.cayley(jnp.asarray(random_skew(rng, (2, head_dim, head_dim), 1.0)))
  freqs = jnp.asarray(rng.uniform(0.1, 2.0, (ndim, 2, head_dim // 2)), jnp.float32)
  q, k = (jnp.asarray(rng.standard_normal((1, 5, 2, head_dim)), jnp.float32) for _ in range(2))
  positions = jnp.asarray(rng.uniform(0, 5, (1, 5, ndim)), jnp.float32)

  def turned(x, pos):
    x = jnp.einsum("hji,bnhj->bnhi", p, x)  # P^T x
    return rope(x, pos, freqs)

  def scores(pos):
    return jnp.einsum("bnhd,bmhd->bhnm", turned(q, pos), turned(k, pos))

  np.testing.assert_allclose(scores(positions), scores(positions + jnp.asarray(rng.uniform(-6, 6, ndim))),
                             atol=1e-4)


def test_gradients_through_expm_match_torch_autograd():
  rng = np.random.default_rng(6)
  raw = rng.standard_normal((2, 1, 2, 4, 4)).astype(np.float64) * 0.5
  positions = rng.uniform(-2, 2, (1, 3, 2))
  x = rng.standard_normal((1, 3, 1, 8))
  weights = rng.standard_normal((1, 3, 1, 8))
  order = lr.pair_order(8, 2)

  def loss(raw):
    rot = lr.generator_rotations(lr.skew(raw), jnp.asarray(positions, jnp.float32))
    return jnp.sum(lr.apply_block_rotations(jnp.asarray(x, jnp.float32), rot, order) * weights)

  got = jax.grad(loss)(jnp.asarray(raw, jnp.float32))

  t_raw = torch.tensor(raw, requires_grad=True)
  upper = torch.triu(t_raw, diagonal=1)
  gens = upper - upper.transpose(-1, -2)
  gen = torch.einsum("bna,ahkij->bnhkij", torch.tensor(positions), gens)
  rot = torch.matrix_exp(gen)
  y = torch.tensor(x)[..., order].reshape(1, 3, 1, 2, 4)
  y = torch.einsum("...kij,...kj->...ki", rot, y).reshape(1, 3, 1, 8)[..., np.argsort(order)]
  (y * torch.tensor(weights)).sum().backward()
  np.testing.assert_allclose(got, t_raw.grad.numpy(), rtol=1e-3, atol=1e-4)
