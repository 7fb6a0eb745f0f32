"""Seed statistics of the study's cells: paired differences with 95 % t-intervals, and orderings that
claim ``A ≻ B`` (A better than B) only where the interval of their paired difference excludes zero.

Two labels are compared on the seeds both have (paired: the same seed shares the data order and
initialisation of everything but the position encoding). For text the metric is the loss in nats
per token (log perplexity: differences are perplexity ratios); for images and tasks a fraction
(accuracy, exact match), reported in percentage points.
"""
from __future__ import annotations

import dataclasses
import math
import statistics

from scipy import stats as scipy_stats

LOWER_IS_BETTER = {"loss": True, "perplexity": True, "accuracy": False, "exact_match": False}


@dataclasses.dataclass(frozen=True)
class Paired:
  """``b - a`` over the seeds both have: mean, 95 % t-interval, the per-seed differences."""

  mean: float
  low: float
  high: float
  diffs: tuple

  @property
  def n(self) -> int:
    return len(self.diffs)

  @property
  def resolved(self) -> bool:
    """The interval excludes zero (needs two seeds at least)."""
    return self.n >= 2 and (self.low > 0 or self.high < 0)


def values(cells, family: str, label: str, mode: str, size, metric: str) -> dict[int, float]:
  """``{seed: value}`` of one cell across seeds."""
  return {c["seed"]: c[metric] for c in cells
          if (c["family"], c["posenc"], c["mode"], c["size"]) == (family, label, mode, size) and metric in c}


def interval(diffs) -> tuple[float, float, float]:
  """Mean and 95 % t-interval of ``diffs`` (a lone value: an interval of +-inf)."""
  mean = statistics.fmean(diffs)
  if len(diffs) < 2:
    return mean, -math.inf, math.inf
  half = scipy_stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
  return mean, mean - half, mean + half


def paired(cells, family: str, a: str, b: str, mode: str, size, metric: str) -> Paired | None:
  """``b - a`` per seed; None where they share no seed."""
  va, vb = values(cells, family, a, mode, size, metric), values(cells, family, b, mode, size, metric)
  seeds = sorted(set(va) & set(vb))
  if not seeds:
    return None
  diffs = tuple(vb[s] - va[s] for s in seeds)
  return Paired(*interval(diffs), diffs)


def ranked(cells, family: str, labels, mode: str, size, metric: str) -> list[str]:
  """``labels`` with cells, best first by their mean over seeds."""
  means = {label: statistics.fmean(v.values()) for label in labels
           if (v := values(cells, family, label, mode, size, metric))}
  return sorted(means, key=lambda label: means[label] if LOWER_IS_BETTER[metric] else -means[label])


def ordering(cells, family: str, labels, mode: str, size, metric: str) -> str:
  """Labels best first, joined by ``≻`` where the next is worse with a 95 % interval that excludes
  zero (better-than is claimed) and ``≈`` where it does not (unresolved): e.g. "a ≻ b ≈ c"."""
  order = ranked(cells, family, labels, mode, size, metric)
  if not order:
    return "—"
  text = f"`{order[0]}`"
  for better, worse in zip(order, order[1:]):
    diff = paired(cells, family, better, worse, mode, size, metric)
    text += f" {'≻' if diff is not None and diff.resolved else '≈'} `{worse}`"
  return text


def diff_text(d: Paired | None, metric: str, unit: str = "") -> str:
  """A paired difference as text: percentage points for fractions, a perplexity ratio for losses;
  ``unit`` follows the numbers."""
  if d is None:
    return "—"
  # Fewer seeds than the protocol's three are said (an interval over 2 seeds is a wide one).
  few = "" if d.n >= 3 else f" ({d.n} seed{'s' if d.n > 1 else ''})"
  if metric == "loss":
    interval_text = f" [{math.exp(d.low):.2f}, {math.exp(d.high):.2f}]" if d.n > 1 else ""
    return f"×{math.exp(d.mean):.2f}{interval_text}{unit}{few}"
  scale = 100.0
  interval_text = f" [{scale * d.low:+.1f}, {scale * d.high:+.1f}]" if d.n > 1 else ""
  return f"{scale * d.mean:+.1f}{interval_text}{unit}{few}"
