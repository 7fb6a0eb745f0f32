"""KV-cache decoding equals recomputation for every 1D encoding and every option that changes positions.

Cases come from the registry (every encoding that supports 1D, with its defaults) plus the options
that move positions: rope's scalings (every HF rope type: ``linear``, ``ntk``, ``yarn``, ``llama3``,
``longrope``; ``ntk``, ``yarn`` and ``longrope`` with a fixed factor and a dynamic one) past
``original_length``, p-RoPE and partial rotation, a RoPE/NoPE layer schedule with Llama 4's temperature
tuning (every query scaled by its own position), fire's threshold and shared layers, kerple per
layer, and position interpolation (``position_scale``: real-valued positions). ``longrope`` with a
factor switches from its short to its long factors once, past ``original_length``: its prefill stops
short of it, so one single-token step crosses it. One program per case (XLA
backend optimisation level 0, as tests/test_gpt.py), run on three seeds of parameters and tokens.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import posenc  # noqa: F401  (flax config)
from posenc import encodings, models
from test_gpt import FAST_COMPILE, TINY, ids, tiny

ORIGINAL = 8  # rope's original_length: prompts and generations below run past it
PROMPT, NEW = 6, 8  # generate: the dynamic factor starts moving mid-generation
PREFILL, TOTAL = 10, 13  # logits: a prefill longer than ORIGINAL, then single tokens
CROSSING_PREFILL = ORIGINAL - 2  # longrope: a prefill within ORIGINAL, then single tokens across it
SEEDS = (0, 1, 2)
SHORT, LONG = tuple(1.0 + 0.1 * i for i in range(8)), tuple(1.0 + i for i in range(8))  # head_dim 16: 8 pairs
LONGROPE = dict(scaling="longrope", original_length=ORIGINAL, short_factor=SHORT, long_factor=LONG)
OPTIONS = {
    "rope": [dict(scaling=kind, original_length=ORIGINAL, **factor) for kind in ("ntk", "yarn")
             for factor in ({}, {"factor": 2.0})] + [
        dict(scaling="linear", factor=2.0),
        dict(scaling="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_length=ORIGINAL),
        dict(LONGROPE, factor=4.0), LONGROPE,
        dict(scaling="yarn", original_length=ORIGINAL, attention_factor=1.3),
        dict(frequency_fraction=0.5), dict(scaling="ntk", original_length=ORIGINAL, partial_rotary_factor=0.5),
        dict(nope_every=2, nope_temperature=True, nope_floor_scale=3.0, nope_attn_scale=0.5)],  # Llama 4's iRoPE
    "fire": [dict(per_layer=False, init_threshold=3.0)],
    "kerple": [dict(per_layer=True)],
}
SCALED = ("rope", "alibi")  # position interpolation: positions times 0.5
CASES = [(name, {}, 1.0) for name in encodings.names() if 1 in encodings.get(name).supported_ndims]
CASES += [(name, options, 1.0) for name, variants in OPTIONS.items() for options in variants]
CASES += [(name, {}, 0.5) for name in SCALED]


def _id(case):
  name, options, scale = case
  return "-".join([name, *(f"{k}={f'[{len(v)}]' if isinstance(v, tuple) else v}" for k, v in options.items()),
                   *([f"scale={scale}"] if scale != 1 else [])])


def _program(graphdef, scale: float, prefill: int):
  """Greedy tokens with and without the cache; the logits of a prefill and single-token steps, and of
  full forwards of the tokens so far (and of the whole buffer told that length, as the reference)."""
  def run(params, rest, prompt, x):
    model = nnx.merge(graphdef, params, rest)
    gen = lambda **kw: models.generate(model, prompt, NEW, position_scale=scale, **kw)  # noqa: E731
    positions = np.arange(TOTAL)[None] * scale
    positions = positions.astype(np.float32 if scale != 1 else np.int32)
    cache = model.init_cache(x.shape[0], TOTAL, positions_dtype=positions.dtype)
    logits, cache = model.decode(x[:, :prefill], cache, positions=positions[:, :prefill])
    stepped = [logits]
    for n in range(prefill, TOTAL):
      logits, cache = model.decode(x[:, n:n + 1], cache, positions=positions[:, n:n + 1])
      stepped.append(logits)
    full = [model(x[:, :n], positions=positions[:, :n]) for n in range(prefill, TOTAL + 1)]
    buffer = [model(x, positions=positions, length=n)[:, n - 1] for n in (prefill, TOTAL - 1)]
    return gen(), gen(use_cache=False), stepped, full, buffer

  return run


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_cached_decoding_equals_recomputation(case):
  name, options, scale = case
  prefill = CROSSING_PREFILL if options.get("scaling") == "longrope" and "factor" in options else PREFILL
  compiled = None
  for seed in SEEDS:
    graphdef, params, rest = tiny(name, seed, posenc_options=options)
    args = (params, rest, ids((2, PROMPT), seed=10 + seed), ids((2, TOTAL), seed=20 + seed))
    with jax.default_matmul_precision("highest"):
      if compiled is None:
        compiled = jax.jit(_program(graphdef, scale, prefill)).lower(*args).compile(compiler_options=FAST_COMPILE)
      cached, reference, stepped, full, buffer = compiled(*args)
    np.testing.assert_array_equal(cached, reference, err_msg=f"seed {seed}")
    np.testing.assert_array_equal(cached[:, :PROMPT], args[2])
    np.testing.assert_allclose(stepped[0], full[0], rtol=1e-5, atol=1e-5, err_msg=f"prefill, seed {seed}")
    for n, (step, forward) in enumerate(zip(stepped[1:], full[1:]), prefill + 1):
      np.testing.assert_allclose(step[:, 0], forward[:, -1], rtol=1e-5, atol=1e-5, err_msg=f"{n} tokens, seed {seed}")
    for told, forward in zip(buffer, (full[0], full[-2])):  # the reference: the buffer told the length
      np.testing.assert_allclose(told, forward[:, -1], rtol=1e-5, atol=1e-5, err_msg=f"buffer, seed {seed}")
    assert np.std(full[-1]) > 0.1  # not flat: the comparisons above mean something
    enc = nnx.merge(graphdef, params, rest).posenc
    if getattr(enc, "length_dependent", False):
      # The factor moves: the same first tokens get other logits in a longer sequence.
      assert enc.rescales(prefill, TOTAL)
      assert not np.allclose(full[-1][:, :prefill], full[0], atol=1e-3)


def test_position_scale_needs_a_continuous_encoding():
  model = nnx.merge(*tiny("learned"))
  with pytest.raises(ValueError, match=r"position_scale=0.5 gives real-valued positions.*'learned'.*position_scale=1"):
    models.generate(model, ids((2, 5)), 3, position_scale=0.5)
  with pytest.raises(ValueError, match=r"position_scale must be > 0"):
    models.generate(model, ids((2, 5)), 3, position_scale=0.0)
