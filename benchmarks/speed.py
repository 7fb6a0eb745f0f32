"""How fast posenc trains, evaluates and transfers, on whatever devices are present.

    python -m benchmarks.speed            # full run; writes benchmarks/results/speed.{md,json} + plots
    python -m benchmarks.speed --quick    # CI only (tests/test_benchmarks.py): tiny models, meaningless numbers
    python -m benchmarks.speed --sections bert   # re-measure one section, keep the others
    python -m benchmarks.speed --profile gpu     # on a GPU (benchmarks/device_check.sh): speed_gpu.{md,json}

Sections (each a markdown table):
  1. The headline: posenc's ViT train step vs timm's VisionTransformer in a PyTorch eager loop
     (``benchmarks.timm_vit``; torch's threads = the host's cores) and vs a straightforward Flax
     linen one (``benchmarks.linen_vit``), same model, same batch, timed in interleaved rounds, at
     each of the profile's ``headline`` (model, size, batch); their ratios; the shape-limited
     ceiling (the model's projection matmuls at its shapes, timed in the same rounds) and the
     fraction of it posenc's step reaches; compile time of the first model's step with its
     layers scanned and unrolled.
  2. Train step per position encoding and size (ViT from configs/vit_tiny.py, BERT from
     configs/bert_small.py): items/s, step time, compile time, GFLOP/step (XLA's cost
     analysis), model FLOP utilisation against a matmul measured in the same rounds,
     overhead vs `none` at the same size, memory, and the input pipeline's items/s.
  3. Evaluation at several resolutions (the run's ``evals``: parameters moved by
     ``posenc.transfer.jit_transfer``, then its eval step).
  4. Transfer on restore: an Orbax checkpoint restored at a new resolution, as ``init_from``
     does (``Checkpointer.restore_params`` + ``jit_transfer`` from the recorded geometry), and
     against a plain restore of the same checkpoint at its own resolution.
All steps are posenc's real ones, built from the configs by ``posenc.training.setup(config)``:
its jitted train step (AdamW + clipping + schedule) and eval steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# On a GPU, timm (PyTorch) runs beside posenc in this process: JAX allocates on demand instead of
# taking most of the device's memory up front. (No effect on CPU.)
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
from absl import logging  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from benchmarks import speed_report, timing  # noqa: E402
from benchmarks import timm_vit  # noqa: E402  (imports torch and timm only when the headline section runs)
from benchmarks.speed_entries import (  # noqa: E402
    first_batch, linen_entry, loader_rate, num_classes, timm_device, timm_entry, timm_note, train_entry,
    unrolled_flops, vit_sizes)
from benchmarks.speed_headline import POSENC  # noqa: E402
from benchmarks.speed_profiles import FAMILIES, PROFILES, SECTIONS, Profile, vit_config  # noqa: E402
from posenc import transfer  # noqa: E402
from posenc.encodings import Geometry  # noqa: E402
from posenc.models.block_stack import resolve_scan_layers  # noqa: E402
from posenc.training import setup, sharding  # noqa: E402
from posenc.training.checkpoint import Checkpointer  # noqa: E402
from posenc.training.config import transfer_options  # noqa: E402


# --------------------------------------------------------------------------- section 1 + 2


def headline_group(p: Profile, model: str, size: int, batch: int, log, other_layer_mode: bool) -> dict:
  """posenc (`learned`) vs the Flax linen reference vs timm, one batch for all, timed in
  interleaved rounds with the model's projection matmuls at its shapes (the ceiling).

  ``other_layer_mode``: also posenc's step with its layers scanned where the backend's default
  unrolls them (CPU) and unrolled where it scans them: compile time and step time of both.
  """
  config = vit_config(p, "learned", size, batch, model)
  run = setup(config)
  sample = first_batch(run, "train", True)
  scanned = resolve_scan_layers(config.model_options.get("scan_layers"))
  entries = [train_entry(POSENC, run, sample)]
  log(f"  headline {model} {size}: posenc ({'scanned' if scanned else 'unrolled'}) compiled in "
      f"{entries[-1].compile_s:.1f}s")
  if other_layer_mode:
    other = ml_collections.ConfigDict(config.to_dict())
    other.model_options.scan_layers = not scanned
    entries.append(train_entry(f"{POSENC}, {'unrolled' if scanned else 'scanned'} layers", setup(other), sample,
                               flops=entries[0].flops))  # the same arithmetic, counted unrolled
    log(f"  headline {model} {size}: {entries[-1].name} compiled in {entries[-1].compile_s:.1f}s")
  entries.append(linen_entry(p, model, sample, num_classes(run)))
  log(f"  headline {model} {size}: linen reference compiled in {entries[-1].compile_s:.1f}s")
  note = timm_note()
  if note is None:
    entries.append(timm_entry(p, model, sample, num_classes(run)))
    log(f"  headline {model} {size}: timm built and run once")
  sizes = vit_sizes(p, model)
  tokens = math.prod(run.geometry.shape) + run.geometry.num_prefix
  ceiling = timing.projection_matmuls(batch * tokens, sizes["width"], sizes["mlp_dim"], jnp.dtype(p.dtype))
  timing.time_interleaved(entries + ceiling, p.rounds, settle=note is None,  # timm: torch in the rounds
                          on_round=lambda r: log(f"  headline {model} {size}: round {r + 1}/{p.rounds}"))
  return dict(model=model, size=size, batch=batch, patch=p.patch, tokens=tokens, dtype=p.dtype,
              scan_layers=scanned, depth=sizes["depth"], entries=entries, ceiling=ceiling, timm_note=note)


def headline(p: Profile, log, torch_threads: int | None = None) -> dict:
  """Every headline group, and what the report states about timm (versions, threads) or why it is absent.

  ``torch_threads``: torch's intra-op threads on CPU (default: the host's cores)."""
  note = timm_note()
  info = dict(timm=None, threads=None, cores=os.cpu_count(), device=timm_device(), timm_note=note,
              load_start=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
  if note is None:
    info.update(timm=timm_vit.versions(), threads=timm_vit.set_threads(torch_threads) if timm_device() == "cpu" else None)
  groups = [headline_group(p, m, s, b, log, other_layer_mode=i == 0) for i, (m, s, b) in enumerate(p.headline)]
  return dict(info, groups=groups)


def train_group(p: Profile, family: str, size: int, batch: int, log) -> dict:
  """Every encoding's train step at one size, timed in interleaved rounds with a matmul."""
  entries, runs, sample = [], [], None
  for name in FAMILIES[family].encodings(p):
    run = setup(FAMILIES[family].config(p, name, size, batch))
    if sample is None:  # one batch for every contender
      sample = first_batch(run, "train", True)
    entry = train_entry(name, run, sample)
    entries.append(entry)
    runs.append(run)
    log(f"  {family} {size} {name}: compiled in {entry.compile_s:.1f}s")
  matmul = timing.matmul_reference(p.matmul_n, jnp.dtype(p.dtype))
  timing.time_interleaved(entries + [matmul], p.rounds,
                          on_round=lambda r: log(f"  {family} {size}: round {r + 1}/{p.rounds}"))
  loader = None if p.dataset == "synthetic" else loader_rate(runs[0], "train", True, max(3, 2 * p.rounds))
  return dict(family=family, size=size, batch=batch, entries=entries, matmul=matmul, loader=loader,
              model=runs[0].config.model)


