"""Every step lowers for GPU (``cuda``) and TPU on this CPU-only machine (``jax.export``, no device).

For each task and one encoding per hook kind (embed, attention bias, rotate, after-block), in
bfloat16, the train step, the evaluation step, the restore-time transfer and (causal LM) the KV-cache
decoding loop are exported for ``cuda`` and ``tpu``, on the run's 8-device mesh and unsharded on one
device. Each platform gets the choices ``auto`` makes there: ``jax.nn.dot_product_attention`` (cuDNN's
fused kernel on a GPU where it applies, else XLA's) and unrolled layers on GPUs, scanned on TPUs.
cuDNN's kernel can only be lowered with cuDNN present, so the GPU export lowers XLA's kernel in its
place; ``test_cudnn_is_chosen_at_run_time_on_gpus`` pins that ``auto`` picks cuDNN on a GPU. No
program may call back into the host: its custom calls are only sharding annotations.
"""
from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import posenc  # noqa: F401  (flax config)
from posenc import models, transfer
from posenc.config import load_config_file
from posenc.models import kernels
from posenc.models.kernels import resolve_scan_layers
from posenc.training import setup, steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ("model_options.width=32,model_options.depth=2,model_options.num_heads=2,model_options.mlp_dim=64,"
         "dataset=synthetic,dtype=bfloat16,warmup_steps=0")
TASKS = {  # (config, its geometry's size, a bigger one for the transfer)
    "vit_tiny": ("image_size=28,patch_size=7,batch_size=8", "image_size=28", "image_size=56"),
    "bert_small": ("batch_size=8", "max_len=16", "max_len=32"),
    "gpt_tiny": ("vocab_size=300,batch_size=8,eval_tokens=0", "max_len=16", "max_len=32"),
}
# One encoding per hook kind that each task can hold (after-block: CPE, 2D only).
CASES = [("vit_tiny", "learned"), ("vit_tiny", "rel_bias"), ("vit_tiny", "rope"), ("vit_tiny", "cpe"),
         ("bert_small", "learned"), ("bert_small", "alibi"), ("bert_small", "rope"),
         ("gpt_tiny", "learned"), ("gpt_tiny", "alibi"), ("gpt_tiny", "rope")]
BACKEND = {"cuda": "gpu", "tpu": "tpu"}
SHARDING_CALLS = {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"}


def run_for(name: str, posenc_name: str, platform: str, size: int = 1):
  backend = BACKEND[platform]
  impl = kernels.resolve_attention_impl("auto", backend)
  scan = resolve_scan_layers(None, backend)
  options = ",".join([SMALL, TASKS[name][0], TASKS[name][size], f"posenc={posenc_name}", f"attention_impl={impl}",
                      f"model_options.scan_layers={scan}"])
  return setup(load_config_file(os.path.join(ROOT, "configs", f"{name}.py:{options}")))


def abstract(tree, sharding=None):
  """ShapeDtypeStructs of ``tree``, keeping each leaf's sharding unless ``sharding`` replaces it."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=getattr(x, "sharding", None) if sharding is None
                                                     else sharding), tree)


def unsharded(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def lower(fn, *args, platform: str, devices: int, bfloat16: bool = True) -> str:
  exported = jax.export.export(fn, platforms=(platform,))(*args)
  assert exported.platforms == (platform,) and exported.nr_devices == devices
  text = exported.mlir_module()
  calls = set(re.findall(r"custom_call @(\w+)", text)) | set(re.findall(r'call_target_name = "(\w+)"', text))
  assert calls <= SHARDING_CALLS, f"{platform} program calls {sorted(calls - SHARDING_CALLS)}"
  assert ("bf16" in text) == bfloat16  # the model computes in bfloat16; parameters stay float32
  return text


@pytest.mark.parametrize("platform", sorted(BACKEND))
@pytest.mark.parametrize("name,posenc_name", CASES)
def test_train_eval_and_transfer_lower_sharded_and_on_one_device(name, posenc_name, platform):
  run = run_for(name, posenc_name, platform)
  devices = jax.device_count()
  batch = next(iter(run.loader("train", train=True)))
  state = run.spec.abstract
  lower(run.train_step, state, abstract(batch, run.batch_sharding), platform=platform, devices=devices)
  lower(run.evals[0].step, state["params"], state["model_state"], abstract(batch, run.batch_sharding),
        platform=platform, devices=devices)

  # One device: the same step, jitted without shardings.
  train_step = jax.jit(steps.make_train_step(run.spec.graphdef, run.spec.tx, steps.task_forward(run.task),
                                             run.task.metrics))
  lower(train_step, unsharded(state), unsharded(batch), platform=platform, devices=1)

  # Restore at a bigger size: the transfer, onto the new run's sharded parameters.
  target = run_for(name, posenc_name, platform, size=2)
  move = transfer.jit_transfer(posenc_name, run.geometry, target.geometry, target.spec.abstract["params"],
                               in_shardings=(run.spec.shardings["params"],))
  lower(move, state["params"], platform=platform, devices=devices, bfloat16=False)
  out = jax.eval_shape(move, state["params"])
  assert jax.tree.map(lambda x: x.shape, out) == jax.tree.map(lambda x: x.shape, target.spec.abstract["params"])


@pytest.mark.parametrize("platform", sorted(BACKEND))
@pytest.mark.parametrize("posenc_name", ("learned", "alibi", "rope", "forgetting"))  # forgetting: cache state
def test_kv_cache_decoding_lowers(posenc_name, platform):
  run = run_for("gpt_tiny", posenc_name, platform)
  graphdef, state = run.spec.graphdef, run.spec.abstract
  prompt = jax.ShapeDtypeStruct((2, 5), jnp.int32)

  def decode(params, model_state, prompt, key):
    model = nnx.merge(graphdef, params, model_state)
    return (models.generate(model, prompt, 8),
            models.generate(model, prompt, 8, temperature=0.7, rng=key))

  key = jax.eval_shape(lambda: jax.random.key(0))
  text = lower(jax.jit(decode), unsharded(state["params"]), unsharded(state["model_state"]), prompt, key,
               platform=platform, devices=1)
  assert "while" in text  # the cached loop, not an unrolled recomputation


def test_cudnn_is_chosen_at_run_time_on_gpus():
  """What the GPU export above could not lower: on a GPU, ``auto`` hands bfloat16 attention of these
  head sizes to cuDNN's fused kernel, chosen when the program is traced on that backend."""
  assert kernels.resolve_attention_impl("auto", "gpu") == "dot_product_attention"
  assert kernels.resolve_attention_impl("auto", "tpu") == "dot_product_attention"
  head_dim = 32 // 2
  assert kernels.fused_kernel(jnp.bfloat16, head_dim, "gpu") == "cudnn"
  assert kernels.fused_kernel(jnp.bfloat16, head_dim, "cpu") == "xla"  # what the export here lowered
  assert kernels.fused_kernel(jnp.bfloat16, head_dim, "tpu") == "xla"
  assert resolve_scan_layers(None, "tpu") and not resolve_scan_layers(None, "gpu")
  np.testing.assert_equal(jax.default_backend(), "cpu")
