"""The absolute tables on 3D (t, h, w) grids: learned's 3D table and sincos3d (posenc/encodings/absolute.py),
their transfer to a new (t, h, w) grid (posenc/transfer.py), and the rotary encodings that take 3D grids
passing their parameters through."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import embed, num_params, tokens
from conftest import build_absolute as build
from posenc import transfer
from posenc.encodings import POSENC_KEY, Geometry
from posenc.resize import resize_grid3d

D = 24  # divisible by 6: a sin and a cos per frequency and axis
VIDEO = Geometry.grid3d(2, 3, 4, num_prefix=1)


def added(enc, geometry, dim=D, positions=None):
  """What ``embed`` adds to the position tokens of a batch of 2 (prefix checked untouched)."""
  x = np.asarray(tokens(geometry, dim))
  out = np.asarray(embed(enc, x, geometry, positions))
  np.testing.assert_array_equal(out[:, :geometry.num_prefix], x[:, :geometry.num_prefix])
  return out[0, geometry.num_prefix:] - x[0, geometry.num_prefix:]


def sincos3d_numpy(coords, dim, temperature=10_000.):
  """[sin(x w), cos(x w), sin(y w), cos(y w), sin(t w), cos(t w)] per (t, y, x), x the column."""
  n = dim // 6
  omega = np.array([temperature ** (-k / (n - 1)) for k in range(n)])
  return np.stack([np.concatenate([f(c * omega) for c in (x, y, t) for f in (np.sin, np.cos)])
                   for t, y, x in coords])


# ---------------------------------------------------------------- learned, 3D table
def test_learned_3d_table_is_row_major_t_h_w_and_has_thw_times_d_params():
  enc = build("learned", VIDEO, dim=D)
  assert num_params(enc) == 2 * 3 * 4 * D
  table = np.asarray(enc.table[...])
  np.testing.assert_allclose(added(enc, VIDEO), table, atol=1e-6)
  # Positions are data: (t, row, col) reads row t*h*w... of the table.
  positions = np.array([[[1, 2, 3], [0, 0, 1]] * 12], np.int32)
  got = added(enc, VIDEO, positions=positions)
  np.testing.assert_allclose(got[:2], table[[1 * 12 + 2 * 4 + 3, 1]], atol=1e-6)


def test_learned_3d_at_another_grid_says_transfer_or_resamples():
  enc = build("learned", VIDEO, dim=D)
  with pytest.raises(ValueError, match=r"'learned' was built for the 2x3x4 grid and cannot serve 3D 3x3x4 "
                                       r"\(\+1 prefix\): transfer its parameters"):
    added(enc, Geometry.grid3d(3, 3, 4, num_prefix=1))
  with pytest.raises(ValueError, match=r"'learned' was built for 3D inputs .* cannot serve 2D 3x4"):
    added(enc, Geometry.grid(3, 4))
  resampling = build("learned", VIDEO, dim=D, resample=True)
  other = Geometry.grid3d(3, 2, 5, num_prefix=1)
  want = resize_grid3d(resampling.table[...], (2, 3, 4), (3, 2, 5), method="bicubic")
  np.testing.assert_allclose(added(resampling, other), want, atol=1e-5)


# ---------------------------------------------------------------- sincos3d
def test_sincos3d_matches_its_closed_form_and_its_frames_are_sincos2d():
  enc = build("sincos3d", VIDEO, dim=D, temperature=100.0)
  assert num_params(enc) == 0
  coords = np.asarray(VIDEO.coords())
  np.testing.assert_allclose(added(enc, VIDEO), sincos3d_numpy(coords, D, 100.0), atol=2e-5)
  # The first 2D/3 features of every frame are sincos2d's at that width.
  frame = added(build("sincos2d", Geometry.grid(3, 4), dim=2 * D // 3, temperature=100.0), Geometry.grid(3, 4),
                dim=2 * D // 3)
  np.testing.assert_allclose(added(enc, VIDEO)[12:, :2 * D // 3], frame, atol=1e-5)
  # Real positions, any grid (no table): a half-frame shift is the closed form there.
  shifted = np.asarray(VIDEO.positions(), np.float32) + np.float32(0.5)
  np.testing.assert_allclose(added(enc, VIDEO, positions=shifted), sincos3d_numpy(coords + 0.5, D, 100.0), atol=2e-5)


def test_sincos3d_errors():
  with pytest.raises(ValueError, match=r"'sincos3d' needs dim divisible by 6 .* and at least 12; got dim=16"):
    build("sincos3d", VIDEO, dim=16)
  with pytest.raises(ValueError, match=r"'sincos3d' supports 3D inputs, not 2D 3x4"):
    build("sincos3d", Geometry.grid(3, 4), dim=D)


# ---------------------------------------------------------------- transfer to a new (t, h, w) grid
def move(name, source, target, **options):
  """The one transfer seam on an encoding's own parameters, jitted, onto ``target``'s shapes."""
  src = build(name, source, dim=D, **options)
  params = {POSENC_KEY: nnx.to_pure_dict(nnx.state(src, nnx.Param))}
  tgt = nnx.eval_shape(lambda: build(name, target, dim=D, **options))
  wanted = {POSENC_KEY: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                     nnx.to_pure_dict(nnx.state(tgt, nnx.Param)))}
  return params, transfer.jit_transfer(name, source, target, wanted)(params)


def test_learned_3d_table_transfers_by_resampling_each_axis():
  target = Geometry.grid3d(4, 2, 6, num_prefix=1)
  params, out = move("learned", VIDEO, target)
  table = out[POSENC_KEY]["table"]
  assert table.shape == (4 * 2 * 6, D)
  np.testing.assert_allclose(table, resize_grid3d(params[POSENC_KEY]["table"], (2, 3, 4), (4, 2, 6)),
                             rtol=1e-6, atol=1e-7)
  # The model at the new grid adds the transferred table.
  enc = build("learned", target, dim=D)
  nnx.update(enc, out[POSENC_KEY])
  np.testing.assert_allclose(added(enc, target), table, atol=1e-6)
  with pytest.raises(transfer.TransferError, match=r"'learned' cannot transfer a 3D 2x3x4 \(\+1 prefix\) table "
                                                    r"to 2D 3x4"):
    transfer.jit_transfer("learned", VIDEO, Geometry.grid(3, 4), {})(params)


@pytest.mark.parametrize("name,options", [("sincos3d", {}), ("mrope", {}), ("string", {}),
                                          ("comrope", dict(block=6)), ("liere", dict(block=6))])
def test_3d_encodings_without_tables_pass_their_parameters_unchanged(name, options):
  params, out = move(name, VIDEO, Geometry.grid3d(5, 6, 2, num_prefix=1), **options)
  assert transfer.shape_diff(transfer.flat_shapes(out), transfer.flat_shapes(params)) == []
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(out)):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.leaves(params) or name in ("sincos3d", "mrope")
