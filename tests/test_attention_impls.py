"""Every attention implementation computes the same function: outputs and gradients of whole
models, for every encoding, with padding masks, packing ids and the causal mask (float32, 1e-5).

The same programs check every model x encoding pair: jitted forward and backward, float32 output
of the right shape, finite gradients, and no parameter with a zero gradient (a hook the model
forgot to call would leave its encoding's parameters without one)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import posenc  # noqa: F401  (flax config)
from posenc import encodings, models
from posenc.models.kernels import ATTENTION_IMPLS, resolve_attention_impl

TINY = dict(width=32, depth=2, num_heads=4, mlp_dim=64)
IMPLS = ("per_head", "xla", "dot_product_attention")


def names_for(ndim: int) -> list[str]:
  return [n for n in encodings.names() if ndim in encodings.get(n).supported_ndims]


def value_and_grads(name: str, posenc_name: str, inputs: dict, **kwargs):
  """For each implementation: sum(output * weights) and its gradient w.r.t. every parameter."""
  results = {}
  for impl in IMPLS:
    model = nnx.eval_shape(lambda: models.create(name, posenc=posenc_name, rngs=nnx.Rngs(0),
                                                 attention_impl=impl, **kwargs))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        # FIRE's threshold_init is a length, not a weight: 4 puts the threshold inside the 0..6
        # positions, so both branches of max(query, threshold) run and the threshold gets a gradient.
        lambda path, a: (np.full(a.shape, 4.0, np.float32) if "threshold_init" in jax.tree_util.keystr(path)
                         else 0.3 * rng.standard_normal(a.shape).astype(np.float32)),
        nnx.to_pure_dict(params))
    is_key = lambda a: jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)  # noqa: E731
    rest = jax.tree.map(lambda a: jax.random.key(0) if is_key(a) else np.zeros(a.shape, a.dtype),
                        nnx.to_pure_dict(rest))

    def loss(p):
      out = nnx.merge(graphdef, p, rest)(**inputs)
      results["output"] = out.shape, out.dtype  # recorded while tracing
      weights = jax.random.normal(jax.random.key(1), out.shape)
      return jnp.sum(out * weights)

    results[impl] = jax.jit(jax.value_and_grad(loss))(params)
  return results


def check_grads(grads: dict) -> None:
  flat = {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.traversals.flatten_mapping(grads).items()}
  bad = [k for k, g in flat.items() if not np.all(np.isfinite(g))]
  assert not bad, f"non-finite gradients: {bad}"
  # FIRE's threshold_init is a constant stored as a parameter (the reference code's init_L): no gradient.
  dead = [k for k, g in flat.items() if not np.any(g) and not k.endswith("threshold_init")]
  assert not dead, f"parameters with zero gradient: {dead}"


def assert_same(results: dict, shape: tuple) -> None:
  assert results["output"] == (shape, jnp.float32)
  value, grads = results["per_head"]
  check_grads(grads)
  for impl in IMPLS[1:]:
    other_value, other_grads = results[impl]
    np.testing.assert_allclose(other_value, value, rtol=1e-5, atol=1e-5)
    assert jax.tree.structure(other_grads) == jax.tree.structure(grads), impl  # no leaf missing or extra
    for a, b in zip(jax.tree.leaves(other_grads), jax.tree.leaves(grads), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(b).max())))


@pytest.mark.parametrize("posenc_name", names_for(2))
def test_vit_implementations_agree(posenc_name):
  images = jnp.asarray(np.random.default_rng(2).standard_normal((2, 28, 28, 1)), jnp.float32)
  assert_same(value_and_grads("vit-mu", posenc_name, {"images": images}, num_classes=5, image_size=28,
                              patch_size=7, channels=1, num_registers=1, **TINY), (2, 5))


@pytest.mark.parametrize("posenc_name", encodings.names(1, causal=False))  # BERT attends both ways
def test_bert_implementations_agree_with_padding_and_packing(posenc_name):
  rng = np.random.default_rng(3)
  ids = jnp.asarray(rng.integers(1, 64, (2, 12)), jnp.int32)
  inputs = {"input_ids": ids, "padding_mask": jnp.arange(12)[None, :] < jnp.array([[12], [9]]),
            "packing_ids": jnp.asarray([[1] * 5 + [2] * 7, [1] * 12], jnp.int32),
            "positions": jnp.asarray([list(range(5)) + list(range(7)), list(range(12))], jnp.int32)}
  assert_same(value_and_grads("bert-mini", posenc_name, inputs, vocab_size=64, max_len=16, **TINY), (2, 12, 64))


@pytest.mark.parametrize("posenc_name", names_for(1))
def test_gpt_implementations_agree_with_the_causal_mask(posenc_name):
  rng = np.random.default_rng(4)
  ids = jnp.asarray(rng.integers(1, 64, (2, 12)), jnp.int32)
  inputs = {"input_ids": ids, "positions": jnp.asarray([list(range(5)) + list(range(7))] * 2, jnp.int32),
            "packing_ids": jnp.asarray([[1] * 5 + [2] * 7] * 2, jnp.int32)}
  assert_same(value_and_grads("gpt-nano", posenc_name, inputs, vocab_size=64, max_len=16, **TINY), (2, 12, 64))


def test_auto_picks_per_backend_and_unknown_is_a_clear_error():
  assert resolve_attention_impl("auto", "cpu") == "per_head"
  assert resolve_attention_impl("auto", "gpu") == "dot_product_attention"
  assert resolve_attention_impl("auto", "tpu") == "dot_product_attention"
  assert set(IMPLS) | {"auto"} == set(ATTENTION_IMPLS)
  with pytest.raises(ValueError, match="attention_impl 'flash' is unknown"):
    resolve_attention_impl("flash")
