"""The video ViT: tubelet embedding (ViViT) against torch's strided convolutions, every 3D encoding
on a (t, h, w) grid through ``models.create``, a learned table moved to more frames, clear errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from posenc import encodings, transfer
from posenc.models import create

TINY = dict(image_size=8, patch_size=4, width=48, depth=1, num_heads=2, mlp_dim=32)  # head_dim 24: 3 axes x 4 pairs


def video_vit(posenc, frames=4, tubelet=2, **kw):
  return create("vit-mu", posenc=posenc, rngs=nnx.Rngs(0), num_frames=frames, tubelet=tubelet, **{**TINY, **kw})


def params_of(model) -> dict:
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("frames", [0, 4])
def test_patch_and_tubelet_embeddings_equal_torch_strided_convolutions(frames):
  """Images: Conv2d with kernel = stride = p; clips: Conv3d with kernel = stride = (tubelet, p, p);
  the tokens in row-major (t, h, w) order."""
  model = video_vit("none", frames=frames) if frames else create("vit-mu", posenc="none", rngs=nnx.Rngs(0), **TINY)
  shape = (2, frames, 8, 12, 3) if frames else (2, 8, 12, 3)
  x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  got = np.asarray(model.embed_patches(jnp.asarray(x)))

  kernel = torch.tensor(np.asarray(model.patch_embed[...]))  # [(tubelet,) p, p, C, width]
  weight = kernel.permute(kernel.ndim - 1, kernel.ndim - 2, *range(kernel.ndim - 2))  # [width, C, (t,) p, p]
  conv = torch.nn.functional.conv3d if frames else torch.nn.functional.conv2d
  channels_first = torch.tensor(x).movedim(-1, 1)
  out = conv(channels_first, weight, torch.tensor(np.asarray(model.patch_bias[...])), stride=weight.shape[2:])
  want = out.flatten(2).transpose(1, 2).numpy()  # [B, t*h*w, width], row-major
  assert got.shape == want.shape == (2, (frames // 2 or 1) * 2 * 3, 48)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", encodings.names(3))
def test_every_3d_encoding_runs_in_a_video_vit(name):
  model = video_vit(name)
  assert model.geometry.shape == (2, 2, 2)
  clips = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 8, 8, 3)), jnp.float32)
  logits = nnx.jit(lambda m, x: m(x))(model, clips)
  assert logits.shape == (2, 10) and np.isfinite(np.asarray(logits)).all()
  # explicit (t, row, col) positions: the default grid gives the same logits
  same = model(clips, positions=model.geometry.positions())
  np.testing.assert_allclose(np.asarray(same), np.asarray(logits), rtol=1e-5, atol=1e-5)


def test_a_learned_video_table_moves_to_more_frames_axis_by_axis():
  """A table constant in time stays so at 4 frames (each frame's h x w slice is the source's), and
  the moved model runs on 4-frame clips."""
  source, target = video_vit("learned", frames=2, tubelet=1), video_vit("learned", frames=4, tubelet=1)
  params = params_of(source)
  table = np.asarray(params["posenc"]["table"])  # [t*h*w, D], frame 0 then frame 1
  frame = table[:4]
  params["posenc"]["table"] = jnp.asarray(np.concatenate([frame, frame]))
  wanted = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params_of(target))
  moved = transfer.jit_transfer("learned", source.geometry, target.geometry, wanted)(params)
  assert target.geometry.shape == (4, 2, 2)
  np.testing.assert_allclose(np.asarray(moved["posenc"]["table"]), np.tile(frame, (4, 1)), rtol=1e-5, atol=1e-5)
  nnx.update(target, moved)
  clips = jnp.zeros((1, 4, 8, 8, 3))
  assert np.isfinite(np.asarray(target(clips))).all()


def test_video_inputs_and_options_get_clear_errors():
  model = video_vit("sincos3d")
  with pytest.raises(ValueError, match=r"^a video ViT expects clips \[batch, frames, height, width, 3\]"):
    model(jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match="a clip of 5 frames is not divisible by the tubelet of 2 frames; use 4 frames"):
    model(jnp.zeros((1, 5, 8, 8, 3)))
  with pytest.raises(ValueError, match="needs stem='patch' and a tubelet >= 1"):
    create("vit-mu", posenc="none", rngs=nnx.Rngs(0), num_frames=4, stem="conv", **TINY)
  with pytest.raises(ValueError, match="needs stem='patch' and a tubelet >= 1"):
    video_vit("none", tubelet=0)
