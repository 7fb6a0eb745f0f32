"""The dataset 'synthetic': random batches with the keys, shapes and dtypes of each task's real ones,
deterministic in the seed, sharded by process, endless in training and one pass in evaluation."""
from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from posenc.config import load_config_file
from posenc.data import synthetic
from posenc.training import setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"vit_tiny": "eval_image_sizes=(14,56)", "bert_small": "max_len=32", "video_tiny": "eval_num_frames=(4,)",
           "gpt_tiny": "max_len=32,eval_lengths=(64,),eval_stride=16"}


def spec(batch: dict) -> dict:
  return {k: (np.shape(v), np.asarray(v).dtype) for k, v in batch.items()}


def first(loader) -> dict:
  return next(iter(loader))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_synthetic_batches_have_the_real_batches_keys_shapes_and_dtypes(name):
  real = setup(load_config_file(os.path.join(ROOT, "configs", f"{name}.py:{CONFIGS[name]}")))
  fake = setup(load_config_file(os.path.join(ROOT, "configs", f"{name}.py:{CONFIGS[name]},dataset=synthetic")))
  for at in real.evals:
    for split, train in (("train", True), ("validation", False)):
      if train and at.size is not None:
        continue
      want, got = (spec(first(r.loader(split, train=train, size=at.size))) for r in (real, fake))
      if "image" in want:  # synthetic images are 3-channel (the real Fashion-MNIST's are 1-channel)
        want["image"] = (want["image"][0][:-1] + (synthetic.INFO.channels,), want["image"][1])
      assert got == want, (at.size, split)


def test_synthetic_batches_are_deterministic_sharded_and_valid_for_the_model():
  config = load_config_file(os.path.join(ROOT, "configs", "gpt_tiny.py:dataset=synthetic,max_len=16,batch_size=8"))
  task = setup(config).task
  again = lambda seed: list(itertools.islice(synthetic.loader(  # noqa: E731
      lambda rng, rows: task.random_batch(config, rng, rows, train=True), split="train", batch_size=8, train=True,
      seed=seed), 2))
  a, b, c = again(0), again(0), again(1)
  np.testing.assert_array_equal(a[1]["input_ids"], b[1]["input_ids"])
  assert not np.array_equal(a[0]["input_ids"], a[1]["input_ids"]) and not np.array_equal(a[0]["input_ids"],
                                                                                         c[0]["input_ids"])
  assert a[0]["input_ids"].max() < config.vocab_size and (a[0]["positions"] == np.arange(16)).all()
  shard = first(synthetic.loader(lambda rng, rows: task.random_batch(config, rng, rows, train=True), split="train",
                                 batch_size=8, train=True, seed=0, process_index=1, process_count=2))
  assert shard["input_ids"].shape == (4, 16)
  with pytest.raises(ValueError, match="not divisible by the 3 processes"):
    synthetic.loader(lambda rng, rows: {}, split="train", batch_size=8, train=True, seed=0, process_count=3)


def test_synthetic_evaluation_is_one_pass_and_training_never_ends():
  config = load_config_file(os.path.join(ROOT, "configs", "vit_tiny.py:dataset=synthetic,eval_batch_size=1000"))
  run = setup(config)
  batches = list(run.loader("test", train=False))
  assert len(batches) == -(-synthetic.INFO.splits["test"] // 1000)
  assert all(b["label"].max() < synthetic.INFO.num_classes for b in batches)
  assert len(list(itertools.islice(run.loader("train", train=True), 50))) == 50
