"""Positions as data through the models: packed rows, offsets, per-row positions.

Models are tiny and their parameters random (N(0, 0.3^2), drawn on the host), so
every encoding's contribution is large enough to show in the logits.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import posenc  # noqa: F401  (flax config)
from posenc import encodings, models
from posenc.encodings.base import Encoding

TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64)
BERT = dict(vocab_size=64, max_len=16, **TINY)
VIT = dict(num_classes=5, image_size=28, patch_size=7, channels=1, num_registers=1, **TINY)


def hooks(name: str) -> set[str]:
  """The hooks encoding ``name`` implements (overrides of ``Encoding``'s)."""
  cls = encodings.get(name)
  return {h for h in ("embed", "attention_bias", "rotate", "after_block")
          if getattr(cls, h) is not getattr(Encoding, h)}


# From the registry, so a new encoding is tested without editing this file. Relative: position enters
# only through the attention (a bias or a rotation), never through the tokens.
# (The BERT below attends both ways: causal-only encodings are tested in a GPT, tests/test_gpt.py.)
ENCODINGS_1D = encodings.names(ndim=1, causal=False)
RELATIVE_1D = [n for n in ENCODINGS_1D if hooks(n) and hooks(n) <= {"attention_bias", "rotate"}]
# LieRE's dense generators do not commute beyond 1D, so its 2D rotations are not relative
# (tests/test_encodings_learned_rotary.py checks that a shift changes its logits).
RELATIVE_2D = [n for n in encodings.names(ndim=2) if hooks(n) and hooks(n) <= {"attention_bias", "rotate"}
               and n != "liere"]
ABSOLUTE_1D = [n for n in ENCODINGS_1D if "embed" in hooks(n)]
# FIRE divides by the query position once it passes its threshold L = |threshold_scale| * threshold_init:
# translation invariant only below L, so the offset test sets L above every position it uses.
BELOW_THRESHOLD = {"fire": {"threshold_init": 1000.0, "threshold_scale": 1.0}}


def test_the_lists_cover_the_registry():
  assert {"fire", "kerple", "learned", "none"} <= set(ENCODINGS_1D)
  assert {"fire", "kerple", "rel_bias", "rope", "alibi"} <= set(RELATIVE_1D) and "cpe" not in RELATIVE_2D
  assert {"learned", "sinusoidal"} <= set(ABSOLUTE_1D)


def model(name: str, posenc_name: str, **kwargs):
  """(graphdef, params, rest) with random parameters; nothing compiled."""
  abstract = nnx.eval_shape(lambda: models.create(name, posenc=posenc_name, rngs=nnx.Rngs(0), **kwargs))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: 0.3 * rng.standard_normal(a.shape).astype(np.float32), nnx.to_pure_dict(params))
  is_key = lambda a: jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)  # noqa: E731
  rest = jax.tree.map(lambda a: jax.random.key(0) if is_key(a) else np.zeros(a.shape, a.dtype),
                      nnx.to_pure_dict(rest))
  return graphdef, params, rest


def apply(graphdef, params, rest, calls):
  """Every ``(args, kwargs)`` of ``calls`` through the model, in one jitted program."""
  return jax.jit(lambda p, calls: [nnx.merge(graphdef, p, rest)(*a, **kw) for a, kw in calls])(params, calls)


@pytest.mark.parametrize("posenc_name", ENCODINGS_1D)
def test_packed_sequences_equal_sequences_run_alone(posenc_name):
  graphdef, params, rest = model("bert-mini", posenc_name, **BERT)
  lengths = (5, 4, 7)
  rng = np.random.default_rng(1)
  seqs = [rng.integers(1, 64, n).astype(np.int32) for n in lengths]
  row = np.concatenate(seqs)[None]
  positions = np.concatenate([np.arange(n) for n in lengths])[None].astype(np.int32)
  packing_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None].astype(np.int32)
  calls = [((row,), dict(positions=positions, packing_ids=packing_ids))]
  calls += [((s[None],), {}) for s in seqs]
  packed, *alone = apply(graphdef, params, rest, calls)
  starts = np.cumsum((0,) + lengths)
  for seq_logits, a, b in zip(alone, starts[:-1], starts[1:]):
    np.testing.assert_allclose(packed[0, a:b], seq_logits[0], rtol=1e-5, atol=1e-5)
  # Without packing ids the sequences see each other: the check above can fail.
  mixed = apply(graphdef, params, rest, [((row,), dict(positions=positions))])[0]
  assert not np.allclose(mixed[0, starts[1]:starts[2]], alone[1][0], atol=1e-3)


