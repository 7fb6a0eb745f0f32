"""How fast posenc trains, evaluates and transfers, on whatever devices are present.

    python benchmarks/speed.py            # full run; writes benchmarks/results/speed.{md,json} + plots
    python benchmarks/speed.py --quick    # tiny sizes (CI: tests/test_benchmarks.py)
    python benchmarks/speed.py --sections bert   # re-measure one section, keep the others

Sections (each a markdown table):
  1. posenc's ViT train step vs a straightforward Flax linen one (benchmarks/linen_vit.py,
     the reference), same model, same batch, timed in interleaved rounds; their ratio.
  2. Train step per position encoding and size (ViT from configs/vit_tiny.py, BERT from
     configs/bert_small.py): items/s, step time, compile time, GFLOP/step (XLA's cost
     analysis), model FLOP utilisation against a matmul measured in the same rounds,
     overhead vs `none` at the same size, memory, and the input pipeline's items/s.
  3. Evaluation at several resolutions (parameters transferred by posenc.transfer).
  4. Transfer on restore: an Orbax checkpoint restored at a new resolution.
All steps are posenc's real ones: ``posenc.training.Trainer``'s jitted train/eval step and
optimizer (AdamW + clipping + schedule), built from the configs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

import jax  # noqa: E402
from absl import logging  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

import data_speed  # noqa: E402  (the input-pipeline helpers of benchmarks/data_speed.py)
import linen_vit  # noqa: E402
import timing  # noqa: E402
from configs import bert_small, vit_tiny  # noqa: E402

import speed_report  # noqa: E402
from posenc import data, encodings, transfer  # noqa: E402
from posenc.models import VIT_SIZES  # noqa: E402
from posenc.training import Trainer, sharding  # noqa: E402
from posenc.training.checkpoint import Checkpointer, flat_shapes  # noqa: E402
from posenc.training import resolution  # noqa: E402
from posenc.training.config import validate  # noqa: E402
from posenc.training.optim import make_optimizer  # noqa: E402
from posenc.training.state import build, model_factory  # noqa: E402
from posenc.training.steps import make_train_step  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Profile:
  """What to measure: models, (size, global batch) pairs, encodings, repeats."""

  vit_model: str
  vit_options: dict           # model options over the config's (sizes come from the model name)
  patch: int
  vit_sizes: tuple            # ((image side, batch), ...); the first is the linen comparison's
  bert_model: str
  bert_options: dict
  bert_sizes: tuple           # ((max_len, batch), ...)
  dtype: str
  rounds: int                 # interleaved timing rounds (one call per entry per round)
  matmul_n: int
  eval_sizes: tuple           # image sides for evaluation (ViT built at vit_sizes[0]); restores to the last
  eval_batch: int
  encodings: dict | None = None  # {"vit": names, "bert": names}; None: every encoding a model supports
  restore_encodings: tuple | None = None  # None: those whose parameters change shape, and `none`


SIZE_OPTIONS = ("width", "depth", "num_heads", "mlp_dim")
TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64)
SECTIONS = ("vit", "bert", "eval", "restore")
PROFILES = {
    # 2-core CPU: ViT-Ti/4 at 32 (the headline) and 64 pixels; BERT-mini at 4096 tokens/step.
    "cpu": Profile("vit-ti", {}, 4, ((32, 128), (64, 32)), "bert-mini", {}, ((128, 32), (256, 16), (512, 8)),
                   "float32", 5, 2048, (16, 32, 48, 64), 128),
    # Accelerators: ViT-B/16 at 224 / 384 and BERT-base, in bfloat16.
    "gpu": Profile("vit-b", {}, 16, ((224, 128), (384, 32)), "bert-base", {}, ((128, 256), (512, 64)),
                   "bfloat16", 10, 8192, (160, 224, 320, 384), 256),
    # CI: as little compiling as covers every section; asserts only that the tables are well-formed.
    "quick": Profile("vit-mu", TINY, 4, ((8, 8),), "bert-mini", TINY, ((16, 8),), "float32", 2, 256, (8, 16), 8,
                     dict(vit=("none", "learned"), bert=("learned",)), ("learned",)),
}


# --------------------------------------------------------------------------- configs and steps


def _model_options(config, overrides: dict) -> ml_collections.ConfigDict:
  """The config's model options without its size fields (the model name says the size), + overrides."""
  options = {k: v for k, v in config.model_options.to_dict().items() if k not in SIZE_OPTIONS}
  return ml_collections.ConfigDict({**options, **overrides})


