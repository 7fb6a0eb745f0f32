"""ViT stems as modules (posenc/models/vit.py): the ViT takes a stem factory; configs name one
(``model_options.stem``, ``stem_width``, ``stem_extra_convs``) and ``make_stem`` builds it. The parameter
layout is the one checkpoints and the HF importer use: ``patch_embed`` / ``patch_bias`` at the top, the
conv stem's convolutions under ``stem/``."""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from posenc import models
from posenc.models import ConvStem, PatchStem, ViT

VIT = dict(posenc="rope_mixed", num_classes=5, image_size=28, channels=1, width=32, depth=1, num_heads=2,
           mlp_dim=64)


def flat_params(model) -> dict:
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_patch_stem_has_no_parameters_and_keeps_the_patch_embedding_at_the_top():
  model = nnx.eval_shape(lambda: ViT(patch_size=7, rngs=nnx.Rngs(0), **VIT))
  assert isinstance(model.stem, PatchStem)
  shapes = {k: v.shape for k, v in flat_params(model).items()}
  assert not any(k.startswith("stem/") for k in shapes)
  assert shapes["patch_embed"] == (7, 7, 1, 32) and shapes["patch_bias"] == (32,)


@pytest.mark.parametrize("stem_width, extra", [(0, 0), (48, 2)])
def test_conv_stem_layout(stem_width, extra):
  model = nnx.eval_shape(lambda: models.create("vit-mu", rngs=nnx.Rngs(0), patch_size=4, stem="conv",
                                               stem_width=stem_width, stem_extra_convs=extra, **VIT))
  out = stem_width or 32
  shapes = {k: v.shape for k, v in flat_params(model).items()}
  kernels = [shapes[f"stem/kernels/{i}"] for i in range(2 + extra)]
  assert kernels == [(3, 3, 1, out // 2), (3, 3, out // 2, out)] + [(3, 3, out, out)] * extra
  assert [shapes[f"stem/norms/{i}/scale"] for i in range(2 + extra)] == [(out // 2,)] + [(out,)] * (1 + extra)
  assert shapes["patch_embed"] == (1, 1, out, 32)


def test_a_stem_factory_given_to_vit_builds_what_the_config_names_build():
  """``ViT(stem=...)`` with a factory built by hand == ``models.create`` from the config's names: the same
  parameters (same initialisation) and the same logits."""
  stem = functools.partial(ConvStem, extra_convs=1, out_width=16)
  by_hand = nnx.jit(lambda rngs: ViT(patch_size=4, stem=stem, rngs=rngs, **VIT))(nnx.Rngs(3))  # as create does
  named = models.create("vit-mu", rngs=nnx.Rngs(3), patch_size=4, stem="conv", stem_width=16, stem_extra_convs=1,
                        **VIT)
  a, b = flat_params(by_hand), flat_params(named)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
  x = np.random.default_rng(0).standard_normal((2, 28, 28, 1)).astype(np.float32)
  np.testing.assert_allclose(by_hand(x), named(x), rtol=1e-6, atol=1e-6)


def test_config_names_of_the_stem_are_checked_once_in_make_stem():
  with pytest.raises(ValueError, match=r"stem must be 'patch' or 'conv', got 'resnet'"):
    models.make_stem("resnet")
  with pytest.raises(ValueError, match=r"stem_width .* needs stem='conv'"):
    models.make_stem("patch", stem_width=8)
  with pytest.raises(ValueError, match=r"stem_extra_convs .* must be >= 0, got -1"):
    models.make_stem("conv", stem_extra_convs=-1)
  assert models.make_stem("patch") is PatchStem
