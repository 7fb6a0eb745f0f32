"""Tests for posenc/models/gpt.py and generate.py: the causal LM, its KV cache and generation.

Models are tiny and their parameters random (N(0, 0.3^2), drawn on the host), so
logits are far from flat and every encoding's contribution shows. Each test is one
program compiled with XLA's backend optimisation level 0 (compiles faster, same function).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import posenc  # noqa: F401  (flax config)
from posenc import encodings, models

TINY = dict(vocab_size=64, max_len=24, width=32, depth=2, num_heads=2, mlp_dim=64)
ENCODINGS_1D = [n for n in encodings.names() if 1 in encodings.get(n).supported_ndims]
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def run_jit(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def count(model) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def tiny(posenc_name: str, seed: int = 0, **kwargs):
  """(graphdef, params, rest) of a tiny GPT with N(0, 0.3^2) parameters; nothing compiled."""
  abstract = nnx.eval_shape(lambda: models.create("gpt-nano", posenc=posenc_name, rngs=nnx.Rngs(0),
                                                  **{**TINY, **kwargs}))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda a: 0.3 * rng.standard_normal(a.shape).astype(np.float32), nnx.to_pure_dict(params))
  is_key = lambda a: jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)  # noqa: E731
  rest = jax.tree.map(lambda a: jax.random.key(seed) if is_key(a) else np.zeros(a.shape, a.dtype),
                      nnx.to_pure_dict(rest))
  return graphdef, params, rest


def ids(shape, seed=1):
  return np.random.default_rng(seed).integers(0, TINY["vocab_size"], shape).astype(np.int32)


def test_sizes_and_parameter_counts():
  nano = nnx.eval_shape(lambda: models.create("gpt-nano", posenc="learned", rngs=nnx.Rngs(0), vocab_size=4096,
                                              max_len=128))
  assert count(nano) == 1_334_016
  small = nnx.eval_shape(lambda: models.create("gpt-small", posenc="learned", rngs=nnx.Rngs(0),
                                               vocab_size=50257, max_len=1024))
  assert count(small) == 124_439_808  # GPT-2 small
  mini = nnx.eval_shape(lambda: models.create("gpt-mini", posenc="rope", rngs=nnx.Rngs(0), vocab_size=100,
                                              max_len=64, depth=3))
  assert mini.blocks.layers.attn.qkv.shape == (3, 256, 4, 3, 64)
  assert {"gpt-nano", "gpt-mini", "gpt-small"} <= set(models.MODEL_NAMES)
  with pytest.raises(ValueError, match="has no option"):
    models.create("gpt-nano", posenc="rope", rngs=nnx.Rngs(0), vocab_size=10, max_len=8, pre_ln=False)


@pytest.mark.parametrize("depth", [2, 8])
def test_gpt2_initialisation(depth):
  model = models.create("gpt-nano", posenc="learned", rngs=nnx.Rngs(0), vocab_size=256, max_len=8, width=64,
                        depth=depth, num_heads=2, mlp_dim=64)
  std = lambda p: float(np.std(np.asarray(p[...])))  # noqa: E731
  layers = model.blocks.layers
  for p in (model.token_embed, layers.attn.qkv, layers.mlp.fc1):
    assert std(p) == pytest.approx(0.02, rel=0.05)
  for p in (layers.attn.out, layers.mlp.fc2):  # residual projections: 0.02 / sqrt(2 * depth)
    assert std(p) == pytest.approx(0.02 / np.sqrt(2 * depth), rel=0.05)
  assert not np.any(np.asarray(layers.attn.qkv_bias[...])) and not np.any(np.asarray(layers.mlp.fc2_bias[...]))
  assert not hasattr(model, "head") and not hasattr(model, "head_bias")  # tied to token_embed


@pytest.mark.parametrize("posenc_name", ENCODINGS_1D)
def test_causal_mask_packing_and_padding(posenc_name):
  graphdef, params, rest = tiny(posenc_name)
  x = ids((2, 12))
  changed = x.copy()
  changed[:, 7] = (changed[:, 7] + 1) % TINY["vocab_size"]
  lengths = (5, 4, 7)
  seqs = [ids(n, seed=i) for i, n in enumerate(lengths)]
  row = np.concatenate(seqs)[None]
  positions = np.concatenate([np.arange(n) for n in lengths])[None].astype(np.int32)
  packing = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None].astype(np.int32)
  # Left padding: 3 pad tokens, the real tokens at positions 0..6.
  padded = np.concatenate([np.zeros(3, np.int32), seqs[2]])[None]
  pad_positions = np.maximum(np.arange(10) - 3, 0)[None].astype(np.int32)
  calls = [(x, {}), (changed, {}), (row, dict(positions=positions, packing_ids=packing)),
           (row, dict(positions=positions)),
           (padded, dict(positions=pad_positions, padding_mask=np.arange(10)[None] >= 3))]
  calls += [(s[None], {}) for s in seqs]

  a, b, packed, mixed, left_padded, *alone = run_jit(
      lambda p, calls: [nnx.merge(graphdef, p, rest)(x, **kw) for x, kw in calls], params, calls)
  assert a.shape == (2, 12, 64) and a.dtype == jnp.float32
  np.testing.assert_allclose(a[:, :7], b[:, :7], rtol=1e-6, atol=1e-6)  # the past does not see the future
  assert not np.allclose(a[:, 7:], b[:, 7:], atol=1e-3)
  starts = np.cumsum((0,) + lengths)
  for logits, lo, hi in zip(alone, starts[:-1], starts[1:]):
    np.testing.assert_allclose(packed[0, lo:hi], logits[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(left_padded[0, 3:], alone[2][0], rtol=1e-5, atol=1e-5)
  # Without packing ids the second sequence sees the first: the check above can fail.
  assert not np.allclose(mixed[0, starts[1]:starts[2]], alone[1][0], atol=1e-3)


@pytest.mark.parametrize("posenc_name", ENCODINGS_1D)
def test_cache_prefill_and_steps_equal_the_full_forward(posenc_name):
  graphdef, params, rest = tiny(posenc_name)
  x = ids((2, 10))
  positions = (np.arange(10) + 2)[None].astype(np.int32)  # positions are data: offset by 2

  def run(params, x, positions):
    model = nnx.merge(graphdef, params, rest)
    full = model(x, positions=positions)
    prefill_all, _ = model.decode(x, model.init_cache(2, 16), positions=positions)
    pieces, cache = [], model.init_cache(2, 16)
    for a, b in ((0, 6), (6, 8), (8, 9), (9, 10)):  # prefill, a chunk of 2, then single tokens
      logits, cache = model.decode(x[:, a:b], cache, positions=positions[:, a:b])
      pieces.append(logits)
    return full, prefill_all, jnp.concatenate(pieces, axis=1), cache.length

  full, prefill_all, stepped, length = run_jit(run, params, x, positions)
  assert int(length) == 10
  np.testing.assert_allclose(prefill_all, full, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stepped, full, rtol=1e-5, atol=1e-5)
  assert np.std(full) > 0.1  # not flat: the comparisons above mean something


@pytest.mark.parametrize("posenc_name", ENCODINGS_1D)
def test_cached_greedy_decoding_equals_recomputing(posenc_name):
  graphdef, params, rest = tiny(posenc_name)
  prompt = ids((2, 5))

  def run(params, prompt):  # generate() under an outer jit: one program for both
    model = nnx.merge(graphdef, params, rest)
    return models.generate(model, prompt, 12), models.generate(model, prompt, 12, use_cache=False)

  cached, reference = run_jit(run, params, prompt)
  assert cached.shape == (2, 17) and cached.dtype == jnp.int32
  np.testing.assert_array_equal(cached[:, :5], prompt)
  np.testing.assert_array_equal(cached, reference)


def test_unrolled_layers_decode_like_scanned_ones():
  graphdef, params, rest = tiny("alibi")
  unrolled, _, _ = tiny("alibi", scan_layers=False)
  gen = lambda g, p, prompt: models.generate(nnx.merge(g, p, rest), prompt, 6)  # noqa: E731
  a, b = run_jit(lambda p, prompt: (gen(graphdef, p, prompt), gen(unrolled, p, prompt)), params, ids((2, 5)))
  np.testing.assert_array_equal(a, b)


def test_greedy_picks_the_argmax_of_the_full_forward():
  graphdef, params, rest = tiny("rope")

  def run(params, prompt):
    model = nnx.merge(graphdef, params, rest)
    out = models.generate(model, prompt, 4)
    return out, model(out)

  out, logits = run_jit(run, params, ids((2, 5)))
  np.testing.assert_array_equal(out[:, 5:], np.asarray(logits)[:, 4:-1].argmax(-1))


def test_sampling():
  graphdef, params, rest = tiny("rope")

  def run(params, prompt, key, other):
    model = nnx.merge(graphdef, params, rest)
    gen = lambda **kw: models.generate(model, prompt, 12, **kw)  # noqa: E731
    return (gen(temperature=2.0, rng=key), gen(temperature=2.0, rng=key, use_cache=False), gen(),
            gen(temperature=2.0, rng=other))

  sampled, uncached, greedy, other = run_jit(run, params, ids((2, 5)), jax.random.key(3), jax.random.key(4))
  np.testing.assert_array_equal(sampled, uncached)
  assert not np.array_equal(sampled, greedy) and not np.array_equal(sampled, other)
  assert sampled.min() >= 0 and sampled.max() < TINY["vocab_size"]
  with pytest.raises(ValueError, match="needs rng"):
    models.generate(nnx.merge(graphdef, params, rest), ids((2, 5)), 3, temperature=1.0)


def test_generation_beyond_a_learned_table_is_a_clear_error():
  model = nnx.merge(*tiny("learned"))  # max_len 24
  with pytest.raises(ValueError, match=r"cannot generate 5 prompt \+ 20 new = 25 tokens: .*max_len=24"):
    models.generate(model, ids((2, 5)), 20)
  with pytest.raises(ValueError, match="max_len=24"):
    model.init_cache(2, 25)
  assert models.generate(model, ids((2, 5)), 19).shape == (2, 24)  # exactly the table
  with pytest.raises(ValueError, match=r"prompt_ids must be integer token ids"):
    models.generate(model, np.zeros((2, 5), np.float32), 3)
  np.testing.assert_array_equal(models.generate(model, ids((2, 5)), 0), ids((2, 5)))


def test_float_positions_need_a_float_cache():
  graphdef, params, rest = tiny("rope")
  model = nnx.merge(graphdef, params, rest)
  x = ids((1, 4))
  positions = np.arange(4, dtype=np.float32)[None] * 0.5  # position interpolation
  with pytest.raises(ValueError, match="positions_dtype=float32"):
    model.decode(x, model.init_cache(1, 8), positions=positions)

  def run(params, x, positions):
    model = nnx.merge(graphdef, params, rest)
    cache = model.init_cache(1, 8, positions_dtype=jnp.float32)
    return model.decode(x, cache, positions=positions)[0], model(x, positions=positions)

  cached, full = run_jit(run, params, x, positions)
  np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5)
