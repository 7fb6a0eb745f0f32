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
are never rewritten. ``--report`` averages the "report" records of each README row (records of
role "choose", used to pick a recipe, are listed apart, never averaged) and writes only the text
between the README's ``<!-- presets:begin/end -->`` and ``<!-- gpt-default:begin/end -->`` markers.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import functools
import hashlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from posenc.config import ConfigError, load_config_file, split_arg

LEDGER = os.path.join(ROOT, "benchmarks", "results", "presets.jsonl")
README = os.path.join(ROOT, "README.md")
WORKDIR = os.path.join(ROOT, "runs", "presets")
ROLES = ("report", "choose")
# The README's rows: (config file, preset, what the model is). Steps and every figure come from the config and ledger.
ROWS = (("configs/vit_tiny.py", "", "`vit-mu`, patch 7 (4×4 tokens), no augmentation"),
        ("configs/vit_tiny.py", "full", "`vit-mu`, patch 7, crops of 35–100 % of the area + flip"),
        ("configs/vit_tiny.py", "hybrid", "`vit-mu` + conv stem 128 wide with two more 3×3 convs on the 7×7 token "
                                          "grid, patch 4, random erasing (p = 1/4), dropout + drop-path"))
GPT_DEFAULT = ("configs/gpt_tiny.py", "")
# How each task's headline test metric is shown: (key, scale, unit, heading).
METRIC = {"image_classification": ("accuracy", 100.0, " %", "test accuracy"),
          "masked_lm": ("accuracy", 100.0, " %", "test masked-token accuracy"),
          "causal_lm": ("perplexity", 1.0, "", "test perplexity")}


# --------------------------------------------------------------------------- recording runs


def config_file(path: str) -> str:
  """The config file as the ledger names it: relative to the repository when inside it."""
  full = os.path.abspath(path)
  return os.path.relpath(full, ROOT) if full.startswith(ROOT + os.sep) else full


def resolved(config) -> dict:
  """``config.to_dict()`` as JSON (tuples become lists, placeholders null)."""
  return json.loads(config.to_json_best_effort())


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
        if name and split != "train":
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


# --------------------------------------------------------------------------- the report


