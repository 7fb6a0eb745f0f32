"""Conditional position encoding: CPVT's positional encoding generator (PEG).

The position tokens, laid out as their ``(h, w)`` grid, go through a depthwise
3x3 convolution (with bias, zero padding) that is added back:
``x + conv(x)``, after the blocks in ``layers`` (CPVT: after the first block).
Zero padding lets the conv see where the border is, which is how position
information enters; away from the border it is translation equivariant. It
reads positions from the token layout, so the ``positions`` data is unused.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from posenc.encodings.base import Encoding, Geometry, split_prefix
from posenc.encodings.options import Options, Rule, option
from posenc.encodings.registry import register


def _taps(grid: jax.Array) -> list[list[jax.Array]]:
  """The 3x3 neighbourhood of ``grid [B, h, w, C]`` (zero padding): ``taps[i][j][b, y, x] = grid[b, y+i-1, x+j-1]``."""
  _, h, w, _ = grid.shape
  padded = jnp.pad(grid, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return [[padded[:, i:i + h, j:j + w] for j in range(3)] for i in range(3)]


def _correlate(grid: jax.Array, kernel: jax.Array) -> jax.Array:
  taps = _taps(grid)
  return sum(taps[i][j] * kernel[i, j] for i in range(3) for j in range(3))


@jax.custom_vjp
def depthwise_conv3x3(grid: jax.Array, kernel: jax.Array) -> jax.Array:
  """``grid [B, h, w, C]`` cross-correlated with one 3x3 filter per channel, ``kernel [3, 3, C]``,
  zero padding ("SAME"): what ``lax.conv_general_dilated(..., feature_group_count=C)`` computes, as
  nine shifted multiply-adds, with a hand-written backward (input gradient: the same correlation with
  the kernel turned 180 degrees; kernel gradient: nine reductions). XLA:CPU's grouped convolution
  and the autodiff of the shifted slices are both much slower (benchmarks/speed.py, cpe)."""
  return _correlate(grid, kernel)


def _depthwise_fwd(grid, kernel):
  return _correlate(grid, kernel), (grid, kernel)


def _depthwise_bwd(residuals, g):
  grid, kernel = residuals
  taps = _taps(grid)
  d_kernel = jnp.stack([jnp.stack([jnp.sum(taps[i][j] * g, axis=(0, 1, 2)) for j in range(3)])
                        for i in range(3)])
  return _correlate(g, kernel[::-1, ::-1]), d_kernel.astype(kernel.dtype)


depthwise_conv3x3.defvjp(_depthwise_fwd, _depthwise_bwd)


@dataclasses.dataclass(frozen=True)
class ConditionalPositionEncodingOptions(Options):
  layers: tuple[int, ...] = option((0,), "the blocks a PEG follows (CPVT: the first)",
                                   Rule(lambda v: bool(v) and min(v) >= 0, "of at least one block index >= 0"))


@register("cpe")
class ConditionalPositionEncoding(Encoding):
  """PEG: ``x + depthwise_conv3x3(x)`` after each block in ``layers``; 2D only, any grid.

  Parameters: ``kernel`` ``(3, 3, 1, C)`` (HWIO, one 3x3 filter per channel;
  LeCun-normal init, fan-in 9) and ``bias`` ``(C,)`` (zeros): ``9C + C``.
  Prefix tokens pass through. The conv runs in the dtype of ``x``.
  """

  Options = ConditionalPositionEncodingOptions
  supported_ndims = (2,)

  def __init__(self, options: ConditionalPositionEncodingOptions, *, dim: int, num_layers: int | None = None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(options)
    layers = options.layers
    if num_layers is not None and max(layers) >= num_layers:
      raise ValueError(f"cpe option layers={layers} must name blocks in "
                       f"[0, num_layers={num_layers}).")
    self.layers = layers
    kernel_init = nnx.initializers.lecun_normal()
    self.kernel = nnx.Param(kernel_init(rngs.params(), (3, 3, 1, dim), param_dtype),
                            out_sharding=(None, None, None, "embed"))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("embed",))

  def check(self, geometry: Geometry) -> None:
    if geometry.ndim != 2:
      raise ValueError(f"position encoding 'cpe' (a 3x3 conv over the patch grid) supports 2D "
                       f"grids only, not {geometry}; for 1D sequences use rel_bias, alibi, "
                       f"rope or learned.")

  def _peg(self, x: jax.Array, geometry: Geometry, kernel, bias) -> jax.Array:
    prefix, tokens = split_prefix(x, geometry)
    b, _, c = tokens.shape
    grid = tokens.reshape(b, *geometry.shape, c)
    grid = grid + depthwise_conv3x3(grid, kernel[:, :, 0].astype(x.dtype)) + bias.astype(x.dtype)
    return jnp.concatenate([prefix, grid.reshape(b, -1, c)], axis=1)

  def after_block(self, x: jax.Array, geometry: Geometry, positions: jax.Array, layer) -> jax.Array:
    self.check(geometry)
    params = (self.kernel[...], self.bias[...])
    # The model's layer index is an int32 array: the conv runs only in the active blocks (a
    # constant index, as in unrolled layers, leaves one branch once compiled).
    active = jnp.any(jnp.asarray(layer) == jnp.asarray(self.layers))
    return jax.lax.cond(active, lambda v, p: self._peg(v, geometry, *p),
                        lambda v, p: v, x, params)
