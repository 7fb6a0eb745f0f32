"""RoPE/NoPE layer schedules and Llama 4's temperature tuning (posenc/encodings/layer_schedule.py):
NoPE layers leave q and k as they are, rotating layers equal the unscheduled encoding, the layer index
may be traced (scan), the temperature against its closed form, and the config errors. KV-cache
decoding with a schedule: tests/test_cached_decoding.py."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from rotary_helpers import DH, H, qk
from test_gpt import FAST_COMPILE, ids, tiny

from posenc import models
from posenc.config import ConfigError
from posenc.encodings import Geometry, make
from posenc.encodings.rotation import cos_sin, inverse_frequencies, turn

LAYERS = 4


def _build(name, geometry, **options):
  return make(name, dim=H * DH, num_heads=H, num_layers=LAYERS, geometry=geometry, rngs=nnx.Rngs(0), **options)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _rotate(graphdef, state, q, k, geometry, positions, layer):
  """``rotate`` with a traced ``layer`` (as under ``nnx.scan``)."""
  return nnx.merge(graphdef, state).rotate(q, k, geometry, positions, layer)


def rotate(enc, q, k, geometry, layer, positions=None):
  positions = geometry.positions() if positions is None else jnp.asarray(positions)
  return _rotate(*nnx.split(enc), q, k, geometry, positions, jnp.int32(layer))


SCHEDULED = [("rope", Geometry.seq(7)), ("rope", Geometry.grid(3, 4, num_prefix=1)),
             ("rope_mixed", Geometry.grid(3, 4)), ("string", Geometry.seq(7)), ("liere", Geometry.grid(2, 4))]


@pytest.mark.parametrize("name,geometry", SCHEDULED, ids=[f"{n}-{g.ndim}D" for n, g in SCHEDULED])
def test_nope_layers_leave_qk_and_the_others_equal_the_unscheduled_encoding(name, geometry):
  q, k = qk(geometry, seed=1, dh=DH)
  plain = _build(name, geometry)
  for schedule, nope in ((dict(nope_every=2), (1, 3)), (dict(rotate_layers=(0, 3)), (1, 2))):
    enc = _build(name, geometry, **schedule)  # the same seed: the same parameters as ``plain``
    for layer in range(LAYERS):
      got, want = rotate(enc, q, k, geometry, layer), rotate(plain, q, k, geometry, layer)
      if layer in nope:
        np.testing.assert_array_equal(got[0], q)
        np.testing.assert_array_equal(got[1], k)
        assert not np.allclose(want[0], q, atol=1e-3)  # the plain encoding does turn them
      else:
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_the_default_is_plain_rope_and_nope_every_beyond_the_depth_changes_nothing():
  geometry = Geometry.seq(9)
  q, k = qk(geometry, seed=2)
  freqs = jnp.asarray(inverse_frequencies(DH, 10000.0), jnp.float32)
  cos, sin = cos_sin(jnp.arange(9, dtype=jnp.float32)[None, :, None, None] * freqs)
  for options in ({}, dict(nope_every=LAYERS + 1), dict(rotate_layers=tuple(range(LAYERS)))):
    enc = _build("rope", geometry, **options)
    for layer in (0, LAYERS - 1):
      got = rotate(enc, q, k, geometry, layer)
      np.testing.assert_allclose(got[0], turn(q, cos, sin), rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(got[1], turn(k, cos, sin), rtol=1e-6, atol=1e-6)


def test_temperature_matches_the_closed_form_and_scales_only_nope_queries():
  positions = np.array([0, 1, 6, 7, 8, 15, 16, 100, 8190, 8191, 70000], np.int32)
  enc = _build("rope", Geometry.seq(len(positions)), rotate_layers=(1,), nope_temperature=True,
               nope_attn_scale=0.3, nope_floor_scale=8.0)
  want = np.log(np.floor((positions + 1) / 8.0) + 1) * 0.3 + 1  # HF Llama4TextAttention's attn_scales
  got = np.asarray(enc.options.temperature(jnp.asarray(positions)[None, :, None]))
  np.testing.assert_allclose(got[0, :, 0, 0], want, rtol=1e-6)
  assert got[0, 0, 0, 0] == 1.0 and want[-1] > 2  # p + 1 < floor_scale: no change; far: a large one
  default = _build("rope", Geometry.seq(1), nope_every=4, nope_temperature=True).options
  np.testing.assert_allclose(default.temperature(jnp.asarray([[[8190], [8191], [16383]]]))[0, :, 0, 0],
                             [1.0, 1.0 + 0.1 * np.log(2), 1.0 + 0.1 * np.log(3)], rtol=1e-6)

  geometry = Geometry.seq(len(positions), num_prefix=2)  # prefix tokens: scale 1
  q, k = qk(geometry, seed=3)
  nope = rotate(enc, q, k, geometry, 0, positions[None, :, None])
  np.testing.assert_allclose(nope[0], q * np.concatenate([[1.0, 1.0], want])[None, :, None, None], rtol=1e-6)
  np.testing.assert_array_equal(nope[1], k)
  plain = _build("rope", geometry)
  np.testing.assert_array_equal(rotate(enc, q, k, geometry, 1, positions[None, :, None])[0],
                                rotate(plain, q, k, geometry, 1, positions[None, :, None])[0])


def test_a_model_nope_everywhere_is_the_model_without_position_encoding():
  x = ids((2, 12), seed=5)
  logits = {}
  for name, options in (("none", {}), ("rope", dict(nope_every=1)), ("rope", dict(rotate_layers=()))):
    graphdef, params, rest = tiny(name, 7, posenc_options=options)
    logits[name, tuple(options)] = jax.jit(lambda p, r: nnx.merge(graphdef, p, r)(x)).lower(
        params, rest).compile(compiler_options=FAST_COMPILE)(params, rest)
  reference = logits.pop(("none", ()))
  for got in logits.values():
    np.testing.assert_allclose(got, reference, rtol=1e-6, atol=1e-6)
  assert np.std(reference) > 0.1


def test_scanned_and_unrolled_layers_agree():
  """Under ``nnx.scan`` the layer index is traced: the schedule still picks the layers."""
  x = ids((2, 10), seed=6)
  options = dict(rotate_layers=(1,), nope_temperature=True, nope_floor_scale=3.0)
  out = []
  for scan in (True, False):
    model = models.create("gpt-nano", posenc="rope", rngs=nnx.Rngs(0), vocab_size=64, max_len=16, width=32,
                          depth=2, num_heads=2, mlp_dim=64, scan_layers=scan, posenc_options=options)
    out.append(nnx.jit(lambda m: m(x))(model))
  plain = models.create("gpt-nano", posenc="rope", rngs=nnx.Rngs(0), vocab_size=64, max_len=16, width=32,
                        depth=2, num_heads=2, mlp_dim=64, scan_layers=True)
  np.testing.assert_allclose(out[0], out[1], rtol=1e-5, atol=1e-5)
  assert not np.allclose(out[0], nnx.jit(lambda m: m(x))(plain), atol=1e-4)


def test_config_errors_name_the_option():
  def fails(match, error=ConfigError, geometry=Geometry.seq(4), name="rope", **options):
    with pytest.raises(error, match=match):
      _build(name, geometry, **options)

  fails(r"nope_every .* and rotate_layers .* give one", nope_every=2, rotate_layers=(0,))
  fails(r"nope_temperature scales the queries of NoPE layers.*set nope_every or rotate_layers", nope_temperature=True)
  fails(r"nope_attn_scale tune the temperature.*nope_temperature=True", nope_every=2, nope_attn_scale=0.2)
  fails(r"rotate_layers must be None \(every layer\) or a tuple of ints of distinct layer indices >= 0, got "
        r"\(0, -1\)", rotate_layers=(0, -1))
  fails(r"rotate_layers must be .*distinct", rotate_layers=(1, 1))
  fails(r"nope_every must be None \(no NoPE layers\) or an int >= 1, got 0", nope_every=0)
  fails(r"'rope': rotate_layers=\(0, 4\) names layer\(s\) \[4\], but the model has 4 layers \(0..3\)", ValueError,
        rotate_layers=(0, 4))
  fails(r"'liere': rotate_layers=\(5,\) names layer\(s\) \[5\]", ValueError, name="liere", rotate_layers=(5,))
  fails(r"'rope': nope_temperature scales queries by their 1D position, not on 2D", ValueError,
        Geometry.grid(2, 2), nope_every=2, nope_temperature=True)
  fails(r"'alibi' has no option\(s\) \['nope_every'\]", name="alibi", nope_every=2)
