"""Tests for posenc/models: ViT and BERT (every model x encoding forward/backward: test_attention_impls).

Models are tiny (width 32, 2 layers). Programs are compiled with XLA's backend
optimisation level 0, which compiles faster and computes the same functions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import posenc  # noqa: F401  (flax config)
from posenc import encodings, models
from posenc.encodings.base import Encoding, Geometry

TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64)
VIT = dict(num_classes=5, image_size=28, patch_size=7, channels=1, **TINY)
BERT = dict(vocab_size=64, max_len=16, **TINY)
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def run_jit(fn, *args):
  """``jax.jit(fn)(*args)``, compiled for speed of compilation."""
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def names_for(ndim: int) -> list[str]:
  return [n for n in encodings.names() if ndim in encodings.get(n).supported_ndims]


def images(batch=2, h=28, w=28, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, h, w, 1)), jnp.float32)


def build(name: str, posenc_name: str, seed: int = 0, **kwargs):
  """(graphdef, params, rest) of a model whose parameters are drawn on the host.

  Nothing is compiled: the model is built abstractly (``nnx.eval_shape``),
  every parameter is N(0, 0.3^2) and the dropout stream gets a fresh key.
  Tests that need the model's own initialisation call ``models.create``.
  """
  model = nnx.eval_shape(lambda: models.create(name, posenc=posenc_name, rngs=nnx.Rngs(0), **kwargs))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda a: 0.3 * rng.standard_normal(a.shape).astype(np.float32), nnx.to_pure_dict(params))
  is_key = lambda a: jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
  rest = jax.tree.map(lambda a: jax.random.key(seed) if is_key(a) else np.zeros(a.shape, a.dtype),
                      nnx.to_pure_dict(rest))
  return graphdef, params, rest


@pytest.mark.parametrize("posenc_name, stem", [("rope", "patch"), ("sincos2d", "patch"), ("cpe", "patch"),
                                               ("none", "patch"), ("cpe", "conv")])
def test_vit_runs_at_new_sizes_from_the_same_parameters(posenc_name, stem):
  patch = 7 if stem == "patch" else 4
  kwargs = dict(VIT, stem=stem, patch_size=patch)
  graphdef, params, rest = build("vit-mu", posenc_name, **kwargs)
  # The same parameters in a model built at a new size define the same function there.
  new = 6 * patch if stem == "patch" else 44
  graphdef_new = nnx.graphdef(nnx.eval_shape(lambda: models.create("vit-mu", posenc=posenc_name, rngs=nnx.Rngs(0),
                                                                 **dict(kwargs, image_size=new))))
  sizes = [(28, 28), (new, new), (28, 56)]
  batch = [images(h=h, w=w, seed=i) for i, (h, w) in enumerate(sizes)]

  def run(params, xs):
    model = nnx.merge(graphdef, params, rest)
    return [model(x) for x in xs] + [nnx.merge(graphdef_new, params, rest)(xs[1])]

  *outs, built_new = run_jit(run, params, batch)
  for out in outs:
    assert out.shape == (2, 5) and np.all(np.isfinite(out))
  assert not np.allclose(outs[0], outs[1])
  np.testing.assert_allclose(built_new, outs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("extra", [0, 2])
def test_conv_stem_matches_torch(extra):
  """ConvStem == torch Conv2d(3x3, stride 2, pad 1) -> LayerNorm over channels -> GELU(tanh), twice for patch 4,
  then ``extra`` times the same with stride 1, and maps H x W to the patchify grid H/4 x W/4."""
  torch = pytest.importorskip("torch", reason="no torch (pip install -e .[test])")

  from posenc.models.stems import ConvStem

  stem = ConvStem(4, 3, 16, 1e-6, jnp.float32, jnp.float32, nnx.Rngs(0), extra_convs=extra)
  rng = np.random.default_rng(0)
  for norm in stem.norms:  # non-trivial LayerNorm affine parameters
    norm.scale[...] = jnp.asarray(1 + 0.3 * rng.standard_normal(norm.scale.shape), jnp.float32)
    norm.bias[...] = jnp.asarray(0.3 * rng.standard_normal(norm.bias.shape), jnp.float32)
  x = rng.standard_normal((2, 28, 44, 3)).astype(np.float32)
  got = np.asarray(run_jit(lambda m, x: m(x), stem, x))
  assert got.shape == (2, 7, 11, 16)

  y = torch.tensor(x.transpose(0, 3, 1, 2))
  with torch.no_grad():
    for i, (kernel, norm) in enumerate(zip(stem.kernels, stem.norms)):
      y = torch.nn.functional.conv2d(y, torch.tensor(np.asarray(kernel[...]).transpose(3, 2, 0, 1)),
                                     stride=2 if i < 2 else 1, padding=1)
      scale, bias = (torch.tensor(np.asarray(v[...])) for v in (norm.scale, norm.bias))
      y = torch.nn.functional.layer_norm(y.permute(0, 2, 3, 1), (y.shape[1],), scale, bias, eps=1e-6)
      y = torch.nn.functional.gelu(y, approximate="tanh").permute(0, 3, 1, 2)
  assert [k.shape for k in stem.kernels] == [(3, 3, 3, 8), (3, 3, 8, 16)] + [(3, 3, 16, 16)] * extra
  np.testing.assert_allclose(got, y.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-4)


def test_learned_grid_at_new_size_is_a_clear_error():
  vit = nnx.eval_shape(lambda: models.create("vit-mu", posenc="learned", rngs=nnx.Rngs(0), **VIT))
  with pytest.raises(ValueError, match="posenc.transfer"):
    nnx.eval_shape(lambda m, x: m(x), vit, jax.ShapeDtypeStruct((2, 42, 42, 1), jnp.float32))
  with pytest.raises(ValueError, match=r"image size 30x28 is not divisible by the patch size 7"):
    nnx.eval_shape(lambda m, x: m(x), vit, jax.ShapeDtypeStruct((2, 30, 28, 1), jnp.float32))


def test_bad_model_arguments_are_clear_errors():
  build = lambda name, **kw: nnx.eval_shape(lambda: models.create(name, posenc="none", rngs=nnx.Rngs(0), **kw))
  with pytest.raises(ValueError, match="unknown model 'vit-xl'"):
    build("vit-xl")
  with pytest.raises(ValueError, match=r"no option\(s\) \['num_layers'\]"):
    build("vit-mu", num_layers=3)
  with pytest.raises(ValueError, match="pool must be"):
    build("vit-mu", pool="max")
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    build("bert-mini", width=30, num_heads=4)
  with pytest.raises(ValueError, match="image size 30x30 is not divisible"):
    build("vit-mu", image_size=30)
  with pytest.raises(ValueError, match="stem must be"):
    build("vit-mu", stem="resnet")
  with pytest.raises(ValueError, match="power of 2"):
    build("vit-mu", stem="conv", patch_size=7, image_size=28)
  with pytest.raises(ValueError, match="stem_width.*needs stem='conv'"):
    build("vit-mu", stem_width=128)
  with pytest.raises(ValueError, match="stem_extra_convs.*needs stem='conv'"):
    build("vit-mu", stem_extra_convs=1)
  wide = build("vit-mu", stem="conv", stem_width=128, patch_size=4, image_size=28)  # 1 -> 64 -> 128 -> 1x1 -> 64
  assert [k.shape for k in wide.stem.kernels] == [(3, 3, 3, 64), (3, 3, 64, 128)]
  assert wide.patch_embed.shape == (1, 1, 128, 64)
  logits = nnx.eval_shape(lambda m, x: m(x), wide, jax.ShapeDtypeStruct((2, 28, 28, 3), jnp.float32))
  assert logits.shape == (2, 10)
  bert = build("bert-mini", **BERT)
  ids = jax.ShapeDtypeStruct((2, 8), jnp.int32)
  with pytest.raises(ValueError, match="padding_mask has shape"):
    nnx.eval_shape(lambda m, i, p: m(i, padding_mask=p), bert, ids, jax.ShapeDtypeStruct((2, 7), bool))
  learned = nnx.eval_shape(lambda: models.create("bert-mini", posenc="learned", rngs=nnx.Rngs(0), **BERT))
  with pytest.raises(ValueError, match="max_len=16"):  # the learned table's own error, at trace time
    nnx.eval_shape(lambda m, i: m(i), learned, jax.ShapeDtypeStruct((2, 20), jnp.int32))


CALLS: list[tuple] = []  # (hook, geometry, layer, positions shape) appended by Recorder, at trace time


class Recorder(Encoding):
  """Records every hook call so the models' calling contract can be checked."""

  def embed(self, x, geometry, positions):
    CALLS.append(("embed", geometry, None, positions.shape))
    return x

  def attention_bias(self, geometry, positions, layer):
    CALLS.append(("attention_bias", geometry, layer, positions.shape))

  def rotate(self, q, k, geometry, positions, layer):
    CALLS.append(("rotate", geometry, layer, positions.shape))
    return q, k

  def after_block(self, x, geometry, positions, layer):
    CALLS.append(("after_block", geometry, layer, positions.shape))
    return x


