"""What computing a layer-shared attention bias once per forward saves: posenc's real train step with the
bias computed once and given to every layer (the default when ``bias_shared_by_layers``) against the same
step with the bias recomputed in every layer, timed in interleaved rounds.

    python benchmarks/bias_sharing.py                       # cpb, rel_bias at ViT-Ti/4 64 px; kerple at BERT 512
    python benchmarks/bias_sharing.py --cases cpb:vit:64 --rounds 8
    python benchmarks/bias_sharing.py --quick               # CI only: tiny models, meaningless numbers
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]

import timing  # noqa: E402
from speed import PROFILES  # noqa: E402
from speed_entries import bert_config, first_batch, train_entry, vit_config  # noqa: E402
from posenc import encodings  # noqa: E402
from posenc.training import setup  # noqa: E402

CASES = ("cpb:vit:64", "rel_bias:vit:64", "kerple:bert:512")
QUICK_CASES = ("cpb:vit:8", "kerple:bert:16")


def run_with_sharing(profile, name: str, family: str, size: int, shared: bool):
  """``setup`` of the profile's config for ``name`` at ``size``, its encoding's ``bias_shared_by_layers``
  forced to ``shared`` (the models read it when they trace)."""
  cls = encodings.get(name)
  original = cls.__init__

  @functools.wraps(original)  # make() reads the constructor's keywords from its signature
  def init(self, *args, **kwargs):
    original(self, *args, **kwargs)
    self.bias_shared_by_layers = shared

  batch = dict(profile.vit_sizes + profile.bert_sizes).get(size, 8)
  config = (vit_config if family == "vit" else bert_config)(profile, name, size, batch)
  cls.__init__ = init
  try:
    return setup(config)
  finally:
    cls.__init__ = original


def measure(profile, case: str, rounds: int) -> list[str]:
  name, family, size = case.split(":")
  entries = []
  for shared in (True, False):
    run = run_with_sharing(profile, name, family, int(size), shared)
    entries.append(train_entry("once per forward" if shared else "in every layer", run,
                               first_batch(run, "train", True)))
  timing.time_interleaved(entries, rounds)
  once, every = (e.seconds for e in entries)
  ratios = [b / a for a, b in zip(*(e.times for e in entries))]
  return [f"| `{name}` | {family} {size} | {1e3 * once:,.0f} | {1e3 * every:,.0f} | {every / once:.2f}× "
          f"({min(ratios):.2f}–{max(ratios):.2f}) |"]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", nargs="+", default=None, help="encoding:family:size, e.g. cpb:vit:64")
  parser.add_argument("--rounds", type=int, default=6)
  parser.add_argument("--quick", action="store_true", help="tiny models (profile 'quick'), for CI")
  args = parser.parse_args(argv)
  profile = PROFILES["quick" if args.quick else "cpu"]
  cases = args.cases or (QUICK_CASES if args.quick else CASES)
  lines = [*(f"- {line}" for line in timing.machine_lines()), "",
           "| encoding | model, size | step ms, bias once | step ms, bias per layer | per layer / once |",
           "|---|---|---:|---:|---:|"]
  for case in cases:
    lines += measure(profile, case, 2 if args.quick else args.rounds)
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
