"""Training: config validation, sharding rules, optimizer, checkpoints, and end-to-end runs.

End-to-end runs use train.py in subprocesses (as a user would) on tiny models:
kill-and-resume must give bit-identical parameters, 1 and 8 devices the same loss
curve, and two processes (jax.distributed on 127.0.0.1, gloo) the same run again.
"""
from __future__ import annotations

import importlib

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from posenc import models, tasks
from posenc.config import load_config_file
from posenc.data import masked_lm
from posenc.tasks.base import cross_entropy
from posenc.tasks.masked_lm import masked_positions
from posenc.training import ConfigError, NonFiniteLossError, setup, train, validate
from posenc.training import checkpoint as ckpt_lib
from posenc.training import config as config_lib
from posenc.training import distributed, optim, sharding
from posenc.training.metrics import read_history

REPO = Path(__file__).resolve().parents[1]
# Tiny models and runs: the subprocess start-up and compiles dominate these tests.
TINY_VIT = ("model_options.width=16,model_options.depth=1,model_options.num_heads=2,"
            "model_options.mlp_dim=32,patch_size=7,batch_size=16,eval_batch_size=256,"
            "eval_max_batches=2,total_steps=8,warmup_steps=2,lr=5e-3,log_every=1,eval_every=0,"
            "checkpoint_every=4")
TINY_BERT = ("model_options.width=16,model_options.depth=1,model_options.num_heads=2,"
             "model_options.mlp_dim=32,max_len=16,batch_size=8,eval_batch_size=16,"
             "eval_max_batches=2,total_steps=6,warmup_steps=1,lr=1e-2,log_every=1,eval_every=0,"
             "checkpoint_every=3")


def load_config(name: str, arg: str | None = None):
  return load_config_file(f"{REPO / 'configs' / name}.py" + (f":{arg}" if arg else ""))


# --------------------------------------------------------------------------- configs


def test_get_config_short_overrides_and_presets():
  c = load_config("vit_tiny", "full,posenc=rope_mixed,eval_image_sizes=(14,28),lr=1,mesh.data=2")
  base = load_config("vit_tiny")
  assert c.posenc == "rope_mixed" and c.eval_image_sizes == (14, 28) and c.mesh.data == 2
  assert c.lr == 1.0 and isinstance(c.lr, float)
  assert c.total_steps > base.total_steps  # the full-length preset
  with pytest.raises(ConfigError, match="'lrr'"):
    load_config("vit_tiny", "lrr=1")
  with pytest.raises(ConfigError, match="'max_len'"):  # a text field: not in an image config
    load_config("vit_tiny", "max_len=64")
  with pytest.raises(ConfigError, match="'image_size'"):
    load_config("bert_small", "image_size=28")
  with pytest.raises(ConfigError, match="'total_steps'"):
    load_config("vit_tiny", "total_steps=many")
  with pytest.raises(ConfigError, match="preset 'fast'"):
    load_config("vit_tiny", "fast")


@pytest.mark.parametrize("name", ["vit_tiny", "bert_small"])  # gpt_tiny has no presets
def test_every_preset_builds_a_valid_run(name):
  """Each named preset (README's table) passes validation and builds its model abstractly."""
  module = importlib.import_module(f"configs.{name}")
  assert module.PRESETS
  for preset in module.PRESETS:
    run = setup(load_config(name, preset))
    assert jax.tree.leaves(run.spec.abstract["params"]), preset


def test_every_config_field_is_its_tasks_and_documented():
  common = (REPO / "configs" / "common.py").read_text().splitlines()
  for field in config_lib.COMMON_FIELDS:
    line = next(l for l in common if l.strip().startswith(f"c.{field} ="))
    assert "#" in line, f"common.py: field {field} has no comment"
  for name, task in (("vit_tiny", "image_classification"), ("bert_small", "masked_lm"), ("gpt_tiny", "causal_lm")):
    config = load_config(name)
    assert config.task == task
    assert set(config) == config_lib.COMMON_FIELDS | set(tasks.get(task).FIELDS)
    source = (REPO / "configs" / f"{name}.py").read_text().splitlines()
    for field in tasks.get(task).FIELDS:
      line = next(l for l in source if l.strip().startswith(f"c.{field} ="))
      assert "#" in line, f"{name}: task field {field} has no comment"


