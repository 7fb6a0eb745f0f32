"""Training at several resolutions (FlexiViT / RoPE-ViT): the config fields' validation, one
compile of the jitted train step per size, and a resumed run drawing the same sizes.

Runs are in-process ``posenc.training.train`` on a one-layer, 16-wide ViT (rope: no table,
so any grid), 8 simulated devices, a few steps; the train step is wrapped to record the
image size of every step it is given.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import jax
import numpy as np
import pytest

from posenc import tasks
from posenc.config import ConfigError, load_config_file
from conftest import image_loader
from posenc.training import setup, train, validate

REPO = Path(__file__).resolve().parents[1]
# Seed 0 draws 24, 32, 24 | 32, 32, 24: both sizes before and after the step-3 checkpoint.
TINY = ("posenc=rope,model_options.width=16,model_options.depth=1,model_options.num_heads=2,"
        "model_options.mlp_dim=32,image_size=32,patch_size=4,train_image_sizes=(24,32),augment=True,"
        "batch_size=8,eval_batch_size=64,eval_max_batches=1,total_steps=6,warmup_steps=1,lr=5e-3,"
        "log_every=1,eval_every=0,checkpoint_every=3,seed=0")


def config(arg: str = ""):
  return load_config_file(f"{REPO / 'configs' / 'vit_tiny.py'}:{TINY}" + (f",{arg}" if arg else ""))


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("arg, match", [
    ("train_image_sizes=(24,30)", r"'patch_size': 4 does not divide train_image_sizes=30"),
    ("train_image_sizes=((24,24,1),)", "'train_image_sizes'"),
    ("posenc=learned",
     r"'train_image_sizes': posenc 'learned' built at image_size=32 cannot run at 24.*resample=True"),
    ("eval_protocol=stretch", "'eval_protocol'"),
    ("object_size=-4", "'object_size'"),
    ("crop_scale=(0.6,0.3)", "'crop_scale'"),
    ("crop_scale=(0,1)", "'crop_scale'"),
])
def test_bad_size_and_augmentation_fields_are_one_clear_error(arg, match):
  with pytest.raises(ConfigError, match=match):
    validate(config(arg), num_devices=8)


@pytest.mark.parametrize("arg", ["", "posenc=sincos2d", "posenc=learned,train_image_sizes=(32,)",
                                 "posenc=learned,posenc_options.resample=True",  # FlexiViT's resampled table
                                 "eval_protocol=canvas,object_size=28,eval_image_sizes=(48,)"])
def test_good_multires_configs_validate(arg):
  cfg = config(arg)
  assert validate(cfg, num_devices=8) == (8, 1, 1)  # every check passed and the mesh resolved
  task = tasks.get(cfg.task)
  sizes = {task.geometry(cfg, size).shape for size in (None, *task.eval_sizes(cfg))}
  assert sizes == {(cfg.image_size // cfg.patch_size,) * 2} | {(s // cfg.patch_size,) * 2 for s in cfg.eval_image_sizes}


def test_task_loaders_follow_the_protocol_and_sizes():
  """The task's loaders: training draws train_image_sizes (always resampled); evaluation at another
  size and training at an image_size other than object_size follow eval_protocol."""
  task = tasks.get("image_classification")
  first = lambda loader: next(iter(loader))  # noqa: E731
  kw = dict(dataset="fashion_mnist", split="validation", batch_size=8, seed=0)
  cfg = config("eval_protocol=canvas,object_size=32")
  multi = [b["image"].shape[1] for b in itertools.islice(task.loader(cfg, "validation", train=True, batch_size=8), 6)]
  assert multi == [24, 32, 24, 32, 32, 24]
  np.testing.assert_array_equal(  # several sizes: zoom, whatever the protocol
      first(task.loader(cfg, "validation", train=True, batch_size=8))["image"],
      first(image_loader(**kw, train=True, image_size=32, image_sizes=(24, 32), crop_scale=(0.35, 1.0)))["image"])
  np.testing.assert_array_equal(  # evaluation at 48: the 32-px object on a 48-px canvas
      first(task.loader(cfg, "validation", train=False, batch_size=8, size=48))["image"],
      first(image_loader(**kw, train=False, image_size=48, protocol="canvas", object_size=32))["image"])
  tune = config("image_size=48,train_image_sizes=(),eval_protocol=canvas,object_size=32")  # canvas fine-tuning
  np.testing.assert_array_equal(
      first(task.loader(tune, "validation", train=True, batch_size=8))["image"],
      first(image_loader(**kw, train=True, image_size=48, protocol="canvas", object_size=32))["image"])
  zoom = config("image_size=48,train_image_sizes=()")  # object_size 0 = image_size: plain resize
  np.testing.assert_array_equal(
      first(task.loader(zoom, "validation", train=False, batch_size=8, size=24))["image"],
      first(image_loader(**kw, train=False, image_size=24))["image"])


# --------------------------------------------------------------------------- runs


class Stop(Exception):
  """Raised by the recording step to stop a run after some steps (as a crash would)."""


def recorded_train(cfg, workdir: Path, stop_after: int | None = None):
  """``train(setup(cfg), workdir)`` recording each step's image size and every XLA compilation of
  the train step (jax's backend-compile event; a persistent-cache hit counts too); stops (raising
  inside the loop) when asked to run step ``stop_after + 1``. -> (run, sizes, compilations).

  (``run.train_step._cache_size()`` is no compile count here: jax's C++ dispatch cache adds
  entries for calls whose arguments hold typed PRNG keys, as the model state's dropout key does,
  without tracing or compiling again.)"""
  run = setup(cfg)
  jitted, sizes, compiled = run.train_step, [], []

  def step(state, batch):
    if stop_after is not None and len(sizes) == stop_after:
      raise Stop
    sizes.append(batch["image"].shape[1])
    assert batch["image"].shape[1:3] == (sizes[-1], sizes[-1])  # every row of a batch has the size
    return jitted(state, batch)

  def on_event(event, duration, fun_name="", **kwargs):
    if event == "/jax/core/compile/backend_compile_duration" and "train_step" in fun_name:
      compiled.append(sizes[-1])

  run.train_step = step
  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    train(run, str(workdir))
  except Stop:
    pass
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
  return run, sizes, compiled


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  return recorded_train(config(), tmp_path_factory.mktemp("multires") / "a")


def test_train_step_compiles_once_per_size(uninterrupted):
  run, sizes, compiled = uninterrupted
  assert len(sizes) == 6 and set(sizes) == {24, 32} and set(sizes[3:]) == {24, 32}
  assert sorted(compiled) == [24, 32]  # one per size, at its first step; reused at every later one
  assert int(jax.device_get(run.state["step"])) == 6
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(run.state["params"])))


def test_resumed_run_continues_the_same_sizes(uninterrupted, tmp_path):
  reference, want, _ = uninterrupted
  _, first, _ = recorded_train(config(), tmp_path / "w", stop_after=4)  # checkpoint at 3; stopped in step 5
  assert first == want[:4]
  run, rest, compiled = recorded_train(config(), tmp_path / "w")  # resumes from the step-3 checkpoint
  assert first[:3] + rest == want
  assert sorted(compiled) == sorted(set(rest))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(run.state["params"]),
               jax.device_get(reference.state["params"]))
