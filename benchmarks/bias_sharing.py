"""What computing a layer-shared attention bias once per forward saves: posenc's real train step with the
bias computed once and given to every layer (the default when ``bias_shared_by_layers``) against the same
step with the bias recomputed in every layer (the bias encodings' option
``bias_once_per_forward=False``), timed in interleaved rounds.

    python -m benchmarks.bias_sharing                       # cpb, rel_bias at ViT-Ti/4 64 px; kerple at BERT 512
    python -m benchmarks.bias_sharing --cases cpb:vit:64 --rounds 8
    python -m benchmarks.bias_sharing --quick               # CI only: tiny models, meaningless numbers
"""
from __future__ import annotations

import argparse
import sys

from benchmarks import timing
from benchmarks.speed_entries import first_batch, train_entry
from benchmarks.speed_profiles import FAMILIES, PROFILES
from posenc.training import setup

CASES = ("cpb:vit:64", "rel_bias:vit:64", "kerple:bert:512")
QUICK_CASES = ("cpb:vit:8", "kerple:bert:16")


def run_with_sharing(profile, name: str, family: str, size: int, shared: bool):
  """``setup`` of the profile's config for ``name`` at ``size``, with the encoding's option
  ``bias_once_per_forward`` set to ``shared``."""
  batch = dict(profile.models[family].sizes).get(size, 8)
  config = FAMILIES[family].config(profile, name, size, batch)
  config.posenc_options.bias_once_per_forward = shared
  return setup(config)


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
