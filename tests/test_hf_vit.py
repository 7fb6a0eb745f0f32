"""Tests for posenc/models/hf_vit.py: a random Hugging Face ViT vs the imported ViT, at its own
resolution and at new ones (posenc.transfer vs HF's ``interpolate_pos_encoding=True``)."""
from __future__ import annotations

import json
import logging
import re

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import posenc  # noqa: F401  (flax config)
from posenc.models.hf_vit import load_hf_vit, vit_kwargs
from posenc.models.vit import ViT
from posenc.transfer import TransferOptions, jit_transfer
from hf_files import DAMAGES, damaged_copy

torch = pytest.importorskip("torch", reason="no torch (pip install -e .[test])")
transformers = pytest.importorskip("transformers", reason="no transformers (pip install -e .[test])")

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
            patch_size=4, num_channels=3, num_labels=10,
            initializer_range=0.2)  # weights large enough that the logits depend on the positions
HF_RESIZE = TransferOptions(method="bicubic_torch", antialias=False)  # torch bicubic, align_corners=False


def run_jit(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})(*args)


def logits_of(model, images_nhwc):
  graphdef, state = nnx.split(model)
  return np.asarray(run_jit(lambda s, x: nnx.merge(graphdef, s)(x), state, images_nhwc))


def hf_logits(model, images_nhwc, **kw):
  with torch.no_grad():
    return model(pixel_values=torch.tensor(images_nhwc.transpose(0, 3, 1, 2)), **kw).logits.numpy()


