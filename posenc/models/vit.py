"""Vision Transformer that runs at any image size its patch size divides.

    vit = ViT(posenc="rope_mixed", image_size=32, patch_size=4, num_classes=10, rngs=nnx.Rngs(0),
              **VIT_SIZES["ti"])
    logits = vit(images)                  # images [B, H, W, C]; any H, W divisible by 4
    logits = vit(images, positions=pos)   # pos [B or 1, h*w, 2] patch coordinates (row, col)
    hybrid = ViT(..., stem=make_stem("conv"))   # 3x3 stride-2 convolutions instead of the patchify matmul
    video = ViT(posenc="mrope", num_frames=8, tubelet=2, ...)  # clips [B, T, H, W, C]: a (t, h, w) grid

The geometry (patch grid + prefix tokens) is derived statically from the
input's shape, so each new size compiles once. Positions default to the
integer patch grid. Fixed encodings recompute for a new grid; a learned grid
raises the encoding's error asking for ``posenc.transfer``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from posenc.encodings.base import Geometry, as_hw
from posenc.geometry import patch_grid
from posenc.models.attention import BlockConfig, layer_norm, param
from posenc.models.kernels import dense
from posenc.models.stems import STEMS, ConvStem, PatchStem, StemFactory, make_stem  # noqa: F401
from posenc.models.trunk import Trunk

# Standard sizes (ViT paper / DeiT); "mu" is a CPU-sized model for quick experiments.
VIT_SIZES = {
    "mu": dict(width=64, depth=4, num_heads=4, mlp_dim=256),
    "ti": dict(width=192, depth=12, num_heads=3, mlp_dim=768),
    "s": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "b": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
}


def vit_with_stem(*, stem: str = "patch", stem_width: int = 0, stem_extra_convs: int = 0, **kwargs) -> ViT:
  """``ViT(**kwargs)`` with the stem named as configs name it (``make_stem``); what ``models.create`` builds."""
  return ViT(stem=make_stem(stem, stem_width, stem_extra_convs), **kwargs)


class ViT(Trunk):
  """Patch embedding -> [class token, registers, patches] -> pre-LN blocks -> LayerNorm -> pool -> head.

  ``image_size`` is the size the model is BUILT at (it fixes the geometry given
  to the encoding, e.g. the size of a learned grid). ``pool="cls"`` reads the
  class token, ``pool="gap"`` averages the patch tokens (no class token).
  ``stem`` builds what maps the images to the token grid (``posenc.models.stems``): ``PatchStem``
  (the default; ``patch_embed [p, p, channels, width]``) or a ``ConvStem`` followed by a 1x1
  projection to ``width`` (``patch_embed [1, 1, its width, width]``); ``make_stem`` builds one from
  a config's names. ``num_frames`` > 0 builds a video ViT (ViViT's tubelet embedding, Arnab et al.
  2021): clips ``[B, T, H, W, C]`` are cut into ``tubelet`` frames x ``p x p`` tubes
  (``patch_embed [tubelet, p, p, channels, width]``), a ``(t, h, w)`` grid for 3D encodings.
  ``scan_layers`` (None: per backend) and ``attention_impl``: see ``posenc.models.kernels``.
  """

  def __init__(self, *, posenc: str, rngs: nnx.Rngs, posenc_options: dict | None = None,
               num_classes: int = 10, image_size=32, patch_size: int = 4, channels: int = 3,
               width: int = 192, depth: int = 12, num_heads: int = 3, mlp_dim: int = 768,
               stem: StemFactory = PatchStem, pool: str = "cls", num_frames: int = 0, tubelet: int = 2,
               num_registers: int = 0, dropout: float = 0.0,
               attention_dropout: float = 0.0, drop_path: float = 0.0, gelu_approximate: bool = True,
               ln_eps: float = 1e-6, scan_layers: bool | None = None, attention_impl: str = "auto",
               dtype=jnp.float32, param_dtype=jnp.float32):
    if pool not in ("cls", "gap"):
      raise ValueError(f"pool must be 'cls' or 'gap', got {pool!r}.")
    block = BlockConfig(width, num_heads, mlp_dim, depth, pre_ln=True, ln_eps=ln_eps,
                        gelu_approximate=gelu_approximate, bias_std=1e-6, dropout=dropout,
                        attention_dropout=attention_dropout, drop_path=drop_path,
                        attention_impl=attention_impl, dtype=dtype, param_dtype=param_dtype)
    self.patch_size, self.channels, self.pool = int(patch_size), int(channels), pool
    self.num_prefix = self.prefix_tokens(pool, num_registers)
    self.num_frames, self.tubelet = int(num_frames), int(tubelet) if num_frames else 0
    self.stem = stem(self.patch_size, self.channels, width, ln_eps, dtype, param_dtype, rngs)
    if self.num_frames and (not isinstance(self.stem, PatchStem) or self.tubelet < 1):
      raise ValueError(f"a video ViT (num_frames={num_frames}) needs stem='patch' and a tubelet >= 1 (frames "
                       f"per token), got stem {type(self.stem).__name__} and tubelet={tubelet}.")
    p = self.stem.embed_patch
    shape = (self.tubelet,) * bool(self.tubelet) + (p, p, self.stem.out_channels, width)
    self.patch_embed = param(
        jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=tuple(range(len(shape) - 1)),
                                             out_axis=-1),
        rngs, shape, param_dtype, (None,) * (len(shape) - 1) + ("embed",))
    self.patch_bias = param(jax.nn.initializers.zeros, rngs, (width,), param_dtype, ("embed",))
    self.cls_token = (param(jax.nn.initializers.zeros, rngs, (1, width), param_dtype, (None, "embed"))
                      if pool == "cls" else None)
    self.registers = (param(jax.nn.initializers.normal(0.02), rngs, (num_registers, width), param_dtype,
                            (None, "embed")) if num_registers else None)
    self._build_trunk(block, posenc=posenc, posenc_options=posenc_options,
                      geometry=self.geometry_for((self.num_frames,) * bool(self.num_frames) + as_hw(image_size)),
                      rngs=rngs, scan_layers=scan_layers)
    self.norm = layer_norm(width, ln_eps, dtype, param_dtype, rngs)
    self.head = param(jax.nn.initializers.truncated_normal(0.02), rngs, (width, num_classes), param_dtype,
                      ("embed", "vocab"))
    self.head_bias = param(jax.nn.initializers.zeros, rngs, (num_classes,), param_dtype, ("vocab",))
    self._build_dropout_stream(rngs)

  @staticmethod
  def prefix_tokens(pool: str = "cls", num_registers: int = 0) -> int:
    """Tokens before the patches: the class token (``pool="cls"``) and the registers."""
    return (1 if pool == "cls" else 0) + int(num_registers)

  def geometry_for(self, size: tuple[int, ...]) -> Geometry:
    """The token geometry for images ``(h, w)`` or clips ``(t, h, w)`` (a clear error if the patch or
    the tubelet doesn't divide them)."""
    return patch_grid(size, self.patch_size, self.num_prefix, self.tubelet)

  def embed_patches(self, images: jax.Array) -> jax.Array:
    """``images [B, H, W, C]`` (or clips ``[B, T, H, W, C]``) -> patch tokens ``[B, N, width]``, row-major."""
    images = self.stem(images)  # its grid divides by the tube (the caller's geometry_for checked)
    b, dt, p, c = images.shape[0], self.dtype, self.stem.embed_patch, images.shape[-1]
    tube = (self.tubelet,) * bool(self.tubelet) + (p, p)
    grid = [n // k for n, k in zip(images.shape[1:-1], tube)]
    split = images.astype(dt).reshape(b, *(s for n, k in zip(grid, tube) for s in (n, k)), c)
    order = [1 + 2 * i for i in range(len(grid))] + [2 + 2 * i for i in range(len(grid))]
    patches = split.transpose(0, *order, split.ndim - 1).reshape(b, -1, *tube, c)
    return dense(patches, self.patch_embed[...].astype(dt), self.patch_bias[...].astype(dt), in_dims=len(tube) + 1)

  def __call__(self, images: jax.Array, *, positions: jax.Array | None = None, train: bool = False) -> jax.Array:
    """``images [B, H, W, C]`` (a video ViT: ``[B, T, H, W, C]``) -> float32 logits ``[B, num_classes]``;
    ``positions`` of the patches ``[B or 1, h*w, 2]`` (video: ``[B or 1, t*h*w, 3]``; default: the
    integer grid)."""
    want = "[batch, frames, height, width, {}]" if self.num_frames else "[batch, height, width, {}]"
    if images.ndim != 4 + bool(self.num_frames) or images.shape[-1] != self.channels:
      raise ValueError(f"{'a video ' if self.num_frames else ''}ViT expects "
                       f"{'clips' if self.num_frames else 'images'} {want.format(self.channels)}, got shape {images.shape}.")
    geometry = self.geometry_for(images.shape[1:-1])
    positions, key = self._start(positions, geometry, images.shape[0], train)
    b, dt = images.shape[0], self.dtype
    x = self.embed_patches(images)
    prefix = [t[...] for t in (self.cls_token, self.registers) if t is not None]
    if prefix:
      prefix = jnp.concatenate(prefix, axis=0).astype(dt)
      x = jnp.concatenate([jnp.broadcast_to(prefix, (b,) + prefix.shape), x], axis=1)

    x = self.norm(self._encode(x, geometry, positions, None, key))
    pooled = x[:, 0] if self.pool == "cls" else x[:, self.num_prefix:].mean(axis=1)
    return dense(pooled, self.head[...].astype(dt), self.head_bias[...].astype(dt)).astype(jnp.float32)
