"""RESULTS.md from its template and the committed records: no result in it is typed by hand.

    python -m benchmarks.report            # render benchmarks/RESULTS.template.md -> benchmarks/RESULTS.md
    python -m benchmarks.report --check    # exit 1 if RESULTS.md differs from a fresh render (tests run this)

The template is prose with ``{{ expression }}`` placeholders, evaluated in ``namespace(records)``:
every number in the rendered report comes from a record under benchmarks/results/ (the study's
cells, the preset ledger, the speed reports) through the functions below.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks import (loop_time, speed_headline, speed_report, step_profile, study, study_report, study_stats,
                        study_tables)

RESULTS = os.path.join(ROOT, "benchmarks", "results")
TEMPLATE = os.path.join(ROOT, "benchmarks", "RESULTS.template.md")
OUTPUT = os.path.join(ROOT, "benchmarks", "RESULTS.md")
PLACEHOLDER = re.compile(r"\{\{(.+?)\}\}", re.S)


def load_records(results_dir: str = RESULTS) -> dict:
  """The study's current cells (as ``benchmarks.study --report-only`` collects them), every recorded cell
  (earlier protocols included), the preset ledger and the speed reports that exist."""
  cells = study.open_cells(results_dir)
  records = dict(study=study.collect("full", cells), raw_cells=[])
  with open(os.path.join(results_dir, "study_cells.jsonl"), encoding="utf-8") as f:
    records["raw_cells"] = [json.loads(line) for line in f if line.strip()]
  for name in ("speed", "speed_gpu", "step_profile", "loop_time"):
    path = os.path.join(results_dir, f"{name}.json")
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        records[name] = json.load(f)
  records["tree_compare"] = []
  compare = os.path.join(results_dir, "tree_compare.jsonl")
  if os.path.exists(compare):
    with open(compare, encoding="utf-8") as f:
      records["tree_compare"] = [json.loads(line) for line in f if line.strip()]
  ledger = os.path.join(results_dir, "presets.jsonl")
  records["presets"] = []
  if os.path.exists(ledger):
    with open(ledger, encoding="utf-8") as f:
      records["presets"] = [json.loads(line) for line in f if line.strip()]
  return records


def namespace(records: dict) -> dict:
  """The functions a template's placeholders call."""
  results = records["study"]
  cells = results["cells"]
  families = {f["name"]: f for f in results["families"]}

  def mean(family, label, mode, size, metric="accuracy", digits=1):
    """Mean ± sample sd over seeds (accuracy in %), as the study's tables print it."""
    return study_tables.cell_text(*study_tables.summary(cells, family, label, mode, size, metric), digits)

  def diff(family, a, b, mode, size, metric="accuracy"):
    """``b - a`` paired by seed: points [95 % CI] for fractions, a perplexity ratio for ``loss``."""
    return study_stats.diff_text(study_stats.paired(cells, family, a, b, mode, size, metric), metric)

  def resolved(family, a, b, mode, size, metric="accuracy"):
    d = study_stats.paired(cells, family, a, b, mode, size, metric)
    return "resolved" if d is not None and d.resolved else "unresolved"

  pending = "(no cells recorded yet)"

  def order(family, mode, size, metric="accuracy", labels=None):
    if family not in families:
      return pending
    f = families[family]
    labels = labels or [e for e in f["encodings"] if e not in f.get("failed", ())]
    return study_stats.ordering(cells, family, labels, mode, size, metric)

  def earlier(budget_prefix):
    return [c for c in records["raw_cells"] if c["budget"].startswith(budget_prefix)]

  def compare(family, a, b, mode, size, metric="accuracy", protocol=None):
    """The claim the cells allow about ``a`` and ``b``: "`w` ≻ `l`, <w against l> [95 % CI]" where the
    interval of the difference paired by seed excludes zero, else "`a` ≈ `b` (unresolved: <b against a>)";
    a perplexity ratio for ``loss``, points otherwise. ``protocol``: an earlier protocol's cells (by
    the start of their ``budget``)."""
    rows = earlier(protocol) if protocol else cells
    d = study_stats.paired(rows, family, a, b, mode, size, metric)
    unit = "" if metric == "loss" else " points"
    what = "perplexity " if metric == "loss" else ""
    if d is None:
      return f"`{a}` vs `{b}`: not recorded"
    if not d.resolved:
      return f"`{a}` ≈ `{b}` (unresolved: `{b}` {what}{study_stats.diff_text(d, metric, unit)})"
    winner, loser = (b, a) if (d.mean < 0) == study_stats.LOWER_IS_BETTER[metric] else (a, b)
    d = study_stats.paired(rows, family, loser, winner, mode, size, metric)
    return f"`{winner}` ≻ `{loser}`, {what}{study_stats.diff_text(d, metric, unit)}"

  def speed_summary(name):
    """The headline ratios (and, for a device profile, its goals) of results/<name>.json."""
    if name not in records:
      return f"(no `results/{name}.json` recorded)"
    data = speed_report.from_json(records[name])
    lines = speed_headline.headline(data["headline"], data.get("goals"), data.get("dataset"))
    start = next(i for i, line in enumerate(lines) if line.startswith("| model | posenc / timm"))
    end = next(i for i, line in enumerate(lines) if line.startswith("**posenc / timm"))
    goals = speed_report.device_goal_lines(data) if data.get("peak_flops") else []
    return "\n".join(lines[start:end + 1] + [""] + goals).strip()

  def tree_compare():
    """One row per ``benchmarks.compare_trees --record`` line: the same step built from two commits."""
    rows = records.get("tree_compare", [])
    if not rows:
      return "(no `results/tree_compare.jsonl` recorded)"
    lines = ["| step (config overrides) | before | after | median step before / after (ms) | after / before "
             "[95 % CI] | rounds × steps | load (start, end) |", "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
      before, after = r["trees"]["before"], r["trees"]["after"]
      what = r["config"].partition(":")[2].replace(",", ", ")
      lines.append(f"| {what} | `{before['commit']}` | `{after['commit']}` | "
                   f"{1e3 * statistics.median(before['seconds']):.0f} / {1e3 * statistics.median(after['seconds']):.0f} | "
                   f"{r['ratio']:.3f} [{r['ratio_low']:.3f}, {r['ratio_high']:.3f}] | {r['rounds']} × {r['steps']} | "
                   f"{r['load_start']:.1f}, {r['load_end']:.1f} |")
    cpus = sorted({f"{r['cpu']}, {r['cores']} cores" for r in rows})
    return "\n".join(lines) + f"\n\nMachine: {'; '.join(cpus)}."

  def overhead(family, size, names, name="speed"):
    """Step time of each of ``names`` against `none` at ``size`` in results/<name>.json (timed in the same
    interleaved rounds): one row per encoding."""
    if name not in records:
      return f"(no `results/{name}.json` recorded)"
    groups = [g for g in speed_report.from_json(records[name]).get(family, []) if g["size"] == size]
    if not groups:
      return f"(no {family} group at {size} in `results/{name}.json`)"
    (g,) = groups
    none = speed_headline.find_entry(g, "none")
    lines = ["| posenc | step ms | vs `none` |", "|---|---:|---:|"]
    for label in names:
      e = speed_headline.find_entry(g, label)
      lines.append(f"| `{label}` | " + ("not timed | — |" if e is None else
                   f"{1e3 * e.seconds:,.0f} | {100 * (e.seconds / none.seconds - 1):+.0f}% |"))
    return "\n".join(lines)

  def recorded(name, table):
    """``table(record)``'s lines for results/<name>.json, after the machine it was measured on."""
    if name not in records:
      return f"(no `results/{name}.json` recorded)"
    machine = "; ".join(line for line in records[name]["machine"] if not line.startswith(("XLA_FLAGS", "JAX ")))
    return "\n".join(table(records[name])) + f"\n\nMachine: {machine}."

  def seeds(family, label=None):
    found = sorted({c["seed"] for c in cells if c["family"] == family and label in (None, c["posenc"])})
    return ", ".join(map(str, found))

  def tables(family):
    if family not in families:
      return f"*No cells of this part are recorded yet: run `python -m benchmarks.study --families {family}`.*"
    return "\n".join(study_report.family_lines(results, families[family])[2:]).strip()

  def baseline(family, name):
    return f"{results['baselines'][family][name]:.1f}"

  def protocol_table(family, budget_prefix, modes, metric="accuracy"):
    """Means over seeds of cells recorded under an earlier protocol (``budget`` starting with the prefix)."""
    rows = [c for c in earlier(budget_prefix) if c["family"] == family]
    labels = sorted({c["posenc"] for c in rows})
    sizes = sorted({c["size"] for c in rows})
    lines = []
    for mode in modes:
      lines += [f"| {mode} | " + " | ".join(str(s) for s in sizes) + " |", "|---|" + "---:|" * len(sizes)]
      for label in labels:
        lines.append(f"| `{label}` | " + " | ".join(study_tables.cell_text(
            *study_tables.summary(rows, family, label, mode, s, metric)) for s in sizes) + " |")
      lines.append("")
    return "\n".join(lines).strip()

  return dict(mean=mean, diff=diff, resolved=resolved, compare=compare, order=order, seeds=seeds, tables=tables,
              speed_summary=speed_summary, tree_compare=tree_compare,
              overhead=overhead, step_profile=lambda: recorded("step_profile", step_profile.table),
              loop_time=lambda: recorded("loop_time", loop_time.table),
              baseline=baseline, protocol_table=protocol_table, records=records, statistics=statistics)


def render(template: str, records: dict) -> str:
  ns = namespace(records)
  header = ("<!-- Generated by `python -m benchmarks.report` from benchmarks/RESULTS.template.md and the records "
            "under benchmarks/results/: edit the template, not this file. -->\n")
  return header + PLACEHOLDER.sub(lambda m: str(eval(m.group(1).strip(), ns)), template)  # noqa: S307 - our template


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="compare with RESULTS.md instead of writing it")
  parser.add_argument("--results", default=RESULTS, help="the records' directory")
  args = parser.parse_args(argv)
  with open(TEMPLATE, encoding="utf-8") as f:
    text = render(f.read(), load_records(args.results))
  if args.check:
    with open(OUTPUT, encoding="utf-8") as f:
      if f.read() != text:
        print("benchmarks/RESULTS.md differs from its template rendered with the records: run "
              "`python -m benchmarks.report`.", file=sys.stderr)
        return 1
    return 0
  with open(OUTPUT, "w", encoding="utf-8") as f:
    f.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
