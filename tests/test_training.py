"""Training's parts: sharding rules, schedule and optimizer, the MLM loss, cluster detection, and
the checkpointer (keep/best, iterator state, transfer of changed leaves, damaged reads).
End-to-end runs are in test_training_runs.py, configs in test_training_config.py."""
from __future__ import annotations

import math

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from conftest import load_config
from posenc import models, tasks
from posenc.data import masked_lm
from posenc.tasks.base import cross_entropy
from posenc.tasks.masked_lm import masked_positions
from posenc.training import checkpoint as ckpt_lib
from posenc.training import distributed, optim, sharding

# --------------------------------------------------------------------------- mesh, optimizer


def test_logical_rules_shard_what_divides_and_never_reuse_an_axis():
  mesh = sharding.make_mesh((2, 2, 2))
  rules = load_config("vit_tiny").logical_axis_rules
  P = jax.sharding.PartitionSpec
  assert sharding.logical_to_spec(("embed", "mlp"), (64, 256), rules, mesh) == P("fsdp", "model")
  assert sharding.logical_to_spec(("embed", "heads", "kv"), (64, 3, 16), rules, mesh) == P("fsdp", None, None)
  assert sharding.logical_to_spec(("embed", "embed"), (64, 64), rules, mesh) == P("fsdp", None)
  assert sharding.logical_to_spec(("posn", "embed"), (49, 64), rules, mesh) == P(None, "fsdp")
  assert sharding.logical_to_spec(None, (5,), rules, mesh) == P()
  batch = sharding.global_batch({"x": np.arange(48).reshape(16, 3)}, sharding.batch_sharding(mesh, rules))
  assert batch["x"].sharding.spec == P(("data", "fsdp"), None)
  np.testing.assert_array_equal(batch["x"], np.arange(48).reshape(16, 3))


def _opt_config(**kw):
  c = load_config("vit_tiny")
  for k, v in {"lr": 1e-2, "warmup_steps": 3, "total_steps": 10, **kw}.items():
    c[k] = v
  return c


def test_schedule_is_linear_warmup_then_cosine_to_zero():
  c = _opt_config()
  schedule = optim.make_schedule(c)
  for t in range(11):
    want = c.lr * t / 3 if t < 3 else 0.5 * c.lr * (1 + math.cos(math.pi * (t - 3) / 7))
    np.testing.assert_allclose(schedule(t), want, rtol=1e-6, atol=1e-12)