def vit_config(p: Profile, posenc: str, size: int, batch: int) -> ml_collections.ConfigDict:
  """configs/vit_tiny.py:full with this profile's model, patch, size and batch."""
  c = vit_tiny.get_config("full")
  c.model, c.model_options, c.patch_size = p.vit_model, _model_options(c, p.vit_options), p.patch
  c.posenc, c.image_size, c.batch_size, c.eval_batch_size, c.dtype = posenc, size, batch, p.eval_batch, p.dtype
  return c


def bert_config(p: Profile, posenc: str, length: int, batch: int) -> ml_collections.ConfigDict:
  """configs/bert_small.py:full with this profile's model, length and batch."""
  c = bert_small.get_config("full")
  c.model, c.model_options = p.bert_model, _model_options(c, p.bert_options)
  c.posenc, c.max_len, c.batch_size, c.dtype = posenc, length, batch, p.dtype
  return c


def family_encodings(p: Profile, family: str) -> list[str]:
  ndim = 2 if family == "vit" else 1
  names = [n for n in encodings.names() if ndim in encodings.get(n).supported_ndims]
  return [n for n in names if p.encodings is None or n in p.encodings[family]]


def abstract_batch(batch: dict, batch_sharding) -> dict:
  return {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=batch_sharding)
          for k, v in batch.items()}


def unrolled_flops(config, batch: dict) -> float | None:
  """XLA's FLOP count of the lowered train step with the layers unrolled.

  XLA counts a loop body once, so a scanned layer stack is counted with its
  layers unrolled (the same arithmetic; nothing is compiled or allocated).
  """
  c = ml_collections.ConfigDict(config.to_dict())
  c.model_options.scan_layers = False
  mesh = sharding.make_mesh(validate(c, num_devices=jax.device_count(), check_dataset=False))
  rules = tuple(tuple(r) for r in c.logical_axis_rules)
  try:
    run = build(model_factory(c, data.info(c.dataset)), make_optimizer(c), rules, mesh)
  except ValueError:  # a model without the option: the caller counts the compiled program
    return None
  lowered = jax.jit(make_train_step(run.graphdef, run.tx)).lower(
      run.abstract, abstract_batch(batch, sharding.batch_sharding(mesh, rules)))
  return timing.xla_flops(lowered)


def items_in(batch: dict) -> int:
  """Images, or tokens, in a batch."""
  return int(np.size(batch["label"]) if "image" in batch else np.size(batch["input_ids"]))


def train_entry(name: str, config, batch: dict, workdir: str) -> tuple[timing.Timed, Trainer]:
  """posenc's real train step for ``config`` (``Trainer.train_step``), compiled and run once."""
  trainer = Trainer(config, workdir)
  state = trainer.run.init()
  global_batch = sharding.global_batch(batch, trainer.batch_sharding)
  holder = {"state": state}

  def make_call(compiled):
    def call():
      holder["state"], metrics = compiled(holder["state"], global_batch)
      return metrics
    return call

  flops = unrolled_flops(config, batch)
  return timing.compile_timed(name, trainer.train_step, (state, global_batch), items_in(batch), make_call,
                              flops), trainer


def linen_entry(p: Profile, batch: dict) -> timing.Timed:
  """The reference: benchmarks/linen_vit.py at the same sizes as posenc's ViT."""
  sizes = {**VIT_SIZES[p.vit_model.split("-")[1]], **{k: v for k, v in p.vit_options.items() if k in SIZE_OPTIONS}}
  model = linen_vit.LinenViT(num_classes=10, patch_size=p.patch, **sizes)
  images, labels = jnp.asarray(batch["image"], p.dtype), jnp.asarray(batch["label"])
  step, (params, opt_state) = linen_vit.make_train_step(model, images, labels)
  holder = [params, opt_state]

  def make_call(compiled):
    def call():
      holder[0], holder[1], loss = compiled(holder[0], holder[1], images, labels)
      return loss
    return call

  return timing.compile_timed("Flax linen reference", step, (params, opt_state, images, labels),
                              items_in(batch), make_call)


