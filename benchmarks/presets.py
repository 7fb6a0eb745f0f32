"""The README's preset figures, from an append-only ledger of recorded runs.

    python -m benchmarks.presets configs/vit_tiny.py:hybrid --seeds 3 4 5    # train, append one record per seed
    python -m benchmarks.presets configs/vit_tiny.py:hybrid --seeds 0 --role choose --note "stem width 96"
    python -m benchmarks.presets configs/gpt_tiny.py --seeds 0               # the GPT default run
    python -m benchmarks.presets --report     # rewrite the README's generated blocks from the ledger; runs nothing

A run trains the config as ``python train.py --config=...`` does (``load_config_file`` ->
``posenc.training.train``), with ``seed`` set, in a fresh workdir ``runs/presets/<name>-s<seed>``
(an existing one is refused unless ``--fresh`` deletes it), and appends one JSON line to
``benchmarks/results/presets.jsonl``: the config as given and resolved, the commit and whether the
tree had uncommitted changes, the seed and role, the final metrics of every evaluated split, the
time in training steps (the loop's steps/s clock: compilation, evaluation and checkpoints excluded)
and the wall time, the date, the machine and the 1-minute load average at start and end. Old lines
are never rewritten. ``--report`` rewrites the README's generated blocks from the ledger (``benchmarks.presets_report``).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks.presets_report import LEDGER, README, report, resolved
from posenc.config import ConfigError, load_config_file, split_arg

WORKDIR = os.path.join(ROOT, "runs", "presets")
ROLES = ("report", "choose")
# --------------------------------------------------------------------------- recording runs


def config_file(path: str) -> str:
  """The config file as the ledger names it: relative to the repository when inside it."""
  full = os.path.abspath(path)
  return os.path.relpath(full, ROOT) if full.startswith(ROOT + os.sep) else full


def run_name(spec: str) -> str:
  """``configs/vit_tiny.py:hybrid`` -> ``vit_tiny-hybrid`` (long override lists shortened by a hash)."""
  path, _, arg = spec.partition(":")
  name = os.path.splitext(os.path.basename(path))[0] + (f"-{arg}" if arg else "")
  name = re.sub(r"[^\w.=-]+", "_", name)
  if len(name) > 80:
    name = f"{name[:60]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
  return name


def git_state() -> tuple[str, bool, list[str]]:
  """(HEAD commit, whether the tree has uncommitted changes, ``git status --porcelain`` lines)."""
  def git(*args) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout
  status = [line for line in git("status", "--porcelain").splitlines() if line.strip()]
  return git("rev-parse", "HEAD").strip(), bool(status), status[:50]


def machine() -> dict:
  """The machine, in the words of benchmarks/timing.py."""
  import flax
  import jax
  import jaxlib
  from benchmarks import timing
  return {"cpu": timing.cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
          "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
          "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "lines": timing.machine_lines()[:2]}


def final_metrics(workdir: str, results: dict) -> tuple[dict, str]:
  """Every split evaluated at the last step (from the run's metrics.jsonl), by split; and the split
  ``train()`` returned (its last line)."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    lines = [json.loads(line) for line in f if line.strip()]
  last = lines[-1]
  out = {}
  for line in lines:
    if line["step"] == last["step"]:
      for key, value in line.items():
        split, _, name = key.partition("/")
        if name and split not in ("train", "loop_time"):  # loop_time: where the run's time went, not a split
          out.setdefault(split, {})[name] = value
  final = next(iter(k for k in last if "/" in k)).split("/")[0]
  out[final] = {k: float(v) for k, v in results.items()}  # train()'s return: the numbers of its last line
  return out, final


def load1() -> float:
  return os.getloadavg()[0]


def run_one(spec: str, seed: int, workdir: str, role: str, note: str | None) -> dict:
  """Train ``spec`` at ``seed`` in ``workdir`` as train.py would; the ledger record."""
  import jax
  from absl import logging
  from posenc.training import setup, train
  logging.set_verbosity(logging.WARNING)  # as train.py: keep Orbax's per-save INFO lines off the console
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # as train.py
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/posenc/jax"))
  commit, dirty, status = git_state()
  load_start, start = load1(), time.perf_counter()
  config = load_config_file(spec)
  config.seed = seed
  run = setup(config)
  results = train(run, workdir)
  wall, load_end = time.perf_counter() - start, load1()
  metrics, final = final_metrics(workdir, results)
  path, _, arg = spec.partition(":")
  presets, overrides = split_arg(arg)
  return {"config": spec, "config_file": config_file(path), "presets": presets, "overrides": overrides,
          "resolved": resolved(config), "seed": seed, "role": role, "note": note, "commit": commit, "dirty": dirty,
          "uncommitted": status, "metrics": metrics, "final_split": final,
          "train_seconds": run.train_seconds, "timed_steps": max(int(config.total_steps) - run.start_step - 1, 0),
          "start_step": run.start_step,
          "wall_seconds": wall, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "machine": machine(), "load_start": load_start, "load_end": load_end,
          "workdir": os.path.relpath(workdir, ROOT) if workdir.startswith(ROOT + os.sep) else workdir}


def append(ledger: str, record: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(ledger)), exist_ok=True)
  with open(ledger, "a", encoding="utf-8") as f:  # one short append: old lines are never rewritten
    f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("config", nargs="?", help="config file[:preset,field=value,...], as train.py's --config")
  p.add_argument("--seeds", type=int, nargs="+", help="one run per seed (default: the config's seed)")
  p.add_argument("--role", choices=ROLES, default="report",
                 help="report: averaged into the README; choose: a run used to choose the recipe (listed apart)")
  p.add_argument("--note", default=None, help="free text kept with the records")
  p.add_argument("--fresh", action="store_true", help="delete an existing workdir of the run first")
  p.add_argument("--resume", action="store_true",
                 help="continue an interrupted run in its workdir (its record is not timed whole)")
  p.add_argument("--report", action="store_true", help="rewrite the README's generated blocks; run nothing")
  p.add_argument("--ledger", default=LEDGER, help=f"the JSONL ledger (default {os.path.relpath(LEDGER, ROOT)})")
  p.add_argument("--workdir", default=WORKDIR, help="root of the runs' workdirs (default runs/presets)")
  p.add_argument("--readme", default=README, help="the README whose marked blocks --report rewrites")
  args = p.parse_args(argv)
  try:
    if args.report == bool(args.config):
      p.error("give a config to run, or --report (not both)")
    if args.report:
      print(report(args.ledger, args.readme), end="")
      return 0
    config = load_config_file(args.config)  # a bad file, preset or override: one message before anything is deleted
    seeds = args.seeds if args.seeds is not None else [int(config.seed)]
    if len(set(seeds)) != len(seeds):
      p.error(f"--seeds repeats a seed: {seeds}")
    workdirs = [os.path.join(os.path.abspath(args.workdir), f"{run_name(args.config)}-s{s}") for s in seeds]
    existing = [w for w in workdirs if os.path.exists(w)]
    if args.fresh and args.resume:
      p.error("--fresh deletes the workdirs that --resume continues: give one of them")
    if existing and not (args.fresh or args.resume):
      print(f"{', '.join(existing)} already exist(s) (an earlier or interrupted run); pass --resume to continue "
            f"it, --fresh to delete and rerun, or move it away.", file=sys.stderr)
      return 2
    for seed, workdir in zip(seeds, workdirs):
      if not args.resume:
        shutil.rmtree(workdir, ignore_errors=True)
      record = run_one(args.config, seed, workdir, args.role, args.note)
      append(args.ledger, record)
      print(f"recorded {args.config} seed {seed} ({args.role}) in {args.ledger}: {record['metrics']['test']}, "
            f"{record['train_seconds']:.1f} s in steps, {record['wall_seconds']:.1f} s wall", flush=True)
  except ConfigError as e:
    print(f"Config error: {e}", file=sys.stderr)
    return 2
  except Exception as e:  # noqa: BLE001 - NonFiniteLossError: its own message, as train.py
    from posenc.training import NonFiniteLossError, RunError
    if isinstance(e, RunError):  # preempted (its step saved), busy workdir, storage
      print(f"{e}\nContinue it with: python -m benchmarks.presets {args.config} --seeds {seed} --resume",
            file=sys.stderr)
      return getattr(e, "exit_code", 1)
    if isinstance(e, NonFiniteLossError):
      print(str(e), file=sys.stderr)
      return 1
    raise
  return 0


if __name__ == "__main__":
  sys.exit(main())
