"""Runs that survive (posenc/training/guard.py and the loop): SIGTERM / SIGINT save the step and resume bit
exactly, one writer per workdir, storage failures are one message, divergence stops before anything diverged is
saved and the advice works, damaged checkpoints never restart a run silently, a failed start leaves nothing."""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from posenc.config import load_config_file
from posenc.training import ConfigError, NonFiniteLossError, Preempted, RunError, StorageError, train
from posenc.training import checkpoint as ckpt_lib
from posenc.training import guard, loop
from posenc.training.metrics import read_history

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TINY = ("model_options.width=16,model_options.depth=1,model_options.num_heads=2,model_options.mlp_dim=32,"
        "patch_size=7,batch_size=16,eval_batch_size=256,eval_max_batches=1,warmup_steps=2,lr=5e-3,log_every=1,"
        "eval_every=0")


def config(extra: str = ""):
  return load_config_file(f"{REPO / 'configs' / 'vit_tiny.py'}:{TINY},{extra}".rstrip(","))


def params_of(workdir: Path, step: int) -> dict:
  return ocp.StandardCheckpointer().restore((workdir / "checkpoints" / str(step) / "params").resolve())


def assert_same_params(a: dict, b: dict) -> None:
  jax.tree.map(np.testing.assert_array_equal, a, b)


def train_py(args: list[str], **kw) -> subprocess.Popen:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """12 steps, uninterrupted, checkpoints at 6 and 12 (in-process)."""
  workdir = tmp_path_factory.mktemp("reference")
  train(config("total_steps=12,checkpoint_every=6"), str(workdir))
  return workdir


# --------------------------------------------------------------------------- preemption

def test_sigterm_saves_the_step_in_progress_and_the_run_resumes_bit_exactly(reference, tmp_path):
  """A real train.py process, SIGTERM at a random moment after training started: exit 143, one line naming the
  checkpoint of the step it finished; rerun resumes from exactly that step and ends with the same parameters."""
  args = [f"--config=configs/vit_tiny.py:{TINY},total_steps=12,checkpoint_every=6", f"--workdir={tmp_path}"]
  proc = train_py(args)
  deadline = time.time() + 300
  while not (tmp_path / "metrics.jsonl").exists() or '"train/loss"' not in (tmp_path / "metrics.jsonl").read_text():
    assert proc.poll() is None and time.time() < deadline, proc.communicate()
    time.sleep(0.02)
  time.sleep(random.uniform(0.0, 0.3))
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  if proc.returncode == 0:
    pytest.skip("the run finished before the signal arrived")  # 12 tiny steps can outrun the signal
  assert proc.returncode == 143, err[-3000:]
  line = [l for l in err.splitlines() if l.startswith("Stopped by SIGTERM")]
  assert len(line) == 1 and "Traceback" not in err, err[-3000:]
  step = int(line[0].split("after step ")[1].split(";")[0])
  assert f"checkpoints/{step}" in line[0] and (tmp_path / "checkpoints" / str(step)).is_dir()
  again = train_py(args)
  out, err = again.communicate(timeout=300)
  assert again.returncode == 0, err[-3000:]
  assert f"Resuming from {tmp_path}/checkpoints/{step} (step {step})" in out
  assert_same_params(params_of(tmp_path, 12), params_of(reference, 12))


def test_a_signal_during_an_async_save_and_a_second_one_while_saving(reference, tmp_path, monkeypatch, capsys):
  """SIGTERM lands while the step-4 checkpoint is being written asynchronously: the loop saves the next step
  (after step 4's save completes) and stops; a second SIGTERM during that save changes nothing. Resuming gives
  the uninterrupted run's parameters."""
  real_save, calls = ckpt_lib.Checkpointer.save, []

  def save(self, step, *args, **kw):
    real_save(self, step, *args, **kw)  # async: returns while the files are written
    calls.append(step)
    if step == 4:
      os.kill(os.getpid(), signal.SIGTERM)
    elif len(calls) == 2:
      os.kill(os.getpid(), signal.SIGTERM)  # the second signal, during the synchronous save of the stop

  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save)
  with pytest.raises(Preempted, match=r"Stopped by SIGTERM after step 5; saved .*checkpoints/5") as info:
    train(config("total_steps=12,checkpoint_every=4"), str(tmp_path))
  assert info.value.exit_code == 143 and calls == [4, 5]
  assert "still saving" in capsys.readouterr().err
  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", real_save)
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [4, 5]
  train(config("total_steps=12,checkpoint_every=6"), str(tmp_path))
  assert_same_params(params_of(tmp_path, 12), params_of(reference, 12))
  history = read_history(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in history if "train/loss" in r] == list(range(1, 13))  # appended, never truncated


# --------------------------------------------------------------------------- one writer per workdir

def test_a_second_run_in_the_same_workdir_stops_naming_the_first(tmp_path):
  args = [f"--config=configs/vit_tiny.py:{TINY},total_steps=400,checkpoint_every=0", f"--workdir={tmp_path}"]
  first = train_py(args)
  try:
    deadline = time.time() + 300
    while not (tmp_path / ".lock").exists() or not (tmp_path / ".lock").read_text().strip():
      assert first.poll() is None and time.time() < deadline
      time.sleep(0.02)
    second = train_py(args)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 1 and "Traceback" not in err, err
    assert f"is in use by another run (host {os.uname().nodename}, pid {first.pid}, started " in err
    assert first.poll() is None  # the first run goes on
  finally:
    first.kill()
    first.communicate()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, capsys):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (tmp_path / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "start": "earlier"}))
  train(config("total_steps=2,checkpoint_every=0"), str(tmp_path))
  assert f"taking over the stale lock of process {dead.pid}" in capsys.readouterr().err
  assert not (tmp_path / ".lock").read_text().strip()  # released at the end


