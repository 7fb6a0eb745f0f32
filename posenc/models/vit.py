"""Vision Transformer that runs at any image size its patch size divides.

    vit = ViT(posenc="rope_mixed", image_size=32, patch_size=4, num_classes=10, rngs=nnx.Rngs(0),
              **VIT_SIZES["ti"])
    logits = vit(images)                  # images [B, H, W, C]; any H, W divisible by 4
    logits = vit(images, positions=pos)   # pos [B or 1, h*w, 2] patch coordinates (row, col)
    hybrid = ViT(..., stem=make_stem("conv"))   # 3x3 stride-2 convolutions instead of the patchify matmul

The geometry (patch grid + prefix tokens) is derived statically from the
input's shape, so each new size compiles once. Positions default to the
integer patch grid. Fixed encodings recompute for a new grid; a learned grid
raises the encoding's error asking for ``posenc.transfer``.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from posenc import encodings
from posenc.encodings.base import Geometry, as_hw, forward_coordinates
from posenc.geometry import patch_grid
from posenc.models.attention import apply_dropout, dense, layer_norm, param
from posenc.models.block_stack import BlockStack

# Standard sizes (ViT paper / DeiT); "mu" is a CPU-sized model for quick experiments.
VIT_SIZES = {
    "mu": dict(width=64, depth=4, num_heads=4, mlp_dim=256),
    "ti": dict(width=192, depth=12, num_heads=3, mlp_dim=768),
    "s": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "b": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
}


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


def vit_with_stem(*, stem: str = "patch", stem_width: int = 0, stem_extra_convs: int = 0, **kwargs) -> ViT:
  """``ViT(**kwargs)`` with the stem named as configs name it (``make_stem``); what ``models.create`` builds."""
  return ViT(stem=make_stem(stem, stem_width, stem_extra_convs), **kwargs)


class ViT(nnx.Module):
  """Patch embedding -> [class token, registers, patches] -> pre-LN blocks -> LayerNorm -> pool -> head.

  ``image_size`` is the size the model is BUILT at (it fixes the geometry given
  to the encoding, e.g. the size of a learned grid). ``pool="cls"`` reads the
  class token, ``pool="gap"`` averages the patch tokens (no class token).
  ``stem`` builds what maps the images to the token grid (``StemFactory``): ``PatchStem`` (the
  default; ``patch_embed [p, p, channels, width]``) or a ``ConvStem`` followed by a 1x1 projection
  to ``width`` (``patch_embed [1, 1, its width, width]``); ``make_stem`` builds one from a config's
  names. ``scan_layers`` (None: per backend): see ``posenc.models.block_stack``; ``attention_impl``:
  see ``posenc.models.attention``.
  """

  def __init__(self, *, posenc: str, rngs: nnx.Rngs, posenc_options: dict | None = None,
               num_classes: int = 10, image_size=32, patch_size: int = 4, channels: int = 3,
               width: int = 192, depth: int = 12, num_heads: int = 3, mlp_dim: int = 768,
               stem: StemFactory = PatchStem, pool: str = "cls",
               num_registers: int = 0, dropout: float = 0.0,
               attention_dropout: float = 0.0, drop_path: float = 0.0, gelu_approximate: bool = True,
               ln_eps: float = 1e-6, scan_layers: bool | None = None, attention_impl: str = "auto",
               dtype=jnp.float32, param_dtype=jnp.float32):
    if pool not in ("cls", "gap"):
      raise ValueError(f"pool must be 'cls' or 'gap', got {pool!r}.")
    for name, rate in (("dropout", dropout), ("attention_dropout", attention_dropout), ("drop_path", drop_path)):
      if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {rate}.")
    self.patch_size, self.channels, self.pool = int(patch_size), int(channels), pool
    self.num_prefix = self.prefix_tokens(pool, num_registers)
    self.dtype, self.dropout = dtype, dropout
    self.any_dropout = bool(dropout or attention_dropout or drop_path)
    self.geometry = self.geometry_for(as_hw(image_size))
    self.stem = stem(self.patch_size, self.channels, width, ln_eps, dtype, param_dtype, rngs)
    p = self.stem.embed_patch
    self.patch_embed = param(
        jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1, 2), out_axis=3),
        rngs, (p, p, self.stem.out_channels, width), param_dtype, (None, None, None, "embed"))
    self.patch_bias = param(jax.nn.initializers.zeros, rngs, (width,), param_dtype, ("embed",))
    self.cls_token = (param(jax.nn.initializers.zeros, rngs, (1, width), param_dtype, (None, "embed"))
                      if pool == "cls" else None)
    self.registers = (param(jax.nn.initializers.normal(0.02), rngs, (num_registers, width), param_dtype,
                            (None, "embed")) if num_registers else None)
    self.posenc = encodings.make(posenc, dim=width, num_heads=num_heads, num_layers=depth,
                                 geometry=self.geometry, param_dtype=param_dtype, rngs=rngs,
                                 **(posenc_options or {}))
    self.blocks = BlockStack(
        depth, dim=width, num_heads=num_heads, mlp_dim=mlp_dim, pre_ln=True, ln_eps=ln_eps,
        gelu_approximate=gelu_approximate, kernel_init=None,
        bias_init=jax.nn.initializers.normal(1e-6), dropout=dropout, attention_dropout=attention_dropout,
        drop_path=drop_path, scan_layers=scan_layers, attention_impl=attention_impl, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs)
    self.norm = layer_norm(width, ln_eps, dtype, param_dtype, rngs)
    self.head = param(jax.nn.initializers.truncated_normal(0.02), rngs, (width, num_classes), param_dtype,
                      ("embed", "vocab"))
    self.head_bias = param(jax.nn.initializers.zeros, rngs, (num_classes,), param_dtype, ("vocab",))
    self.rngs = nnx.Rngs(dropout=rngs.dropout())

  @staticmethod
  def prefix_tokens(pool: str = "cls", num_registers: int = 0) -> int:
    """Tokens before the patches: the class token (``pool="cls"``) and the registers."""
    return (1 if pool == "cls" else 0) + int(num_registers)

  def geometry_for(self, image_hw: tuple[int, int]) -> Geometry:
    """The token geometry for images of size ``image_hw`` (a clear error if the patch doesn't divide it)."""
    return patch_grid(image_hw, self.patch_size, self.num_prefix)

  def __call__(self, images: jax.Array, *, positions: jax.Array | None = None, train: bool = False) -> jax.Array:
    """``images [B, H, W, C]`` -> float32 logits ``[B, num_classes]``; ``positions`` of the patches
    ``[B or 1, h*w, 2]`` (default: the integer grid)."""
    if images.ndim != 4 or images.shape[-1] != self.channels:
      raise ValueError(f"ViT expects images [batch, height, width, {self.channels}], got shape {images.shape}.")
    geometry = self.geometry_for(images.shape[1:3])
    positions = forward_coordinates(self.posenc, positions, geometry, images.shape[0], self.rngs, train)
    key = self.rngs.dropout() if train and self.any_dropout else None
    embed_key, blocks_key = (None, None) if key is None else jax.random.split(key)

    images = self.stem(images)
    b, (h, w), dt = images.shape[0], geometry.shape, self.dtype
    p, c = self.stem.embed_patch, images.shape[-1]
    patches = images.astype(dt).reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = dense(patches.reshape(b, h * w, p, p, c), self.patch_embed[...].astype(dt),
              self.patch_bias[...].astype(dt), in_dims=3)
    prefix = [t[...] for t in (self.cls_token, self.registers) if t is not None]
    if prefix:
      prefix = jnp.concatenate(prefix, axis=0).astype(dt)
      x = jnp.concatenate([jnp.broadcast_to(prefix, (b,) + prefix.shape), x], axis=1)

    x = self.posenc.embed(x, geometry, positions)
    x = apply_dropout(x, self.dropout, embed_key)
    x = self.blocks(x, self.posenc, geometry, positions, None, blocks_key)
    x = self.norm(x)
    pooled = x[:, 0] if self.pool == "cls" else x[:, self.num_prefix:].mean(axis=1)
    return dense(pooled, self.head[...].astype(dt), self.head_bias[...].astype(dt)).astype(jnp.float32)