@pytest.mark.parametrize("scan_layers", [True, False])
def test_models_call_every_hook_with_the_input_geometry(scan_layers):
  vit = nnx.eval_shape(lambda: models.ViT(posenc="none", rngs=nnx.Rngs(0), scan_layers=scan_layers,
                                          num_registers=2, **dict(VIT, depth=3)))
  vit.posenc = Recorder()
  CALLS.clear()
  nnx.eval_shape(lambda m, x: m(x), vit, jax.ShapeDtypeStruct((1, 28, 35, 1), jnp.float32))
  kinds = [c[0] for c in CALLS]
  assert kinds.count("embed") == 1
  for hook in ("attention_bias", "rotate", "after_block"):
    assert kinds.count(hook) == (1 if scan_layers else 3), hook  # a scan traces its body once
  assert all(c[1] == Geometry.grid(4, 5, num_prefix=3) for c in CALLS)
  assert all(c[3] == (1, 20, 2) for c in CALLS)  # default positions: the grid, shared by the batch
  if not scan_layers:
    assert [c[2] for c in CALLS if c[0] == "after_block"] == [0, 1, 2]


@pytest.mark.parametrize("name, posenc_name, options, scan_layers", [
    ("vit-mu", "cpb", {}, False), ("vit-mu", "cpb", {}, True), ("vit-mu", "rel_bias", {}, False),
    ("vit-mu", "alibi", {}, False), ("bert-mini", "kerple", {}, False), ("bert-mini", "fire", {"per_layer": False}, False)])
