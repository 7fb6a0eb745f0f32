"""benchmarks/RESULTS.md is rendered from its template and the committed records, and its claims follow the CIs."""
from __future__ import annotations

from benchmarks import report


def cell(label, seed, value, mode="zoom", size=64, family="vit", budget="b"):
  return dict(family=family, posenc=label, seed=seed, mode=mode, size=size, accuracy=value, loss=1.0 - value,
              budget=budget)


def namespace(cells, raw=()):
  return report.namespace(dict(study=dict(cells=list(cells), families=[], baselines={}), raw_cells=list(raw)))


def test_a_claim_is_made_only_where_the_paired_interval_excludes_zero():
  # b beats a by 0.10, 0.11, 0.12 on the three seeds: resolved, whatever their spread across seeds.
  resolved = [cell("a", s, 0.5 + 0.2 * s) for s in range(3)] + [cell("b", s, 0.6 + 0.2 * s + 0.01 * s)
                                                                  for s in range(3)]
  ns = namespace(resolved)
  assert ns["compare"]("vit", "a", "b", "zoom", 64) == "`b` ≻ `a`, +11.0 [+8.5, +13.5] points"
  assert ns["compare"]("vit", "b", "a", "zoom", 64) == "`b` ≻ `a`, +11.0 [+8.5, +13.5] points"
  # Differences of +0.10, -0.05, +0.02: the interval spans zero.
  mixed = [cell("a", s, 0.5) for s in range(3)] + [cell("b", s, 0.5 + d) for s, d in enumerate((0.10, -0.05, 0.02))]
  text = namespace(mixed)["compare"]("vit", "a", "b", "zoom", 64)
  assert text.startswith("`a` ≈ `b` (unresolved: `b` +2.3 [")
  # Loss: lower is better, the difference a perplexity ratio.
  ns = namespace(resolved)
  assert ns["compare"]("vit", "a", "b", "zoom", 64, "loss").startswith("`b` ≻ `a`, perplexity ×0.90 [")
  assert ns["compare"]("vit", "a", "missing", "zoom", 64) == "`a` vs `missing`: not recorded"


def test_an_earlier_protocol_is_read_from_its_own_cells():
  current = [cell("a", s, 0.5) for s in range(3)] + [cell("b", s, 0.5) for s in range(3)]
  earlier = [cell("a", s, 0.5, budget="old,x") for s in range(3)] + [cell("b", s, 0.7 + 0.01 * s, budget="old,x")
                                                                     for s in range(3)]
  ns = namespace(current, raw=current + earlier)
  assert ns["compare"]("vit", "a", "b", "zoom", 64, protocol="old").startswith("`b` ≻ `a`, +21.0 [")
  assert ns["compare"]("vit", "a", "b", "zoom", 64).startswith("`a` ≈ `b`")
  table = ns["protocol_table"]("vit", "old", ["zoom"])
  assert "| `b` | 71.0 ± 1.0 |" in table


def test_results_md_is_the_render_of_its_template_and_the_committed_records():
  assert report.main(["--check"]) == 0, "run `python -m benchmarks.report` and commit benchmarks/RESULTS.md"
