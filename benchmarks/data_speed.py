"""Input pipeline speed vs the CPU train step: does the data ever starve training?

    python -m benchmarks.data_speed            # prints a markdown table
    python -m benchmarks.data_speed --batches 30 --train-steps 5 --workers 0 2

Columns: `data b/s` = batches/s of the loader alone; `step b/s` = train steps/s of
the model on a fixed batch (no input pipeline); `loop b/s` = steps/s when the
loader feeds the step (grain prefetches in a background thread). The step is posenc's real
one (``posenc.training.setup(config).train_step`` on configs/vit_tiny.py or
configs/bert_small.py at the case's model, size and batch, learned positions). Training is not
input-bound when `loop b/s` is close to `step b/s`, i.e. `data b/s` is well above it.
`first s` = seconds to create the loader and get its first batch (in this process;
TFDS data already prepared).
"""
from __future__ import annotations

import argparse
import os
import time

import jax

from benchmarks.timing import rate
from configs import bert_small, vit_tiny
from posenc.data import Batching, images, masked_lm
from posenc.training import setup, sharding

# (dataset, split, train, batch size, image size / max_len, model)
CASES = [
    ("fashion_mnist", "train", True, 128, 28, "vit-mu"),
    ("fashion_mnist", "train", True, 128, 56, "vit-mu"),
    ("fashion_mnist", "train", True, 128, (28, 40), "vit-mu"),
    ("fashion_mnist", "test", False, 256, 28, "vit-mu"),
    ("text", "train", True, 64, 128, "bert-mini"),
    ("text", "validation", False, 16, 512, "bert-mini"),
]


def batches_for(dataset, split, train, batch_size, size, workers, seed=0):
  """Endless batches (an eval loader is one pass: it starts again when exhausted)."""
  batching = Batching(batch_size, train, seed, worker_count=workers)
  while True:
    if dataset == "text":
      yield from masked_lm.loader(dataset, split, batching, max_len=size)
    else:
      yield from images.loader(dataset, split, batching, images.ImageOptions(image_size=size))


def make_step(model_name, size, batch):
  """posenc's train step (``setup(config).train_step``) of ``model_name`` with learned positions,
  compiled on ``batch``; returns (step on a host batch, its state)."""
  if model_name.startswith("vit"):
    config = vit_tiny.get_config()
    with config.ignore_type():  # the field is an int; a (h, w) size is valid too
      config.image_size, config.patch_size = size, 4
  else:
    config = bert_small.get_config()
    config.max_len = size
  config.model, config.posenc = model_name, "learned"
  config.batch_size = config.eval_batch_size = len(next(iter(batch.values())))
  run = setup(config)

  def train_step(state, host_batch):
    return run.train_step(state, sharding.global_batch(host_batch, run.batch_sharding))

  state, metrics = train_step(run.spec.init(), batch)  # compile
  jax.block_until_ready(metrics)
  return train_step, state


def run(case, workers, n, train_steps):
  dataset, split, train, batch_size, size, model_name = case
  start = time.perf_counter()
  it = batches_for(dataset, split, train, batch_size, size, workers)
  batch = next(it)
  first = time.perf_counter() - start
  data = rate(lambda: next(it), n)
  train_step, state = make_step(model_name, size, batch)
  holder = {"state": state}

  def fixed_step():
    holder["state"], metrics = train_step(holder["state"], batch)
    jax.block_until_ready(metrics)

  step = rate(fixed_step, train_steps)
  it = batches_for(dataset, split, train, batch_size, size, workers, seed=1)
  next(it)

  def fed_step():
    holder["state"], metrics = train_step(holder["state"], next(it))
    jax.block_until_ready(metrics)

  loop = rate(fed_step, train_steps)
  mode = "train" if train else "eval"
  size_text = "x".join(map(str, size)) if isinstance(size, tuple) else str(size)
  return (f"| {dataset} | {split} ({mode}) | {batch_size} | {size_text} | {workers} | "
          f"{first:.1f} | {data:.1f} | {model_name} | {step:.2f} | {loop:.2f} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, default=30, help="loader batches timed")
  parser.add_argument("--train-steps", type=int, default=5, help="train steps timed")
  parser.add_argument("--workers", type=int, nargs="+", default=[0],
                      help="grain worker processes to compare (0 = in-process)")
  parser.add_argument("--cases", nargs="+", type=int, default=list(range(len(CASES))),
                      help="indices into CASES to run")
  args = parser.parse_args()
  print(f"{os.cpu_count()} CPU cores, jax {jax.__version__} on {jax.devices()[0].platform}\n")
  print("| dataset | split | batch | size / max_len | workers | first s | data b/s | model "
        "| step b/s | loop b/s |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for case in (CASES[i] for i in args.cases):
    for workers in args.workers:
      print(run(case, workers, args.batches, args.train_steps), flush=True)


if __name__ == "__main__":
  main()
