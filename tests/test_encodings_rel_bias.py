"""rel_bias: T5's buckets (1D) and Swin's offset table (2D), checked against HF transformers' T5
and Swin code, at the geometry's grid and at positions given as data."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="no torch (pip install -e .[test])")
pytest.importorskip("transformers", reason="no transformers (pip install -e .[test])")
from transformers import T5Config  # noqa: E402
from transformers.models.swin.modeling_swin import SwinRelativePositionBias  # noqa: E402
from transformers.models.t5.modeling_t5 import T5Attention  # noqa: E402

from conftest import BIAS_HEADS as H, BIAS_SEQ as SEQ, GRID, bias_of, int_positions, randomize  # noqa: E402
from conftest import bias_positions as positions, build_bias as build  # noqa: E402
from posenc.encodings import Geometry, make  # noqa: E402
from posenc.encodings.relative import t5_bucket  # noqa: E402


# --- at the geometry's grid ---------------------------------------------------------

@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 64), (8, 20)])
def test_t5_buckets_match_transformers(num_buckets, max_distance):
  rel = np.arange(-400, 401)
  ours = np.asarray(jax.jit(t5_bucket, static_argnums=(1, 2))(jnp.asarray(rel), num_buckets,
                                                              max_distance))
  theirs = T5Attention._relative_position_bucket(torch.from_numpy(rel), bidirectional=True,
                                                 num_buckets=num_buckets,
                                                 max_distance=max_distance).numpy()
  np.testing.assert_array_equal(ours, theirs)
  # Every bucket is used but num_buckets // 2 (offset 0 always falls in the lower half).
  assert len(np.unique(ours)) == num_buckets - 1 and num_buckets // 2 not in ours


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (32, 64), (16, 64), (8, 20)])
def test_unidirectional_t5_buckets_match_transformers(num_buckets, max_distance):
  """T5's decoder buckets (``bidirectional=False``): every bucket for keys at or before the query."""
  rel = np.arange(-400, 401)
  ours = np.asarray(jax.jit(t5_bucket, static_argnums=(1, 2, 3))(jnp.asarray(rel), num_buckets, max_distance,
                                                                 False))
  theirs = T5Attention._relative_position_bucket(torch.from_numpy(rel), bidirectional=False,
                                                 num_buckets=num_buckets, max_distance=max_distance).numpy()
  np.testing.assert_array_equal(ours, theirs)
  assert len(np.unique(ours[rel <= 0])) == num_buckets and not ours[rel > 0].any()


def test_rel_bias_in_a_causal_model_uses_the_decoders_buckets():
  """A causal model (``causal=True``, which the GPT passes) gets T5's decoder buckets by default; an
  encoder keeps the bidirectional ones; ``bidirectional`` overrides either."""
  geometry = Geometry.seq(40)
  for kwargs, bidirectional in (({}, True), ({"causal": True}, False),
                                ({"causal": True, "bidirectional": True}, True)):
    enc = randomize(make("rel_bias", num_heads=H, geometry=SEQ, rngs=nnx.Rngs(0), num_buckets=16, max_distance=20,
                         **kwargs))
    assert enc.bidirectional is bidirectional
    config = T5Config(d_model=16, d_kv=4, num_heads=H, relative_attention_num_buckets=16,
                      relative_attention_max_distance=20, is_decoder=not bidirectional)
    t5 = T5Attention(config, has_relative_attention_bias=True)
    with torch.no_grad():
      t5.relative_attention_bias.weight.copy_(torch.tensor(np.asarray(enc.table[...])))
      theirs = t5.compute_bias(40, 40)[0].numpy()
    np.testing.assert_array_equal(positions(bias_of(enc, geometry), geometry), theirs)
  from posenc import models
  gpt = models.create("gpt-nano", posenc="rel_bias", rngs=nnx.Rngs(0), vocab_size=16, max_len=32)
  bert = models.create("bert-tiny", posenc="rel_bias", rngs=nnx.Rngs(0), vocab_size=16, max_len=32)
  assert not gpt.posenc.bidirectional and bert.posenc.bidirectional


