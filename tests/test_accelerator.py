"""What must hold on an accelerator, checked on whatever backend runs the tests: the CPU in CI, a GPU
or TPU through ``benchmarks/device_check.sh`` (``JAX_PLATFORMS=cuda pytest -m accelerator``).

- the attention implementations compute the same function in float32 and bfloat16, with cuDNN's
  fused kernel in the compiled program exactly where a GPU offers it (odd lengths padded);
- one real train step of every task (synthetic batches: no dataset needed on the device);
- KV-cache decoding equals recomputing the whole sequence;
- a checkpoint restored at a new size, transferred under ``jit`` onto a sharded mesh, equals the
  host's transfer of the stored parameters.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import posenc  # noqa: F401  (flax config)
from posenc import models, transfer
from posenc.config import load_config_file
from posenc.encodings import Geometry
from posenc.models import kernels
from posenc.models.kernels import resolve_scan_layers
from posenc.training import setup, sharding
from posenc.training.checkpoint import Checkpointer

pytestmark = pytest.mark.accelerator
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND = jax.default_backend()
TINY = dict(width=64, depth=2, num_heads=4, mlp_dim=128)  # head_dim 16: cuDNN's flash kernel takes it
# One encoding per hook that touches attention (none, rotate, bias without and with parameters).
ATTENTION_ENCODINGS = ("none", "rope", "alibi", "rel_bias")


def random_params(graphdef_params_rest, seed=0):
  graphdef, params, rest = graphdef_params_rest
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda a: 0.3 * rng.standard_normal(a.shape).astype(np.float32), nnx.to_pure_dict(params))
  is_key = lambda a: jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)  # noqa: E731
  rest = jax.tree.map(lambda a: jax.random.key(seed) if is_key(a) else np.zeros(a.shape, a.dtype),
                      nnx.to_pure_dict(rest))
  return graphdef, params, rest


def model_loss(name: str, posenc_name: str, impl: str, dtype, inputs: dict, **kwargs):
  """(jitted value-and-grad of sum(output * weights) in the parameters, the parameters)."""
  abstract = nnx.eval_shape(lambda: models.create(name, posenc=posenc_name, rngs=nnx.Rngs(0), attention_impl=impl,
                                                  dtype=dtype, **TINY, **kwargs))
  graphdef, params, rest = random_params(nnx.split(abstract, nnx.Param, ...))

  def loss(p):
    out = nnx.merge(graphdef, p, rest)(**inputs).astype(jnp.float32)
    return jnp.sum(out * jax.random.normal(jax.random.key(1), out.shape))

  return jax.jit(jax.value_and_grad(loss)), params


def gpt_inputs(length=12):
  ids = np.random.default_rng(4).integers(1, 64, (2, length)).astype(np.int32)
  half = length // 2
  return {"input_ids": ids, "positions": np.array([list(range(half)) + list(range(length - half))] * 2, np.int32),
          "packing_ids": np.array([[1] * half + [2] * (length - half)] * 2, np.int32)}


CASES = {  # model, its inputs and options: a causal LM with packing (even length) and a ViT (17 tokens: odd)
    "gpt": ("gpt-nano", gpt_inputs(), dict(vocab_size=64, max_len=16)),
    "vit": ("vit-mu", {"images": np.random.default_rng(2).standard_normal((2, 28, 28, 1)).astype(np.float32)},
            dict(num_classes=5, image_size=28, patch_size=7, channels=1)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("posenc_name", ATTENTION_ENCODINGS)
def test_fused_attention_equals_the_einsum_path_in_float32_and_bfloat16(case, posenc_name):
  name, inputs, options = CASES[case]
  if case == "vit" and posenc_name == "rope":
    posenc_name = "rope_mixed"  # the 2D learned-frequency variant
  results = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    for impl in ("xla", "dot_product_attention"):
      step, params = model_loss(name, posenc_name, impl, dtype, inputs, **options)
      with jax.default_matmul_precision("highest"):
        compiled = step.lower(params).compile()
        results[dtype, impl] = compiled(params)
      if impl == "dot_product_attention":  # which kernel the compiled program calls
        fused = "__cudnn$fmha" in compiled.as_text()
        assert fused == (BACKEND == "gpu" and dtype == jnp.bfloat16), (BACKEND, dtype, fused)
  for dtype, tol in ((jnp.float32, 1e-4), (jnp.bfloat16, 5e-2)):
    (value, grads), (ref_value, ref_grads) = results[dtype, "dot_product_attention"], results[dtype, "xla"]
    scale = max(1.0, abs(float(ref_value)))
    assert abs(float(value) - float(ref_value)) <= tol * scale, (float(value), float(ref_value))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      assert np.all(np.isfinite(a))
      np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1e-3, float(np.abs(b).max())))
  # bfloat16 computes the same function as float32, to bfloat16's precision
  low, high = float(results[jnp.bfloat16, "dot_product_attention"][0]), float(results[jnp.float32, "xla"][0])
  assert abs(low - high) <= 0.1 * max(1.0, abs(high)), (low, high)


def test_auto_chooses_cudnn_on_gpus_only_where_it_applies_and_unrolls_layers_off_tpus():
  assert not resolve_scan_layers(None, "cpu") and not resolve_scan_layers(None, "gpu")  # measured faster
  assert resolve_scan_layers(None, "tpu") and not resolve_scan_layers(False, "tpu")
  assert kernels.resolve_attention_impl("auto", "gpu") == "dot_product_attention"
  assert kernels.resolve_attention_impl("auto", "cpu") == "per_head"
  assert kernels.fused_kernel(jnp.bfloat16, 64, "gpu") == "cudnn"
  assert kernels.fused_kernel(jnp.float16, 128, "gpu") == "cudnn"
  assert kernels.fused_kernel(jnp.float32, 64, "gpu") == "xla"   # cuDNN's flash kernel is 16-bit only
  assert kernels.fused_kernel(jnp.bfloat16, 12, "gpu") == "xla"  # not a multiple of 8
  assert kernels.fused_kernel(jnp.bfloat16, 64, "tpu") == "xla"
  assert kernels.fused_kernel(jnp.bfloat16, 64, "cpu") == "xla"


@pytest.mark.parametrize("t,s,bias_batch,mask_shape", [(7, 7, 1, None), (5, 9, 2, (2, 5, 9)), (7, 7, None, (2, 1, 7)),
                                                       (6, 6, 1, (1, 6, 6))])
def test_odd_lengths_padded_for_the_fused_kernel_give_the_same_values_and_gradients(monkeypatch, t, s, bias_batch,
                                                                                   mask_shape):
  """The cuDNN branch's padding (one masked key, one discarded query), run through XLA's kernel."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, n, 2, 8)), jnp.float32) for n in (t, s, s))
  bias = None if bias_batch is None else jnp.asarray(rng.standard_normal((bias_batch, 2, t, s)), jnp.float32)
  mask = None if mask_shape is None else jnp.asarray(rng.random(mask_shape) > 0.3).at[..., 0].set(True)
  args = (q, k, v) + (() if bias is None else (bias,))
  argnums = tuple(range(len(args)))

  def loss(*a):
    return jnp.sum(jnp.sin(kernels.dot_product_attention(*a[:3], a[3] if len(a) > 3 else None, mask,
                                                           jnp.float32)))

  with jax.default_matmul_precision("highest"):  # GPUs multiply float32 in TF32 by default
    want = jax.value_and_grad(loss, argnums)(*args)
  real = jax.nn.dot_product_attention
  seen = []

  def as_xla(*a, implementation=None, **kw):
    seen.append((implementation, a[0].shape))
    return real(*a, implementation="xla", **kw)

  monkeypatch.setattr(kernels, "fused_kernel", lambda *a, **kw: "cudnn")
  monkeypatch.setattr(jax.nn, "dot_product_attention", as_xla)
  with jax.default_matmul_precision("highest"):
    got = jax.value_and_grad(loss, argnums)(*args)
  assert seen[0] == ("cudnn", (2, t + t % 2, 2, 8))  # the padded branch ran
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