def test_a_layer_shared_bias_is_computed_once_and_changes_nothing(name, posenc_name, options, scan_layers,
                                                                   monkeypatch):
  """An encoding whose bias ignores the layer is called once per forward; outputs and gradients equal
  those of calling it in every layer."""
  kwargs = dict(VIT if name.startswith("vit") else BERT, posenc_options=options, scan_layers=scan_layers)
  graphdef, params, rest = build(name, posenc_name, **kwargs)
  per_layer = nnx.eval_shape(lambda: models.create(name, posenc=posenc_name, rngs=nnx.Rngs(0), **kwargs))
  assert per_layer.posenc.bias_shared_by_layers
  if posenc_name != "alibi":  # per-layer parameters: a bias per layer
    own = nnx.eval_shape(lambda: models.create(name, posenc=posenc_name, rngs=nnx.Rngs(0),
                                               **dict(kwargs, posenc_options={"per_layer": True})))
    assert not own.posenc.bias_shared_by_layers
  per_layer.posenc.bias_shared_by_layers = False
  graphdef_per_layer = nnx.graphdef(per_layer)
  inputs = images() if name.startswith("vit") else jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 12)))

  calls = []
  cls = type(per_layer.posenc)
  original = cls.attention_bias
  monkeypatch.setattr(cls, "attention_bias", lambda self, *a: calls.append(1) or original(self, *a))

  def run(params, x):
    value_and_grad = lambda g: jax.value_and_grad(lambda p: nnx.merge(g, p, rest)(x).sum())(params)
    return value_and_grad(graphdef), value_and_grad(graphdef_per_layer)

  (out, grad), (out_per_layer, grad_per_layer) = run_jit(run, params, inputs)
  assert len(calls) == 1 + (1 if scan_layers else TINY["depth"])  # shared: once; per layer: per traced layer
  np.testing.assert_allclose(out, out_per_layer, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grad, grad_per_layer)
  if posenc_name != "alibi":  # the bias's parameters get a gradient (alibi has none)
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grad["posenc"]))


def test_scan_and_loop_compute_the_same_function():
  """Per-layer encoding parameters indexed by a traced (scan) or Python (loop) layer agree."""
  graphdef, params, rest = build("vit-mu", "rope_mixed", scan_layers=True, **VIT)
  graphdef_loop = nnx.graphdef(nnx.eval_shape(lambda: models.create(
      "vit-mu", posenc="rope_mixed", rngs=nnx.Rngs(0), scan_layers=False, **VIT)))

  def run(params, x):
    value_and_grad = lambda g: jax.value_and_grad(lambda p: nnx.merge(g, p, rest)(x).sum())(params)
    return value_and_grad(graphdef), value_and_grad(graphdef_loop)

  (out_s, grad_s), (out_l, grad_l) = run_jit(run, params, images())
  np.testing.assert_allclose(out_l, out_s, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grad_l, grad_s)