def test_model_options_only_override_the_named_size():
  """--config.model=vit-ti builds ViT-Ti (the config restates no widths of its default size)."""
  vit = setup(load_config("vit_tiny", "model=vit-ti")).spec.abstract["params"]
  assert vit["blocks"]["layers"]["attn"]["qkv"].shape == (12, 192, 3, 3, 64)  # depth, width, heads, q/k/v
  assert 5.3e6 < sum(x.size for x in jax.tree.leaves(vit)) < 5.6e6           # ViT-Ti at patch 7: ~5.4M
  bert = setup(load_config("bert_small", "model=bert-mini")).spec.abstract["params"]
  assert bert["blocks"]["layers"]["mlp"]["fc1"].shape == (4, 256, 1024)


@pytest.mark.parametrize("name,arg,field", [
    ("vit_tiny", "posenc=bogus", "'posenc'"),
    ("vit_tiny", "posenc=sinusoidal", "'posenc'"),          # 1D-only encoding on a ViT
    ("bert_small", "posenc=cpe", "'posenc'"),               # 2D-only encodings on BERT
    ("bert_small", "posenc=rope_mixed", "'posenc'"),
    ("bert_small", "posenc=sincos2d", "'posenc'"),
    ("vit_tiny", "patch_size=5", "'patch_size'"),
    ("vit_tiny", "eval_image_sizes=(30,)", "'patch_size'"),
    ("vit_tiny", "batch_size=12", "'batch_size'"),          # 8 devices
    ("vit_tiny", "total_steps=-5", "'total_steps'"),
    ("vit_tiny", "total_steps=0", "'total_steps' is 0.*init_from"),  # evaluating needs a checkpoint
    ("vit_tiny", "warmup_steps=-1", "'warmup_steps'"),
    ("vit_tiny", "checkpoint_every=-1", "'checkpoint_every'"),
    ("vit_tiny", "lr=0", "'lr'"),
    ("vit_tiny", "mesh.model=3", "'mesh'"),
    ("vit_tiny", "mesh.model=2,mesh.fsdp=2,mesh.data=1", "'mesh'"),
    ("vit_tiny", "dtype=float16", "'dtype'"),
    ("vit_tiny", "dataset=text", "'dataset'"),
    ("vit_tiny", "train_split=trian", "'train_split'.*Unknown split"),
    ("vit_tiny", "train_split=train[:60001]", "'train_split'.*60000 examples"),
    ("vit_tiny", "init_from=/no/such/run", "'init_from'"),
    ("vit_tiny", "task=no_such_task", "'task'"),
    ("vit_tiny", "transfer.method=cubic", "'transfer'"),
    ("vit_tiny", "posenc=learned,transfer.interpolate_positions=True", "'transfer.interpolate_positions'"),
    ("vit_tiny", "eval_image_sizes=((28, 28, 3),)", "'eval_image_sizes'"),
    ("bert_small", "max_len=0", "'max_len'"),
    ("gpt_tiny", "posenc=cpe", "'posenc'"),                 # 2D-only encodings on GPT
    ("gpt_tiny", "posenc=ropee", r"'posenc'.*did you mean 'rope'\?\); choose one of the 1D encodings: alibi, fire"),
    ("gpt_tiny", "model=gpt-nan", r"'model'.*'gpt-nano'\?\); choose one of: gpt-nano, gpt-mini, gpt-small\."),
    ("gpt_tiny", "task=causal", r"'task'.*did you mean 'causal_lm'\?"),
    ("gpt_tiny", "max_len=0", "'max_len'"),
    ("gpt_tiny", "vocab_size=100", "'vocab_size'"),
    ("gpt_tiny", "batch_size=12", "'batch_size'"),
    ("gpt_tiny", "eval_lengths=(32,),eval_stride=64", "'eval_stride'"),
    ("gpt_tiny", "dataset=fashion_mnist", "'dataset'"),
])
def test_bad_config_gives_one_clear_error(name, arg, field):
  config = load_config(name, arg)
  with pytest.raises(ConfigError, match=field):
    validate(config, num_devices=8)


