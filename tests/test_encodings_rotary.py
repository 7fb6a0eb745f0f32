"""Tests for posenc/encodings/rotary.py: rope (1D, 2D axial) and rope_mixed, their shared rotation
(posenc/encodings/rotation.py). rope's other variants: test_encodings_rope_variants.py."""
from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from rotary_helpers import (DH, H, L, logits, make_mixed, make_rope, qk, real_positions, rotate, to_interleaved,
                            xy_positions)

from posenc.encodings import Geometry, make
from posenc.transfer import interpolation_scale


# ---------------------------------------------------------------- relative offsets
CASES = [
    ("rope 1D", lambda: make_rope(), Geometry.seq(12)),
    ("rope 2D", lambda: make_rope(), Geometry.grid(4, 5)),
    ("rope_mixed 2D", lambda: make_mixed(), Geometry.grid(4, 5)),
]


@pytest.mark.parametrize("label,build,geometry", CASES, ids=[c[0] for c in CASES])
def test_logits_depend_only_on_relative_offset(label, build, geometry):
  enc = build()
  # The same q and k content at every position: logits then differ only through positions.
  q0, k0 = qk(Geometry.seq(1), seed=1, batch=1)
  t = geometry.num_tokens
  q, k = jnp.tile(q0, (1, t, 1, 1)), jnp.tile(k0, (1, t, 1, 1))
  for layer in (0, L - 1):
    qr, kr = rotate(enc, q, k, geometry, layer)
    logits = np.asarray(jnp.einsum("bnhd,bmhd->hnm", qr, kr, precision="highest"))
    pos = xy_positions(geometry)
    groups = collections.defaultdict(list)
    for n in range(t):
      for m in range(t):
        groups[tuple(pos[n] - pos[m])].append(logits[:, n, m])
    reps = {}
    for offset, values in groups.items():
      values = np.stack(values)
      np.testing.assert_allclose(values, np.broadcast_to(values[0], values.shape), atol=2e-4,
                                 err_msg=f"{label}: offset {offset} gives different logits")
      reps[offset] = values[0]
    # ... while different offsets give different logits.
    offsets = sorted(reps)
    zero = (0,) * geometry.ndim
    for offset in offsets:
      if offset != zero:
        assert np.abs(reps[offset] - reps[zero]).max() > 1e-3, (label, offset)
    one = (1,) + (0,) * (geometry.ndim - 1)
    two = (2,) + (0,) * (geometry.ndim - 1)
    assert np.abs(reps[one] - reps[two]).max() > 1e-3


@pytest.mark.parametrize("label,build,geometry", CASES, ids=[c[0] for c in CASES])
def test_rotation_preserves_norms_and_changes_vectors(label, build, geometry):
  enc = build()
  q, k = qk(geometry)
  qr, kr = rotate(enc, q, k, geometry, 1)
  for x, xr in ((q, qr), (k, kr)):
    np.testing.assert_allclose(jnp.linalg.norm(xr, axis=-1), jnp.linalg.norm(x, axis=-1),
                               rtol=1e-5)
    # Position 0 is not turned; the others are.
    np.testing.assert_allclose(xr[:, 0], x[:, 0], atol=1e-6)
    assert np.abs(np.asarray(xr[:, 1:] - x[:, 1:])).max() > 1e-2


# ---------------------------------------------------------------- parity with references
@pytest.mark.parametrize("theta", [None, 500.0])
@pytest.mark.parametrize("factor", [1.0, 2.0])
def test_rope_1d_matches_hf_llama(theta, factor):
  torch = pytest.importorskip("torch", reason="no torch (pip install -e .[test])")
  pytest.importorskip("transformers", reason="no transformers (pip install -e .[test])")
  from transformers import LlamaConfig
  from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

  base = 10000.0 if theta is None else theta
  rope_params = {"rope_type": "default", "rope_theta": base}
  if factor != 1.0:  # HF's linear scaling divides positions by factor
    rope_params = {"rope_type": "linear", "factor": factor, "rope_theta": base}
  config = LlamaConfig(hidden_size=H * DH, num_attention_heads=H, head_dim=DH,
                       rope_parameters=rope_params)
  geometry = Geometry.seq(37, num_prefix=1)
  q, k = qk(geometry)
  enc = make_rope(**({} if theta is None else {"theta": theta}))
  # Position interpolation is data: positions times 1/factor (the old ``scale=1/factor``).
  positions = geometry.positions() * jnp.float32(1.0 / factor)
  qr, kr = rotate(enc, q, k, geometry, 0, positions)

  tq, tk = (torch.from_numpy(np.array(x[:, 1:])) for x in (q, k))
  cos, sin = LlamaRotaryEmbedding(config)(tq, torch.arange(geometry.num_positions)[None])
  hq, hk = apply_rotary_pos_emb(tq, tk, cos, sin, unsqueeze_dim=2)
  np.testing.assert_allclose(qr[:, 1:], hq.numpy(), atol=3e-5)
  np.testing.assert_allclose(kr[:, 1:], hk.numpy(), atol=3e-5)