TASKS = {
    "vit_tiny": "image_size=28,patch_size=7,batch_size=8",
    "bert_small": "max_len=16,batch_size=8",
    "gpt_tiny": "max_len=16,vocab_size=300,batch_size=8,eval_tokens=0",
}
SMALL = "model_options.width=32,model_options.depth=1,model_options.num_heads=2,model_options.mlp_dim=64"


def task_config(name: str, extra: str = ""):
  options = ",".join(filter(None, (SMALL, TASKS[name], "dataset=synthetic,dtype=bfloat16,warmup_steps=0", extra)))
  return load_config_file(os.path.join(ROOT, "configs", f"{name}.py:{options}"))


@pytest.mark.parametrize("name", sorted(TASKS))
def test_one_bfloat16_train_step_of_every_task_on_synthetic_batches(name):
  run = setup(task_config(name))
  state = run.spec.init()
  before = jax.tree.map(np.asarray, state["params"])
  batch = sharding.global_batch(next(iter(run.loader("train", train=True))), run.batch_sharding)
  state, metrics = run.train_step(state, batch)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), state["params"], before)
  assert all(jax.tree.leaves(changed)), "a parameter did not move in one AdamW step"


@pytest.mark.parametrize("posenc_name", ("rope", "alibi", "learned"))
def test_kv_cache_decoding_equals_recomputing_the_sequence(posenc_name):
  graphdef, params, rest = random_params(nnx.split(nnx.eval_shape(
      lambda: models.create("gpt-nano", posenc=posenc_name, rngs=nnx.Rngs(0), vocab_size=64, max_len=24, **TINY)),
      nnx.Param, ...))
  prompt = np.random.default_rng(1).integers(0, 64, (2, 5)).astype(np.int32)

  def run(params, prompt):
    model = nnx.merge(graphdef, params, rest)
    return models.generate(model, prompt, 12), models.generate(model, prompt, 12, use_cache=False)

  with jax.default_matmul_precision("highest"):
    cached, recomputed = jax.jit(run)(params, prompt)
  assert cached.shape == (2, 17)
  np.testing.assert_array_equal(cached, recomputed)


def test_restore_at_a_new_size_transfers_onto_a_sharded_mesh(tmp_path):
  model_axis = 2 if jax.device_count() % 2 == 0 else 1
  source = setup(task_config("vit_tiny"))
  state = source.spec.init()
  writer = Checkpointer(str(tmp_path / "checkpoints"), keep=1)
  writer.save(0, state, iter(source.loader("train", train=True)), source.meta)
  writer.close()
  rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "model"), ("heads", "model"), ("kv", None),
           ("vocab", "model"), ("posn", "model"), ("layers", None))
  target = setup(task_config("vit_tiny", f"image_size=56,total_steps=0,init_from={tmp_path},mesh.data=1,"
                                         f"mesh.fsdp=-1,mesh.model={model_axis},logical_axis_rules={rules}"))
  table = target.initial_state()["params"]["posenc"]["table"]
  assert table.shape == (64, 32) and len(table.sharding.device_set) == jax.device_count()
  stored = jax.tree.map(np.asarray, state["params"])
  want = transfer.transfer_params(stored, "learned", Geometry.grid(4, 4, 1), Geometry.grid(8, 8, 1))
  np.testing.assert_allclose(np.asarray(table), want["posenc"]["table"], rtol=1e-5, atol=1e-5)