# --------------------------------------------------------------------------- storage

@pytest.fixture
def small_disk(tmp_path):
  """A real 1.5 MiB tmpfs (root only): a run's checkpoint does not fit twice."""
  mount = tmp_path / "disk"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mount)],
                    capture_output=True).returncode:
    pytest.skip("cannot mount a tmpfs here (needs root)")
  yield mount
  subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_stops_with_one_message_and_keeps_the_complete_checkpoints(small_disk):
  workdir = small_disk / "run"
  cfg = config("total_steps=40,checkpoint_every=1,keep_checkpoints=50")
  with pytest.raises(StorageError, match=r"the disk is full") as info:
    train(cfg, str(workdir))
  message = str(info.value)
  assert str(workdir) in message and "Traceback" not in message
  kept = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), read_only=True).all_steps()
  assert kept and f"checkpoints/{max(kept)}" in message  # the newest complete one is named
  for step in kept:  # every checkpoint that became visible is complete (half-written ones stay temporary)
    params_of(workdir, step)


def test_a_read_only_workdir_stops_with_one_message(small_disk):
  subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
  with pytest.raises(StorageError, match=r"read-only") as info:
    train(config("total_steps=2"), str(small_disk / "run"))
  assert str(small_disk / "run") in str(info.value)


def test_a_failed_metrics_write_is_one_message(tmp_path, monkeypatch):
  """EACCES injected into the metrics write (root ignores permission bits, so the error is injected)."""
  def refuse(*args, **kw):
    raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "metrics.jsonl"))

  monkeypatch.setattr(loop.MetricLogger, "log", refuse)
  with pytest.raises(StorageError, match=r"cannot write metrics.jsonl .*permission denied"):
    train(config("total_steps=2"), str(tmp_path))


def test_a_failed_start_leaves_the_workdir_as_it_found_it(tmp_path, monkeypatch):
  proc = train_py([f"--config=configs/vit_tiny.py:{TINY},lr=-1", f"--workdir={tmp_path / 'new'}"])
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 2 and "config field 'lr'" in err and not (tmp_path / "new").exists()

  def broken(run):
    raise RuntimeError("the dataset went away")

  monkeypatch.setattr(loop, "_eval_splits", broken)
  with pytest.raises(RuntimeError, match="went away"):
    train(config("total_steps=2"), str(tmp_path / "other"))
  assert not (tmp_path / "other").exists()


# --------------------------------------------------------------------------- divergence and damage

def test_divergence_stops_names_the_last_healthy_checkpoint_and_the_advice_works(tmp_path):
  with pytest.raises(NonFiniteLossError) as info:
    train(config("total_steps=12,checkpoint_every=1,lr=1e6,grad_clip_norm=0,warmup_steps=0"), str(tmp_path))
  message = str(info.value)
  bad = int(message.split("the loss at step ")[1].split()[0])
  kept = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), read_only=True)
  newest = max(kept.all_steps())
  assert newest < bad and f"checkpoints/{newest} (step {newest}, training loss" in message
  assert "lower --config.lr (it was 1e+06)" in message
  losses = kept.train_losses()
  assert all(np.isfinite(v) and v < 10 for v in losses.values())  # every saved state is healthy
  # the advice: the same command with a lower learning rate continues from that checkpoint and finishes
  results = train(config("total_steps=12,checkpoint_every=1,lr=1e-3,grad_clip_norm=0,warmup_steps=0"),
                  str(tmp_path))
  assert np.isfinite(results["loss"])


def test_restore_step_resumes_from_an_earlier_kept_checkpoint(reference, tmp_path):
  shutil.copytree(reference, tmp_path / "w")
  train(config("total_steps=12,checkpoint_every=6,restore_step=6,keep_checkpoints=3"), str(tmp_path / "w"))
  assert (tmp_path / "w" / "checkpoints.abandoned").is_dir()  # step 12 set aside, then redone
  assert_same_params(params_of(tmp_path / "w", 12), params_of(reference, 12))
  with pytest.raises(ConfigError, match=r"restore_step=5 is not a kept checkpoint .* \(kept: 6, 12\)"):
    train(config("total_steps=12,checkpoint_every=6,restore_step=5"), str(tmp_path / "w"))


def test_every_checkpoint_damaged_stops_until_restart_is_asked_for(reference, tmp_path):
  shutil.copytree(reference, tmp_path / "w")
  for step_dir in (tmp_path / "w" / "checkpoints").iterdir():
    for f in step_dir.rglob("*"):
      if f.is_file() and f.stat().st_size > 0 and "params" in str(f):
        f.write_bytes(b"")  # truncated
  before = (tmp_path / "w" / "metrics.jsonl").read_text()
  for _ in range(2):  # a second attempt does not start afresh silently either
    with pytest.raises(RunError, match=r"every checkpoint of the run .* is damaged .*--config.restart=True"):
      train(config("total_steps=12,checkpoint_every=6"), str(tmp_path / "w"))
  assert (tmp_path / "w" / "metrics.jsonl").read_text() == before
  train(config("total_steps=12,checkpoint_every=6,restart=True"), str(tmp_path / "w"))
  assert (tmp_path / "w" / "metrics.jsonl").read_text().startswith(before)  # appended to, never truncated
  assert_same_params(params_of(tmp_path / "w", 12), params_of(reference, 12))