def read_ledger(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _recipe(config: dict) -> dict:
  return {k: v for k, v in config.items() if k != "seed"}


def row_records(records: list[dict], file: str, preset: str) -> tuple[list[dict], int]:
  """The records of ``file:preset`` run as it is now (no overrides; the same resolved config up to
  the seed), and how many of that row were recorded under another recipe (set aside)."""
  current = _recipe(resolved(load_config_file(os.path.join(ROOT, file) + (f":{preset}" if preset else ""))))
  mine = [r for r in records if r["config_file"] == file and r["presets"] == ([preset] if preset else [])
          and not r["overrides"]]
  same = [r for r in mine if _recipe(r["resolved"]) == current]
  return same, len(mine) - len(same)


def _seeds(seeds) -> str:
  seeds = list(seeds)
  return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(str(s) for s in seeds)


def metric_cell(records: list[dict], task: str) -> str:
  """The mean of the records' final test metric, then every seed's value."""
  key, scale, unit, _ = METRIC[task]
  values = [scale * r["metrics"]["test"][key] for r in records]
  if len(values) == 1:
    return f"{values[0]:.1f}{unit} ({_seeds(r['seed'] for r in records)})"
  each = " / ".join(f"{v:.1f}" for v in values)
  return f"{statistics.mean(values):.1f}{unit} ({each}, {_seeds(r['seed'] for r in records)})"


def load_text(records: list[dict]) -> str:
  """The 1-minute load averages the runs started and ended under; which ran above half the cores."""
  loads = [x for r in records for x in (r["load_start"], r["load_end"])]
  busy = [r["seed"] for r in records if max(r["load_start"], r["load_end"]) > r["machine"]["cores"] / 2]
  cores = "/".join(str(c) for c in sorted({r["machine"]["cores"] for r in records}))
  text = f"load {min(loads):.1f}–{max(loads):.1f}"
  return text + (f": above half the {cores} cores in {_seeds(busy)}" if busy else "")


def time_cell(records: list[dict]) -> str:
  """Median train time and wall time in minutes, and the load the runs were measured under; runs
  resumed from a checkpoint (``start_step`` > 0) timed only part of the run and are left out."""
  records = [r for r in records if not r.get("start_step")]
  if not records:
    return "— (every run was resumed: not timed whole)"
  train = statistics.median(r["train_seconds"] for r in records) / 60
  wall = statistics.median(r["wall_seconds"] for r in records) / 60
  return f"{train:.1f} min (wall {wall:.1f} min; {load_text(records)})"


@functools.lru_cache(maxsize=None)
def stem_share(file: str, preset: str) -> tuple[int, int, float, float] | None:
  """(stem parameters, all parameters, stem FLOPs, model FLOPs) of ``file:preset``'s model, or None
  without a conv stem. FLOPs: XLA's cost analysis of the jitted forward of the stem alone and of the
  whole model on one image at the config's size (layers unrolled, so each counts; XLA counts only the
  taps of a convolution that fall inside the image, not the zero padding)."""
  config = load_config_file(os.path.join(ROOT, file) + (f":{preset}" if preset else ""))
  if config.get("model_options", {}).get("stem", "patch") != "conv":
    return None
  import jax
  import jax.numpy as jnp
  from benchmarks import timing
  from flax import nnx
  from posenc.encodings.base import as_hw
  from posenc.training.config import task_of
  config = copy.deepcopy(config)
  config.model_options.scan_layers = False
  model = nnx.eval_shape(lambda: task_of(config).create_model(config))
  images = jax.ShapeDtypeStruct((1, *as_hw(config.image_size), model.channels), jnp.float32)

  def flops(module) -> float:
    graphdef, state = nnx.split(module)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return timing.xla_flops(forward.lower(nnx.to_pure_dict(state), images))

  def count(module) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(module, nnx.Param))))

  return count(model.stem), count(model), flops(model.stem), flops(model)


def stem_cell(file: str, preset: str) -> str:
  share = stem_share(file, preset)
  if share is None:
    return "—"
  p_stem, p_all, f_stem, f_all = share
  return (f"{100 * p_stem / p_all:.0f} % of parameters ({p_stem:,} of {p_all:,}), "
          f"{100 * f_stem / f_all:.0f} % of FLOPs ({f_stem / 1e6:.1f}M of {f_all / 1e6:.1f}M)")


def _commits(records: list[dict]) -> str:
  seen = {}
  for r in records:
    seen[r["commit"][:7]] = seen.get(r["commit"][:7], False) or r["dirty"]
  return ("commit " if len(seen) == 1 else "commits ") + ", ".join(
      f"{c}{' + uncommitted changes' if d else ''}" for c, d in seen.items())


def presets_block(records: list[dict], ledger_name: str) -> str:
  """The README's preset table, its "chosen with" lines and where the numbers come from."""
  heading = METRIC["image_classification"][3]
  lines = [f"| preset | model | steps | {heading} (mean) | train time (median) | conv stem share |",
           "|---|---|---:|---:|---:|---|"]
  notes, used = [], []
  for file, preset, model in ROWS:
    config = load_config_file(os.path.join(ROOT, file) + (f":{preset}" if preset else ""))
    found, stale = row_records(records, file, preset)
    report = [r for r in found if r["role"] == "report"]
    chosen = [r for r in found if r["role"] == "choose"]
    used += found
    name = f"`:{preset}`" if preset else "(default)"
    if report:
      metric, when = metric_cell(report, config.task), time_cell(report)
    else:
      metric, when = "not yet recorded", "not yet recorded"
    lines.append(f"| {name} | {model} | {config.total_steps:,} | {metric} | {when} | {stem_cell(file, preset)} |")
    if chosen:
      key, scale, unit, heading = METRIC[config.task]
      values = " / ".join(f"{scale * r['metrics']['test'][key]:.1f}" for r in chosen)
      notes.append(f"{name} was chosen with {_seeds(r['seed'] for r in chosen)} (role \"choose\", not averaged "
                   f"into the table; {heading} {values}{unit}).")
    if stale:
      notes.append(f"{name}: {stale} record(s) of an earlier recipe set aside.")
  source = (f"Generated by `python -m benchmarks.presets --report` from `{ledger_name}`"
            + (f" ({len(used)} runs; {_commits(used)})" if used else " (no runs recorded yet)") + ". "
            "Train time: the loop's clock over the training steps (compilation, evaluation and checkpoints "
            "excluded); wall: the whole run; load: the 1-minute load average at the start and end of each run. "
            "Stem share: the conv stem's parameters (its 3×3 convolutions and LayerNorms; not the 1×1 "
            "projection to the width) over the model's, and XLA's FLOP count of its forward over the whole "
            "model's, for one image at the preset's size.")
  return "\n".join(lines + [""] + [f"- {n}" for n in notes] + ([""] if notes else []) + [source])