# --------------------------------------------------------------------------- section 3 + 4


def eval_at_sizes(p: Profile, log) -> list[dict]:
  """ViT (learned grid) built at the first train size, evaluated at each of ``p.eval_sizes``.

  The run's own evaluation (``setup(config).evals``, one ``EvalAt`` per size):
  per size, its jitted transfer of the parameters (``EvalAt.move``, made by
  ``posenc.transfer.jit_transfer``; the first call compiles) and its eval step
  (compile time, images/s); beside them the eval loader's images/s.
  """
  train_size, batch = p.models["vit"].sizes[0]
  config = vit_config(p, "learned", train_size, batch)
  config.eval_image_sizes = tuple(s for s in p.eval_sizes if s != train_size)
  run = setup(config)
  state = run.spec.init()
  at_size = {train_size if at.size is None else at.size: at for at in run.evals}
  rows, entries = [], []
  for size in p.eval_sizes:
    at = at_size[size]
    times, params = [], state["params"]
    for _ in range(max(2, p.rounds) if at.move else 0):
      start = time.perf_counter()
      params = jax.block_until_ready(at.move(state["params"]))
      times.append(time.perf_counter() - start)
    test = sharding.global_batch(first_batch(run, "test", False, at.size), run.batch_sharding)
    args = (params, state["model_state"], test)
    entries.append(timing.compile_timed(f"eval {size}", at.step, args, run.task.items(test),
                                        lambda c, args=args: lambda: c(*args)))
    loader = None if p.dataset == "synthetic" else loader_rate(run, "test", False, max(3, 2 * p.rounds), at.size)
    rows.append(dict(size=size, train_size=train_size, tokens=math.prod(at.geometry.shape) + at.geometry.num_prefix,
                     transfer_first_s=times[0] if times else None,
                     transfer_s=statistics.median(times[1:]) if times else None,
                     eval=entries[-1], loader=loader))
    log(f"  eval {size}: compiled in {entries[-1].compile_s:.1f}s")
  timing.time_interleaved(entries, p.rounds)
  return rows


