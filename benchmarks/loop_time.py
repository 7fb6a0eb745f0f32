"""Where a real training run's wall time goes: the steps, or the host's work around them.

    python -m benchmarks.loop_time                                  # configs/vit_tiny.py, its default run
    python -m benchmarks.loop_time --config configs/vit_tiny.py:hybrid
    python -m benchmarks.loop_time --quick                          # tiny (CI checks the plumbing)

Runs ``train(setup(config))`` in a temporary workdir, as train.py does, and reads back the loop's own
record of its phases (``posenc.training.metrics.LoopClock``: data, logging, evaluation, checkpoints,
and the steps themselves, from the end of the first, compiling, step). Writes ``OUT/loop_time.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from benchmarks import timing
from posenc.config import load_config_file
from posenc.training import setup, train
from posenc.training.metrics import read_history

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "results")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ("model_options.width=16,model_options.depth=1,model_options.num_heads=2,model_options.mlp_dim=32,"
         "batch_size=16,eval_batch_size=64,eval_max_batches=1,total_steps=6,warmup_steps=1,eval_every=3,"
         "checkpoint_every=3")


def measure(config_arg: str) -> dict:
  """The run's phases (seconds), its steps and its host share: everything but the steps and evaluation."""
  run = setup(load_config_file(os.path.join(ROOT, config_arg)))
  with tempfile.TemporaryDirectory() as workdir:
    train(run, workdir)
    (record,) = [r for r in read_history(os.path.join(workdir, "metrics.jsonl")) if "loop_time/total_s" in r]
  phases = {k.split("/")[1][:-2]: v for k, v in record.items() if k.startswith("loop_time/")}
  c = run.config
  host = phases["data"] + phases["logging"] + phases["checkpoints"]
  return dict(config=config_arg, steps=c.total_steps - 1, eval_every=c.eval_every, log_every=c.log_every,
              checkpoint_every=c.checkpoint_every, phases=phases, host_share_of_steps=host / phases["steps"])


def table(result: dict) -> list[str]:
  """The run's phases (what RESULTS.md shows), after a line on the run."""
  p, steps = result["phases"], result["steps"]
  lines = [f"{steps:,} steps after the first (compiling) one; evaluation every {result['eval_every']}, logs every "
           f"{result['log_every']}, checkpoints every {result['checkpoint_every']} steps.", "",
           "| phase | seconds | share of the loop | per step, ms |", "|---|---:|---:|---:|"]
  for name in ("steps", "data", "logging", "checkpoints", "evaluation", "total"):
    lines.append(f"| {'all' if name == 'total' else name} | {p[name]:,.1f} | {p[name] / p['total']:.1%} | "
                 f"{p[name] / steps * 1e3:,.1f} |")
  return lines + ["", f"Host work around the steps (data + logging + checkpoints): {result['host_share_of_steps']:.1%} "
                  "of the steps' own time."]


def markdown(result: dict, command: str) -> str:
  return "\n".join([f"# Where a training run's time goes: `{result['config']}`", "",
                    f"`{command}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
                    *(f"- {line}" for line in result["machine"]), "", *table(result)]) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/vit_tiny.py", help="a train.py --config value")
  parser.add_argument("--quick", action="store_true", help="a tiny run of the config (the plumbing, for CI)")
  parser.add_argument("--out", default=DEFAULT_OUT, help="directory for loop_time.md and loop_time.json")
  args = parser.parse_args(argv)
  config_arg = args.config + ((":" if ":" not in args.config else ",") + QUICK if args.quick else "")
  machine = timing.machine_lines()  # the load before measuring
  result = measure(config_arg)
  result["machine"] = machine
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "loop_time.json"), "w") as f:
    json.dump(result, f, indent=1)
  text = markdown(result, "python -m benchmarks.loop_time" + (f" --config {args.config}" if args.config !=
                                                               "configs/vit_tiny.py" else "") + (" --quick" * args.quick))
  with open(os.path.join(args.out, "loop_time.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
