"""Absolute encodings (learned, factorized, sinusoidal, sincos2d, none) at the geometry's grid:
parameter counts, values against the papers' formulas, clear errors, jit, gradients and dtypes.
Positions given as data and learned's resampling are in test_encodings_absolute_positions.py."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ABSOLUTE_DIM as D, ABSOLUTE_SEQ as SEQ, GRID, embed, num_params, tokens
from conftest import build_absolute as build
from posenc.encodings import Geometry


# Independent numpy references, written from the papers' formulas.
def vaswani_numpy(length, dim, temperature=10_000.):
  pe = np.zeros((length, dim))
  for pos in range(length):
    for i in range(dim // 2):
      angle = pos / temperature**(2 * i / dim)
      pe[pos, 2 * i] = math.sin(angle)
      pe[pos, 2 * i + 1] = math.cos(angle)
  return pe


def mocov3_numpy(h, w, dim, temperature=10_000.):
  """[sin(x w), cos(x w), sin(y w), cos(y w)], x = column, y = row, row-major."""
  quarter = dim // 4
  omega = np.array([temperature**(-k / (quarter - 1)) for k in range(quarter)])
  rows = []
  for y in range(h):
    for x in range(w):
      rows.append(np.concatenate([np.sin(x * omega), np.cos(x * omega),
                                  np.sin(y * omega), np.cos(y * omega)]))
  return np.stack(rows)


def added(enc, geometry, dim=D):
  """What ``embed`` adds to the position tokens (prefix checked untouched)."""
  x = np.asarray(tokens(geometry, dim))
  out = np.asarray(embed(enc, x, geometry))
  np.testing.assert_array_equal(out[:, :geometry.num_prefix], x[:, :geometry.num_prefix])
  delta = out[:, geometry.num_prefix:] - x[:, geometry.num_prefix:]
  np.testing.assert_allclose(delta[0], delta[1], atol=1e-6)  # same for every example
  return delta[0]


# --- parameter counts (the seed tables) ---

def test_learned_1d_bert_table_has_512x768_params():
  enc = build("learned", Geometry.seq(512), dim=768)
  assert num_params(enc) == 393_216 == 512 * 768
  assert enc.table.shape == (512, 768)
  assert enc.built == Geometry.seq(512)
  assert "built" not in nnx.state(enc)  # static, not a leaf
  assert enc.table.get_metadata()["out_sharding"] == ("posn", "embed")


def test_learned_2d_grid_table_excludes_prefix_tokens():
  enc = build("learned", GRID)  # 3x4 grid + class token
  assert num_params(enc) == 3 * 4 * D
  assert enc.built == GRID and enc.built.shape == (3, 4)


def test_factorized_has_row_plus_column_params():
  enc = build("factorized", GRID)
  assert num_params(enc) == (3 + 4) * D
  assert enc.row_table.shape == (3, D) and enc.col_table.shape == (4, D)
  for table in (enc.row_table, enc.col_table):
    assert table.get_metadata()["out_sharding"] == ("posn", "embed")


@pytest.mark.parametrize("name,geometry", [("sinusoidal", SEQ), ("sincos2d", GRID),
                                           ("none", SEQ), ("none", GRID)])


def test_fixed_encodings_have_no_params(name, geometry):
  assert num_params(build(name, geometry)) == 0


def test_learned_init_is_plain_normal_with_init_std():
  table = np.asarray(build("learned", Geometry.seq(512), dim=768).table[...])
  assert abs(table.mean()) < 1e-3
  assert table.std() == pytest.approx(0.02, rel=0.01)
  assert np.abs(table).max() > 3 * 0.02  # not truncated at 2 std
  wide = np.asarray(build("learned", Geometry.seq(512), dim=768, init_std=0.5).table[...])
  assert wide.std() == pytest.approx(0.5, rel=0.01)


# --- values ---

def test_learned_1d_shorter_sequence_uses_first_rows():
  enc = build("learned", Geometry.seq(8))
  short = Geometry.seq(6, num_prefix=2)
  np.testing.assert_allclose(added(enc, short), enc.table[...][:6], atol=1e-6)


def test_learned_2d_adds_grid_table_row_major():
  enc = build("learned", GRID)
  np.testing.assert_allclose(added(enc, GRID), enc.table[...], atol=1e-6)


def test_factorized_adds_row_plus_column():
  enc = build("factorized", GRID)
  rows, cols = np.asarray(enc.row_table[...]), np.asarray(enc.col_table[...])
  want = np.stack([rows[i] + cols[j] for i in range(3) for j in range(4)])
  np.testing.assert_allclose(added(enc, GRID), want, atol=1e-6)
  # A smaller grid indexes the same tables (NaViT): positions keep their vectors.
  small = Geometry.grid(2, 3, num_prefix=0)
  want = np.stack([rows[i] + cols[j] for i in range(2) for j in range(3)])
  np.testing.assert_allclose(added(enc, small), want, atol=1e-6)


@pytest.mark.parametrize("length,temperature", [(8, 10_000.), (37, 10_000.), (20, 100.)])
def test_sinusoidal_matches_vaswani(length, temperature):
  geometry = Geometry.seq(length, num_prefix=1)
  enc = build("sinusoidal", geometry, temperature=temperature)
  np.testing.assert_allclose(added(enc, geometry), vaswani_numpy(length, D, temperature),
                             atol=2e-5)


@pytest.mark.parametrize("name,geometry", [("sinusoidal", SEQ), ("sincos2d", GRID)])
def test_fixed_tables_scale(name, geometry):
  unit = added(build(name, geometry), geometry)
  np.testing.assert_allclose(added(build(name, geometry, scale=0.03), geometry), 0.03 * unit, atol=2e-6)
  assert np.abs(unit).max() > 0.9  # the default amplitude is 1


@pytest.mark.parametrize("h,w,dim,temperature", [(3, 4, 16, 10_000.), (5, 2, 32, 10_000.),
                                                 (4, 4, 8, 100.)])


def test_sincos2d_matches_mocov3(h, w, dim, temperature):
  geometry = Geometry.grid(h, w, num_prefix=1)
  enc = build("sincos2d", geometry, dim=dim, temperature=temperature)
  np.testing.assert_allclose(added(enc, geometry, dim), mocov3_numpy(h, w, dim, temperature),
                             atol=2e-5)


@pytest.mark.parametrize("geometry", [SEQ, GRID, Geometry.seq(5)])
def test_none_is_identity(geometry):
  x = tokens(geometry)
  np.testing.assert_array_equal(embed(build("none", geometry), x, geometry), x)


# --- clear errors (raised while tracing, so also under jit) ---

def test_learned_1d_too_long_says_raise_max_len_or_transfer():
  enc = build("learned", Geometry.seq(8))
  geometry = Geometry.seq(9)
  with pytest.raises(ValueError, match=r"'learned' has max_len=8.*1D 9.*raise max_len.*"
                                       r"posenc\.transfer"):
    embed(enc, tokens(geometry), geometry)


@pytest.mark.parametrize("name,other", [("learned", Geometry.grid(4, 3, num_prefix=1)),
                                        ("learned", Geometry.grid(2, 4)),
                                        ("factorized", Geometry.grid(4, 4))])


def test_wrong_grid_says_transfer(name, other):
  enc = build(name, GRID)
  with pytest.raises(ValueError, match=rf"'{name}' was built for the 3x4 grid.*2D {other.shape[0]}"
                                       r"x.*posenc\.transfer.*init_from.*image_size"):
    embed(enc, tokens(other), other)


def test_learned_built_1d_refuses_2d_and_vice_versa():
  with pytest.raises(ValueError, match=r"'learned' was built for 1D .*cannot serve 2D 3x4"):
    embed(build("learned", SEQ), tokens(GRID), GRID)
  with pytest.raises(ValueError, match=r"'learned' was built for 2D .*cannot serve 1D 8"):
    embed(build("learned", GRID), tokens(SEQ), SEQ)


@pytest.mark.parametrize("name,geometry,supports", [("sinusoidal", GRID, "1D"),
                                                    ("sincos2d", SEQ, "2D"),
                                                    ("factorized", SEQ, "2D")])


def test_unsupported_ndim_is_refused(name, geometry, supports):
  with pytest.raises(ValueError, match=rf"'{name}' supports {supports} inputs, not "):
    build(name, geometry)  # at construction, by make
  if name != "factorized":  # and when called at such a geometry
    built = SEQ if geometry is GRID else GRID
    with pytest.raises(ValueError, match=rf"'{name}' supports {supports} inputs, not "):
      embed(build(name, built), tokens(geometry), geometry)


def test_dimension_errors():
  with pytest.raises(ValueError, match=r"'sincos2d' needs dim divisible by 4.*dim=18"):
    build("sincos2d", GRID, dim=18)
  with pytest.raises(ValueError, match=r"'sincos2d' needs .*at least 8.*dim=4"):
    build("sincos2d", GRID, dim=4)
  with pytest.raises(ValueError, match=r"'sinusoidal' needs dim divisible by 2 .*dim=15"):
    build("sinusoidal", SEQ, dim=15)
  with pytest.raises(ValueError, match=r"'sinusoidal' needs .*at least 4.*dim=2"):
    build("sinusoidal", SEQ, dim=2)
  assert num_params(build("sinusoidal", SEQ, dim=4)) == 0  # the smallest allowed
  assert num_params(build("sincos2d", GRID, dim=8)) == 0


def test_wrong_token_shape_is_refused():
  enc = build("sincos2d", GRID)
  with pytest.raises(ValueError,
                     match=r"expects tokens \[B, T, D\] with T=13 .*D=16.*\(2, 12, 16\)"):
    embed(enc, np.zeros((2, 12, D)), GRID)  # forgot the class token
  with pytest.raises(ValueError, match=r"expects tokens .*D=16.*\(2, 13, 8\)"):
    embed(build("learned", GRID), np.zeros((2, 13, 8)), GRID)


# --- jit, gradients, dtypes ---

CASES = [  # (name, geometry built at, two geometries to call at)
    ("learned", Geometry.seq(8), (Geometry.seq(8, num_prefix=1), Geometry.seq(5))),
    ("learned", GRID, (GRID, Geometry.grid(3, 4, num_prefix=2))),
    ("factorized", GRID, (GRID, Geometry.grid(2, 3))),
    ("sinusoidal", SEQ, (SEQ, Geometry.seq(13, num_prefix=2))),
    ("sincos2d", GRID, (GRID, Geometry.grid(5, 2))),
    ("none", SEQ, (SEQ, Geometry.grid(2, 2, num_prefix=1))),
]


@pytest.mark.parametrize("name,built,geometries", CASES)
def test_jit_retraces_per_geometry_with_finite_grads(name, built, geometries):
  enc = build(name, built)
  graphdef, params, rest = nnx.split(enc, nnx.Param, ...)
  traces = []

  def loss(params, x, geometry):
    traces.append(geometry)
    return jnp.sum(nnx.merge(graphdef, params, rest).embed(x, geometry, geometry.positions()) ** 2)

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
  for geometry in geometries:
    x = tokens(geometry)
    value, (g_params, g_x) = grad(params, x, geometry)
    out = embed(enc, x, geometry)
    assert np.isfinite(value) and np.isfinite(g_x).all()
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(g_params))
    np.testing.assert_allclose(g_x, 2 * out, rtol=1e-5, atol=1e-6)  # d sum(y^2)/dx, y = x + pe
    if name == "learned" and geometry.ndim == 1:  # rows past L get no gradient
      assert not np.any(g_params["table"][...][geometry.num_positions:])
  grad(params, tokens(geometries[0]), geometries[0])
  assert traces == list(geometries)  # one trace per geometry, none for a repeat


@pytest.mark.parametrize("name,built,geometries", CASES)
def test_bf16_in_bf16_out(name, built, geometries):
  geometry = geometries[0]
  x = tokens(geometry, dtype=jnp.bfloat16)
  for param_dtype in (jnp.float32, jnp.bfloat16):
    enc = build(name, built, param_dtype=param_dtype)
    out = embed(enc, x, geometry)
    assert out.dtype == jnp.bfloat16
    ref = embed(enc, jnp.asarray(np.asarray(x, np.float32)), geometry)  # same x, in f32
    # Tolerance: about one bf16 ulp of x and one of pe.
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=8e-3, atol=4e-3)
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(nnx.state(enc, nnx.Param)))
