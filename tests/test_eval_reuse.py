"""Evaluation at several resolutions compiles each size's eval step, and its parameter transfer,
exactly once: a second ``evaluate`` reuses them and compiles nothing.

Compilations are counted with JAX's own instrumentation: every XLA compilation a jitted function
asks for (cache hits of the session's persistent compilation cache included) records one
``/jax/core/compile/backend_compile_duration`` event, named after the function
(``jit(eval_step)``, ``jit(move)``).
"""
from __future__ import annotations

import collections
import contextlib

import ml_collections
import pytest
from jax import monitoring

from configs import vit_tiny
from posenc.training import evaluate, setup

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def counting_compiles():
  """A Counter of XLA compilations by function name while the block runs."""
  counts = collections.Counter()

  def listener(event, duration, **kwargs):
    if event == BACKEND_COMPILE:
      counts[kwargs.get("fun_name")] += 1

  monitoring.register_event_duration_secs_listener(listener)
  try:
    yield counts
  finally:
    monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(scope="module")
def tiny_run():
  """A one-layer, 16-wide ViT with a learned grid at 28 px (patch 7), evaluated also at 14 and 56 px."""
  c = vit_tiny.get_config()
  c.model_options = ml_collections.ConfigDict(dict(width=16, depth=1, num_heads=2, mlp_dim=32))
  c.posenc, c.eval_image_sizes = "learned", (14, 56)
  c.batch_size, c.eval_batch_size, c.eval_max_batches = 8, 16, 2
  run = setup(c)
  return run, run.spec.init()


def test_each_size_compiles_its_eval_step_and_transfer_once(tiny_run):
  run, state = tiny_run
  assert [at.size for at in run.evals] == [None, 14, 56]
  assert run.evals[0].move is None and all(at.move is not None for at in run.evals[1:])  # the grid changes
  step_name = f"jit({run.evals[0].step.__name__})"
  move_name = f"jit({run.evals[1].move.__name__})"
  with counting_compiles() as first:
    metrics = evaluate(run, state, "test")
  assert set(metrics) >= {"accuracy", "accuracy_14", "accuracy_56"}
  assert first[step_name] == 3, first  # one eval step per size: 28 (as trained), 14, 56
  assert first[move_name] == 2, first  # one transfer per size whose parameters change shape
  with counting_compiles() as again:
    assert evaluate(run, state, "test") == metrics  # the same numbers, from the same programs
  assert not again, again  # nothing compiled: every size's step and transfer were reused
  # Each jitted function holds exactly one executable: one input signature per size.
  assert [at.step._cache_size() for at in run.evals] == [1, 1, 1]
  assert [at.move._cache_size() for at in run.evals[1:]] == [1, 1]