@pytest.mark.parametrize("posenc_name", RELATIVE_1D)
def test_relative_encodings_ignore_where_a_sequence_starts(posenc_name):
  graphdef, params, rest = model("bert-mini", posenc_name, **BERT)
  for k, v in BELOW_THRESHOLD.get(posenc_name, {}).items():
    params["posenc"][k] = np.full_like(params["posenc"][k], v)
  ids = np.random.default_rng(2).integers(1, 64, (2, 12)).astype(np.int32)
  at0, at100 = apply(graphdef, params, rest, [((ids,), {}), ((ids,), dict(positions=np.arange(100, 112)[None]))])
  np.testing.assert_allclose(at100, at0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("posenc_name", ABSOLUTE_1D)
def test_absolute_encodings_do_see_the_offset(posenc_name):
  graphdef, params, rest = model("bert-mini", posenc_name, **BERT)
  ids = np.random.default_rng(2).integers(1, 64, (2, 8)).astype(np.int32)
  at0, at4 = apply(graphdef, params, rest, [((ids,), {}), ((ids,), dict(positions=np.arange(4, 12)[None]))])
  assert not np.allclose(at4, at0, atol=1e-3)


@pytest.mark.parametrize("posenc_name", RELATIVE_2D)
def test_relative_2d_encodings_ignore_a_shift_of_the_grid(posenc_name):
  # No prefix tokens: an unrotated class token would see absolute patch positions through RoPE.
  graphdef, params, rest = model("vit-mu", posenc_name, **dict(VIT, pool="gap", num_registers=0))
  images = np.random.default_rng(3).standard_normal((2, 28, 28, 1)).astype(np.float32)
  grid = np.stack(np.meshgrid(np.arange(4), np.arange(4), indexing="ij"), -1).reshape(1, 16, 2)
  shifted = (grid + np.array([2, 3])).astype(np.int32)
  if encodings.get(posenc_name).continuous:  # real-valued positions: a real shift too
    shifted = grid + np.array([2.5, -7.25], np.float32)
  at0, moved = apply(graphdef, params, rest, [((images,), {}), ((images,), dict(positions=shifted))])
  np.testing.assert_allclose(moved, at0, rtol=1e-4, atol=1e-4)
  stretched = apply(graphdef, params, rest, [((images,), dict(positions=(2 * grid).astype(np.int32)))])[0]
  if posenc_name != "rel_bias":  # rel_bias's 4x4 table has no offsets of 2x the grid: NaN, tested elsewhere
    assert not np.allclose(stretched, at0, rtol=1e-4, atol=1e-4)  # the tolerance of the equality above


@pytest.mark.parametrize("posenc_name", ["learned", "rope", "alibi"])
def test_per_row_positions_equal_rows_run_one_at_a_time(posenc_name):
  graphdef, params, rest = model("bert-mini", posenc_name, **BERT)
  ids = np.random.default_rng(4).integers(1, 64, (2, 6)).astype(np.int32)
  positions = np.array([[0, 1, 2, 3, 4, 5], [9, 8, 7, 0, 1, 2]], np.int32)
  both, first, second, flat = apply(graphdef, params, rest, [
      ((ids,), dict(positions=positions)), ((ids[:1],), dict(positions=positions[:1])),
      ((ids[1:],), dict(positions=positions[1:])), ((ids,), dict(positions=positions[..., None]))])
  np.testing.assert_allclose(both[0], first[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(both[1], second[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(flat, both, rtol=1e-6, atol=1e-6)  # [B, L] and [B, L, 1] are the same positions


def test_positions_of_the_wrong_shape_are_a_clear_error():
  graphdef, params, rest = model("vit-mu", "rope", **VIT)
  vit = nnx.merge(graphdef, params, rest)
  with pytest.raises(ValueError, match=r"positions must be \[B, h\*w, 2\] with 16 positions"):
    vit(jnp.zeros((1, 28, 28, 1)), positions=jnp.zeros((1, 17, 2)))