def gpt_block(records: list[dict]) -> str:
  """The GPT default run's sentence: steps, tokens, validation and test perplexity, time."""
  file, preset = GPT_DEFAULT
  config = load_config_file(os.path.join(ROOT, file))
  found, stale = row_records(records, file, preset)
  report = [r for r in found if r["role"] == "report"]
  steps, rows, length = config.total_steps, config.batch_size, config.max_len
  what = f"The default run ({steps:,} steps of {rows} × {length} tokens, {steps * rows * length / 1e6:.1f}M tokens)"
  if not report:
    aside = f"; {stale} record(s) of an earlier recipe set aside" if stale else ""
    return (f"{what} is not yet recorded in `benchmarks/results/presets.jsonl` (`python -m benchmarks.presets "
            f"{file} --seeds 0`{aside}).")
  val = [r["metrics"]["validation"]["perplexity"] for r in report]
  test = [r["metrics"]["test"]["perplexity"] for r in report]
  each = lambda v: "" if len(v) == 1 else f" ({' / '.join(f'{x:.1f}' for x in v)})"  # noqa: E731
  train = statistics.median(r["train_seconds"] for r in report)
  rate = statistics.median(r["timed_steps"] * rows * length / r["train_seconds"] for r in report)
  m = report[0]["machine"]
  return (f"{what} ends at **validation perplexity {statistics.mean(val):.1f}**{each(val)} (test "
          f"{statistics.mean(test):.1f}{each(test)}; {_seeds(r['seed'] for r in report)}; a smoke-sized run, "
          f"the study trains longer). Its training steps took {train / 60:.1f} min (about {rate:,.0f} tokens/s; "
          f"{statistics.median(r['wall_seconds'] for r in report) / 60:.1f} min in all) on {m['cores']} cores of "
          f"{m['cpu']} ({load_text(report)}{'; medians' if len(report) > 1 else ''}; recorded by "
          f"`benchmarks.presets` at {_commits(report)}).")


def replace_block(text: str, name: str, body: str) -> str:
  begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
  if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
    raise SystemExit(f"the README needs exactly one '{begin}' ... '{end}' block.")
  head, rest = text.split(begin)
  return f"{head}{begin}\n{body}\n{end}{rest.split(end, 1)[1]}"


def report(ledger: str, readme: str) -> str:
  """Rewrite ``readme``'s generated blocks from ``ledger``; the new blocks' text."""
  records = read_ledger(ledger)
  name = os.path.relpath(ledger, ROOT) if os.path.abspath(ledger).startswith(ROOT + os.sep) else ledger
  table, gpt = presets_block(records, name), gpt_block(records)
  with open(readme, encoding="utf-8") as f:
    text = f.read()
  new = replace_block(replace_block(text, "presets", table), "gpt-default", gpt)
  if new != text:
    with open(readme, "w", encoding="utf-8") as f:
      f.write(new)
  return f"{table}\n\n{gpt}\n"


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
