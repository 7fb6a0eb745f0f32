"""Conditional position encoding: CPVT's positional encoding generator (PEG).

The position tokens, laid out as their ``(h, w)`` grid, go through a depthwise
3x3 convolution (with bias, zero padding) that is added back:
``x + conv(x)``, after the blocks in ``layers`` (CPVT: after the first block).
Zero padding lets the conv see where the border is, which is how position
information enters; away from the border it is translation equivariant. It
reads positions from the token layout, so the ``positions`` data is unused.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from posenc.encodings.base import Encoding, Geometry, split_prefix
from posenc.encodings.registry import register


@register("cpe")
class ConditionalPositionEncoding(Encoding):
  """PEG: ``x + depthwise_conv3x3(x)`` after each block in ``layers``; 2D only, any grid.

  Parameters: ``kernel`` ``(3, 3, 1, C)`` (HWIO, one 3x3 filter per channel;
  LeCun-normal init, fan-in 9) and ``bias`` ``(C,)`` (zeros): ``9C + C``.
  Prefix tokens pass through. The conv runs in the dtype of ``x``.
  """

  supported_ndims = (2,)

  def __init__(self, *, dim: int, num_layers: int | None = None,
               layers: Sequence[int] = (0,), param_dtype=jnp.float32, rngs: nnx.Rngs):
    layers = tuple(int(l) for l in layers)
    limit = num_layers if num_layers is not None else float("inf")
    if not layers or any(not 0 <= l < limit for l in layers):
      raise ValueError(f"cpe option layers={layers} must name at least one block in "
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
    conv = jax.lax.conv_general_dilated(
        grid, kernel.astype(x.dtype), window_strides=(1, 1), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
    grid = grid + conv + bias.astype(x.dtype)
    return jnp.concatenate([prefix, grid.reshape(b, -1, c)], axis=1)

  def after_block(self, x: jax.Array, geometry: Geometry, positions: jax.Array, layer) -> jax.Array:
    self.check(geometry)
    params = (self.kernel[...], self.bias[...])
    if isinstance(layer, (int, np.integer)):  # static: no branch in the graph
      return self._peg(x, geometry, *params) if int(layer) in self.layers else x
    # Traced layer (blocks under nnx.scan): the conv only runs in the active blocks.
    active = jnp.any(jnp.asarray(layer) == jnp.asarray(self.layers))
    return jax.lax.cond(active, lambda v, p: self._peg(v, geometry, *p),
                        lambda v, p: v, x, params)
