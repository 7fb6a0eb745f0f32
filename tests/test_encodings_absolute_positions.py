"""Absolute encodings at positions given as data (tables look rows up, fixed tables take real
positions) and learned's resampling of its grid table (FlexiViT-style)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ABSOLUTE_DIM as D, ABSOLUTE_SEQ as SEQ, GRID, build_absolute as build, embed, tokens
from posenc.encodings import Geometry


# Independent numpy references, written from the papers' formulas.
def vaswani_at(positions, dim, temperature=10_000.):
  """Vaswani et al.'s sinusoids at any (real) positions ``[N]``, float64."""
  i = np.arange(dim // 2)
  angle = np.asarray(positions, np.float64)[:, None] / temperature**(2 * i / dim)
  return np.stack([np.sin(angle), np.cos(angle)], axis=-1).reshape(len(angle), dim)


def mocov3_at(coords, dim, temperature=10_000.):
  """MoCo v3's 2D sin-cos, ``[sin(x w), cos(x w), sin(y w), cos(y w)]``, at any (real) ``(row, col)``
  coordinates ``[N, 2]``, float64."""
  quarter = dim // 4
  omega = temperature**(-np.arange(quarter) / (quarter - 1))
  y, x = (np.asarray(coords, np.float64)[:, a, None] * omega for a in (0, 1))
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=-1)


# --- positions as data ---

def random_positions(geometry, low, high, batch=2, seed=0, dtype=np.float32):
  """``[batch, N, ndim]`` positions, uniform in ``[low, high)`` (``dtype`` float) or integers."""
  rng = np.random.default_rng(seed)
  shape = (batch, geometry.num_positions, geometry.ndim)
  if np.issubdtype(dtype, np.integer):
    return rng.integers(low, high, size=shape).astype(dtype)
  return rng.uniform(low, high, size=shape).astype(dtype)


def embedded(enc, geometry, positions, dim=D):
  """``(x, out)`` as numpy, for ``embed`` at ``positions`` under jit; prefix checked untouched."""
  x = np.asarray(tokens(geometry, dim))
  out = np.asarray(embed(enc, x, geometry, positions))
  np.testing.assert_array_equal(out[:, :geometry.num_prefix], x[:, :geometry.num_prefix])
  return x, out


# Table encodings and the rows a position reads: row index, or (row, col) -> value.
def table_rows(enc, positions):
  """numpy ``[B, N, D]``: what a table encoding should add at integer ``positions`` (NaN outside)."""
  p = np.asarray(positions)
  if enc.name == "factorized":
    rows, cols = np.asarray(enc.row_table[...]), np.asarray(enc.col_table[...])
    (h, w), parts = enc.built.shape, (rows, cols)
  else:
    table = np.asarray(enc.table[...])
    if enc.built.ndim == 2:
      h, w = enc.built.shape
      table = table.reshape(h, w, -1)
    parts = (table,)
  out = np.full(p.shape[:2] + (parts[0].shape[-1],), np.nan, np.float32)
  for b in range(p.shape[0]):
    for n in range(p.shape[1]):
      c = tuple(int(v) for v in p[b, n])
      if not all(0 <= v < s for v, s in zip(c, enc.built.shape)):
        continue  # outside the table: NaN
      if enc.name == "factorized":
        out[b, n] = rows[c[0]] + cols[c[1]]
      else:
        out[b, n] = table[c]
  return out


def test_learned_1d_restarting_positions_look_up_those_rows():
  enc = build("learned", Geometry.seq(8))
  geometry = Geometry.seq(5, num_prefix=1)
  table = np.asarray(enc.table[...])
  # Packed sequences restart at 0; one set shared by the batch ([1, N, 1]) ...
  restart = np.array([[0, 1, 2, 0, 1]], np.int32)[..., None]
  x, out = embedded(enc, geometry, restart)
  np.testing.assert_array_equal(out[:, 1:], x[:, 1:] + table[[0, 1, 2, 0, 1]][None])
  # ... or one per example ([B, N, 1]).
  per_example = np.array([[0, 1, 2, 0, 1], [7, 3, 3, 6, 0]], np.int32)[..., None]
  x, out = embedded(enc, geometry, per_example)
  np.testing.assert_array_equal(out[0, 1:], x[0, 1:] + table[[0, 1, 2, 0, 1]])
  np.testing.assert_array_equal(out[1, 1:], x[1, 1:] + table[[7, 3, 3, 6, 0]])