def test_rel_bias_1d_matches_t5_compute_bias():
  enc = randomize(build("rel_bias", SEQ, num_buckets=16, max_distance=20))
  geometry = Geometry.seq(40, num_prefix=2)  # any length, longer than built
  ours = positions(bias_of(enc, geometry), geometry)
  config = T5Config(d_model=16, d_kv=4, num_heads=H, relative_attention_num_buckets=16,
                    relative_attention_max_distance=20, is_decoder=False)
  t5 = T5Attention(config, has_relative_attention_bias=True)
  with torch.no_grad():
    t5.relative_attention_bias.weight.copy_(torch.tensor(np.asarray(enc.table[...])))
    theirs = t5.compute_bias(40, 40)[0].numpy()
  np.testing.assert_array_equal(ours, theirs)


def test_rel_bias_2d_matches_swin():
  enc = randomize(build("rel_bias"))
  ours = positions(bias_of(enc, GRID, 0), GRID)
  swin = SwinRelativePositionBias(H, GRID.shape)
  with torch.no_grad():
    swin.relative_position_bias_table.copy_(torch.tensor(np.asarray(enc.table[...])))
    theirs = swin()[0].numpy()
  np.testing.assert_array_equal(ours, theirs)


def test_rel_bias_smaller_grid_uses_same_offsets():
  enc = randomize(build("rel_bias"))
  full = positions(bias_of(enc, GRID, 0), GRID)
  small = Geometry.grid(2, 3)
  coords = np.asarray(GRID.coords())
  keep = np.flatnonzero((coords[:, 0] < 2) & (coords[:, 1] < 3))
  np.testing.assert_array_equal(positions(bias_of(enc, small, 0), small),
                                full[:, keep][:, :, keep])


def test_rel_bias_per_layer_traced_layer():
  enc = randomize(build("rel_bias", per_layer=True))
  traced = nnx.jit(lambda e, layer: e.attention_bias(GRID, GRID.positions(), layer))
  biases = [np.asarray(traced(enc, jnp.int32(l))) for l in range(3)]
  for l in range(3):
    np.testing.assert_array_equal(biases[l], np.asarray(bias_of(enc, GRID, l)))
  assert not np.allclose(biases[0], biases[1])
  shared = randomize(build("rel_bias"))
  np.testing.assert_array_equal(bias_of(shared, GRID, 0), bias_of(shared, GRID, 2))


# --- positions as data ------------------------------------------------------------

def t5_bias_numpy(table, coords, num_buckets, max_distance):
  """T5: ``table[bucket(key - query), h]`` per pair, buckets from transformers."""
  p = np.asarray(coords)[..., 0].astype(np.int64)
  rel = torch.from_numpy(p[:, None, :] - p[:, :, None])  # [B, query, key]: key - query
  bucket = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=num_buckets,
                                                 max_distance=max_distance).numpy()
  return np.moveaxis(np.asarray(table)[bucket], -1, 1)  # [B, H, N, N]


def swin_bias_numpy(table, coords, hw):
  """Swin: row ``(dy + h-1)(2w-1) + dx + w-1`` of offset ``query - key``; NaN outside the table."""
  h, w = hw
  c = np.asarray(coords).astype(np.int64)
  dy, dx = np.moveaxis(c[:, :, None] - c[:, None, :], -1, 0)
  inside = (np.abs(dy) < h) & (np.abs(dx) < w)
  index = np.where(inside, (dy + h - 1) * (2 * w - 1) + dx + w - 1, 0)
  bias = np.where(inside[..., None], np.asarray(table, np.float32)[index], np.nan)
  return np.moveaxis(bias, -1, 1)  # [B, H, N, N]


REL_BIAS = [("1d", SEQ), ("2d", GRID)]


