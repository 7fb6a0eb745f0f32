"""The timed entries of ``benchmarks.speed``: posenc's real steps built from the configs, and the
references it is compared with (a Flax linen ViT, timm's VisionTransformer), all at a profile's sizes."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks import linen_vit, timing
from benchmarks import timm_vit  # imports torch and timm only when a timm entry is built
from benchmarks.speed_headline import LINEN, TIMM  # the headline's entry names
from benchmarks.speed_profiles import Profile
from posenc.models import VIT_SIZES
from posenc.models.block_stack import resolve_scan_layers
from posenc.training import ConfigError, Run, setup, sharding

SIZE_OPTIONS = ("width", "depth", "num_heads", "mlp_dim")


def abstract_batch(batch: dict, batch_sharding) -> dict:
  return {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=batch_sharding)
          for k, v in batch.items()}


def unrolled_flops(config, batch: dict, always: bool = False) -> float | None:
  """XLA's FLOP count of the lowered train step with the layers unrolled; None when they already are
  (unless ``always``).

  XLA counts a loop body once, so a scanned layer stack is counted with its
  layers unrolled (the same arithmetic; nothing is compiled or allocated).
  """
  if not always and not resolve_scan_layers(config.model_options.get("scan_layers")):
    return None  # the caller counts the step it compiles (unrolled already)
  c = ml_collections.ConfigDict(config.to_dict())
  c.model_options.scan_layers = False
  try:
    run = setup(c)
  except ConfigError:  # a model without the option: the caller counts the compiled program
    return None
  return timing.xla_flops(run.train_step.lower(run.spec.abstract, abstract_batch(batch, run.batch_sharding)))


def train_entry(name: str, run: Run, batch: dict, flops: float | None = None) -> timing.Timed:
  """posenc's real train step (``run.train_step``, from ``setup(config)``), compiled and run once.

  ``flops``: the step's FLOPs when already known (the same step with its layers in the other
  mode); default: counted here."""
  state = run.spec.init()
  global_batch = sharding.global_batch(batch, run.batch_sharding)
  holder = {"state": state}

  def make_call(compiled):
    def call():
      holder["state"], metrics = compiled(holder["state"], global_batch)
      return metrics
    return call

  flops = unrolled_flops(run.config, batch) if flops is None else flops
  return timing.compile_timed(name, run.train_step, (state, global_batch), run.task.items(batch), make_call,
                              flops)


def vit_sizes(p: Profile, model: str) -> dict:
  """Width, depth, heads and MLP width of ``model`` with the profile's overrides (posenc's ViT's)."""
  return {**VIT_SIZES[model.split("-")[1]], **{k: v for k, v in p.models["vit"].options.items() if k in SIZE_OPTIONS}}


def num_classes(run: Run) -> int:
  """The classes of the run's dataset (the references' heads match posenc's)."""
  from posenc import data
  return data.info(run.config.dataset).num_classes


def linen_entry(p: Profile, model_name: str, batch: dict, classes: int) -> timing.Timed:
  """The reference: ``benchmarks.linen_vit`` at the same sizes as posenc's ViT."""
  model = linen_vit.LinenViT(num_classes=classes, patch_size=p.patch, dtype=jnp.dtype(p.dtype), **vit_sizes(p, model_name))
  images, labels = jnp.asarray(batch["image"], p.dtype), jnp.asarray(batch["label"])
  step, (params, opt_state) = linen_vit.make_train_step(model, images, labels)
  holder = [params, opt_state]

  def make_call(compiled):
    def call():
      holder[0], holder[1], loss = compiled(holder[0], holder[1], images, labels)
      return loss
    return call

  return timing.compile_timed(LINEN, step, (params, opt_state, images, labels), int(np.size(batch["label"])),
                              make_call)


def timm_device() -> str:
  return "cpu" if jax.default_backend() == "cpu" else "cuda"


def timm_note() -> str | None:
  """None when timm can run where posenc runs (same device), else why it is skipped."""
  return timm_vit.available() or timm_vit.cuda_note(timm_device())


def timm_entry(p: Profile, model_name: str, batch: dict, classes: int) -> timing.Timed:
  """timm's VisionTransformer, same sizes, same batch, in a PyTorch eager loop (``benchmarks.timm_vit``)."""
  step, _ = timm_vit.make_train_step(np.asarray(batch["image"]), np.asarray(batch["label"]), num_classes=classes,
                                     patch_size=p.patch, dtype=p.dtype, device=timm_device(),
                                     **vit_sizes(p, model_name))
  return timing.eager_timed(TIMM, step, int(np.size(batch["label"])))


def first_batch(run: Run, split: str, train: bool, size=None) -> dict:
  """The first batch of the run's own loader (``run.loader``) at ``size`` (None: as trained)."""
  return next(iter(run.loader(split, train=train, size=size)))


def loader_rate(run: Run, split: str, train: bool, batches: int, size=None) -> float:
  """Items/s of the run's own input pipeline alone (``run.loader``: the task's, in-process), at
  ``size`` (None: as trained)."""
  def endless():  # an evaluation loader is one pass: start it again when exhausted
    while True:
      yield from run.loader(split, train=train, size=size)
  it = endless()
  items = run.task.items(next(it))
  return items * timing.rate(lambda: next(it), batches)