def test_rope_2d_matches_rope_vit_axial_closed_form():
  # rope-vit: x = column, y = row; Dh/4 frequencies 100**(-4k/Dh) for x then the same for y;
  # rotation = complex multiplication of feature pairs.
  geometry = Geometry.grid(3, 5, num_prefix=1)
  q, k = qk(geometry)
  qr, _ = rotate(make_rope(), q, k, geometry, 0)
  mag = 100.0 ** (-np.arange(0, DH, 4) / DH)
  pos = xy_positions(geometry).astype(np.float64)
  angles = np.concatenate([np.outer(pos[:, 0], mag), np.outer(pos[:, 1], mag)], axis=-1)
  expected = to_interleaved(q[:, 1:]) * np.exp(1j * angles)[None, :, None, :]
  np.testing.assert_allclose(to_interleaved(qr[:, 1:]), expected, atol=2e-5)


def test_rope_mixed_matches_closed_form_per_layer_and_head():
  geometry = Geometry.grid(4, 3)
  enc = make_mixed(seed=3)
  freqs = np.asarray(enc.freqs[...], np.float64)
  q, k = qk(geometry)
  pos = xy_positions(geometry).astype(np.float64)
  for layer in range(L):
    _, kr = rotate(enc, q, k, geometry, layer)
    angles = (pos[:, 0, None, None] * freqs[layer, 0][None] +
              pos[:, 1, None, None] * freqs[layer, 1][None])  # [N, H, Dh/2]
    expected = to_interleaved(k) * np.exp(1j * angles)[None]
    np.testing.assert_allclose(to_interleaved(kr), expected, atol=2e-5)


