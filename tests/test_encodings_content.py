"""cope and forgetting (posenc/encodings/content.py): each bias against the papers' equations by hand
loops in numpy, packed rows against rows alone and offsets (GPT), gradients through the gates (nonzero,
and a finite difference), and the clear error of a bidirectional model. KV-cache decoding equals
recomputation for both in tests/test_cached_decoding.py and tests/test_gpt.py (they take every 1D
encoding from the registry)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import posenc  # noqa: F401  (flax config)
from posenc import encodings, models
from posenc.encodings.base import ContentInputs, Geometry
from test_gpt import FAST_COMPILE, ids, tiny

B, T, H, DH, D = 2, 7, 2, 4, 8


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x, q, k = (rng.standard_normal(s).astype(np.float32) for s in ((B, T, D), (B, T, H, DH), (B, T, H, DH)))
  return x, q, k, np.tril(np.ones((T, T), bool))[None]


def test_cope_bias_is_the_papers_equations():
  enc = encodings.make("cope", dim=H * DH, num_heads=H, num_layers=2, npos_max=4, rngs=nnx.Rngs(0))
  table = np.random.default_rng(1).standard_normal((2, 4, DH)).astype(np.float32)
  enc.table[...] = jnp.asarray(table)
  x, q, k, mask = _inputs()
  q = 2 * q  # counts above npos_max - 1 = 3 occur: the clamp is exercised
  bias, _ = enc.content_bias(ContentInputs(x, q, k, mask, 0, None), Geometry.seq(T), None, jnp.int32(1))
  want = np.zeros((B, H, T, T), np.float32)
  for b in range(B):
    for h in range(H):
      for i in range(T):
        for j in range(i + 1):
          p = sum(_sigmoid(q[b, i, h] @ k[b, m, h]) for m in range(j, i + 1))  # q already scaled
          p = min(p, 3.0)
          lo, hi = int(np.floor(p)), int(np.ceil(p))
          e = table[1, lo] + (p - lo) * (table[1, hi] - table[1, lo])
          want[b, h, i, j] = q[b, i, h] @ e
  causal = np.tril(np.ones((T, T), bool))
  np.testing.assert_allclose(np.asarray(bias)[..., causal], want[..., causal], rtol=1e-5, atol=1e-5)
  assert np.max(np.asarray(enc.positions_of(ContentInputs(x, q, k, mask, 0, None)))) == 3.0


def test_forgetting_bias_is_the_papers_equations():
  enc = encodings.make("forgetting", dim=D, num_heads=H, num_layers=2, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(2)
  w, b0 = rng.standard_normal((2, D, H)).astype(np.float32), rng.standard_normal((2, H)).astype(np.float32)
  enc.gate[...], enc.gate_bias[...] = jnp.asarray(w), jnp.asarray(b0)
  x, q, k, mask = _inputs()
  bias, _ = enc.content_bias(ContentInputs(x, q, k, mask, 0, None), Geometry.seq(T), None, jnp.int32(0))
  want = np.zeros((B, H, T, T), np.float32)
  for b in range(B):
    for h in range(H):
      for i in range(T):
        for j in range(i + 1):
          want[b, h, i, j] = sum(np.log(_sigmoid(x[b, m] @ w[0, :, h] + b0[0, h])) for m in range(j + 1, i + 1))
  causal = np.tril(np.ones((T, T), bool))
  np.testing.assert_allclose(np.asarray(bias)[..., causal], want[..., causal], rtol=1e-5, atol=1e-5)


def test_defaults_and_parameter_counts():
  cope = nnx.eval_shape(lambda: encodings.make("cope", dim=32, num_heads=4, num_layers=3, rngs=nnx.Rngs(0)))
  assert cope.table.shape == (3, 64, 8)  # npos_max 64 rows of head_dim, per layer, shared by the heads
  fox = encodings.make("forgetting", dim=32, num_heads=4, num_layers=3, rngs=nnx.Rngs(0))
  assert fox.gate.shape == (3, 32, 4) and fox.gate_bias.shape == (3, 4)
  assert not np.any(np.asarray(fox.gate_bias[...]))  # the reference code's zero bias: gates near 1/2
  assert np.std(np.asarray(fox.gate[...])) == pytest.approx(0.02, rel=0.2)
  assert encodings.get("cope").causal_only and encodings.get("forgetting").causal_only
  assert {"cope", "forgetting"} <= set(encodings.names(1)) - set(encodings.names(1, causal=False))


@pytest.mark.parametrize("posenc_name", ["cope", "forgetting"])
def test_bidirectional_model_is_a_clear_error(posenc_name):
  with pytest.raises(ValueError, match=f"'{posenc_name}' is causal only.*causal decoder"):
    models.create("bert-mini", posenc=posenc_name, rngs=nnx.Rngs(0), vocab_size=64, max_len=16, width=32,
                  depth=2, num_heads=2, mlp_dim=64)


@pytest.mark.parametrize("posenc_name", ["cope", "forgetting"])
def test_packed_rows_and_offsets_equal_rows_alone(posenc_name):
  graphdef, params, rest = tiny(posenc_name)
  lengths = (5, 4, 6)
  seqs = [ids(n, seed=i) for i, n in enumerate(lengths)]
  row = np.concatenate(seqs)[None]
  positions = np.concatenate([np.arange(n) for n in lengths])[None].astype(np.int32)
  packing = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None].astype(np.int32)
  calls = [(row, dict(positions=positions, packing_ids=packing)), (seqs[2][None], dict(positions=np.arange(9, 15)[None]))]
  calls += [(s[None], {}) for s in seqs]
  fn = lambda p, calls: [nnx.merge(graphdef, p, rest)(x, **kw) for x, kw in calls]  # noqa: E731
  packed, shifted, *alone = jax.jit(fn).lower(params, calls).compile(compiler_options=FAST_COMPILE)(params, calls)
  starts = np.cumsum((0,) + lengths)
  for logits, lo, hi in zip(alone, starts[:-1], starts[1:]):
    np.testing.assert_allclose(packed[0, lo:hi], logits[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(shifted, alone[2], rtol=1e-5, atol=1e-5)  # content, not positions


@pytest.mark.parametrize("posenc_name, leaf", [("cope", "table"), ("forgetting", "gate_bias")])
def test_gradients_flow_through_the_gates(posenc_name, leaf):
  graphdef, params, rest = tiny(posenc_name)
  x = ids((2, 9))
  weights = np.random.default_rng(5).standard_normal((2, 9, 64)).astype(np.float32)

  def loss(p):
    return jnp.sum(nnx.merge(graphdef, p, rest)(x) * weights)

  with jax.default_matmul_precision("highest"):
    grads = jax.jit(jax.grad(loss))(params)
    for name in params["posenc"]:
      assert np.all(np.abs(np.asarray(grads["posenc"][name])).max() > 0), name
    # The gates themselves: the query weights of layer 0 (cope: q . k gates; forgetting: its own gates).
    assert np.abs(np.asarray(grads["blocks"]["layers"]["attn"]["qkv"])[0, :, :, 0]).max() > 0
    index = (1, 0) if posenc_name == "forgetting" else (1, 2, 3)
    eps = 3e-2  # central differences: O(eps^2) error, well above float32's rounding of the loss

    def moved(step):
      p = jax.tree.map(np.copy, params)
      p["posenc"][leaf][index] += step
      return p

    f = jax.jit(loss)
    numeric = (float(f(moved(eps))) - float(f(moved(-eps)))) / (2 * eps)
  analytic = float(np.asarray(grads["posenc"][leaf])[index])
  assert analytic != 0
  assert numeric == pytest.approx(analytic, rel=2e-2, abs=1e-3)
