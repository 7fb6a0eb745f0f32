"""The study report's shared pieces: a cell's mean over seeds, its text, row labels, orderings."""
from __future__ import annotations

import statistics

from benchmarks.study_stats import ordering

PERCENT = ("accuracy", "exact_match")  # fractions, shown in percent


def summary(cells: list[dict], family: str, posenc: str, mode: str, size: int,
            metric: str = "accuracy") -> tuple[float, float, int]:
  """(mean, sample std, count) over seeds of the accuracy or exact match in percent, or of the loss / perplexity."""
  scale = 100 if metric in PERCENT else 1
  values = [scale * c[metric] for c in cells
            if (c["family"], c["posenc"], c["mode"], c["size"]) == (family, posenc, mode, size)]
  if not values:
    return float("nan"), float("nan"), 0
  return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def cell_text(mean: float, std: float, count: int, digits: int = 1) -> str:
  if not count:
    return "—"
  return f"{mean:.{digits}f}" if count == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def row_label(f: dict, label: str) -> str:
  if label in f.get("failed", ()):
    return f"`{label}` (failed to train: not ranked)"
  if label in f.get("superseded", {}):
    return f"`{label}` (superseded setting: not ranked)"
  return f"`{label}`"


def notes(results: dict, f: dict) -> list[str]:
  """The superseded rows' legend, each with the seeds it was run at (fewer than the protocol's, often)."""
  out = []
  for label, why in f.get("superseded", {}).items():
    seeds = sorted({c["seed"] for c in results["cells"] if (c["family"], c["posenc"]) == (f["name"], label)})
    out.append(f"`{label}`: {why} (seeds {', '.join(map(str, seeds)) or 'none'}).")
  return out + [""] if out else []


def ordering_lines(results: dict, f: dict, modes, metric: str) -> list[str]:
  """Per mode and size, the ranked labels: ``≻`` where the 95 % CI of the paired difference of the
  neighbours (over the seeds both have) excludes zero, ``≈`` where it does not."""
  ranked = [e for e in f["encodings"] if e not in f.get("failed", ())]
  lines = [f"### Orderings ({metric}; `a ≻ b`: a better, the 95 % CI of the paired difference over seeds excludes "
           f"zero; `≈`: unresolved)", "", "| mode | " + f["field"] + " | ordering, best first |", "|---|---:|---|"]
  for mode in modes:
    for size in f["sizes"]:
      lines.append(f"| {mode} | {size} | {ordering(results['cells'], f['name'], ranked, mode, size, metric)} |")
  return lines + [""]


def seeds_text(results: dict, f: dict) -> str:
  """The seeds recorded for family ``f``, or "none"."""
  return ", ".join(map(str, sorted({c["seed"] for c in results["cells"] if c["family"] == f["name"]}))) or "none"
