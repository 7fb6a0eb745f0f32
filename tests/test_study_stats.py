"""benchmarks.study_stats: paired differences over seeds against scipy's paired t-test, and orderings that
claim a better-than only where the interval excludes zero."""
from __future__ import annotations

import math

import numpy as np
import pytest

stats = pytest.importorskip("scipy.stats", reason="no scipy (pip install -e .[test])")

from benchmarks import study_stats  # noqa: E402  (after the skip: it imports scipy)


def cells(values: dict, metric="accuracy", mode="zoom", size=32):
  return [dict(family="f", posenc=label, seed=seed, mode=mode, size=size, **{metric: v})
          for label, per_seed in values.items() for seed, v in enumerate(per_seed)]


def test_paired_interval_equals_scipys_paired_t_test():
  a, b = [0.80, 0.82, 0.79], [0.84, 0.855, 0.835]
  d = study_stats.paired(cells({"a": a, "b": b}), "f", "a", "b", "zoom", 32, "accuracy")
  ci = stats.ttest_rel(b, a).confidence_interval(0.95)
  assert d.diffs == pytest.approx(tuple(np.subtract(b, a)))
  assert (d.mean, d.low, d.high) == pytest.approx((np.mean(np.subtract(b, a)), ci.low, ci.high))
  assert d.resolved and d.n == 3


def test_pairs_only_the_seeds_both_have_and_one_seed_resolves_nothing():
  rows = cells({"a": [0.5, 0.6, 0.7], "b": [0.9]})
  d = study_stats.paired(rows, "f", "a", "b", "zoom", 32, "accuracy")
  assert d.diffs == pytest.approx((0.4,)) and not d.resolved and math.isinf(d.high)
  assert study_stats.paired(rows, "f", "a", "c", "zoom", 32, "accuracy") is None
  assert study_stats.diff_text(d, "accuracy") == "+40.0 (1 seed)"


def test_fewer_seeds_than_three_are_said_after_the_unit():
  two = study_stats.paired(cells({"a": [0.5, 0.6], "b": [0.7, 0.9]}), "f", "a", "b", "zoom", 32, "accuracy")
  assert study_stats.diff_text(two, "accuracy", " points").endswith(" points (2 seeds)")
  three = study_stats.paired(cells({"a": [0.5, 0.6, 0.4], "b": [0.7, 0.9, 0.6]}), "f", "a", "b", "zoom", 32,
                             "accuracy")
  assert study_stats.diff_text(three, "accuracy", " points").endswith("] points")


def test_ordering_claims_better_only_where_the_interval_excludes_zero():
  rows = cells({"best": [0.90, 0.91, 0.92], "close": [0.89, 0.92, 0.90], "worst": [0.50, 0.52, 0.49]})
  assert study_stats.ordering(rows, "f", ["worst", "close", "best"], "zoom", 32, "accuracy") == \
      "`best` ≈ `close` ≻ `worst`"
  losses = cells({"low": [1.0, 1.1, 1.05], "high": [2.0, 2.1, 2.2]}, metric="loss")
  assert study_stats.ordering(losses, "f", ["high", "low"], "zoom", 32, "loss") == "`low` ≻ `high`"  # lower is better
  ratio = study_stats.paired(losses, "f", "low", "high", "zoom", 32, "loss")
  assert study_stats.diff_text(ratio, "loss").startswith(f"×{math.exp(ratio.mean):.2f} [")
