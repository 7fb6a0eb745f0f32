"""Default positions change nothing: every model's outputs equal those recorded before
positions became data (tests/data/reference_outputs.npz, written by the code of commit 5de6dce).

Parameters are drawn from a seed derived from each parameter's path, so the same tree
gives the same values whatever order the code builds it in. Refresh the file only for a
deliberate change of the models' function: ``python tests/test_reference_outputs.py``.
"""
from __future__ import annotations

import sys
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import posenc  # noqa: F401  (flax config)
from posenc import models
from posenc.encodings import Geometry

REFERENCE = Path(__file__).parent / "data" / "reference_outputs.npz"
TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64, scan_layers=True)  # as recorded (then the default)
VIT = dict(num_classes=5, image_size=28, patch_size=7, channels=1, num_registers=1, **TINY)
BERT = dict(vocab_size=64, max_len=16, **TINY)
# (case name, model, posenc, posenc options, model options)
CASES = [(f"vit-{p}", "vit-mu", p, {}, VIT) for p in (
    "learned", "factorized", "sincos2d", "rel_bias", "cpb", "cpe", "rope", "rope_mixed", "alibi", "none")]
CASES += [(f"bert-{p}", "bert-mini", p, {}, BERT) for p in (
    "learned", "sinusoidal", "rel_bias", "rope", "alibi", "none")]
CASES += [
    ("vit-rope-gap-unrolled", "vit-mu", "rope", {}, dict(VIT, pool="gap", num_registers=0, scan_layers=False)),
    ("vit-rel_bias-per_layer", "vit-mu", "rel_bias", {"per_layer": True}, VIT),
    ("vit-cpb-per_layer", "vit-mu", "cpb", {"per_layer": True, "hidden_dim": 16}, VIT),
    ("vit-rope-theta", "vit-mu", "rope", {"theta": 10.0}, VIT),
    ("bert-sinusoidal-scaled", "bert-mini", "sinusoidal", {"scale": 0.028}, BERT),
    ("bert-rel_bias-per_layer", "bert-mini", "rel_bias", {"per_layer": True, "num_buckets": 8,
                                                          "max_distance": 12}, BERT),
    ("bert-alibi-pre_ln", "bert-mini", "alibi", {}, dict(BERT, pre_ln=True)),
]
# Recorded with rope's former option scale=s; position interpolation is now positions times s.
SCALED = [("vit-rope-scale", "vit-mu", "rope", 0.5, VIT), ("bert-rope-scale", "bert-mini", "rope", 0.25, BERT)]


def path_seeded_params(graphdef_params: dict) -> dict:
  """N(0, 0.3^2) parameters, each drawn from a seed that is its path's CRC32."""
  flat = nnx.traversals.flatten_mapping(graphdef_params)
  out = {}
  for path, leaf in flat.items():
    rng = np.random.default_rng(zlib.crc32("/".join(map(str, path)).encode()))
    out[path] = (0.3 * rng.standard_normal(leaf.shape)).astype(np.float32)
  return nnx.traversals.unflatten_mapping(out)


def inputs(model_name: str) -> dict:
  rng = np.random.default_rng(7)
  if model_name.startswith("vit"):
    return {"images": rng.standard_normal((2, 28, 28, 1)).astype(np.float32)}
  ids = rng.integers(1, 64, (2, 12)).astype(np.int32)
  return {"input_ids": ids, "segment_ids": rng.integers(0, 2, (2, 12)).astype(np.int32),
          "padding_mask": np.arange(12)[None, :] < np.array([[12], [9]]),
          "packing_ids": np.array([[1] * 5 + [2] * 7, [1] * 12], np.int32)}


def outputs(model_name: str, posenc_name: str, posenc_options: dict, model_options: dict,
            position_scale: float = 1.0) -> np.ndarray:
  model = nnx.eval_shape(lambda: models.create(model_name, posenc=posenc_name, posenc_options=posenc_options,
                                               rngs=nnx.Rngs(0), **model_options))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = path_seeded_params(nnx.to_pure_dict(params))
  is_key = lambda a: jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
  rest = jax.tree.map(lambda a: jax.random.key(0) if is_key(a) else np.zeros(a.shape, a.dtype),
                      nnx.to_pure_dict(rest))
  x = inputs(model_name)
  if position_scale != 1.0:
    geometry = Geometry.grid(4, 4) if model_name.startswith("vit") else Geometry.seq(12)
    x["positions"] = geometry.positions() * position_scale
  call = jax.jit(lambda p, x: nnx.merge(graphdef, p, rest)(**x))
  return np.asarray(call(params, x))


@pytest.fixture(scope="module")
def reference():
  with np.load(REFERENCE) as f:
    return dict(f)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_default_positions_reproduce_the_recorded_outputs(case, reference):
  name, *spec = case
  got = outputs(*spec)
  np.testing.assert_allclose(got, reference[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", SCALED, ids=[c[0] for c in SCALED])
def test_scaled_positions_reproduce_the_former_rope_scale_option(case, reference):
  name, model_name, posenc_name, scale, model_options = case
  got = outputs(model_name, posenc_name, {}, model_options, position_scale=scale)
  np.testing.assert_allclose(got, reference[name], rtol=1e-6, atol=1e-6)
  assert not np.allclose(got, outputs(model_name, posenc_name, {}, model_options), atol=1e-3)


if __name__ == "__main__":
  REFERENCE.parent.mkdir(exist_ok=True)
  scaled = {c[0]: outputs(c[1], c[2], {}, c[4], position_scale=c[3]) for c in SCALED}
  np.savez_compressed(REFERENCE, **{c[0]: outputs(*c[1:]) for c in CASES}, **scaled)
  print(f"wrote {REFERENCE}", file=sys.stderr)
