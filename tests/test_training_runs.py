"""End-to-end training runs: train.py in subprocesses (as a user would) on tiny models.

Kill-and-resume must give bit-identical parameters, 1 and 8 devices the same loss curve, and two
processes (jax.distributed on 127.0.0.1, gloo) the same run again; damaged checkpoints, bad
command lines and non-finite losses each end in one clear message.
"""
from __future__ import annotations

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

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, load_config
from posenc.training import NonFiniteLossError, train
from posenc.training import checkpoint as ckpt_lib
from posenc.training.metrics import read_history

# Tiny models and runs: the subprocess start-up and compiles dominate these tests.
TINY_VIT = ("model_options.width=16,model_options.depth=1,model_options.num_heads=2,"
            "model_options.mlp_dim=32,patch_size=7,batch_size=16,eval_batch_size=256,"
            "eval_max_batches=2,total_steps=8,warmup_steps=2,lr=5e-3,log_every=1,eval_every=0,"
            "checkpoint_every=4")
TINY_BERT = ("model_options.width=16,model_options.depth=1,model_options.num_heads=2,"
             "model_options.mlp_dim=32,max_len=16,batch_size=8,eval_batch_size=16,"
             "eval_max_batches=2,total_steps=6,warmup_steps=1,lr=1e-2,log_every=1,eval_every=0,"
             "checkpoint_every=3")


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