@pytest.mark.parametrize("name,built,geometry", [
    ("learned", Geometry.seq(8), Geometry.seq(6, num_prefix=1)),
    ("learned", GRID, GRID),
    ("factorized", GRID, Geometry.grid(2, 3, num_prefix=1))])


def test_tables_look_up_the_positions_given(name, built, geometry):
  enc = build(name, built)
  # Random in-table integer positions per example (shuffled, repeated): exactly those rows.
  high = np.asarray(built.shape)
  rng = np.random.default_rng(3)
  positions = (rng.integers(0, 1 << 20, size=(2, geometry.num_positions, built.ndim)) % high).astype(np.int32)
  x, out = embedded(enc, geometry, positions)
  want = table_rows(enc, positions)
  assert np.isfinite(want).all() and not np.allclose(want[0], want[1])
  np.testing.assert_allclose(out[:, geometry.num_prefix:], x[:, geometry.num_prefix:] + want,
                             rtol=0, atol=1e-7)


TABLES = [("learned", Geometry.seq(8), Geometry.seq(5, num_prefix=1)),
          ("learned", GRID, GRID),
          ("factorized", GRID, GRID)]


@pytest.mark.parametrize("name,built,geometry", TABLES)
def test_tables_refuse_real_valued_positions(name, built, geometry):
  enc = build(name, built)
  assert enc.continuous is False
  real = geometry.positions().astype(jnp.float32)  # even integer-valued floats
  match = rf"'{name}' looks positions up in a table and needs integer positions; got float32"
  with pytest.raises(ValueError, match=match):
    enc.embed(tokens(geometry), geometry, real)
  with pytest.raises(ValueError, match=match):  # the dtype is static: also under jit
    embed(enc, tokens(geometry), geometry, real + 0.5)


@pytest.mark.parametrize("name,built,geometry", TABLES)
def test_tables_refuse_concrete_positions_outside_the_table(name, built, geometry):
  enc = build(name, built)
  x = tokens(geometry)
  good = np.asarray(geometry.positions())
  outside = []
  for n, coord in ((1, built.shape), (2, (-1,) * built.ndim)):  # one past the end; below 0
    bad = good.copy()
    bad[0, n] = coord
    outside.append(bad)
  if built.ndim == 2:  # a column past the end that a flat index would alias to the next row
    bad = good.copy()
    bad[0, 0] = (0, built.shape[1])
    outside.append(bad)
  for bad in outside:
    with pytest.raises(ValueError, match=rf"'{name}' has a table for positions 0\.\..* per axis; "
                                         r"got .*Transfer .*posenc\.transfer"):
      enc.embed(x, geometry, jnp.asarray(bad))
  enc.embed(x, geometry, jnp.asarray(good))  # in range: fine


@pytest.mark.parametrize("name,built,geometry", TABLES)
def test_tables_under_jit_give_nan_outside_and_exact_rows_inside(name, built, geometry):
  enc = build(name, built)
  positions = np.asarray(geometry.positions()).repeat(2, axis=0)
  if built.ndim == 1:
    positions[0, 1], positions[0, 3], positions[1, 4] = 8, -1, 100
  else:
    positions[0, 2] = (0, 4)    # flat index 4: would alias row (1, 0)
    positions[0, 5] = (-1, 5)   # flat index 1: would alias row (0, 1)
    positions[1, 7] = (3, 0)    # flat index 12: one past the end (a clamp gives row 11)
    positions[1, 0] = (2, -1)
  x, out = embedded(enc, geometry, positions)  # traced positions: no concrete check
  want = table_rows(enc, positions)
  outside = np.isnan(want).all(-1)
  assert outside.sum() in (3, 4) and not np.isnan(want[~outside]).any()
  got = out[:, geometry.num_prefix:]
  assert np.isnan(got[outside]).all()  # never a silent clamp or wrap
  np.testing.assert_allclose(got[~outside], (x[:, geometry.num_prefix:] + want)[~outside],
                             rtol=0, atol=1e-7)


@pytest.mark.parametrize("name,geometry", [("sinusoidal", Geometry.seq(7, num_prefix=1)),
                                           ("sincos2d", GRID)])


