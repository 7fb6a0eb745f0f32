"""Resolution transfer of whole models: per-encoding rules, sharding, clear errors.

``posenc.transfer`` takes geometries as data; the models here only supply parameters
and the shapes wanted (``model.geometry`` is the geometry a model was built at).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from posenc import encodings, transfer
from posenc.encodings import Geometry
from posenc.models import create
from posenc.resize import resize_1d, resize_grid, resize_table

VIT = dict(num_classes=10, patch_size=4, channels=1, width=32, depth=2, num_heads=2, mlp_dim=64)


def params_of(model) -> dict:
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def move(params, src, tgt, options=transfer.TransferOptions()):
  """``params`` of model ``src`` onto model ``tgt``'s geometry (the one jitted seam)."""
  wanted = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params_of(tgt))
  return transfer.jit_transfer(src.posenc.name, src.geometry, tgt.geometry, wanted, options)(params)


def vit(posenc, size, abstract=False, **kw):
  build = lambda: create("vit-mu", posenc=posenc, rngs=nnx.Rngs(0), image_size=size, **{**VIT, **kw})
  return nnx.eval_shape(build) if abstract else build()


def bert(posenc, max_len, abstract=False):
  build = lambda: create("bert-mini", posenc=posenc, rngs=nnx.Rngs(0), vocab_size=64, max_len=max_len,
                         width=32, depth=2, num_heads=2, mlp_dim=64)
  return nnx.eval_shape(build) if abstract else build()


def test_learned_grid_is_resampled_by_resize_grid():
  src, tgt = vit("learned", 28), vit("learned", (56, 40), abstract=True)
  params = params_of(src)
  out = move(params, src, tgt)
  want = resize_grid(params["posenc"]["table"], (7, 7), (14, 10), method="bicubic")
  np.testing.assert_allclose(out["posenc"]["table"], want, rtol=1e-6, atol=1e-8)  # jitted vs eager
  assert out["posenc"]["table"].shape == (140, 32)
  # Everything that is not a position parameter is passed through untouched.
  np.testing.assert_array_equal(out["patch_embed"], params["patch_embed"])
  assert transfer.shape_diff(transfer.flat_shapes(out), transfer.flat_shapes(params)) == [
      "posenc/table: stored (140, 32), wanted (49, 32)"]  # the one parameter whose shape changed


def test_transferred_model_runs_at_new_size_and_same_size_is_identity():
  src = vit("learned", 28)
  params = params_of(src)
  same = move(params, src, vit("learned", 28, abstract=True))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(same)):
    np.testing.assert_array_equal(a, b)
  tgt = vit("learned", 56)
  nnx.update(tgt, move(params, src, tgt))
  logits = nnx.jit(lambda m, x: m(x))(tgt, jnp.ones((2, 56, 56, 1)))
  assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("method", ["bicubic", "bilinear_aligned"])
def test_factorized_tables_resample_in_1d(method):
  src, tgt = vit("factorized", 28), vit("factorized", (20, 48), abstract=True)
  params = params_of(src)
  out = move(params, src, tgt, transfer.TransferOptions(method=method))
  # jitted (the transfer) against eager: equal up to float32 rounding of fused ops
  for name, size in (("row_table", 5), ("col_table", 12)):
    np.testing.assert_allclose(out["posenc"][name], resize_1d(params["posenc"][name], size, method=method),
                               rtol=1e-6, atol=1e-8)


def test_rel_bias_table_resamples_and_model_runs():
  src, tgt = vit("rel_bias", 28), vit("rel_bias", 56)
  params = params_of(src)
  opts = transfer.TransferOptions(method="bicubic_torch")
  out = move(params, src, tgt, opts)
  np.testing.assert_allclose(  # jitted vs eager
      out["posenc"]["table"], resize_table(params["posenc"]["table"], (7, 7), (14, 14), method="bicubic_torch"),
      rtol=1e-6, atol=1e-8)
  assert out["posenc"]["table"].shape == (27 * 27, 2)
  nnx.update(tgt, out)
  assert bool(jnp.all(jnp.isfinite(nnx.jit(lambda m, x: m(x))(tgt, jnp.ones((1, 56, 56, 1))))))


@pytest.mark.parametrize("posenc", ["sincos2d", "alibi", "cpe", "cpb", "rope", "rope_mixed", "string", "comrope", "liere",
                                    "none"])
def test_geometry_free_encodings_pass_unchanged(posenc):
  src = vit(posenc, 28)
  params = params_of(src)
  out = move(params, src, vit(posenc, 56, abstract=True))
  assert transfer.shape_diff(transfer.flat_shapes(out), transfer.flat_shapes(params)) == []
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(out)):
    np.testing.assert_array_equal(a, b)


