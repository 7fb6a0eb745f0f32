"""End to end: train at 28 px, restore the run at 56 / 14 px (and text 128 -> 512)."""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from posenc.training.config import ConfigError
from posenc.training.loop import train

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(name: str, arg: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


TINY_VIT = ("model_options.width=32,model_options.depth=2,model_options.num_heads=2,"
            "model_options.mlp_dim=64,patch_size=7,batch_size=32,eval_batch_size=256,"
            "warmup_steps=2,eval_every=0,checkpoint_every=0,log_every=10,eval_max_batches=2")


def jsonl(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def vit28(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("vit28"))
  results = train(config("vit_tiny", TINY_VIT + ",total_steps=30,eval_image_sizes=(14,56)"), workdir)
  return workdir, results


def test_eval_at_other_sizes_transfers_on_the_fly(vit28):
  _, results = vit28
  for key in ("accuracy", "accuracy_14", "accuracy_56"):
    assert 0.0 <= results[key] <= 1.0
  assert results["accuracy"] > 0.2  # 30 steps already beat chance (0.1) at the trained size


@pytest.mark.parametrize("size", [56, 14])
def test_restore_at_new_size_trains_with_finite_loss(vit28, tmp_path, size, capsys):
  source, _ = vit28
  workdir = str(tmp_path / f"vit{size}")
  results = train(config("vit_tiny", TINY_VIT + f",total_steps=5,image_size={size},init_from={source}"),
                  workdir)
  out = capsys.readouterr().out
  assert "posenc/table (16, 32) -> " in out and "transferred (bicubic)" in out
  assert all(np.isfinite(r["loss"]) for r in jsonl(workdir) if "loss" in r)
  assert np.isfinite(results["loss"])


def test_same_size_restore_keeps_accuracy(vit28, tmp_path):
  source, results = vit28
  workdir = str(tmp_path / "vit28b")
  again = train(config("vit_tiny", TINY_VIT + f",total_steps=1,lr=1e-12,warmup_steps=0,init_from={source}"),
                workdir)
  assert again["accuracy"] == pytest.approx(results["accuracy"], abs=0.02)


@pytest.mark.parametrize("size", [28, 56])
def test_evaluate_only_restore_matches_the_runs_own_evaluation(vit28, tmp_path, size):
  """``total_steps=0`` + ``init_from`` evaluates the checkpoint at ``image_size``: the same test
  batches, and (at 56) the same transfer, as the run's final evaluation at that size."""
  source, results = vit28
  again = train(config("vit_tiny", TINY_VIT + f",total_steps=0,image_size={size},init_from={source}"),
                str(tmp_path / f"eval{size}"))
  assert again["accuracy"] == results["accuracy" if size == 28 else f"accuracy_{size}"]
  assert again["loss"] == pytest.approx(results["loss" if size == 28 else f"loss_{size}"], rel=1e-5)


def test_restore_into_other_architecture_is_a_clear_error(vit28, tmp_path):
  source, _ = vit28
  with pytest.raises(ConfigError, match=r"(?s)init_from.*patch_embed: stored \(7, 7, 1, 32\), wanted \(4, 4, 1, 32\)"):
    train(config("vit_tiny", TINY_VIT + f",total_steps=1,warmup_steps=0,patch_size=4,init_from={source}"),
          str(tmp_path / "bad"))


TINY_BERT = ("model_options.width=16,model_options.depth=1,model_options.num_heads=2,"
             "model_options.mlp_dim=32,batch_size=8,eval_batch_size=8,eval_max_batches=1,"
             "warmup_steps=1,eval_every=0,checkpoint_every=0,log_every=1")


def test_learned_text_table_128_to_512_on_restore(tmp_path, capsys):
  source = str(tmp_path / "len128")
  train(config("bert_small", TINY_BERT + ",max_len=128,total_steps=3"), source)
  capsys.readouterr()
  workdir = str(tmp_path / "len512")
  results = train(config("bert_small", TINY_BERT + f",max_len=512,total_steps=2,init_from={source}"), workdir)
  assert "posenc/table (128, 16) -> (512, 16)" in capsys.readouterr().out
  assert all(np.isfinite(r["train/loss"]) for r in jsonl(workdir) if "train/loss" in r)
  assert np.isfinite(results["loss"]) and 0.0 <= results["accuracy"] <= 1.0