def test_unknown_presets_and_fields_suggest_the_closest():
  with pytest.raises(ConfigError, match=r"preset 'fulll' \(did you mean 'full'\?\); choose from \['digits', 'full',"):
    load_config("vit_tiny", "fulll")
  with pytest.raises(ConfigError, match=r"config has no field 'lrr' \(did you mean 'lr'\?\); fields: "):
    load_config("gpt_tiny", "lrr=1")
  with pytest.raises(ConfigError, match=r"no field 'mesh.dat' \(did you mean 'mesh.data'\?\); fields: mesh.data, "):
    load_config("gpt_tiny", "mesh.dat=1")


@pytest.mark.parametrize("name,arg,field", [
    ("vit_tiny", "posenc_options.no_such_option=1", "posenc_options"),   # the encoding's own check
    ("vit_tiny", "model_options.no_such_option=1", "model_options"),
    ("vit_tiny", "model=vit-xl", "unknown model 'vit-xl'"),
])
def test_bad_model_or_encoding_options_are_one_clear_error_before_compiling(name, arg, field):
  with pytest.raises(ConfigError, match=field):
    setup(load_config(name, arg))


def test_good_configs_validate_and_resolve_the_mesh():
  assert validate(load_config("vit_tiny"), num_devices=8) == (8, 1, 1)
  assert validate(load_config("bert_small", "mesh.model=2,mesh.fsdp=2"), num_devices=8) == (2, 2, 2)
  assert validate(load_config("vit_tiny", "batch_size=12"), num_devices=4) == (4, 1, 1)


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


# --------------------------------------------------------------------------- end to end


def run_train(args: list[str], devices: int, *, wait: bool = True):
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]  # conftest's others
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])}
  cmd = [sys.executable, str(REPO / "train.py"), *args]
  if not wait:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def kill_after_checkpoint(procs: list, workdir: Path, step: int) -> None:
  """SIGKILL ``procs`` as soon as checkpoint ``step`` is committed (renamed into place)."""
  deadline = time.time() + 300
  while not (workdir / "checkpoints" / str(step)).is_dir():
    assert time.time() < deadline and all(p.poll() is None for p in procs), [
        p.communicate()[0][-3000:] for p in procs if p.poll() is not None]
    time.sleep(0.02)
  for p in procs:
    p.send_signal(signal.SIGKILL)
  for p in procs:
    p.communicate()
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def read_params(workdir: Path, step: int) -> dict:
  path = (workdir / "checkpoints" / str(step) / "params").resolve()
  return ocp.StandardCheckpointer().restore(path)


def train_losses(workdir: Path) -> np.ndarray:
  """The run's train losses as its history reads them (a resume redoes the steps after its checkpoint)."""
  return np.array([r["train/loss"] for r in read_history(str(workdir / "metrics.jsonl")) if "train/loss" in r])


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def vit_args(workdir) -> list[str]:
  return [f"--config=configs/vit_tiny.py:{TINY_VIT}", f"--workdir={workdir}"]


def resume(template: Path, workdir: Path, devices: int) -> subprocess.CompletedProcess:
  """Copy a killed run's workdir and resume it on ``devices``; it must resume from step 4."""
  shutil.copytree(template, workdir)
  out = run_train(vit_args(workdir), devices)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"Resuming from {workdir}/checkpoints/4 (step 4)" in out.stdout, out.stdout[-2000:]
  return out


