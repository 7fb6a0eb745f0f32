"""The README's preset blocks, from the ledger that ``benchmarks.presets`` appends to.

``report`` averages the "report" records of each README row (records of role "choose", used to
pick a recipe, are listed apart, never averaged) and writes only the text between the README's
``<!-- presets:begin/end -->`` and ``<!-- gpt-default:begin/end -->`` markers.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import os
import statistics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from posenc.config import load_config_file

LEDGER = os.path.join(ROOT, "benchmarks", "results", "presets.jsonl")
README = os.path.join(ROOT, "README.md")
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


def resolved(config) -> dict:
  """``config.to_dict()`` as JSON (tuples become lists, placeholders null)."""
  return json.loads(config.to_json_best_effort())


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
