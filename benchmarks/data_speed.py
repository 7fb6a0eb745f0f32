"""Input pipeline speed vs the CPU train step: does the data ever starve training?

    python -m benchmarks.data_speed            # prints a markdown table
    python -m benchmarks.data_speed --batches 30 --train-steps 5 --workers 0 2

Columns: `data b/s` = batches/s of the loader alone; `step b/s` = train steps/s of
the model on a fixed batch (no input pipeline); `loop b/s` = steps/s when the
loader feeds the step (grain prefetches in a background thread). The step is posenc's real
one and the loader the task's (``posenc.training.setup(config)`` on each case's config, learned
positions; ``--workers`` sets ``data_workers``). Training is not
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
from posenc.config import load_config_file
from posenc.training import setup, sharding

# (config with overrides, split, train); each run's task builds its loader and train step
CASES = [
    ("configs/vit_tiny.py:model=vit-mu,image_size=28,batch_size=128", "train", True),
    ("configs/vit_tiny.py:model=vit-mu,image_size=56,batch_size=128", "train", True),
    ("configs/vit_tiny.py:model=vit-mu,image_size=(28,40),batch_size=128", "train", True),
    ("configs/vit_tiny.py:model=vit-mu,image_size=28,eval_batch_size=256", "test", False),
    ("configs/bert_small.py:model=bert-mini,max_len=128,batch_size=64", "train", True),
    ("configs/bert_small.py:model=bert-mini,max_len=512,eval_batch_size=16", "validation", False),
]


def setup_case(spec: str, train: bool, workers: int):
  """The run of config ``spec`` with learned positions and ``workers`` grain workers; training and
  evaluation batches the same size (the step is timed on the loader's batches)."""
  config = load_config_file(spec)
  config.posenc, config.data_workers = "learned", workers
  config.batch_size = config.eval_batch_size = config.batch_size if train else config.eval_batch_size
  return setup(config)


def batches_for(run, split, train):
  """Endless batches (an eval loader is one pass: it starts again when exhausted)."""
  while True:
    yield from run.loader(split, train=train)


def run_case(case, workers, n, train_steps):
  spec, split, train = case
  run = setup_case(spec, train, workers)
  start = time.perf_counter()
  it = batches_for(run, split, train)
  batch = next(it)
  first = time.perf_counter() - start
  data = rate(lambda: next(it), n)

  def train_step(state, host_batch):
    return run.train_step(state, sharding.global_batch(host_batch, run.batch_sharding))

  holder = {"state": run.spec.init()}

  def fixed_step():
    holder["state"], metrics = train_step(holder["state"], batch)
    jax.block_until_ready(metrics)

  fixed_step()  # compile
  step = rate(fixed_step, train_steps)
  it = batches_for(run, split, train)
  next(it)

  def fed_step():
    holder["state"], metrics = train_step(holder["state"], next(it))
    jax.block_until_ready(metrics)

  loop = rate(fed_step, train_steps)
  config = run.config
  size = config.get("image_size", config.get("max_len"))
  size_text = "x".join(map(str, size)) if isinstance(size, tuple | list) else str(size)
  return (f"| {config.dataset} | {split} ({'train' if train else 'eval'}) | {config.batch_size} | {size_text} | "
          f"{workers} | {first:.1f} | {data:.1f} | {config.model} | {step:.2f} | {loop:.2f} |")


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
      print(run_case(case, workers, args.batches, args.train_steps), flush=True)


if __name__ == "__main__":
  main()