@pytest.mark.parametrize("label,geometry", REL_BIAS, ids=[c[0] for c in REL_BIAS])
def test_rel_bias_refuses_real_valued_positions(label, geometry):
  enc = build("rel_bias", geometry)
  assert enc.continuous is False
  match = r"'rel_bias' looks positions up in a table and needs integer positions; got float32"
  real = geometry.positions().astype(jnp.float32)  # even integer-valued floats
  with pytest.raises(ValueError, match=match):
    enc.attention_bias(geometry, real, 0)
  with pytest.raises(ValueError, match=match):  # the dtype is static: also under jit
    bias_of(enc, geometry, 0, real + 0.5)


def test_rel_bias_2d_refuses_concrete_offsets_outside_the_table():
  enc = build("rel_bias")  # built 3x4: offsets |dy| <= 2, |dx| <= 3
  small = Geometry.grid(2, 3)
  coords = np.asarray(small.positions())
  for n, coord in ((5, (3, 0)), (0, (-2, 0)), (4, (1, 4)), (2, (1, -2))):  # rows 3, cols 4 apart
    bad = coords.copy()
    bad[0, n] = coord
    with pytest.raises(ValueError, match=r"'rel_bias' has a table for offsets up to .* per axis; got "
                                         r"positions .* apart\. Transfer .*posenc\.transfer"):
      enc.attention_bias(small, jnp.asarray(bad), 0)
  # The largest offsets the table has are fine, and so are positions far from the origin
  # while their spread fits: offsets are what counts.
  edge = coords.copy()
  edge[0, 5] = (2, 3)
  enc.attention_bias(small, jnp.asarray(edge), 0)
  far = coords + np.int32([100, -50])
  np.testing.assert_array_equal(positions(enc.attention_bias(small, jnp.asarray(far), 0), small),
                                positions(bias_of(enc, small), small))


def test_rel_bias_2d_under_jit_gives_nan_outside_and_the_table_inside():
  enc = randomize(build("rel_bias"))
  coords = int_positions(GRID, (3, 4))  # [2, 12, 2], spread fits the table
  coords[0, 4] = (5, 1)    # 5 rows from everyone: outside (a flat index would alias a row)
  coords[1, 7] = (1, -3)   # 4 to 6 columns from most: outside for those pairs
  bias = positions(bias_of(enc, GRID, 0, coords), GRID, batch=2)  # traced: no concrete check
  want = swin_bias_numpy(enc.table[...], coords, GRID.shape)
  outside = np.isnan(want)
  assert outside[0].any() and outside[1].any() and (~outside).sum() > outside.sum()
  np.testing.assert_array_equal(np.isnan(bias), outside)  # never a clamp or a wrap
  np.testing.assert_array_equal(bias[~outside], want[~outside])


@pytest.mark.parametrize("shift", [(7,), (-300,), (2, 5), (-40, 13)], ids=str)
def test_rel_bias_translation_invariant_in_positions(shift):
  """Bias at ``p + c`` (integer shift) equals bias at ``p``, and both follow T5 / Swin."""
  if len(shift) == 1:
    geometry, options = Geometry.seq(10, num_prefix=1), dict(num_buckets=16, max_distance=20)
    coords = int_positions(geometry, 60)  # one set per example, spread beyond max_distance
    coords[1, :5, 0] = np.arange(5)  # a packed sequence restarting at 0
    coords[1, 5:, 0] = np.arange(5)
  else:
    geometry, options = GRID, {}
    coords = int_positions(geometry, GRID.shape)
  enc = randomize(build("rel_bias", geometry, **options))
  bias = positions(bias_of(enc, geometry, 0, coords), geometry, batch=2)
  moved = positions(bias_of(enc, geometry, 0, coords + np.int32(shift)), geometry, batch=2)
  np.testing.assert_array_equal(moved, bias)
  if len(shift) == 1:
    want = t5_bias_numpy(enc.table[...], coords, **options)
  else:
    want = swin_bias_numpy(enc.table[...], coords, GRID.shape)
  np.testing.assert_array_equal(bias, want)
  assert not np.array_equal(bias[0], bias[1])
  # And concrete positions give the same (checked, then looked up).
  eager = positions(enc.attention_bias(geometry, jnp.asarray(coords + np.int32(shift)), 0), geometry,
                    batch=2)
  np.testing.assert_array_equal(eager, bias)
