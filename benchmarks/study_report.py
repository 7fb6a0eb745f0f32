"""Markdown tables, JSON and a plot for ``benchmarks.study``'s cells.

Each family's description (``StudyFamily.describe``) names its ``kind``; the family class of
that kind (``study_family.KINDS``) renders its tables and plot panels.
"""
from __future__ import annotations

import itertools
import json
import os
import time

from benchmarks import study_algo, study_bert, study_lm, study_vit  # noqa: F401  (each registers its kind)
from benchmarks.study_family import KINDS
from benchmarks.study_tables import summary

# Every line of a panel distinct in colour and in marker and line style (13 colours, 11 markers, 3 styles).
STYLES = list(itertools.islice(zip(itertools.cycle([f"C{i}" for i in range(10)] + ["tab:olive", "tab:cyan", "k"]),
                                   itertools.cycle("osD^v<>PX*h"), itertools.cycle(["-", "--", ":"])), 60))


def family_lines(results: dict, f: dict) -> list[str]:
  """The markdown of the family described by ``f``."""
  return KINDS[f["kind"]].lines(results, f)


def plot_rows(f: dict) -> list[list[str]]:
  """The encodings drawn in each row of panels of the family described by ``f``."""
  return KINDS[f["kind"]].plot_rows(f)


def markdown(results: dict) -> str:
  seeds = results["seeds"]
  minutes = sum(c.get("seconds", 0.0) for c in results["cells"]) / 60
  lines = ["# posenc study: position encodings across resolution and length", "",
           f"Profile `{results['profile']}`, reported {time.strftime('%Y-%m-%d %H:%M')}; "
           f"{minutes:.0f} min of runs, summed over processes (`python -m benchmarks.study"
           f"{' --quick' if results['profile'] == 'quick' else ''}`).", ""]
  lines += [f"- {line}" for line in results["header"]]
  lines += [f"- seeds: {'; '.join(f'{f} ' + ', '.join(map(str, s)) for f, s in seeds.items())}; each cell is the mean ± sample standard deviation over "
            f"the seeds recorded (a bare number: one seed); one model per encoding and seed, trained "
            f"once, evaluated at every size", ""]
  for f in results["families"]:
    lines += family_lines(results, f)
  return "\n".join(lines).rstrip() + "\n"


def plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [(f, names) for f in results["families"] for names in plot_rows(f)]
  if not rows:  # nothing recorded yet
    return
  columns = max(2, *(len(KINDS[f["kind"]].plot_modes(f)) for f, _ in rows))
  fig, axes = plt.subplots(len(rows), columns, figsize=(5.5 * columns, 4 * len(rows)), squeeze=False, sharey="row")
  for row, (f, names) in zip(axes, rows):
    kind = KINDS[f["kind"]]
    modes = kind.plot_modes(f)
    for ax in row[len(modes):]:
      ax.set_visible(False)
    colours = {name: STYLES[i][0] for i, name in enumerate(f["encodings"])}
    markers = {name: STYLES[i][1] for i, name in enumerate(f["encodings"])}
    dashes = {name: STYLES[i][2] for i, name in enumerate(f["encodings"])}
    for ax, (mode, caption) in zip(row, modes.items()):
      for posenc in names:
        colour, style, reference = kind.line_style(names, posenc, colours, dashes)
        stats = [summary(results["cells"], f["name"], posenc, mode, s, kind.metric) for s in f["sizes"]]
        ax.errorbar(f["sizes"], [m for m, _, _ in stats], yerr=[s for _, s, _ in stats], marker=markers[posenc],
                    capsize=2, label=posenc, color=colour, linewidth=0.7 if reference else 1.5,
                    alpha=0.5 if reference else 1.0, linestyle=style)
        if not reference:
          kind.decorate(ax, results, f, mode, posenc, colour)
      ax.axvline(f["base"], color="grey", linewidth=0.8)
      ax.set_xscale("log", base=2)
      ax.set_xticks(f["sizes"], [str(s) for s in f["sizes"]])
      ax.set_title(f"{f['name']}: {caption.split(':')[0]}" + kind.title_note(names), fontsize=10)
      ax.set_xlabel(f["field"])
      ax.set_ylabel(kind.ylabel)
      kind.decorate_panel(ax, results, f)
    row[len(modes) - 1].legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def write(results: dict, text: str, directory: str) -> None:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "study.md"), "w") as f:
    f.write(text)
  with open(os.path.join(directory, "study.json"), "w") as f:
    json.dump(results, f, indent=1)
  plot(results, os.path.join(directory, "study.png"))
