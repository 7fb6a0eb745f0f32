"""posenc.resize against torch F.interpolate / scipy.ndimage.zoom, plus sharding."""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from posenc.resize import METHODS, resize_1d, resize_grid, resize_grid3d, resize_table

scipy = pytest.importorskip("scipy", reason="no scipy (pip install -e .[test])")
torch = pytest.importorskip("torch", reason="no torch (pip install -e .[test])")
import scipy.ndimage  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# (old_hw, new_hw): rectangular up, rectangular down, same token count, one axis fixed.
CASES = [((7, 5), (11, 13)), ((12, 10), (5, 7)), ((2, 8), (4, 4)), ((5, 7), (5, 9))]
# method, antialias -> torch mode, antialias
TORCH_METHODS = [("bicubic", True, "bicubic", True), ("bicubic", False, "bicubic", False),
                 ("bicubic_torch", False, "bicubic", False),
                 ("bilinear", True, "bilinear", True), ("bilinear", False, "bilinear", False),
                 ("nearest", False, "nearest", False)]


def _random(shape, seed=0, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _torch_resize(grid: np.ndarray, new_hw, mode: str, antialias: bool) -> np.ndarray:
  """Reference: grid (..., h, w, C) -> (..., nh, nw, C) with torch F.interpolate."""
  lead, (h, w, c) = grid.shape[:-3], grid.shape[-3:]
  t = torch.from_numpy(grid.reshape(-1, h, w, c)).permute(0, 3, 1, 2)
  kwargs = {} if mode == "nearest" else {"align_corners": False, "antialias": antialias}
  out = F.interpolate(t, size=tuple(new_hw), mode=mode, **kwargs)
  return out.permute(0, 2, 3, 1).numpy().reshape(*lead, *new_hw, c)


def _scipy_zoom(grid: np.ndarray, new_hw) -> np.ndarray:
  """Reference: big_vision's scipy.ndimage.zoom(order=1) on each (h, w, C) grid."""
  lead, (h, w, c) = grid.shape[:-3], grid.shape[-3:]
  zoom = (new_hw[0] / h, new_hw[1] / w, 1)
  out = [scipy.ndimage.zoom(g, zoom, order=1) for g in grid.reshape(-1, h, w, c)]
  return np.stack(out).reshape(*lead, *new_hw, c)


def _check_against(reference, method, antialias, old_hw, new_hw, prefix, lead):
  (h, w), (nh, nw), dim = old_hw, new_hw, 6
  emb = _random((*lead, prefix + h * w, dim), seed=prefix)
  out = np.asarray(resize_grid(jnp.asarray(emb), old_hw, new_hw, method=method,
                               antialias=antialias, num_prefix_tokens=prefix))
  assert out.shape == (*lead, prefix + nh * nw, dim)
  np.testing.assert_array_equal(out[..., :prefix, :], emb[..., :prefix, :])
  expected = reference(emb[..., prefix:, :].reshape(*lead, h, w, dim))
  np.testing.assert_allclose(out[..., prefix:, :].reshape(*lead, nh, nw, dim), expected,
                             rtol=0, atol=1e-5)


# Every case once with each prefix count / leading batch axes.
CASES_WITH_PREFIX = [(*case, prefix, lead) for case in CASES
                     for prefix, lead in [(0, ()), (1, (2,)), (2, (2, 3))]]


@pytest.mark.parametrize("old_hw,new_hw,prefix,lead", CASES_WITH_PREFIX)
@pytest.mark.parametrize("method,antialias,mode,torch_aa", TORCH_METHODS)
def test_matches_torch(old_hw, new_hw, prefix, lead, method, antialias, mode, torch_aa):
  reference = lambda g: _torch_resize(g, new_hw, mode, torch_aa)
  _check_against(reference, method, antialias, old_hw, new_hw, prefix, lead)


@pytest.mark.parametrize("old_hw,new_hw", CASES)
@pytest.mark.parametrize("prefix,lead", [(0, ()), (2, (3,))])
def test_bilinear_aligned_matches_scipy_zoom(old_hw, new_hw, prefix, lead):
  reference = lambda g: _scipy_zoom(g, new_hw)
  _check_against(reference, "bilinear_aligned", True, old_hw, new_hw, prefix, lead)


def test_antialias_changes_bicubic_and_bilinear_only():
  # Shrinking: both antialiased filters widen. Growing: torch's antialiased
  # bicubic still differs (a=-0.5, PIL's kernel, vs a=-0.75); bilinear does not.
  emb = jnp.asarray(_random((12 * 10, 4)))
  for new_hw, changed in (((5, 7), ("bicubic", "bilinear")), ((19, 23), ("bicubic",))):
    for method in METHODS:
      on, off = (resize_grid(emb, (12, 10), new_hw, method=method, antialias=a)
                 for a in (True, False))
      assert (not np.allclose(on, off, atol=1e-4)) == (method in changed), (method, new_hw)


def test_same_token_count_really_resizes():
  emb = jnp.asarray(_random((1 + 16, 4)))
  out = resize_grid(emb, (2, 8), (4, 4), num_prefix_tokens=1)
  assert out.shape == emb.shape
  assert not np.allclose(out[1:], emb[1:], atol=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_same_geometry_is_identity(method):
  emb = jnp.asarray(_random((2, 1 + 7 * 5, 4)))
  assert resize_grid(emb, (7, 5), (7, 5), method=method, num_prefix_tokens=1) is emb
  table = jnp.asarray(_random((13 * 9, 3)))
  assert resize_table(table, (7, 5), (7, 5), method=method) is table
  assert resize_1d(table, 13 * 9, method=method) is table


def test_constant_grid_stays_constant():
  # Every kernel's weights sum to one: a constant embedding must survive any resize.
  emb = jnp.full((1 + 12 * 10, 3), 0.25, jnp.float32).at[0].set(7.0)
  for method in METHODS:
    for antialias in (True, False):
      for new_hw in ((5, 7), (19, 23)):
        out = resize_grid(emb, (12, 10), new_hw, method=method, antialias=antialias,
                          num_prefix_tokens=1)
        np.testing.assert_allclose(out[1:], 0.25, atol=1e-6, err_msg=f"{method} {antialias}")
        assert out[0, 0] == 7.0


@pytest.mark.parametrize("method", ["bicubic", "bicubic_torch", "bilinear"])
def test_bfloat16_in_bfloat16_out(method):
  grid = _random((7, 5, 4))
  emb = jnp.asarray(grid.reshape(35, 4), jnp.bfloat16)
  out = resize_grid(emb, (7, 5), (11, 13), method=method)
  assert out.dtype == jnp.bfloat16
  mode, aa = ("bicubic", method == "bicubic") if method != "bilinear" else ("bilinear", True)
  exact = _torch_resize(np.asarray(emb, np.float32).reshape(7, 5, 4), (11, 13), mode, aa)
  np.testing.assert_allclose(np.asarray(out, np.float32).reshape(11, 13, 4), exact,
                             rtol=2 ** -7, atol=1e-6)


# ----------------------------------------------------------------------------
# resize_table (Swin) and resize_1d
# ----------------------------------------------------------------------------

def _swin_torch(table: np.ndarray, old_hw, new_hw) -> np.ndarray:
  """Swin's recipe, per layer: (offsets, heads) -> heads x (2h-1) x (2w-1) image ->
  bicubic (align_corners=False) to (2nh-1) x (2nw-1) -> back to (offsets, heads)."""
  old_size = (2 * old_hw[0] - 1, 2 * old_hw[1] - 1)
  new_size = (2 * new_hw[0] - 1, 2 * new_hw[1] - 1)
  out = []
  for layer_table in table:
    t = torch.from_numpy(layer_table).permute(1, 0).reshape(1, -1, *old_size)
    t = F.interpolate(t, size=new_size, mode="bicubic", align_corners=False)
    out.append(t.reshape(t.shape[1], -1).permute(1, 0).numpy())
  return np.stack(out)


@pytest.mark.parametrize("old_hw,new_hw", [((7, 7), (12, 12)), ((4, 6), (3, 5))])
def test_resize_table_matches_swin_recipe(old_hw, new_hw):
  layers, heads = 3, 4
  table = _random((layers, (2 * old_hw[0] - 1) * (2 * old_hw[1] - 1), heads))
  out = np.asarray(resize_table(jnp.asarray(table), old_hw, new_hw))
  assert out.shape == (layers, (2 * new_hw[0] - 1) * (2 * new_hw[1] - 1), heads)
  np.testing.assert_allclose(out, _swin_torch(table, old_hw, new_hw), rtol=0, atol=1e-5)
  # One table without the layer axis gives the same as the first layer.
  single = np.asarray(resize_table(jnp.asarray(table[0]), old_hw, new_hw))
  np.testing.assert_allclose(single, out[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("old,new", [(9, 20), (20, 9)])
@pytest.mark.parametrize("method,antialias,mode", [("bicubic", True, "bicubic"),
                                                   ("bicubic_torch", False, "bicubic"),
                                                   ("bilinear", False, "bilinear"),
                                                   ("bilinear", True, "bilinear"),
                                                   ("nearest", False, "nearest")])
def test_resize_1d_matches_torch(old, new, method, antialias, mode):
  table = _random((2, old, 5))
  out = np.asarray(resize_1d(jnp.asarray(table), new, method=method, antialias=antialias))
  # torch's 1D modes lack antialias/bicubic: resize a 1-row image instead.
  t = torch.from_numpy(table).permute(0, 2, 1)[:, :, None]
  kwargs = {} if mode == "nearest" else {"align_corners": False, "antialias": antialias}
  ref = F.interpolate(t, size=(1, new), mode=mode, **kwargs)[:, :, 0]
  np.testing.assert_allclose(out, ref.permute(0, 2, 1).numpy(), rtol=0, atol=1e-5)


def test_nearest_rounds_like_torch_float32():
  # 26 -> 22: torch's float32 floor(i * 26/22) picks row 12 at i=11 (exact: 13).
  rows = np.arange(26, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
  out = np.asarray(resize_1d(jnp.asarray(rows), 22, method="nearest"))
  t = torch.from_numpy(rows.T.copy())[None, :, None]
  ref = F.interpolate(t, size=(1, 22), mode="nearest")[0, :, 0].numpy().T
  np.testing.assert_array_equal(out, ref)


def test_resize_1d_matches_scipy_zoom():
  table = _random((11, 5))
  out = np.asarray(resize_1d(jnp.asarray(table), 17, method="bilinear_aligned"))
  ref = scipy.ndimage.zoom(table, (17 / 11, 1), order=1)
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_factorized_tables_resize_like_their_grid(method):
  # A factorized embedding is row[i] + col[j]; resizing both 1D tables must equal
  # resizing the 2D grid they add up to (same separable kernels).
  rows, cols = _random((7, 4), seed=1), _random((5, 4), seed=2)
  grid = (rows[:, None] + cols[None, :]).reshape(35, 4)
  new_rows, new_cols = resize_1d(jnp.asarray(rows), 11, method=method), resize_1d(
      jnp.asarray(cols), 3, method=method)
  expected = resize_grid(jnp.asarray(grid), (7, 5), (11, 3), method=method)
  np.testing.assert_allclose((new_rows[:, None] + new_cols[None, :]).reshape(33, 4), expected,
                             rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------
# 3D (t, h, w) grids
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("method,mode", [("bilinear", "trilinear"), ("nearest", "nearest")])
@pytest.mark.parametrize("old,new", [((3, 4, 5), (5, 2, 7)), ((2, 3, 3), (2, 6, 3))])
def test_grid3d_matches_torch_trilinear_and_nearest(method, mode, old, new):
  dim, prefix = 3, 1
  emb = _random((2, prefix + int(np.prod(old)), dim))
  out = np.asarray(resize_grid3d(jnp.asarray(emb), old, new, method=method, antialias=False,
                                 num_prefix_tokens=prefix))
  np.testing.assert_array_equal(out[:, :prefix], emb[:, :prefix])
  grid = torch.from_numpy(emb[:, prefix:].reshape(2, *old, dim)).permute(0, 4, 1, 2, 3)
  kwargs = {} if mode == "nearest" else {"align_corners": False}
  expected = F.interpolate(grid, size=new, mode=mode, **kwargs).permute(0, 2, 3, 4, 1).numpy()
  np.testing.assert_allclose(out[:, prefix:].reshape(2, *new, dim), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_grid3d_is_separable_frames_resize_like_2d_grids(method):
  frame = _random((4 * 5, 3))
  video = np.tile(frame, (3, 1))  # three equal frames: constant along t
  out = resize_grid3d(jnp.asarray(video), (3, 4, 5), (2, 6, 3), method=method)
  expected = resize_grid(jnp.asarray(frame), (4, 5), (6, 3), method=method)
  np.testing.assert_allclose(np.asarray(out).reshape(2, 18, 3), np.stack([expected] * 2), rtol=0, atol=1e-5)
  same = jnp.asarray(video)
  assert resize_grid3d(same, (3, 4, 5), (3, 4, 5), method=method) is same


def test_grid3d_clear_errors():
  emb = jnp.zeros((25, 4), jnp.float32)
  with pytest.raises(ValueError, match=r"resize_grid3d: emb of shape \(25, 4\) .*old grid 2x3x4 needs 24"):
    resize_grid3d(emb, (2, 3, 4), (2, 2, 2))
  with pytest.raises(ValueError, match=r"old_thw must be 3 positive Python ints"):
    resize_grid3d(emb, (5, 5), (2, 2, 2))


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("call,match", [
    (lambda e: resize_grid(e, (7, 5), (4, 4)), r"\(37, 4\).*37 rows.*num_prefix_tokens=0.*7x5.*35"),
    (lambda e: resize_grid(e, (6, 5), (4, 4), num_prefix_tokens=1), r"needs 31"),
    (lambda e: resize_grid(e, (7, 5), (4, 4), num_prefix_tokens=2, method="cubic"),
     r"Unknown resize method 'cubic'.*bicubic, bicubic_torch, bilinear, bilinear_aligned, nearest"),
    (lambda e: resize_grid(e, (7, 5), (4, 4), num_prefix_tokens=2, antialias="yes"), r"antialias"),
    (lambda e: resize_grid(e, 35, (4, 4), num_prefix_tokens=2), r"old_hw must be 2 positive"),
    (lambda e: resize_grid(e, (7, 5), (4.0, 4), num_prefix_tokens=2), r"new_hw must be 2 positive"),
    (lambda e: resize_grid(e, (7, 5), (0, 4), num_prefix_tokens=2), r"new_hw must be 2 positive"),
    (lambda e: resize_grid(e, (7, 5), (4, 4), num_prefix_tokens=-2), r"num_prefix_tokens must be"),
    (lambda e: resize_grid(e, (7, 5), (4, 4), num_prefix_tokens=2.0), r"num_prefix_tokens must be"),
    (lambda e: resize_grid(e[0], (7, 5), (4, 4)), r"at least 2 dims.*\(4,\)"),
    (lambda e: resize_grid(e.astype(jnp.int32), (7, 5), (4, 4), num_prefix_tokens=2),
     r"floating point.*int32"),
    (lambda e: resize_table(e, (3, 3), (4, 4)), r"37 rows.*3x3 window.*25"),
    (lambda e: resize_1d(e, 0), r"new_len must be 1 positive"),
])
def test_clear_errors(call, match):
  emb = jnp.zeros((37, 4), jnp.float32)
  with pytest.raises(ValueError, match=match):
    call(emb)


# ----------------------------------------------------------------------------
# Sharding: jit with in/out shardings on 8 simulated devices, no host transfers
# ----------------------------------------------------------------------------

_HOST_OP = re.compile(r"\b(infeed|outfeed|send|send-done|recv|recv-done)\(")
_HOST_CALL = re.compile(r'custom_call_target="[^"]*(host|callback|Host)[^"]*"')


def _host_transfers(hlo: str) -> list[str]:
  return [l for l in hlo.splitlines() if _HOST_OP.search(l) or _HOST_CALL.search(l)]


def test_host_transfer_check_can_fail():
  # The detector must flag a function that calls back into Python on the host.
  def via_host(x):
    return jax.pure_callback(lambda a: np.asarray(a) * 2, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
  hlo = jax.jit(via_host).lower(jnp.ones(4)).compile().as_text()
  assert _host_transfers(hlo)


def _mesh(shape, names):
  assert jax.device_count() == 8, "tests/conftest.py should give 8 simulated CPU devices"
  return Mesh(np.asarray(jax.devices()).reshape(shape), names)


def _check_sharded(fn, x: np.ndarray, mesh, in_spec, out_spec):
  expected = np.asarray(fn(jnp.asarray(x)))
  in_s, out_s = NamedSharding(mesh, in_spec), NamedSharding(mesh, out_spec)
  jitted = jax.jit(fn, in_shardings=in_s, out_shardings=out_s)
  arg = jax.device_put(x, in_s)
  out = jitted(arg)
  assert out.sharding.is_equivalent_to(out_s, out.ndim), (out.sharding, out_s)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=1e-6)
  assert _host_transfers(jitted.lower(arg).compile().as_text()) == []


GRID = functools.partial(resize_grid, old_hw=(6, 5), new_hw=(5, 6), num_prefix_tokens=2)


# The methods share one code path (only the constant matrices differ): one each.
@pytest.mark.parametrize("method,in_spec,out_spec", [
    ("bicubic", P(None, "model"), P(None, "model")),  # along D
    ("nearest", P("model", None), P(None, "model")),  # along positions in, D out
    ("bilinear_aligned", P(None, "model"), P("model", None)),  # along D in, positions out
])
def test_jit_sharded_grid_1d_mesh(method, in_spec, out_spec):
  fn = functools.partial(GRID, method=method)
  _check_sharded(fn, _random((2 + 30, 16)), _mesh((8,), ("model",)), in_spec, out_spec)


def test_jit_sharded_grid_data_model_mesh():
  fn = functools.partial(GRID, method="bicubic_torch")
  mesh = _mesh((2, 4), ("data", "model"))
  _check_sharded(fn, _random((4, 2 + 30, 8)), mesh, P("data", None, "model"),
                 P("data", None, "model"))
  _check_sharded(fn, _random((2 + 30, 8)), mesh, P("data", "model"), P("model", "data"))


def test_jit_sharded_table_and_1d():
  mesh = _mesh((2, 4), ("data", "model"))
  table = functools.partial(resize_table, old_hw=(4, 3), new_hw=(6, 5))
  _check_sharded(table, _random((2, 7 * 5, 8)), mesh, P("data", None, "model"),
                 P("data", None, "model"))
  _check_sharded(functools.partial(resize_1d, new_len=24), _random((16, 8)), mesh,
                 P("data", "model"), P("model", "data"))
