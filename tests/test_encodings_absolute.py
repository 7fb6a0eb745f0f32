"""Absolute encodings: learned, factorized, sinusoidal, sincos2d, none."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posenc.encodings import Geometry, make

D = 16
SEQ = Geometry.seq(8, num_prefix=1)
GRID = Geometry.grid(3, 4, num_prefix=1)


def build(name, geometry, dim=D, param_dtype=jnp.float32, **options):
  """Build as a model does: every context key, plus encoding options."""
  return make(name, dim=dim, num_heads=2, num_layers=2, geometry=geometry,
              param_dtype=param_dtype, rngs=nnx.Rngs(0), **options)


def num_params(module) -> int:
  return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(module, nnx.Param)))


def tokens(geometry, dim=D, batch=2, dtype=jnp.float32, seed=0):
  x = np.random.default_rng(seed).standard_normal((batch, geometry.num_tokens, dim))
  return jnp.asarray(x.astype(jnp.dtype(dtype)))  # cast on the host: no compile


@nnx.jit(static_argnums=2)
def _embed(enc, x, geometry, positions):
  return enc.embed(x, geometry, positions)


def embed(enc, x, geometry, positions=None):
  """``enc.embed`` under jit: one compile, shared by encodings of one structure.

  ``positions`` (default: the geometry's grid) are traced data, as in a model.
  """
  return _embed(enc, x, geometry, geometry.positions() if positions is None else jnp.asarray(positions))


# Independent numpy references, written from the papers' formulas.
def vaswani_numpy(length, dim, temperature=10_000.):
  pe = np.zeros((length, dim))
  for pos in range(length):
    for i in range(dim // 2):
      angle = pos / temperature**(2 * i / dim)
      pe[pos, 2 * i] = math.sin(angle)
      pe[pos, 2 * i + 1] = math.cos(angle)
  return pe


def vaswani_at(positions, dim, temperature=10_000.):
  """The same closed form at any (real) positions ``[N]``, float64."""
  i = np.arange(dim // 2)
  angle = np.asarray(positions, np.float64)[:, None] / temperature**(2 * i / dim)
  return np.stack([np.sin(angle), np.cos(angle)], axis=-1).reshape(len(angle), dim)


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


def mocov3_at(coords, dim, temperature=10_000.):
  """The same closed form at any (real) ``(row, col)`` coordinates ``[N, 2]``, float64."""
  quarter = dim // 4
  omega = temperature**(-np.arange(quarter) / (quarter - 1))
  y, x = (np.asarray(coords, np.float64)[:, a, None] * omega for a in (0, 1))
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=-1)


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
  with pytest.raises(ValueError, match=r"resample=True resamples a 2D grid table"):
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


# --- sincos2d: CAPE ---
