"""The bias encodings' options ``bias_once_per_forward`` and ``per_layer`` (what benchmarks.bias_sharing times).

``bias_once_per_forward=False`` recomputes a layer-shared bias in every layer: the same parameters, the
same function and gradients, more calls of the hook. ``per_layer=True`` gives each layer its own
parameters: ``num_layers`` times as many, and the layer-shared model's function when every layer
holds the shared parameters. Models are tiny (width 32, 2 layers, layers unrolled).
"""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from flax import nnx

import posenc  # noqa: F401  (flax config)
from posenc import encodings, models

TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64, scan_layers=False)
MODELS = {"vit-mu": dict(num_classes=5, image_size=28, patch_size=7, channels=1, **TINY),
          "bert-mini": dict(vocab_size=64, max_len=16, **TINY)}
FAST_COMPILE = {"xla_backend_optimization_level": 0}
CASES = [("vit-mu", "cpb", {}), ("vit-mu", "rel_bias", {}), ("vit-mu", "alibi", {}),
         ("bert-mini", "rel_bias", {}), ("bert-mini", "kerple", {}), ("bert-mini", "fire", {"per_layer": False})]


def abstract(name: str, posenc_name: str, options: dict):
  return nnx.eval_shape(lambda: models.create(name, posenc=posenc_name, rngs=nnx.Rngs(0), posenc_options=options,
                                              **MODELS[name]))


def random_params(model, seed: int = 0) -> tuple[dict, dict]:
  """(params, rest) of ``model`` as pure dicts: every parameter N(0, 0.3^2), a fresh key for dropout."""
  _, params, rest = nnx.split(model, nnx.Param, ...)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda a: 0.3 * rng.standard_normal(a.shape).astype(np.float32), nnx.to_pure_dict(params))
  is_key = lambda a: jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)  # noqa: E731
  rest = jax.tree.map(lambda a: jax.random.key(seed) if is_key(a) else np.zeros(a.shape, a.dtype),
                      nnx.to_pure_dict(rest))
  return params, rest


def inputs(name: str):
  rng = np.random.default_rng(1)
  if name.startswith("vit"):
    return rng.standard_normal((2, 28, 28, 1)).astype(np.float32)
  return rng.integers(1, 64, (2, 12))


def value_and_grad(model, params, rest, x):
  graphdef = nnx.graphdef(model)
  fn = lambda p, x: jax.value_and_grad(lambda p: nnx.merge(graphdef, p, rest)(x).sum())(p)  # noqa: E731
  return jax.jit(fn).lower(params, x).compile(compiler_options=FAST_COMPILE)(params, x)


def count(tree) -> int:
  return sum(math.prod(np.shape(a)) for a in jax.tree.leaves(tree))


@pytest.mark.parametrize("name, posenc_name, options", CASES)
def test_bias_once_per_forward_off_keeps_parameters_and_function_and_calls_the_hook_per_layer(
    name, posenc_name, options, monkeypatch):
  once = abstract(name, posenc_name, options)
  every = abstract(name, posenc_name, dict(options, bias_once_per_forward=False))
  assert once.posenc.bias_shared_by_layers and not every.posenc.bias_shared_by_layers
  params, rest = random_params(once)
  assert jax.tree.map(np.shape, nnx.to_pure_dict(nnx.state(every, nnx.Param))) == jax.tree.map(np.shape, params)
  calls = []
  cls = type(once.posenc)
  original = cls.attention_bias
  monkeypatch.setattr(cls, "attention_bias", lambda self, *a: calls.append(1) or original(self, *a))
  x = inputs(name)
  out_once, grad_once = value_and_grad(once, params, rest, x)
  assert len(calls) == 1
  out_every, grad_every = value_and_grad(every, params, rest, x)
  assert len(calls) == 1 + TINY["depth"]
  np.testing.assert_allclose(out_every, out_once, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grad_every, grad_once)


@pytest.mark.parametrize("name, posenc_name", [("vit-mu", "cpb"), ("vit-mu", "rel_bias"), ("bert-mini", "kerple"),
                                               ("bert-mini", "fire")])
def test_per_layer_multiplies_the_bias_parameters_and_equals_sharing_when_the_layers_agree(name, posenc_name):
  shared = abstract(name, posenc_name, {"per_layer": False})
  own = abstract(name, posenc_name, {"per_layer": True})
  assert not own.posenc.bias_shared_by_layers
  params, rest = random_params(shared)
  own_params, own_rest = random_params(own)
  assert count(own_params["posenc"]) == TINY["depth"] * count(params["posenc"])
  others = lambda tree: jax.tree.map(np.shape, {k: v for k, v in tree.items() if k != "posenc"})  # noqa: E731
  assert others(own_params) == others(params)
  # Every layer holds the shared parameters: the per-layer model computes the shared model's function.
  copied = dict(params, posenc=jax.tree.map(lambda a, b: np.broadcast_to(a, b.shape).copy(), params["posenc"],
                                            own_params["posenc"]))
  x = inputs(name)
  out_shared, _ = value_and_grad(shared, params, rest, x)
  out_own, grad_own = value_and_grad(own, copied, own_rest, x)
  np.testing.assert_allclose(out_own, out_shared, rtol=1e-5, atol=1e-5)
  # ... and each layer's copy gets its own gradient: the layers' parts differ.
  first = jax.tree.leaves(grad_own["posenc"])[0]
  assert not np.allclose(first[0], first[1])


def test_the_option_is_named_by_every_bias_encoding_and_ignored_with_per_layer_parameters():
  geometry = encodings.Geometry.seq(8)
  for name in ("rel_bias", "alibi", "kerple", "fire"):
    for once in (True, False):
      enc = nnx.eval_shape(lambda: encodings.make(name, dim=32, num_heads=2, num_layers=2, geometry=geometry,
                                                  per_layer=False, bias_once_per_forward=once, rngs=nnx.Rngs(0))
                           if name != "alibi" else encodings.make(name, num_heads=2, bias_once_per_forward=once))
      assert enc.bias_shared_by_layers is once, (name, once)
  per_layer = encodings.make("kerple", num_heads=2, num_layers=2, per_layer=True, bias_once_per_forward=True,
                             rngs=nnx.Rngs(0))
  assert not per_layer.bias_shared_by_layers  # its bias differs per layer: computed in each
  with pytest.raises(ValueError, match="bias_once_per_forward"):
    encodings.make("learned", dim=32, geometry=geometry, bias_once_per_forward=False, rngs=nnx.Rngs(0))
