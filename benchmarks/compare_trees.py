"""The same train step built from two source trees (git worktrees), timed in interleaved rounds.

    git worktree add /tmp/before <commit>
    python -m benchmarks.compare_trees /tmp/before . --rounds 30
    python -m benchmarks.compare_trees /tmp/before . --config "configs/bert_small.py:batch_size=32"

Each tree runs in its own process (two versions of ``posenc`` cannot share one), imports
``posenc`` from that tree only, builds ``setup(config)``'s jitted train step on one synthetic
batch and compiles it. The parent then asks them in turn (A B A B ...) for ``--steps`` steps
each round, so a load spike from other jobs hits both alike, and prints per tree: compile
seconds, XLA's FLOPs and instruction count of the compiled step, and the median step time;
then after/before with a 95 % CI of the median per-round ratio (binomial order statistics).
``--record`` appends all of it (commits, CPU model, load, per-round times) as one JSON line to
``benchmarks/results/tree_compare.jsonl``, which RESULTS.md reads. Only ``posenc``'s public setup
API is used, so any two commits compare.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from scipy import stats

from benchmarks import timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEDGER = os.path.join(ROOT, "benchmarks", "results", "tree_compare.jsonl")
DEFAULT = ("configs/vit_tiny.py:full,model=vit-ti,patch_size=4,image_size=32,batch_size=128,"
           "dataset=synthetic,posenc=learned")

WORKER = r"""
import json, sys, time
import jax
from posenc.config import load_config_file
from posenc.training import setup, sharding

run = setup(load_config_file(sys.argv[1]))
state = run.spec.init()
batch = sharding.global_batch(next(iter(run.loader("train", train=True))), run.batch_sharding)
start = time.perf_counter()
compiled = run.train_step.lower(state, batch).compile()
compile_s = time.perf_counter() - start
cost = compiled.cost_analysis()
cost = cost[0] if isinstance(cost, (list, tuple)) else cost
ops = sum(" = " in line for line in compiled.as_text().splitlines())
state, metrics = compiled(state, batch)
jax.block_until_ready(metrics)
print(json.dumps(dict(compile_s=compile_s, flops=cost.get("flops"), hlo_ops=ops)), flush=True)
for line in sys.stdin:
  start = time.perf_counter()
  for _ in range(int(line)):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  print(time.perf_counter() - start, flush=True)
"""


def start(tree: str, config: str) -> tuple[subprocess.Popen, dict]:
  """A worker on ``tree`` with its compiled step, and what it reported about it."""
  env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
  proc = subprocess.Popen([sys.executable, "-c", WORKER, config], cwd=os.path.abspath(tree), env=env,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  line = proc.stdout.readline()
  if not line:
    raise RuntimeError(f"the worker on {tree} exited with {proc.wait()} before compiling its step")
  return proc, json.loads(line)


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
  """Median of ``values`` and a distribution-free ``level`` CI for it: the order statistics
  (k, n - k + 1) where Binomial(n, 1/2) puts ``level`` between them."""
  xs = sorted(values)
  n = len(xs)
  k = int(stats.binom.ppf((1 - level) / 2, n, 0.5))
  if k < 1:
    return statistics.median(xs), float("-inf"), float("inf")
  return statistics.median(xs), xs[k - 1], xs[n - k]


def commit(tree: str) -> str:
  """The tree's commit, with ``+dirty`` where it has uncommitted changes."""
  def git(*args):
    return subprocess.run(["git", "-C", tree, *args], capture_output=True, text=True).stdout.strip()
  return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("before", help="source tree (a git worktree) of the baseline")
  parser.add_argument("after", help="source tree of the change")
  parser.add_argument("--config", default=DEFAULT, help=f"config[:preset,field=value,...] (default {DEFAULT})")
  parser.add_argument("--rounds", type=int, default=20)
  parser.add_argument("--steps", type=int, default=5, help="train steps per tree and round")
  parser.add_argument("--record", action="store_true", help=f"append the result to {os.path.relpath(LEDGER, ROOT)}")
  args = parser.parse_args(argv)
  load_start = os.getloadavg()[0]

  workers = {name: start(tree, args.config) for name, tree in (("before", args.before), ("after", args.after))}
  times = {name: [] for name in workers}
  for _ in range(args.rounds):
    for name, (proc, _) in workers.items():
      proc.stdin.write(f"{args.steps}\n")
      proc.stdin.flush()
      times[name].append(float(proc.stdout.readline()) / args.steps)
  for name, (proc, info) in workers.items():
    proc.stdin.close()
    proc.wait()
    print(f"{name:6s} {getattr(args, name)}: compile {info['compile_s']:.1f} s, {info['flops']:.4g} FLOPs, "
          f"{info['hlo_ops']} HLO instructions, median step {1e3 * statistics.median(times[name]):.1f} ms")
  ratio, low, high = median_interval([a / b for a, b in zip(times["after"], times["before"])])
  print(f"after / before step time: {ratio:.3f} [95 % CI {low:.3f}, {high:.3f}] (median per-round ratio of "
        f"{args.rounds} interleaved rounds of {args.steps} steps)")
  if args.record:
    record = dict(config=args.config, rounds=args.rounds, steps=args.steps, cpu=timing.cpu_model(),
                  cores=os.cpu_count(), load_start=load_start, load_end=os.getloadavg()[0],
                  date=time.strftime("%Y-%m-%d"), ratio=ratio, ratio_low=low, ratio_high=high,
                  trees={name: dict(commit=commit(getattr(args, name)), seconds=times[name], **info)
                         for name, (_, info) in workers.items()})
    with open(LEDGER, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")
    print(f"recorded in {os.path.relpath(LEDGER, ROOT)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
