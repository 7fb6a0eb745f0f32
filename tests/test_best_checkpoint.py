"""The best checkpoint is picked by the task's declared metric (``Task.BEST_METRIC``): the highest eval
accuracy for images, the lowest eval loss for the causal LM (lower loss and perplexity are better)."""
from __future__ import annotations

import json
from pathlib import Path

import grain
import jax.numpy as jnp
import pytest

from posenc.config import load_config_file
from posenc.training import checkpoint as ckpt_lib
from posenc.training import train

REPO = Path(__file__).resolve().parents[1]
TINY = ("model_options.width=16,model_options.depth=1,model_options.num_heads=2,model_options.mlp_dim=32,"
        "warmup_steps=1,total_steps=6,log_every=1,eval_every=1,keep_checkpoints=1,divergence_factor=0")
IMAGE = f"vit_tiny.py:{TINY},patch_size=7,batch_size=16,eval_batch_size=256,eval_max_batches=1,lr=1e-2"
# lr 1.0 is too high on purpose: the eval loss rises after the first step, so the best is not the last
GPT = f"gpt_tiny.py:{TINY},vocab_size=512,max_len=16,batch_size=8,eval_batch_size=8,eval_tokens=256,lr=1.0"


def _state(value: float) -> dict:
  return {"step": jnp.int32(0), "params": {"w": jnp.full((2,), value)}, "opt_state": {},
          "model_state": {}}


@pytest.mark.parametrize("best, kept", [(("accuracy", "max"), [2, 5]), (("loss", "min"), [3, 5])])
def test_checkpointer_keeps_the_last_and_the_best_by_metric_and_direction(tmp_path, best, kept):
  metrics = {1: {"accuracy": 0.3, "loss": 2.0}, 2: {"accuracy": 0.9, "loss": 1.5},
             3: {"accuracy": 0.5, "loss": 0.7}, 4: {"accuracy": 0.6, "loss": 1.1}, 5: {"accuracy": 0.1, "loss": 3.0}}
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=1, best=best)
  data_iter = iter(grain.MapDataset.range(10).to_iter_dataset())
  for step, m in metrics.items():
    ck.save(step, _state(step), data_iter, {}, metrics=m)
  ck.close()
  assert ckpt_lib.Checkpointer(str(tmp_path), read_only=True).all_steps() == kept


def test_checkpointer_rejects_an_unknown_direction(tmp_path):
  with pytest.raises(ValueError, match=r"direction must be one of \('max', 'min'\)"):
    ckpt_lib.Checkpointer(str(tmp_path), best=("loss", "lowest"))


def _run(config: str, workdir: Path) -> tuple[dict[int, dict], list[int]]:
  """Train ``config`` evaluating every step: (step -> its validation metrics, the kept checkpoints)."""
  train(load_config_file(str(REPO / "configs" / config)), str(workdir))
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  evals = {r["step"]: r for r in records if "validation/loss" in r}
  return evals, ckpt_lib.Checkpointer(str(workdir / "checkpoints"), read_only=True).all_steps()


@pytest.mark.slow
def test_an_image_run_keeps_the_highest_eval_accuracy(tmp_path):
  evals, kept = _run(IMAGE, tmp_path)
  best = max(evals, key=lambda s: evals[s]["validation/accuracy"])
  lowest_loss = min(evals, key=lambda s: evals[s]["validation/loss"])
  assert best not in (lowest_loss, 6)  # the run tells the two metrics apart, and the best from the last
  assert kept == [best, 6]


@pytest.mark.slow
def test_a_gpt_run_keeps_the_lowest_eval_loss(tmp_path):
  evals, kept = _run(GPT, tmp_path)
  best = min(evals, key=lambda s: evals[s]["validation/loss"])
  highest_accuracy = max(evals, key=lambda s: evals[s]["validation/accuracy"])
  assert best not in (highest_accuracy, 6)  # the run tells the two metrics apart, and the best from the last
  assert kept == [best, 6]
