"""Stems: what maps images ``[B, H, W, C]`` to the token grid a ViT's patch embedding cuts up.

    stem = make_stem("conv", stem_width=128, stem_extra_convs=2)   # a config's model_options
    vit = ViT(..., stem=stem)

Recipe options of a stem (its width, extra convolutions) are arguments of the stem, bound by
``make_stem``; the ViT only calls the factory.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
from flax import nnx

from posenc.models.attention import param

# A stem maps images [B, H, W, C] to a grid that the ViT's linear patch embedding cuts into
# ``embed_patch`` x ``embed_patch`` patches of ``out_channels`` channels, one per token. ViT builds it
# as ``stem(patch_size, channels, width, ln_eps, dtype, param_dtype, rngs)``.
StemFactory = Callable[..., nnx.Module]


class PatchStem(nnx.Module):
  """Patchify (Dosovitskiy et al. 2021): the image itself, cut into ``patch_size`` patches by the
  ViT's embedding. It has no parameters; it takes a stem's arguments and uses the first two."""

  def __init__(self, patch_size: int, channels: int, width: int, ln_eps: float, dtype, param_dtype,
               rngs: nnx.Rngs):
    del width, ln_eps, dtype, param_dtype, rngs  # no parameters
    self.embed_patch, self.out_channels = int(patch_size), int(channels)

  def __call__(self, images: jax.Array) -> jax.Array:
    return images


class ConvStem(nnx.Module):
  """Xiao et al. 2021 ("Early convolutions help transformers see better"): log2(patch_size) 3x3
  stride-2 convolutions, each followed by LayerNorm and GELU, widening to ``out_width`` (0:
  ``width``) by halves, then ``extra_convs`` 3x3 stride-1 convolutions at that width on the token
  grid (same LayerNorm, GELU). It maps an image to the same token grid as patchify, so position
  encodings see the same geometry; the ViT's embedding is then a 1x1 projection to ``width``."""

  def __init__(self, patch_size: int, channels: int, width: int, ln_eps: float, dtype, param_dtype,
               rngs: nnx.Rngs, extra_convs: int = 0, out_width: int = 0):
    depth = int(patch_size).bit_length() - 1
    if patch_size < 2 or 1 << depth != patch_size:
      raise ValueError(f"stem='conv' needs a patch size that is a power of 2 (2, 4, 8, ...), got {patch_size}; "
                       f"use stem='patch' or change patch_size.")
    width = out_width or width
    sizes = [channels] + [max(width >> (depth - 1 - i), 1) for i in range(depth)] + [width] * extra_convs
    self.strides = (2,) * depth + (1,) * extra_convs
    init = jax.nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal", in_axis=(0, 1, 2), out_axis=3)
    self.kernels = nnx.List([param(init, rngs, (3, 3, cin, cout), param_dtype, (None, None, None, None))
                             for cin, cout in zip(sizes, sizes[1:])])
    replicated = {"out_sharding": (None,)}  # stem channels are no model axis (as the kernels)
    self.norms = nnx.List([nnx.LayerNorm(c, epsilon=ln_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                         scale_metadata=replicated, bias_metadata=replicated)
                           for c in sizes[1:]])
    self.dtype = dtype
    self.embed_patch, self.out_channels = 1, width

  def __call__(self, images: jax.Array) -> jax.Array:
    """``[B, H, W, C]`` -> ``[B, H / patch, W / patch, width]`` (H, W divisible by the patch size)."""
    x = images.astype(self.dtype)
    for kernel, norm, stride in zip(self.kernels, self.norms, self.strides):
      x = jax.lax.conv_general_dilated(x, kernel[...].astype(self.dtype), (stride, stride), ((1, 1), (1, 1)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      x = jax.nn.gelu(norm(x))
    return x


STEMS = {"patch": PatchStem, "conv": ConvStem}


def make_stem(stem: str = "patch", stem_width: int = 0, stem_extra_convs: int = 0) -> StemFactory:
  """The stem a config names (``model_options.stem``, ``stem_width``, ``stem_extra_convs``): ``stem_width``
  is the conv stem's output channels (0 = the model's width), ``stem_extra_convs`` its stride-1 convolutions."""
  if stem not in STEMS:
    raise ValueError(f"stem must be {' or '.join(map(repr, STEMS))}, got {stem!r}.")
  if stem_width < 0 or (stem_width and stem != "conv"):
    raise ValueError(f"stem_width (the conv stem's output channels; 0 = width) needs stem='conv' and must "
                     f"be >= 0, got stem_width={stem_width} with stem={stem!r}.")
  if stem_extra_convs < 0 or (stem_extra_convs and stem != "conv"):
    raise ValueError(f"stem_extra_convs (3x3 stride-1 convolutions at the end of the conv stem) needs "
                     f"stem='conv' and must be >= 0, got {stem_extra_convs} with stem={stem!r}.")
  if stem == "conv":
    return functools.partial(ConvStem, extra_convs=stem_extra_convs, out_width=stem_width)
  return STEMS[stem]