def test_learned_text_table_extends_by_interpolation_or_copy():
  src, tgt = bert("learned", 128), bert("learned", 512, abstract=True)
  params = params_of(src)
  table = params["posenc"]["table"]
  interp = move(params, src, tgt)["posenc"]["table"]
  np.testing.assert_allclose(interp, resize_1d(table, 512, method="bicubic"), rtol=1e-6, atol=1e-7)
  copy = move(params, src, tgt, transfer.TransferOptions(extend="copy"))["posenc"]["table"]
  assert copy.shape == (512, 32)
  for start in range(0, 512, 128):  # Longformer: the trained table repeated
    np.testing.assert_array_equal(copy[start:start + 128], table)
  shorter = move(params, src, bert("learned", 64, abstract=True))
  np.testing.assert_array_equal(shorter["posenc"]["table"], table[:64])


def test_position_interpolation_scale():
  assert transfer.interpolation_scale(Geometry.seq(128), Geometry.seq(512)) == 0.25
  assert transfer.interpolation_scale(Geometry.grid(7, 7), Geometry.grid(14, 28)) == 0.25
  assert transfer.interpolation_scale(Geometry.grid(7, 7), Geometry.grid(4, 4)) == 1.0


def test_transfer_needs_no_model_only_geometries():
  """The seam is one call on the encoding class: parameters + two geometries + options."""
  src = vit("learned", 28)
  table = params_of(src)["posenc"]
  out = encodings.get("learned").transfer(table, Geometry.grid(7, 7, 1), Geometry.grid(14, 10, 1),
                                          transfer.TransferOptions())
  np.testing.assert_array_equal(out["table"], resize_grid(table["table"], (7, 7), (14, 10), method="bicubic"))
  same = transfer.transfer_params(params_of(src), "rope", Geometry.grid(7, 7), Geometry.grid(14, 14))
  jax.tree.map(np.testing.assert_array_equal, same, params_of(src))


def test_mismatches_name_parameter_and_shapes():
  src = vit("learned", 28)
  params = params_of(src)
  with pytest.raises(transfer.TransferError, match=r"patch_embed: stored \(4, 4, 1, 32\), wanted \(7, 7, 1, 32\)"):
    move(params, src, vit("learned", 28, abstract=True, patch_size=7))
  with pytest.raises(transfer.TransferError, match=r"cls_token: stored \(1, 32\), wanted \(1, 48\)"):
    move(params, src, vit("learned", 28, abstract=True, width=48, mlp_dim=96))
  with pytest.raises(transfer.TransferError, match="posenc/table: in the checkpoint, not in the model"):
    move(params, src, vit("rope", 28, abstract=True))
  with pytest.raises(ValueError, match="transfer method 'cubic' is unknown"):
    transfer.TransferOptions(method="cubic")
  with pytest.raises(ValueError, match="extend mode"):
    transfer.TransferOptions(extend="tile")


@pytest.mark.parametrize("spec", [P(None, "model"), P("data", "model")])
def test_sharded_transfer_keeps_requested_sharding_and_values(spec):
  devices = np.array(jax.devices()[:8]).reshape(4, 2)
  mesh = Mesh(devices, ("data", "model"))
  src, tgt = vit("learned", 28, width=32), vit("learned", 56, abstract=True, width=32)
  params = params_of(src)
  replicated = NamedSharding(mesh, P())
  table_sharding = NamedSharding(mesh, spec)
  out_shardings = jax.tree.map(lambda _: replicated, params_of(tgt))
  out_shardings["posenc"]["table"] = table_sharding
  in_shardings = jax.tree.map(lambda _: replicated, params)
  in_shardings["posenc"]["table"] = NamedSharding(mesh, P(None, "model"))  # sharded along D
  placed = jax.device_put(params, in_shardings)
  wanted = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params_of(tgt),
                        out_shardings)
  fn = transfer.jit_transfer("learned", src.geometry, tgt.geometry, wanted, in_shardings=(in_shardings,))
  out = fn(placed)
  assert out["posenc"]["table"].sharding == table_sharding
  expected = move(params, src, tgt)
  np.testing.assert_allclose(out["posenc"]["table"], expected["posenc"]["table"], atol=1e-6)
  hlo = fn.lower(placed).compile().as_text().lower()
  for marker in ("infeed", "outfeed", "host-compute", "callback"):
    assert marker not in hlo