def restore_with_transfer(p: Profile, names: list[str], log) -> list[dict]:
  """An Orbax checkpoint saved at the first ViT size, restored at the last eval size.

  As ``init_from`` does it: the target run reads the checkpoint's metadata (the
  source run's ``run.meta``: geometry, encoding), builds the jitted transfer from
  that geometry to its own (``posenc.transfer.jit_transfer``, onto its parameters'
  shardings) and restores through ``Checkpointer.restore_params``; each of these
  restores builds and compiles the transfer anew, as a new run does. Encodings whose
  parameters keep their shapes (``none``) are the plain-restore baseline.

  Then what the transfer itself costs: the same checkpoint restored through
  ``Checkpointer.restore_params`` at the new size with one jitted transfer built (and
  compiled, by an untimed first restore) once, against a plain restore at the size it
  was saved at, alternating, ``max(3, rounds)`` times each; their ratio of medians.
  """
  (source_size, batch), target_size = p.models["vit"].sizes[0], p.eval_sizes[-1]
  repeats = max(3, p.rounds)
  rows = []
  for name in p.restore_encodings or names:
    source, target = (setup(vit_config(p, name, s, batch)) for s in (source_size, target_size))
    shapes = [transfer.flat_shapes(r.spec.abstract["params"]) for r in (source, target)]
    if shapes[0] == shapes[1] and name != "none" and not p.restore_encodings:
      continue
    with tempfile.TemporaryDirectory() as tmp:
      writer = Checkpointer(os.path.join(tmp, "checkpoints"), keep=1)
      state, data_iter = source.spec.init(), iter(source.loader("train", train=True))
      start = time.perf_counter()
      writer.save(0, state, data_iter, source.meta)
      writer.close()  # waits for the async save
      save_s = time.perf_counter() - start
      ckpt = Checkpointer(os.path.join(tmp, "checkpoints"), read_only=True)
      wanted, times = target.spec.abstract["params"], []
      for _ in range(max(2, p.rounds)):
        start = time.perf_counter()
        meta = ckpt.meta(0)
        move = transfer.jit_transfer(meta["posenc"], Geometry.from_dict(meta["geometry"]), target.geometry,
                                     wanted, transfer_options(target.config))
        params, changed = ckpt.restore_params(0, wanted, move)
        jax.block_until_ready(params)
        times.append(time.perf_counter() - start)
      megabytes = sum(x.nbytes for x in jax.tree.leaves(params)) / 2**20
      # The transfer built once (``move``, the last one above: its first call compiled it) vs a
      # plain restore of the same checkpoint at its own size (nothing to transfer: no ``move``).
      plain_wanted = source.spec.abstract["params"]
      jax.block_until_ready(ckpt.restore_params(0, plain_wanted)[0])  # untimed: both paths warm
      plain_s, moved_s = [], []
      for _ in range(repeats):
        for wanted_now, move_now, out in ((plain_wanted, None, plain_s), (wanted, move, moved_s)):
          start = time.perf_counter()
          jax.block_until_ready(ckpt.restore_params(0, wanted_now, move_now)[0])
          out.append(time.perf_counter() - start)
      ckpt.close()
    rows.append(dict(posenc=name, source=source_size, target=target_size, changed=changed, save_s=save_s,
                     first_s=times[0], again_s=statistics.median(times[1:]), megabytes=megabytes,
                     plain_times=plain_s, transfer_times=moved_s))
    ratio = statistics.median(moved_s) / statistics.median(plain_s)
    log(f"  restore {name}: {times[0]:.2f}s first, {rows[-1]['again_s']:.2f}s again; with the transfer built "
        f"once {ratio:.2f}x a plain restore")
  return rows


# --------------------------------------------------------------------------- FLOPs counted here


