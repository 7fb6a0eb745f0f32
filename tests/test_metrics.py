"""The metric logger's sinks: TensorBoard event files that TensorBoard's own reader reads back with
the values and steps of metrics.jsonl, and a history that drops what a resume redoes."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.util import tensor_util

from conftest import REPO, load_config
from posenc.training import setup, train
from posenc.training.metrics import MetricLogger, read_history


def tensorboard_scalars(tb_dir) -> dict[str, list[tuple[int, float]]]:
  """``{tag: [(step, value), ...]}`` as TensorBoard's scalar plugin loads them from ``tb_dir``."""
  events = plugin_event_accumulator.EventAccumulator(str(tb_dir), size_guidance={"tensors": 0})
  events.Reload()
  assert events.PluginTagToContent("scalars")  # tagged for the scalars dashboard
  return {tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]
          for tag in events.Tags()["tensors"]}


def test_event_files_hold_the_jsonl_records(tmp_path):
  log = MetricLogger(str(tmp_path), total_steps=10)
  rng = np.random.default_rng(0)
  for step in range(1, 6):
    log.log(step, {"loss": rng.uniform(0, 3), "accuracy": rng.uniform()}, "train")
  log.log(5, {"accuracy": 0.8125, "loss": 0.5}, "test")
  log.close()
  assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
  scalars = tensorboard_scalars(tmp_path / "tb")
  want: dict[str, list[tuple[int, float]]] = {}
  for record in read_history(str(tmp_path / "metrics.jsonl")):
    for tag, value in record.items():
      if tag not in ("step", "time"):
        want.setdefault(tag, []).append((record["step"], float(np.float32(value))))
  assert set(want) >= {"train/loss", "train/accuracy", "train/steps_per_sec", "test/accuracy", "test/loss"}
  assert scalars == want
  assert scalars["test/accuracy"] == [(5, 0.8125)]


def test_history_drops_the_steps_a_resume_redoes(tmp_path):
  log = MetricLogger(str(tmp_path), total_steps=10)
  for step in range(1, 5):
    log.log(step, {"loss": float(step)}, "train")
  log.event(2, "resumed")
  for step in range(3, 5):
    log.log(step, {"loss": 10.0 * step}, "train")
  log.close()
  history = read_history(str(tmp_path / "metrics.jsonl"))
  assert [(r["step"], r["train/loss"]) for r in history] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_writing_events_imports_neither_torch_nor_tensorflow(tmp_path):
  """Event files cost no torch import (seconds per train.py process where torch is installed)."""
  script = textwrap.dedent(f"""
      import sys
      from posenc.training.metrics import MetricLogger
      log = MetricLogger({str(tmp_path)!r}, total_steps=1)
      log.log(1, {{"loss": 1.0}}, "train")
      log.close()
      print(sorted({{"torch", "tensorflow"}} & set(sys.modules)))
  """)
  out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == "[]"
  assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_the_loop_clock_puts_a_slow_input_pipeline_in_its_data_share(tmp_path, capsys):
  """Each batch after the first (compiling) step waits 0.2 s for its data: the loop's record of where
  its time went puts at least that in ``data``, and the phases add up to its wall time."""
  run = setup(load_config("vit_tiny", "model_options.width=16,model_options.depth=1,model_options.num_heads=2,"
                                      "model_options.mlp_dim=32,batch_size=16,eval_batch_size=64,eval_max_batches=1,"
                                      "total_steps=6,warmup_steps=1,log_every=2,eval_every=3,checkpoint_every=3"))
  loader = run.loader

  def slow_loader(split, *, train, size=None):
    batches = loader(split, train=train, size=size)
    return batches.map(lambda b: (time.sleep(0.2), b)[1]) if train else batches

  run.loader = slow_loader
  train(run, str(tmp_path))
  (clock,) = [r for r in read_history(str(tmp_path / "metrics.jsonl")) if "loop_time/total_s" in r]
  phases = {k.split("/")[1][:-2]: v for k, v in clock.items() if k.startswith("loop_time/") and k != "loop_time/total_s"}
  assert set(phases) == {"steps", "data", "logging", "evaluation", "checkpoints"}
  assert phases["data"] >= 5 * 0.2 and phases["evaluation"] > 0 and phases["checkpoints"] > 0
  assert min(phases.values()) >= 0
  assert abs(sum(phases.values()) - clock["loop_time/total_s"]) < 1e-6
  assert "loop time after the first step:" in capsys.readouterr().out