def test_rope_mixed_with_axial_frequencies_equals_axial_rope():
  geometry = Geometry.grid(5, 4, num_prefix=2)
  enc = make_mixed()
  mag = 100.0 ** (-np.arange(0, DH, 4) / DH)
  zeros = np.zeros_like(mag)
  axial = np.stack([np.concatenate([mag, zeros]), np.concatenate([zeros, mag])])  # [2, Dh/2]
  enc.freqs[...] = jnp.asarray(np.broadcast_to(axial[None, :, None], (L, 2, H, DH // 2)),
                               jnp.float32)
  q, k = qk(geometry)
  for a, b in zip(rotate(enc, q, k, geometry, 1), rotate(make_rope(), q, k, geometry, 0)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  # Sanity: random (paper) init is not axial.
  a, b = rotate(make_mixed(), q, k, geometry, 1)[0], rotate(make_rope(), q, k, geometry, 0)[0]
  assert np.abs(np.asarray(a - b)).max() > 1e-2


def test_rope_mixed_init_follows_rope_vit():
  enc = make("rope_mixed", dim=4 * 32, num_heads=4, num_layers=L, theta=10.0, rngs=nnx.Rngs(7))
  f = np.asarray(enc.freqs[...], np.float64)  # (L, 2, H, Dh/2)
  dh = 32
  assert f.shape == (L, 2, 4, dh // 2)
  mag = 10.0 ** (-np.arange(0, dh, 4) / dh)
  np.testing.assert_allclose(np.hypot(f[:, 0], f[:, 1]), np.broadcast_to(
      np.concatenate([mag, mag]), (L, 4, dh // 2)), rtol=1e-5)
  direction = np.arctan2(f[:, 1], f[:, 0])  # (L, H, Dh/2)
  first, second = direction[..., : dh // 4], direction[..., dh // 4:]
  np.testing.assert_allclose(first, first[..., :1].repeat(dh // 4, -1), atol=1e-5)
  np.testing.assert_allclose(np.cos(second - first), 0.0, atol=1e-5)  # a + pi/2
  np.testing.assert_allclose(np.sin(second - first), 1.0, atol=1e-5)
  # One random angle per layer and head.
  angles = first[..., 0].reshape(-1)
  assert len(np.unique(np.round(angles, 4))) == angles.size


# ---------------------------------------------------------------- prefix, layers, params
@pytest.mark.parametrize("build,shape", [
    (make_rope, (3, 4)), (make_mixed, (3, 4)), (lambda: make_rope(scaling="yarn", original_length=8), (40,)),
], ids=["rope", "rope_mixed", "rope-yarn"])
def test_prefix_tokens_unchanged_and_ignored(build, shape):
  enc = build()
  geom = Geometry.grid if len(shape) == 2 else Geometry.seq
  with_prefix = geom(*shape, num_prefix=3)
  q, k = qk(with_prefix)
  qr, kr = rotate(enc, q, k, with_prefix, 2)
  np.testing.assert_array_equal(qr[:, :3], q[:, :3])  # not turned, and not scaled by YaRN's factor
  np.testing.assert_array_equal(kr[:, :3], k[:, :3])
  # Position tokens are rotated exactly as without the prefix.
  q2, k2 = rotate(enc, q[:, 3:], k[:, 3:], geom(*shape), 2)
  np.testing.assert_allclose(qr[:, 3:], q2, atol=1e-6)
  np.testing.assert_allclose(kr[:, 3:], k2, atol=1e-6)


def test_traced_layer_index_under_jit_and_scan_picks_that_layers_frequencies():
  enc = make_mixed(seed=5)
  geometry = Geometry.grid(3, 3, num_prefix=1)
  q, k = qk(geometry)
  graphdef, state = nnx.split(enc)

  @jax.jit
  def all_layers(state, q, k):
    module = nnx.merge(graphdef, state)

    def body(carry, layer):
      return carry, module.rotate(q, k, geometry, geometry.positions(), layer)

    return jax.lax.scan(body, None, jnp.arange(L, dtype=jnp.int32))[1]

  scanned_q, scanned_k = all_layers(state, q, k)
  for layer in range(L):
    eager_q, eager_k = enc.rotate(q, k, geometry, geometry.positions(), layer)  # Python int layer, eager
    np.testing.assert_allclose(scanned_q[layer], eager_q, atol=1e-6)
    np.testing.assert_allclose(scanned_k[layer], eager_k, atol=1e-6)
  assert np.abs(np.asarray(scanned_q[0] - scanned_q[1])).max() > 1e-2  # layers differ


def test_param_counts_and_logical_names():
  assert not jax.tree.leaves(nnx.state(make_rope(), nnx.Param))
  enc = make_mixed()
  params = jax.tree.leaves(nnx.state(enc, nnx.Param))
  assert sum(p.size for p in params) == L * 2 * H * (DH // 2)
  assert enc.freqs.get_metadata()["out_sharding"] == ("layers", None, "heads", "kv")
  bf16 = make_mixed(param_dtype=jnp.bfloat16)
  assert bf16.freqs[...].dtype == jnp.bfloat16


# ---------------------------------------------------------------- errors
def test_clear_errors():
  with pytest.raises(ValueError, match=r"'rope' needs a head dimension that is even.*head_dim=7"):
    make("rope", dim=14, num_heads=2, geometry=Geometry.seq(8))
  with pytest.raises(ValueError, match=r"divisible by 4.*head_dim=6"):
    make("rope", dim=12, num_heads=2, geometry=Geometry.grid(2, 2))
  q, k = qk(Geometry.seq(5), dh=7)
  with pytest.raises(ValueError, match="head_dim=7"):
    make("rope").rotate(q, k, Geometry.seq(5), Geometry.seq(5).positions(), 0)
  q, k = qk(Geometry.grid(2, 2), dh=6)
  with pytest.raises(ValueError, match="head_dim=6"):
    make("rope").rotate(q, k, Geometry.grid(2, 2), Geometry.grid(2, 2).positions(), 0)
  with pytest.raises(ValueError, match=r"'rope_mixed'.*1D 8.*use 'rope'"):
    make_mixed(geometry=Geometry.seq(8))
  q, k = qk(Geometry.seq(8))
  with pytest.raises(ValueError, match=r"'rope_mixed'.*1D 8.*use 'rope'"):
    make_mixed().rotate(q, k, Geometry.seq(8), Geometry.seq(8).positions(), 0)
  with pytest.raises(ValueError, match="head_dim=6"):
    make("rope_mixed", dim=12, num_heads=2, num_layers=1, rngs=nnx.Rngs(0))
  q, k = qk(Geometry.grid(2, 3))
  with pytest.raises(ValueError, match=r"7 tokens"):
    make_rope().rotate(q, k, Geometry.grid(2, 3, num_prefix=1), Geometry.grid(2, 3, num_prefix=1).positions(), 0)
  # ``scale`` is gone (position interpolation scales the positions): a clear error naming it (the closest
  # name is now yarn's ``mscale``; the list of options names ``scaling`` too).
  with pytest.raises(ValueError, match=r"'rope' has no option\(s\) \['scale'\] \(did you mean 'mscale'\?\); its options are .*theta.*'scaling'"):
    make_rope(scale=0.5)
  with pytest.raises(ValueError, match=r"'rope_mixed' has no option\(s\) \['scale'\]"):
    make_mixed(scale=0.5)
  with pytest.raises(ValueError, match=r"'rope': theta must be None \(10000 in 1D, 100 in 2D\) or a number > 1"):
    make_rope(theta=1.0)


# ---------------------------------------------------------------- jit, grads, dtypes, scale
@pytest.mark.parametrize("build,geometries", [
    (make_rope, [Geometry.seq(6), Geometry.seq(40, num_prefix=1)]),
    (make_rope, [Geometry.grid(2, 3, 1), Geometry.grid(7, 5, 1)]),
    (make_mixed, [Geometry.grid(2, 3, 1), Geometry.grid(7, 5, 1)]),
    (lambda: make_rope(scaling="yarn", original_length=8), [Geometry.seq(6), Geometry.seq(40, num_prefix=1)]),
    (lambda: make_rope(scaling="ntk", original_length=8), [Geometry.seq(6), Geometry.seq(40, num_prefix=1)]),
], ids=["rope-1d", "rope-2d", "rope_mixed", "rope-yarn", "rope-ntk"])
def test_jit_at_two_geometries_finite_values_and_grads(build, geometries):
  enc = build()
  graphdef, state = nnx.split(enc)

  def loss(state, q, k, geometry):
    qr, kr = nnx.merge(graphdef, state).rotate(q, k, geometry, geometry.positions(), 1)
    logits = jnp.einsum("bnhd,bmhd->bhnm", qr, kr)
    return jnp.mean(jax.nn.log_softmax(logits, axis=-1) ** 2)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
  for geometry in geometries:
    q, k = qk(geometry)
    value, (g_state, g_q, g_k) = step(state, q, k, geometry)
    assert np.isfinite(value)
    for g in [g_q, g_k] + jax.tree.leaves(g_state):
      assert np.all(np.isfinite(g)) and np.abs(np.asarray(g)).max() > 0


@pytest.mark.parametrize("build,geometry", [
    (make_rope, Geometry.seq(50, num_prefix=1)), (make_mixed, Geometry.grid(6, 6, num_prefix=1))
], ids=["rope", "rope_mixed"])
def test_bf16_in_bf16_out(build, geometry):
  enc = build()
  q, k = qk(geometry, dtype=jnp.bfloat16)
  qr, kr = rotate(enc, q, k, geometry, 0)
  assert qr.dtype == kr.dtype == jnp.bfloat16
  ref, _ = rotate(enc, q.astype(jnp.float32), k.astype(jnp.float32), geometry, 0)
  np.testing.assert_allclose(qr.astype(jnp.float32), ref, atol=3e-2, rtol=1e-2)


@pytest.mark.parametrize("build,small,large", [
    (make_rope, Geometry.seq(7), Geometry.seq(14)),
    (make_rope, Geometry.grid(3, 4), Geometry.grid(6, 8)),
    (make_mixed, Geometry.grid(3, 4), Geometry.grid(6, 8)),
], ids=["rope-1d", "rope-2d", "rope_mixed"])
def test_scaled_positions_halve_effective_positions(build, small, large):
  """Position interpolation as data: positions * 0.5 (the old ``scale=0.5``)."""
  enc = build()
  scale = interpolation_scale(small, large)
  assert scale == 0.5
  q, k = qk(small)
  big_q = jnp.zeros((q.shape[0], large.num_tokens) + q.shape[2:])
  # Put the small geometry's tokens at the even positions of the large one.
  pos_large = xy_positions(large)
  even = np.all(pos_large % 2 == 0, axis=1)
  big_q = big_q.at[:, even].set(q)
  rotated_half, _ = rotate(enc, big_q, big_q, large, 1, large.positions() * jnp.float32(scale))
  rotated, _ = rotate(enc, q, k, small, 1)
  np.testing.assert_allclose(rotated_half[:, even], rotated, atol=1e-5)
  # Without scaling the same tokens are turned by twice the angle.
  rotated_full, _ = rotate(enc, big_q, big_q, large, 1)
  assert np.abs(np.asarray(rotated_full[:, even] - rotated)).max() > 1e-2


# ---------------------------------------------------------------- positions as data
REAL = [
    ("rope 1D", lambda: make_rope(), Geometry.seq(9, num_prefix=1)),
    ("rope 2D", lambda: make_rope(), Geometry.grid(3, 4, num_prefix=1)),
    ("rope_mixed 2D", lambda: make_mixed(seed=2), Geometry.grid(3, 4, num_prefix=1)),
]


@pytest.mark.parametrize("label,build,geometry", REAL, ids=[c[0] for c in REAL])
def test_logits_at_real_positions_depend_only_on_their_difference(label, build, geometry):
  enc = build()
  assert enc.continuous is True
  q, k = qk(geometry, seed=4)
  n = geometry.num_prefix
  p = real_positions(geometry)  # one set per example
  c = np.random.default_rng(1).uniform(-20, 20, size=(1, 1, geometry.ndim)).astype(np.float32)
  wobble = np.random.default_rng(2).uniform(-1, 1, size=p.shape).astype(np.float32)
  for layer in (0, L - 1):
    base = logits(*rotate(enc, q, k, geometry, layer, p))
    shifted = logits(*rotate(enc, q, k, geometry, layer, p + c))  # the same real shift for all
    scale = np.abs(base).max()
    # Between position tokens: only the difference counts. (A prefix token is not turned, so
    # its logits with position tokens see their absolute positions.)
    np.testing.assert_allclose(shifted[..., n:, n:], base[..., n:, n:], rtol=1e-4, atol=1e-4 * scale,
                               err_msg=label)
    np.testing.assert_array_equal(shifted[..., :n, :n], base[..., :n, :n])
    # A non-uniform change of the positions changes the position-position logits.
    moved = logits(*rotate(enc, q, k, geometry, layer, p + wobble))
    assert np.abs(moved[..., n:, n:] - base[..., n:, n:]).max() > 1e-2 * scale, label
    # And the examples' own positions matter: swapping them changes each example's logits.
    swapped = logits(*rotate(enc, q, k, geometry, layer, p[::-1]))
    assert np.abs(swapped[..., n:, n:] - base[..., n:, n:]).max() > 1e-2 * scale, label


@pytest.mark.parametrize("label,build,geometry", REAL, ids=[c[0] for c in REAL])
def test_rotation_at_real_positions_matches_closed_form(label, build, geometry):
  """Angles = sum over axes of (x, y) = (col, row) coordinate times frequency, no rounding."""
  enc = build()
  q, k = qk(geometry, seed=5)
  p = real_positions(geometry, seed=3).astype(np.float64)
  xy = p[..., ::-1]  # (row, col) -> (x, y)
  layer = L - 1
  if label == "rope 1D":
    freqs = (10000.0 ** (-np.arange(0, DH, 2) / DH))[None, None]  # [ndim, 1, Dh/2]
  elif label == "rope 2D":
    mag = 100.0 ** (-np.arange(0, DH, 4) / DH)
    zeros = np.zeros_like(mag)
    freqs = np.stack([np.concatenate([mag, zeros]), np.concatenate([zeros, mag])])[:, None]
  else:
    freqs = np.asarray(enc.freqs[...], np.float64)[layer]  # [2, H, Dh/2]
  angles = np.einsum("bna,ahi->bnhi", xy, np.broadcast_to(freqs, (geometry.ndim, H, DH // 2)))
  qr, kr = rotate(enc, q, k, geometry, layer, p.astype(np.float32))
  n = geometry.num_prefix
  for x, xr in ((q, qr), (k, kr)):
    np.testing.assert_array_equal(xr[:, :n], x[:, :n])
    expected = to_interleaved(x[:, n:]) * np.exp(1j * angles)
    np.testing.assert_allclose(to_interleaved(xr[:, n:]), expected, atol=5e-5, err_msg=label)
  # Integer-valued float positions give exactly the int32 result.
  ints = np.round(p).astype(np.int32)
  for a, b in zip(rotate(enc, q, k, geometry, layer, ints.astype(np.float32)),
                  rotate(enc, q, k, geometry, layer, ints)):
    np.testing.assert_array_equal(a, b)