def test_fixed_tables_take_real_positions(name, geometry):
  enc = build(name, geometry)
  assert enc.continuous is True
  real = random_positions(geometry, -20, 20)  # [2, N, ndim], one set per example
  x, out = embedded(enc, geometry, real)
  pe = out[:, geometry.num_prefix:] - x[:, geometry.num_prefix:]
  assert np.isfinite(pe).all() and not np.allclose(pe[0], pe[1], atol=1e-3)
  closed = vaswani_at if name == "sinusoidal" else mocov3_at
  for b in range(2):
    want = closed(real[b, :, 0] if name == "sinusoidal" else real[b], D)
    np.testing.assert_allclose(pe[b], want, atol=2e-5)
  # Integer-valued float positions give exactly the int32 result.
  ints = random_positions(geometry, -30, 30, dtype=np.int32, seed=1)
  np.testing.assert_array_equal(embed(enc, x, geometry, ints.astype(np.float32)),
                                embed(enc, x, geometry, ints))
  np.testing.assert_array_equal(embed(enc, x, geometry, geometry.positions().astype(jnp.float32)),
                                embed(enc, x, geometry))


def test_sinusoidal_table_closed_form_at_real_positions():
  """``table(p)[2i] = sin(p / T^(2i/D))``, ``[2i+1] = cos(...)`` at real p, two temperatures."""
  p = np.random.default_rng(2).uniform(-20, 20, size=(1, 11, 1)).astype(np.float32)
  p[0, :3, 0] = (0.0, 0.25, -1e-3)
  for temperature in (10_000., 100.):
    enc = build("sinusoidal", Geometry.seq(11), temperature=temperature)
    table = np.asarray(jax.jit(enc.table)(jnp.asarray(p)))
    assert table.shape == (1, 11, D)
    np.testing.assert_allclose(table[0], vaswani_at(p[0, :, 0], D, temperature), atol=2e-5)
    np.testing.assert_allclose(table[0, 0], np.tile([0.0, 1.0], D // 2), atol=0)  # p = 0


# --- learned: resample (FlexiViT-style, any grid) ---

def test_learned_resample_at_the_built_grid_changes_nothing():
  x = tokens(GRID)
  np.testing.assert_array_equal(embed(build("learned", GRID, resample=True), x, GRID),
                                embed(build("learned", GRID), x, GRID))


@pytest.mark.parametrize("other", [Geometry.grid(5, 6, num_prefix=1), Geometry.grid(2, 3, num_prefix=1)])
def test_learned_resample_elsewhere_adds_the_resized_table_with_gradients(other):
  from posenc.resize import resize_grid
  enc = build("learned", GRID, resample=True)
  x = tokens(other)
  graphdef, params, rest = nnx.split(enc, nnx.Param, ...)

  def both(params, x):
    table = params["table"][...]
    out = nnx.merge(graphdef, params, rest).embed(x, other, other.positions())
    want = x.at[:, 1:].add(resize_grid(table, GRID.shape, other.shape, method="bicubic"))
    return out, want

  out, want = jax.jit(both)(params, x)
  np.testing.assert_array_equal(out, want)  # exactly resize_grid's table (bicubic, antialiased)
  assert out.shape == (2, other.num_tokens, D)
  grad = jax.jit(jax.grad(lambda p: jnp.sum(both(p, x)[0] ** 2)))(params)["table"][...]
  assert np.isfinite(grad).all() and np.all(np.abs(grad).sum(axis=-1) > 0)  # every stored row learns


def test_learned_resample_options_and_the_transfer_error_without_it():
  other = Geometry.grid(5, 6, num_prefix=1)
  with pytest.raises(ValueError, match=r"'learned' was built for the 3x4 grid.*posenc\.transfer"):
    embed(build("learned", GRID, resample=False), tokens(other), other)
  with pytest.raises(ValueError, match=r"resample=True resamples a 2D or 3D grid table"):
    build("learned", SEQ, resample=True)
  with pytest.raises(ValueError, match=r"resample_method must be one of .*'cubic'"):
    build("learned", GRID, resample=True, resample_method="cubic")
  nearest = build("learned", GRID, resample=True, resample_method="nearest")
  out = np.asarray(embed(nearest, tokens(Geometry.grid(6, 8, num_prefix=1)),
                         Geometry.grid(6, 8, num_prefix=1)))
  table = np.asarray(nearest.table[...]).reshape(3, 4, D)
  x = np.asarray(tokens(Geometry.grid(6, 8, num_prefix=1)))
  np.testing.assert_allclose((out - x)[:, 1:].reshape(2, 6, 8, D)[:, ::2, ::2], np.broadcast_to(table, (2, 3, 4, D)),
                             rtol=1e-6, atol=1e-6)