def test_posenc_lr_mult_scales_exactly_the_posenc_updates():
  rng = np.random.default_rng(0)
  params = {"posenc": {"table": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)},
            "w": jnp.asarray(rng.normal(size=(3, 3)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
  grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)

  def updates(mult):
    tx = optim.make_optimizer(_opt_config(posenc_lr_mult=mult, grad_clip_norm=0.0))
    state = tx.init(params)
    for _ in range(4):  # past warmup
      u, state = tx.update(grads, state, params)
    return u

  one, tenth = updates(1.0), updates(0.1)
  np.testing.assert_allclose(tenth["posenc"]["table"], 0.1 * one["posenc"]["table"], rtol=1e-6)
  np.testing.assert_array_equal(tenth["w"], one["w"])
  np.testing.assert_array_equal(tenth["b"], one["b"])


def test_weight_decay_hits_matrices_only():
  params = {"posenc": {"table": jnp.ones((4, 3))}, "w": jnp.ones((3, 3)), "b": jnp.ones(3)}
  zeros = jax.tree.map(jnp.zeros_like, params)
  c = _opt_config(weight_decay=0.5, warmup_steps=0)
  tx = optim.make_optimizer(c)
  u, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(u["w"], -c.lr * 0.5 * np.ones((3, 3)), rtol=1e-6)
  np.testing.assert_array_equal(u["b"], 0.0)
  np.testing.assert_array_equal(u["posenc"]["table"], 0.0)


@pytest.mark.parametrize("length", [16, 64, 128, 512, 2048])
def test_mlm_capacity_overflows_with_negligible_probability(length):
  stats = pytest.importorskip("scipy.stats", reason="no scipy (pip install -e .[test])")
  cap = masked_lm.mlm_capacity(length)
  assert cap <= length and stats.binom.sf(cap, length, masked_lm.MASK_RATE) < 1e-8
  assert length < 64 or cap < length / 2  # and the head does run on a fraction of the row


def test_mlm_loss_at_masked_positions_equals_the_full_logits_loss():
  model = models.create("bert-mini", posenc="alibi", vocab_size=50, max_len=32, width=16, depth=1,
                        num_heads=2, mlp_dim=32, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 50, (4, 32)).astype(np.int32)
  weights = (rng.random((4, 32)) < masked_lm.MASK_RATE).astype(np.float32)
  weights[0] = 0.0  # a row with nothing masked
  batch = {"input_ids": ids, "segment_ids": np.zeros_like(ids), "padding_mask": np.ones((4, 32), bool),
           "mlm_targets": rng.integers(1, 50, (4, 32)).astype(np.int32), "mlm_weights": weights,
           "valid": np.array([1, 1, 1, 0], np.float32)}  # the last row is eval padding
  _, masked = tasks.get("masked_lm").forward(model, batch, train=False)
  full_logits = model(ids, segment_ids=batch["segment_ids"], padding_mask=batch["padding_mask"])
  _, full = cross_entropy(full_logits, batch["mlm_targets"], weights * batch["valid"][:, None])
  assert float(full["count"]) == weights[:3].sum() > 0
  for k in full:
    np.testing.assert_allclose(masked[k], full[k], rtol=1e-5)
  positions = np.asarray(masked_positions(jnp.asarray(weights), 12))
  for row, at in zip(weights, positions):  # the masked tokens first, in order
    k = int(row.sum())
    np.testing.assert_array_equal(at[:k], np.flatnonzero(row)[:12])


def test_cluster_detection():
  assert not distributed.cluster_detected({})
  assert distributed.cluster_detected({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
  assert distributed.cluster_detected({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"})
  assert not distributed.cluster_detected({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"})
  assert distributed.cluster_detected({"TPU_WORKER_HOSTNAMES": "a,b"})
  assert not distributed.cluster_detected({"TPU_WORKER_HOSTNAMES": "a"})


# --------------------------------------------------------------------------- checkpoints


def _toy_state(scale: float, n: int = 3) -> dict:
  return {"step": jnp.int32(0), "params": {"posenc": {"table": jnp.full((n, 2), scale)},
                                         "w": jnp.full((2,), scale)},
          "opt_state": {"mu": jnp.full((2,), -scale)}, "model_state": {"key": jax.random.key(1)}}


def test_checkpointer_keeps_last_k_and_best_and_restores_iterator(tmp_path):
  data_iter = iter(grain.MapDataset.range(100).to_iter_dataset())
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
  accuracies = {2: 0.9, 4: 0.5, 5: 0.6}
  for step in range(1, 6):
    next(data_iter)
    acc = accuracies.get(step)
    ck.save(step, _toy_state(step), data_iter, {"config": {"step": step}},
            metrics=None if acc is None else {"accuracy": acc, "loss": 1.0})
  ck.wait()
  assert ck.manager.all_steps() == [2, 4, 5]  # the last two, and the best (step 2)

  fresh = iter(grain.MapDataset.range(100).to_iter_dataset())
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _toy_state(0.0))
  restored = ck.restore(4, abstract, fresh)
  assert next(fresh) == 4  # the iterator continues after the 4 elements seen by step 4
  np.testing.assert_array_equal(restored["params"]["posenc"]["table"], np.full((3, 2), 4.0))
  np.testing.assert_array_equal(restored["opt_state"]["mu"], np.full((2,), -4.0))
  assert ck.meta(4) == {"config": {"step": 4}}

  wrong = jax.tree.map(ocp.utils.to_shape_dtype_struct, _toy_state(0.0, n=5))
  with pytest.raises(ckpt_lib.CheckpointError, match=r"/4 holds a different model.*posenc/table: stored \(3, 2\), "
                     r"wanted \(5, 2\)"):
    ck.restore(4, wrong, fresh)
  ck.close()


def test_restore_params_transfers_only_changed_leaves(tmp_path):
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=1)
  ck.save(7, _toy_state(3.0), iter(grain.MapDataset.range(4).to_iter_dataset()),
          {"config": {"image_size": 28}})
  ck.wait()
  mesh = sharding.make_mesh((8, 1, 1))
  rep = sharding.replicated(mesh)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                        _toy_state(0.0, n=5)["params"])
  with pytest.raises(ckpt_lib.CheckpointError, match=r"/7 does not fit.*posenc/table: stored \(3, 2\), wanted \(5, 2\)"):
    ck.restore_params(7, target)
  seen = {}

  def move(params):
    seen.update(shape=params["posenc"]["table"].shape)
    table = jnp.pad(params["posenc"]["table"], ((0, 2), (0, 0)))  # any rule of the right shape
    return {**params, "posenc": {"table": table}}

  params, changed = ck.restore_params(7, target, move)
  assert changed == ["posenc/table (3, 2) -> (5, 2)"]
  assert seen == {"shape": (3, 2)}  # read at its stored shape
  assert ck.meta(7) == {"config": {"image_size": 28}}
  np.testing.assert_array_equal(params["posenc"]["table"][:3], np.full((3, 2), 3.0))
  np.testing.assert_array_equal(params["w"], np.full((2,), 3.0))
  assert params["w"].sharding == rep
  ck.close()



def test_late_shard_reads_of_a_damaged_checkpoint_print_no_traceback(caplog):
  """A shard read that finishes after Orbax's event loop closed fails in a
  concurrent.futures callback (asyncio's is_closed() check races with the close);
  Python logs that with a traceback. It is dropped; other callback errors are not."""
  import concurrent.futures
  ckpt_lib._register_array_handler()

  def fail_with(message):
    def callback(_):
      raise RuntimeError(message)
    future = concurrent.futures.Future()
    future.add_done_callback(callback)
    future.set_result(None)  # runs the callback, which Python logs with its traceback

  errors = lambda: [str(r.exc_info[1]) for r in caplog.records if r.exc_info]  # noqa: E731
  fail_with("Event loop is closed")
  assert errors() == []
  fail_with("something else")
  assert errors() == ["something else"]


def test_collected_reads_of_a_damaged_checkpoint_print_no_traceback(monkeypatch):
  """The same abandoned reads, when Python collects their coroutines (at exit, or in the garbage
  collector), reach ``sys.unraisablehook`` ("Exception ignored in ..."): dropped; others are not."""
  import types
  seen = []
  monkeypatch.setattr(ckpt_lib, "_PREVIOUS_UNRAISABLEHOOK", seen.append)

  async def _read_array_index_and_device_put():
    pass

  async def another_coroutine():
    pass

  for fn, message in ((_read_array_index_and_device_put, "Encountered error while reading array index: (...)"),
                      (another_coroutine, "Encountered error while reading array index: (...)"),
                      (_read_array_index_and_device_put, "something else")):
    coroutine = fn()
    ckpt_lib._drop_abandoned_reads(types.SimpleNamespace(exc_value=Exception(message), object=coroutine))
    coroutine.close()
  assert [(u.object.__qualname__.rsplit(".", 1)[-1], str(u.exc_value)) for u in seen] == [
      ("another_coroutine", "Encountered error while reading array index: (...)"),
      ("_read_array_index_and_device_put", "something else")]