def count_flops(p: Profile, results: dict, log) -> int:
  """Fill in the GFLOP/step of posenc's train steps that the measuring machine did not count (jax
  0.11's GPU lowering reports no cost analysis) with this machine's count of the same step: XLA's
  cost analysis of the lowered (StableHLO) program, before any backend compiles it. Returns how
  many entries it filled."""
  cache, filled = {}, 0

  def flops(family, name, size, batch, model=None):
    key = (family, name, size, batch, model)
    if key not in cache:
      config = FAMILIES[family].config(p, name, size, batch, model)
      cache[key] = unrolled_flops(config, first_batch(setup(config), "train", True), always=True)
      log(f"  counted {key}: {cache[key] and cache[key] / 1e9:,.1f} GFLOP/step")
    return cache[key]

  for family in FAMILIES:
    for g in results.get(family) or []:
      for e in g["entries"]:
        if e.flops is None:
          e.flops, filled = flops(family, e.name, g["size"], g["batch"]), filled + 1
  for g in (results.get("headline") or {}).get("groups", []):
    for e in g["entries"]:
      if e.flops is None and e.name.startswith(POSENC):
        e.flops, filled = flops("vit", "learned", g["size"], g["batch"], g["model"]), filled + 1
  return filled


# --------------------------------------------------------------------------- main


def keep_other_sections(results: dict, previous_json: str) -> dict:
  """Sections this run did not measure, taken from the previous report of the same profile."""
  if not os.path.exists(previous_json):
    return results
  with open(previous_json) as f:
    previous = speed_report.from_json(json.load(f))
  if previous["profile"] != results["profile"]:
    return results
  merged = dict(results, measured=dict(results["measured"]))
  for section in SECTIONS:
    if section not in results["measured"] and previous.get(section):
      merged[section] = previous[section]
      merged["measured"][section] = previous.get("measured", {}).get(section, "earlier")
  return merged


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes for CI (profile 'quick')")
  parser.add_argument("--profile", choices=sorted(PROFILES), default=None,
                      help="default: 'gpu' on an accelerator, else 'cpu'")
  parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
  parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS,
                      help="measure only these; the others are kept from the previous report in --out")
  parser.add_argument("--encodings", nargs="+", default=None,
                      help="only these encodings (default: every one a model supports)")
  parser.add_argument("--synthetic", action="store_true",
                      help="random batches of the real ones' shapes (no dataset needed; the gpu profile's default)")
  parser.add_argument("--count-flops", action="store_true",
                      help="measure nothing: fill in the GFLOP/step (and MFU) that the profile's report in --out "
                           "lacks, counted on this machine from the same lowered steps")
  parser.add_argument("--torch-threads", type=int, default=None,
                      help="torch's CPU threads for the timm contender (default: the host's cores)")
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"),
                      help="directory for speed.md, speed.json and the plots")
  args = parser.parse_args(argv)
  name = "quick" if args.quick else args.profile or ("cpu" if jax.default_backend() == "cpu" else "gpu")
  p = PROFILES[name]
  start = time.time()
  if args.rounds:
    p = dataclasses.replace(p, rounds=args.rounds)
  if args.synthetic:
    p = dataclasses.replace(p, dataset="synthetic")
  if args.encodings:
    p = p.with_encodings(args.encodings)
  log = lambda msg: print(f"[{time.time() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)
  logging.set_verbosity(logging.ERROR)  # Orbax's notes about read-only checkpoint directories
  if args.count_flops:
    stem = speed_report.stem(name)
    with open(os.path.join(args.out, f"{stem}.json")) as f:
      results = speed_report.from_json(json.load(f))
    filled = count_flops(p, results, log)
    results["flops_note"] = (f"GFLOP/step of {filled} train steps counted after the run by `--count-flops` "
                             f"({timing.machine_lines()[1]}): XLA's cost analysis of the same lowered step.")
    markdown = speed_report.markdown(results)
    speed_report.write(results, markdown, args.out, stem)
    print(markdown)
    return 0
  header = timing.machine_lines()
  results = {"profile": name, "header": header, "measured": {}, "dataset": p.dataset,
             "peak_flops": timing.peak_flops(p.dtype)}
  results["goals"] = p.goals
  if "headline" in args.sections:
    results["headline"] = headline(p, log, args.torch_threads)
  for family in FAMILIES:
    if family in args.sections:
      results[family] = [train_group(p, family, s, b, log) for s, b in p.models[family].sizes]
  if "eval" in args.sections:
    results["eval"] = eval_at_sizes(p, log)
  if "restore" in args.sections:
    results["restore"] = restore_with_transfer(p, FAMILIES["vit"].encodings(p), log)
  results["seconds"] = time.time() - start
  results["cores"] = os.cpu_count()
  results["load_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
  now = time.strftime("%Y-%m-%d %H:%M")
  results["measured"] = {s: now for s in args.sections}
  stem = speed_report.stem(name)
  results = keep_other_sections(results, os.path.join(args.out, f"{stem}.json"))
  markdown = speed_report.markdown(results)
  print(markdown)
  speed_report.write(results, markdown, args.out, stem)
  return 0


if __name__ == "__main__":
  sys.exit(main())