def test_bf16_compute_tracks_float32():
  graphdef, params, rest = build("vit-mu", "rel_bias", **VIT)
  graphdef16 = nnx.graphdef(nnx.eval_shape(lambda: models.create(
      "vit-mu", posenc="rel_bias", rngs=nnx.Rngs(0), dtype=jnp.bfloat16, **VIT)))
  out32, out16 = run_jit(lambda p, x: [nnx.merge(g, p, rest)(x) for g in (graphdef, graphdef16)],
                         params, images(batch=4))
  assert out16.dtype == jnp.float32
  np.testing.assert_allclose(out16, out32, atol=0.05 * float(np.abs(out32).max()))
  assert not np.array_equal(out16, out32)  # bf16 compute really happened


def test_dropout_and_drop_path_use_the_model_rng():
  graphdef, params, rest = build("vit-mu", "sincos2d", dropout=0.2, drop_path=0.3, **VIT)

  def three(params, rest, x):
    model = nnx.merge(graphdef, params, rest)
    return model(x, train=True), model(x, train=True), model(x), nnx.to_pure_dict(nnx.state(model, nnx.RngCount))

  a, b, evaluation, counts = run_jit(three, params, rest, images())
  assert not np.allclose(a, b)  # the stream advances between calls
  assert not np.allclose(a, evaluation)
  assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
  assert int(counts["rngs"]["dropout"]["count"]) == 2


@pytest.mark.parametrize("posenc_name", ["alibi", "rel_bias", "learned"])
def test_padded_keys_get_no_attention(posenc_name):
  """Real tokens' hidden states ignore whatever sits in padded positions, with or without a bias hook,
  and equal those of the unpadded sequence."""
  graphdef, params, rest = build("bert-mini", posenc_name, **BERT)
  rng = np.random.default_rng(0)
  real = 9
  ids = rng.integers(1, 64, (2, 14)).astype(np.int32)
  garbage = ids.copy()
  garbage[:, real:] = rng.integers(1, 64, (2, 14 - real))
  mask = np.broadcast_to(np.arange(14) < real, (2, 14))

  def run(params, ids, garbage):
    model = nnx.merge(graphdef, params, rest)
    return model.encode(ids, padding_mask=mask), model.encode(garbage, padding_mask=mask), model.encode(ids[:, :real])

  h1, h2, short = run_jit(run, params, ids, garbage)
  np.testing.assert_allclose(h1[:, :real], h2[:, :real], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(h1[:, :real], short, rtol=1e-5, atol=1e-5)
  assert not np.allclose(h1[:, real:], h2[:, real:])  # the garbage did reach the padded positions


def test_packing_ids_keep_sequences_apart():
  graphdef, params, rest = build("bert-mini", "alibi", **BERT)
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 64, (1, 12)).astype(np.int32)
  other = ids.copy()
  other[:, 7:] = rng.integers(1, 64, (1, 5))
  packing = jnp.asarray([[1] * 7 + [2] * 5], jnp.int32)

  def run(params, ids, other):
    model = nnx.merge(graphdef, params, rest)
    return [model.encode(i, packing_ids=packing) for i in (ids, other)]

  a, b = run_jit(run, params, ids, other)
  np.testing.assert_allclose(a[:, :7], b[:, :7], rtol=1e-6, atol=1e-6)  # the first sequence never sees the second
  assert not np.allclose(a[:, 7:], b[:, 7:])


CONV_STEM = dict(VIT, patch_size=4, stem="conv", stem_width=32, stem_extra_convs=1)


@pytest.mark.parametrize("name, posenc_name, options", [("vit-mu", "rope_mixed", VIT), ("vit-mu", "learned", CONV_STEM),
                                                        ("bert-mini", "rel_bias", BERT)])
def test_logical_axis_sharding_matches_one_device(name, posenc_name, options):
  """(data=4, model=2) mesh, FSDP over data + tensor parallel over model: same outputs as one device."""
  from posenc.training.sharding import state_shardings

  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
  rules = (("batch", "data"), ("embed", "data"), ("mlp", "model"), ("heads", "model"), ("vocab", "model"))
  graphdef, params, rest = build(name, posenc_name, **options)
  if name.startswith("vit"):
    inputs = images(batch=8)
  else:
    inputs = jnp.asarray(np.random.default_rng(0).integers(1, 64, (8, 12)), jnp.int32)
  forward = lambda params, inputs: nnx.merge(graphdef, params, rest)(inputs)
  expected = run_jit(forward, params, inputs)

  abstract_params = nnx.state(nnx.merge(graphdef, params, rest), nnx.Param)
  shardings = state_shardings(abstract_params, rules, mesh)
  specs = [s.spec for s in jax.tree.leaves(shardings)]
  assert any("model" in s for s in specs) and any("data" in s for s in specs)
  got = run_jit(forward, jax.device_put(params, shardings),
                jax.device_put(inputs, NamedSharding(mesh, PartitionSpec("data"))))
  assert len(got.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)