def first_batch(dataset: str, split: str, train: bool, batch: int, size: int) -> dict:
  return next(data_speed.batches_for(dataset, split, train, batch, size, 0))


def loader_rate(dataset: str, split: str, train: bool, batch: int, size: int, batches: int) -> float:
  """Items/s of the input pipeline alone (``posenc.data.make_loader``, in-process)."""
  it = data_speed.batches_for(dataset, split, train, batch, size, 0)
  items = items_in(next(it))
  return items * data_speed.rate(lambda: next(it), batches)


# --------------------------------------------------------------------------- section 1 + 2


def train_group(p: Profile, family: str, size: int, batch: int, log, with_linen: bool) -> dict:
  """Every encoding's train step at one size, timed in interleaved rounds with a matmul."""
  dataset, make_config = ("fashion_mnist", vit_config) if family == "vit" else ("text", bert_config)
  sample = first_batch(dataset, "train", True, batch, size)
  entries, trainers = [], []
  with tempfile.TemporaryDirectory() as tmp:
    for name in family_encodings(p, family):
      config = make_config(p, name, size, batch)
      entry, trainer = train_entry(name, config, sample, os.path.join(tmp, name))
      entries.append(entry)
      trainers.append(trainer)
      log(f"  {family} {size} {name}: compiled in {entry.compile_s:.1f}s")
      if with_linen and name == "learned":  # ABAB: the reference right after the same model
        entries.append(linen_entry(p, sample))
        log(f"  {family} {size} linen reference: compiled in {entries[-1].compile_s:.1f}s")
    matmul = timing.matmul_reference(p.matmul_n, jnp.dtype(p.dtype))
    timing.time_interleaved(entries + [matmul], p.rounds,
                            on_round=lambda r: log(f"  {family} {size}: round {r + 1}/{p.rounds}"))
    for trainer in trainers:
      trainer.close()
  loader = loader_rate(dataset, "train", True, batch, size, batches=max(3, 2 * p.rounds))
  return dict(family=family, size=size, batch=batch, entries=entries, matmul=matmul, loader=loader,
              model=trainers[0].config.model)


# --------------------------------------------------------------------------- section 3 + 4