def assert_close_to(workdir: Path, reference: Path) -> None:
  """Same run on another device count: the same losses and parameters up to float reordering."""
  np.testing.assert_allclose(train_losses(workdir), train_losses(reference), rtol=2e-4)
  got, want = (jax.tree.map(np.array, read_params(w, 8)) for w in (workdir, reference))
  # The key bias shifts every logit of a query equally (softmax ignores it with `learned`), so its
  # gradient is rounding noise, different for 1 and 8 devices, that Adam scales up to +-lr steps.
  for params in (got, want):
    params["blocks"]["layers"]["attn"]["qkv_bias"][..., 1, :] = 0.0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4), got, want)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The reference: tiny ViT, 8 steps on 8 devices, no interruption."""
  workdir = tmp_path_factory.mktemp("vit") / "a"
  out = run_train(vit_args(workdir), 8)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir, out


@pytest.fixture(scope="module")
def killed8(tmp_path_factory) -> Path:
  """The same run on 8 devices, SIGKILLed right after its step-4 checkpoint (tests resume copies)."""
  workdir = tmp_path_factory.mktemp("killed8") / "w"
  kill_after_checkpoint([run_train(vit_args(workdir), 8, wait=False)], workdir, 4)
  return workdir


@pytest.mark.slow
def test_vit_run_logs_evaluates_and_checkpoints(uninterrupted):
  workdir, out = uninterrupted
  assert f"workdir: {workdir}" in out.stdout and "final: loss=" in out.stdout
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 9))
  assert all(r["train/images_per_sec"] > 0 for r in records if "train/loss" in r and r["step"] > 1)
  test = [r for r in records if "test/accuracy" in r]
  assert len(test) == 1 and 0.15 < test[0]["test/accuracy"] <= 1.0  # 10 classes: chance is 0.1
  assert list((workdir / "tb").glob("events.out.tfevents.*"))
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [4, 8]
  losses = train_losses(workdir)
  assert np.all(np.isfinite(losses)) and losses[-3:].mean() < losses[:3].mean()
  meta = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), read_only=True).meta(8)
  assert (meta["task"], meta["geometry"], meta["posenc"]) == (
      "image_classification", {"shape": [4, 4], "num_prefix": 1}, "learned")


@pytest.mark.slow
def test_sigkill_and_resume_gives_bit_identical_params(uninterrupted, killed8, tmp_path):
  reference, _ = uninterrupted
  resume(killed8, tmp_path / "w", 8)
  want, got = read_params(reference, 8), read_params(tmp_path / "w", 8)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  np.testing.assert_array_equal(train_losses(tmp_path / "w"), train_losses(reference))


@pytest.mark.slow
def test_checkpoint_of_eight_devices_resumes_on_one(uninterrupted, killed8, tmp_path):
  out = resume(killed8, tmp_path / "w", 1)
  assert "mesh data=1, fsdp=1, model=1 over 1 device(s)" in out.stdout
  assert_close_to(tmp_path / "w", uninterrupted[0])


@pytest.mark.slow
def test_one_device_run_matches_eight_and_resumes_on_eight(uninterrupted, tmp_path):
  template = tmp_path / "killed1"
  kill_after_checkpoint([run_train(vit_args(template), 1, wait=False)], template, 4)
  reference = uninterrupted[0]
  np.testing.assert_allclose(train_losses(template)[:4], train_losses(reference)[:4], rtol=2e-4)
  out = resume(template, tmp_path / "w", 8)
  assert "mesh data=8, fsdp=1, model=1 over 8 device(s)" in out.stdout
  assert_close_to(tmp_path / "w", reference)


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


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated_file", "half_written_step"])
def test_damaged_newest_checkpoint_resumes_from_the_previous_one(uninterrupted, tmp_path, damage):
  reference, _ = uninterrupted
  workdir = tmp_path / "w"
  shutil.copytree(reference, workdir)
  step8 = workdir / "checkpoints" / "8"
  if damage == "truncated_file":
    victim = max((p for p in (step8 / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
  else:
    shutil.rmtree(step8 / "train")
    shutil.rmtree(step8 / "data")
  out = run_train(vit_args(workdir), 8)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Traceback" not in out.stdout + out.stderr
  assert f"checkpoint {step8}" in out.stdout and "is damaged" in out.stdout
  assert f"Resuming from {workdir}/checkpoints/4 (step 4)" in out.stdout
  assert [p.name.split("-")[0] for p in (workdir / "checkpoints.damaged").iterdir()] == ["8"]  # kept
  jax.tree.map(np.testing.assert_array_equal, read_params(workdir, 8), read_params(reference, 8))


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume(uninterrupted, tmp_path):
  reference, _ = uninterrupted
  port = free_port()

  def launch():
    return [run_train(vit_args(tmp_path) + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                            f"--process_id={i}"], 2, wait=False) for i in range(2)]

  kill_after_checkpoint(launch(), tmp_path, 4)
  procs = launch()
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outs]
  assert f"Resuming from {tmp_path}/checkpoints/4 (step 4)" in outs[0] and "2 process(es)" in outs[0]
  data_state = tmp_path / "checkpoints" / "8" / "data"
  assert {p.name for p in data_state.glob("process_*.json")} == {"process_0-of-2.json",
                                                                  "process_1-of-2.json"}
  # Two processes x 2 devices read the same global batches as one process x 8 devices.
  np.testing.assert_allclose(train_losses(tmp_path), train_losses(reference), rtol=2e-4)


@pytest.mark.slow
def test_cli_input_errors_are_one_message_without_traceback(uninterrupted, tmp_path):
  (tmp_path / "a_file").write_text("")
  (tmp_path / "broken.py").write_text("def get_config(:\n")
  bert = tmp_path / "bert"
  bert.mkdir()  # a checkpoint of another task, for init_from
  cases = [
      (["--config=configs/no_such_file.py"], "no config file 'configs/no_such_file.py'"),
      ([f"--config={tmp_path}/broken.py"], "SyntaxError at line 1"),
      (["--config=configs/vit_tiny.py:bogus"], "unknown config preset 'bogus'"),
      (["--config=configs/vit_tiny.py:lrr=1"], "config has no field 'lrr'"),
      (["--config=configs/vit_tiny.py", "--config.lr=fast"], "could not convert string to float"),
      (["--config=configs/vit_tiny.py", "--config.no_such_field=1"], "unknown field(s) ['no_such_field']"),
      (["--config=configs/vit_tiny.py:image_size=30"], "'patch_size': 7 does not divide image_size=30"),
      (["--config=configs/vit_tiny.py:posenc=sinusoidal"], "does not support the 2D inputs"),
      ([f"--config=configs/vit_tiny.py:init_from={tmp_path}"], f"no checkpoint under '{tmp_path}'"),
      ([f"--config=configs/bert_small.py:init_from={uninterrupted[0]}"], "is a 'image_classification' run"),
      ([f"--config=configs/vit_tiny.py:{TINY_VIT},model_options.width=32", f"--workdir={uninterrupted[0]}"],
       "cannot resume from workdir"),
      (["--config=configs/vit_tiny.py"], "is a file, not a directory"),
  ]
  procs = []
  for args, _ in cases:
    if not any(a.startswith("--workdir") for a in args):
      args = args + [f"--workdir={tmp_path / 'a_file'}"]  # reached only by the last case
    procs.append(run_train(args, 1, wait=False))
  for (args, message), proc in zip(cases, procs):
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode not in (0, None), args
    assert "Traceback" not in out and message in out, (args, out[-1500:])
  assert sorted(int(p.name) for p in (uninterrupted[0] / "checkpoints").iterdir()) == [4, 8]  # untouched


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  config = load_config("vit_tiny", TINY_VIT + ",lr=1e30,warmup_steps=1,checkpoint_every=1,"
                       "grad_clip_norm=0")
  with pytest.raises(NonFiniteLossError, match=r"the loss at step \d+ is not finite") as info:
    train(config, str(tmp_path))
  failed = int(str(info.value).split("the loss at step ")[1].split()[0])
  ck = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=1, read_only=True)
  last = ck.latest_step()
  assert last is not None and last < failed and f"checkpoints/{last}" in str(info.value)
  params = read_params(tmp_path, last)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_bert_mlm_run(tmp_path):
  results = train(load_config("bert_small", TINY_BERT), str(tmp_path))
  losses = train_losses(tmp_path)
  assert len(losses) == 6 and np.all(np.isfinite(losses))
  assert losses[0] > math.log(30522) - 1.0 and losses[-1] < losses[0]  # starts near chance, learns
  assert 0.0 <= results["accuracy"] <= 1.0 and np.isfinite(results["loss"])
  assert results["loss"] < math.log(30522)
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3, 6]