def images(h, w, seed=0):
  return np.random.default_rng(seed).standard_normal((2, h, w, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """A random ViTForImageClassification saved as config.json + model.safetensors, and its directory."""
  torch.manual_seed(0)
  model = transformers.ViTForImageClassification(transformers.ViTConfig(**TINY)).eval()
  with torch.no_grad():  # non-trivial biases and LayerNorms; a position table that matters
    for name, p in model.named_parameters():
      if name.endswith("bias") or "layernorm" in name:
        p.add_(0.1 * torch.randn_like(p))
    model.vit.embeddings.position_embeddings.normal_(0.0, 1.0)
    model.vit.embeddings.cls_token.normal_(0.0, 1.0)
  directory = tmp_path_factory.mktemp("vit")
  model.save_pretrained(str(directory), safe_serialization=True)
  return model, directory


@pytest.fixture(scope="module")
def loaded(reference):
  return load_hf_vit(reference[1])


def test_logits_match_transformers(reference, loaded):
  hf, directory = reference
  assert isinstance(loaded, ViT)
  assert load_file(str(directory / "model.safetensors"))["vit.embeddings.position_embeddings"].shape == (1, 65, 64)
  assert loaded.posenc.table[...].shape == (64, 64) and loaded.cls_token[...].shape == (1, 64)
  x = images(32, 32)
  expected = hf_logits(hf, x)
  got = logits_of(loaded, x)
  assert np.abs(got - expected).max() <= 1e-4
  assert np.std(expected) > 0.1  # the comparison is not between flat logits


def at_size(model, directory, hw):
  """``model`` moved to images of size ``hw`` by posenc.transfer (HF's recipe), and its new table."""
  target = nnx.eval_shape(lambda: ViT(**dict(vit_kwargs(directory), image_size=hw), rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  wanted = nnx.to_pure_dict(nnx.state(target, nnx.Param))
  moved = jit_transfer("learned", model.geometry, target.geometry, wanted, HF_RESIZE)(params)
  _, _, rest = nnx.split(model, nnx.Param, ...)
  return nnx.merge(nnx.graphdef(target), moved, rest), np.asarray(moved["posenc"]["table"])


def torch_grid(pos, new_hw, legacy=False):
  """The 8x8 patch rows of HF's table ``pos [1, 65, D]`` resampled with torch bicubic
  (align_corners=False) to exactly ``new_hw``, or (``legacy``) by the ``scale_factor``
  ``(new + 0.1) / old`` that older transformers and DINO used; ``[new_h * new_w, D]``."""
  grid = pos[:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
  size = dict(scale_factor=tuple((n + 0.1) / 8 for n in new_hw)) if legacy else dict(size=new_hw)
  out = torch.nn.functional.interpolate(grid, mode="bicubic", align_corners=False, **size)
  assert out.shape[2:] == new_hw  # the +0.1 keeps floor() from losing a row
  return out.permute(0, 2, 3, 1).reshape(-1, grid.shape[1]).numpy()


@pytest.mark.parametrize("hw", [(48, 48), (48, 64)])
def test_new_resolution_matches_interpolate_pos_encoding(reference, loaded, hw):
  """This transformers resizes the patch grid to exactly (H/p, W/p) with torch bicubic,
  align_corners=False (``size=``, not a ``scale_factor``): the same function as posenc's transfer."""
  hf, directory = reference
  new_hw = tuple(s // TINY["patch_size"] for s in hw)
  moved, table = at_size(loaded, directory, hw)
  pos = hf.vit.embeddings.position_embeddings.detach()
  explicit = torch_grid(pos, new_hw)
  np.testing.assert_allclose(table, explicit, atol=1e-5)
  with torch.no_grad():  # HF's own table at this size: class row untouched, patch rows the explicit grid
    hf_table = hf.vit.embeddings.interpolate_pos_encoding(torch.zeros(1, 1 + len(table), 64), *hw)[0].numpy()
  np.testing.assert_array_equal(hf_table[0], pos[0, 0].numpy())
  np.testing.assert_allclose(hf_table[1:], explicit, atol=1e-5)

  x = images(*hw, seed=1)
  expected = hf_logits(hf, x, interpolate_pos_encoding=True)
  assert np.abs(logits_of(moved, x) - expected).max() <= 1e-4
  # The tolerance tells the recipes apart: the legacy scale_factor grid is off by more.
  nnx.update(moved, {"posenc": {"table": torch_grid(pos, new_hw, legacy=True)}})
  assert np.abs(logits_of(moved, x) - expected).max() > 1e-2


def bicubic_at(values, src):
  """1D torch-style bicubic (Keys a=-0.75, edge indices clamped) of ``values [n]`` sampled at
  the real source positions ``src``."""
  def cubic(x, a=-0.75):
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))
  base = np.floor(src)
  return sum(values[np.clip(base + t, 0, len(values) - 1).astype(int)] * cubic(src - base - t)
             for t in (-1, 0, 1, 2))


def test_legacy_scale_factor_samples_off_the_grid_centres():
  """What older transformers (and DINO) did: ``scale_factor=(new + 0.1) / old``. The output has
  the same size (floor(old * scale) = new), but torch samples output row i at
  ``(i + 0.5) * old / (new + 0.1) - 0.5`` instead of the new grid's centre ``(i + 0.5) * old / new - 0.5``."""
  values = np.random.default_rng(0).standard_normal(8)
  old, new = 8, 12
  run = lambda **kw: torch.nn.functional.interpolate(  # noqa: E731  (a 1 x 8 image: resample the width)
      torch.tensor(values, dtype=torch.float64).reshape(1, 1, 1, old), mode="bicubic", align_corners=False,
      **kw)[0, 0, 0].numpy()
  i = np.arange(new) + 0.5
  explicit, legacy = run(size=(1, new)), run(scale_factor=(1.0, (new + 0.1) / old))
  np.testing.assert_allclose(explicit, bicubic_at(values, i * old / new - 0.5), atol=1e-12)
  np.testing.assert_allclose(legacy, bicubic_at(values, i * old / (new + 0.1) - 0.5), atol=1e-12)
  assert np.abs(legacy - explicit).max() > 1e-2


def edited_copy(directory, out, edit=lambda t: None, config=lambda text: text):
  out.mkdir(exist_ok=True)
  (out / "config.json").write_text(config((directory / "config.json").read_text()))
  tensors = load_file(str(directory / "model.safetensors"))
  edit(tensors)
  save_file(tensors, str(out / "model.safetensors"))
  return out


def params_equal(a, b):
  flat_a, flat_b = (nnx.traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(m, nnx.Param))) for m in (a, b))
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=str(k))


def test_transformers5_module_names_and_ignored_tensors(reference, loaded, tmp_path):
  """The names transformers 5 gives its modules load the same; the pooler and a mask token are skipped."""
  renames = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
             "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj",
             "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}

  def rename(t):
    for k in list(t):
      new = k.replace("vit.encoder.layer.", "vit.layers.")
      for old, now in renames.items():
        new = new.replace(old, now)
      t[new] = t.pop(k)
    t["vit.pooler.dense.weight"] = np.ones((64, 64), np.float32)
    t["vit.pooler.dense.bias"] = np.ones(64, np.float32)
    t["vit.embeddings.mask_token"] = np.ones((1, 1, 64), np.float32)

  path = edited_copy(reference[1], tmp_path / "v5", rename)
  assert "vit.layers.1.mlp.fc2.weight" in load_file(str(path / "model.safetensors"))
  params_equal(load_hf_vit(path), loaded)


def test_vit_model_without_head_is_refused_unless_allowed(reference, tmp_path, caplog):
  hf, _ = reference
  bare_dir = tmp_path / "bare"
  transformers.ViTModel(hf.config).save_pretrained(str(bare_dir), safe_serialization=True)  # with a pooler
  with pytest.raises(ValueError, match=r"no classification head \(classifier\.weight.*allow_missing_head=True"):
    load_hf_vit(bare_dir)
  with caplog.at_level(logging.WARNING):
    bare = load_hf_vit(bare_dir, allow_missing_head=True)
  assert "classifier.weight" in caplog.text and "freshly initialised (10 classes)" in caplog.text
  t = load_file(str(bare_dir / "model.safetensors"))
  np.testing.assert_array_equal(bare.posenc.table[...], t["embeddings.position_embeddings"][0, 1:])
  np.testing.assert_array_equal(bare.cls_token[...],
                                t["embeddings.cls_token"][0] + t["embeddings.position_embeddings"][0, :1])
  assert bare.head[...].shape == (64, 10)


def test_damaged_checkpoint_names_its_tensors(reference, tmp_path):
  def damage(t):
    t.pop("vit.encoder.layer.1.attention.attention.key.weight")
    t["vit.embeddings.position_embeddings"] = np.zeros((1, 64, 64), np.float32)  # no class-token row
    t["vit.encoder.layer.0.extra"] = np.zeros(3, np.float32)

  with pytest.raises(ValueError) as err:
    load_hf_vit(edited_copy(reference[1], tmp_path / "damaged", damage))
  message = str(err.value)
  assert "does not fit the ViT" in message and "nothing was loaded" in message
  assert "missing (1): encoder.layer.1.attention.attention.key.weight" in message
  assert "wrong shape (1): embeddings.position_embeddings: (1, 64, 64) (expected (1, 65, 64))" in message
  assert "unknown (1): encoder.layer.0.extra" in message


@pytest.mark.parametrize("field, value", [("qkv_bias", "false"), ("patch_size", "[4, 2]"),
                                          ("hidden_act", '"relu"'), ("model_type", '"deit"')])
def test_unsupported_configs_are_refused(reference, tmp_path, field, value):
  path = edited_copy(reference[1], tmp_path / field,
                     config=lambda text: json.dumps({**json.loads(text), field: json.loads(value)}))
  with pytest.raises(ValueError, match=rf"not a ViT config this importer supports.*'{field}'"):
    load_hf_vit(path)
  with pytest.raises(ValueError, match="config.json and model.safetensors"):
    load_hf_vit(tmp_path / "nowhere")


@pytest.mark.parametrize("damage", DAMAGES)
def test_unreadable_files_are_one_error_naming_them(reference, tmp_path, damage):
  """A truncated or non-safetensors weights file, a config.json without a key or not JSON: one ValueError
  naming the file (and the key), not safetensors' or json's own error."""
  message = damaged_copy(reference[1], tmp_path, damage, "vit.embeddings.cls_token", "model_type")
  with pytest.raises(ValueError, match=re.escape(message)):
    load_hf_vit(tmp_path)