def eval_at_sizes(p: Profile, log) -> list[dict]:
  """ViT (learned grid) built at the first train size, evaluated at each of ``p.eval_sizes``.

  The Trainer's own evaluation seams: per size, its jitted transfer of the
  parameters (``posenc.training.resolution.make_transfer``: first call compiles)
  and its eval step (compile time, images/s); beside them the eval loader's images/s.
  """
  train_size, batch = p.vit_sizes[0]
  config = vit_config(p, "learned", train_size, batch)
  config.eval_image_sizes = tuple(s for s in p.eval_sizes if s != train_size)
  rows, entries = [], []
  with tempfile.TemporaryDirectory() as tmp:
    trainer = Trainer(config, tmp)
    state = trainer.run.init()
    for size in p.eval_sizes:
      eval_step, move = trainer.eval_sizes[None if size == train_size else size]
      times = []
      for _ in range(max(2, p.rounds) if move else 0):
        start = time.perf_counter()
        params = jax.block_until_ready(move(state["params"]))
        times.append(time.perf_counter() - start)
      test = sharding.global_batch(first_batch("fashion_mnist", "test", False, p.eval_batch, size),
                                   trainer.batch_sharding)
      args = (params if move else state["params"], state["model_state"], test)
      entries.append(timing.compile_timed(f"eval {size}", eval_step, args, p.eval_batch,
                                          lambda c, args=args: lambda: c(*args)))
      loader = loader_rate("fashion_mnist", "test", False, p.eval_batch, size, max(3, 2 * p.rounds))
      rows.append(dict(size=size, train_size=train_size, tokens=(size // p.patch) ** 2 + 1,
                       transfer_first_s=times[0] if times else None,
                       transfer_s=statistics.median(times[1:]) if times else None,
                       eval=entries[-1], loader=loader))
      log(f"  eval {size}: compiled in {entries[-1].compile_s:.1f}s")
    timing.time_interleaved(entries, p.rounds)
    trainer.close()
  return rows


def restore_with_transfer(p: Profile, names: list[str], log) -> list[dict]:
  """An Orbax checkpoint saved at the first ViT size, restored at the last eval size.

  Restores go through ``Checkpointer.restore_params`` with the Trainer's jitted
  transfer seam (``posenc.training.resolution.make_transfer`` over ``posenc.transfer``);
  encodings whose parameters keep their shapes (``none``) are the plain-restore baseline.
  """
  (source_size, batch), target_size = p.vit_sizes[0], p.eval_sizes[-1]
  info = data.info("fashion_mnist")
  rows = []
  for name in p.restore_encodings or names:
    source_config, target_config = (vit_config(p, name, s, batch) for s in (source_size, target_size))
    shapes = [flat_shapes(transfer.param_dict(resolution.abstract_model(c, info)))
              for c in (source_config, target_config)]
    if shapes[0] == shapes[1] and name != "none" and not p.restore_encodings:
      continue
    with tempfile.TemporaryDirectory() as tmp:
      writer = Trainer(source_config, os.path.join(tmp, "source"))
      state = writer.run.init()
      start = time.perf_counter()
      writer.ckpt.save(0, state, iter(data.make_loader("fashion_mnist", "train", batch_size=batch, train=True,
                                                       seed=0, image_size=source_size)), writer.meta)
      writer.close()  # waits for the async save
      save_s = time.perf_counter() - start
      reader = Trainer(target_config, os.path.join(tmp, "target"))
      move = resolution.make_transfer(source_config, target_config, info, resolution.options(target_config))
      ckpt = Checkpointer(os.path.join(tmp, "source", "checkpoints"), keep=1, read_only=True)
      times = []
      for _ in range(max(2, p.rounds)):
        start = time.perf_counter()
        params, changed = ckpt.restore_params(0, reader.run.abstract["params"], lambda x, _, __: move(x))
        jax.block_until_ready(params)
        times.append(time.perf_counter() - start)
      ckpt.close()
      reader.close()
    rows.append(dict(posenc=name, source=source_size, target=target_size, changed=changed, save_s=save_s,
                     first_s=times[0], again_s=statistics.median(times[1:]),
                     megabytes=sum(x.nbytes for x in jax.tree.leaves(params)) / 2**20))
    log(f"  restore {name}: {times[0]:.2f}s first, {rows[-1]['again_s']:.2f}s again")
  return rows


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
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"),
                      help="directory for speed.md, speed.json and the plots")
  args = parser.parse_args(argv)
  name = "quick" if args.quick else args.profile or ("cpu" if jax.default_backend() == "cpu" else "gpu")
  p = PROFILES[name]
  start = time.time()
  if args.rounds:
    p = dataclasses.replace(p, rounds=args.rounds)
  if args.encodings:
    p = dataclasses.replace(p, encodings=dict(vit=args.encodings, bert=args.encodings))
  log = lambda msg: print(f"[{time.time() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)
  logging.set_verbosity(logging.ERROR)  # Orbax's notes about read-only checkpoint directories
  header = timing.machine_lines()
  results = {"profile": name, "header": header, "measured": {}}
  if "vit" in args.sections:
    results["vit"] = [train_group(p, "vit", s, b, log, with_linen=i == 0) for i, (s, b) in enumerate(p.vit_sizes)]
  if "bert" in args.sections:
    results["bert"] = [train_group(p, "bert", s, b, log, with_linen=False) for s, b in p.bert_sizes]
  if "eval" in args.sections:
    results["eval"] = eval_at_sizes(p, log)
  if "restore" in args.sections:
    results["restore"] = restore_with_transfer(p, family_encodings(p, "vit"), log)
  results["seconds"] = time.time() - start
  now = time.strftime("%Y-%m-%d %H:%M")
  results["measured"] = {s: now for s in args.sections}
  results = keep_other_sections(results, os.path.join(args.out, "speed.json"))
  markdown = speed_report.markdown(results)
  print(markdown)
  speed_report.write(results, markdown, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
