"""The layer stack: ``num_layers`` blocks with stacked parameters, iterated by
``posenc.models.kernels.iterate_layers`` (scanned or unrolled, per backend), with the KV cache a
decoder carries through it."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from posenc.encodings.base import Encoding, Geometry
from posenc.models.attention import Block, BlockConfig, LayerCache
from posenc.models.kernels import iterate_layers, resolve_scan_layers


class BlockStack(nnx.Module):
  """``config.num_layers`` blocks with parameters stacked on a leading ``layers`` axis.

  ``scan_layers`` (None: per backend, ``resolve_scan_layers``) says how ``iterate_layers`` runs
  them; either way each block and the encoding see the layer index as an int32 array. The
  parameters are the same either way.
  """

  def __init__(self, config: BlockConfig, *, rngs: nnx.Rngs, scan_layers: bool | None = None):
    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
      return Block(config, rngs=rngs)

    self.layers = make(rngs)
    self.num_layers, self.scan_layers = config.num_layers, resolve_scan_layers(scan_layers)

  def __call__(self, x: jax.Array, encoding: Encoding, geometry: Geometry, positions: jax.Array,
               mask: jax.Array | None, key: jax.Array | None, length=None) -> jax.Array:
    """``length``: the sequence's length for a length-dependent ``rotate`` (default: the geometry's)."""
    keys = None if key is None else jax.random.split(key, self.num_layers)
    shared = None
    if encoding.bias_shared_by_layers:
      shared = encoding.attention_bias(geometry, positions, jnp.zeros((), jnp.int32))

    def body(block, layer, x, key, encoding):
      return block(x, encoding, geometry, positions, layer, mask, key, shared, length), None

    return iterate_layers(body, self.layers, x, keys, encoding, scan=self.scan_layers)[0]

  def empty_cache(self, batch_size: int, positions: jax.Array, dtype, encoding: Encoding) -> "KVCache":
    """A KV cache of one empty slot per row of ``positions`` ``[1, S, ndim]``, k/v in ``dtype``, and
    the encoding's ``content_state`` per layer."""
    attn, slots = self.layers.attn, positions.shape[1]
    zeros = jnp.zeros((self.num_layers, batch_size, slots, attn.num_heads, attn.head_dim), dtype)
    state = jax.tree.map(lambda a: jnp.broadcast_to(a, (self.num_layers, *a.shape)),
                         encoding.content_state(batch_size, slots))
    return KVCache(zeros, zeros, positions, jnp.zeros((), jnp.int32), jnp.zeros((batch_size, slots), jnp.int32),
                   state)

  def decode(self, x: jax.Array, encoding: Encoding, geometry: Geometry, positions: jax.Array,
             cache: "KVCache", length=None) -> tuple[jax.Array, jax.Array, jax.Array, Any]:
    """New tokens ``x [B, T, D]`` through every block with the KV cache ``cache``: its
    ``positions`` already hold the new tokens' at slot ``cache.length``, where their k/v go;
    ``length`` is the sequence's (default ``cache.length + T``). Returns ``x``, the new
    ``k``, ``v`` ``[layers, B, S, H, Dh]`` and the encoding's new per-layer state."""
    length = cache.length + x.shape[1] if length is None else length

    def body(block, layer, x, kv, encoding):
      k, v, state = kv
      view = LayerCache(k, v, cache.positions, cache.length, length, state)
      return block.decode(x, encoding, geometry, positions, layer, view)

    x, (k, v, state) = iterate_layers(body, self.layers, x, (cache.k, cache.v, cache.state), encoding,
                                      scan=self.scan_layers)
    return x, k, v, state


class KVCache(NamedTuple):
  """The KV cache of a decoder: ``k``/``v`` ``[layers, B, S, H, Dh]`` in the compute dtype (k
  already rotated by the encoding), the positions of the ``S`` slots ``[B or 1, S, ndim]``
  (data: what ``attention_bias`` sees), ``length``, the slots filled (int32 scalar), and the
  token ids of the slots ``[B, S]`` int32 (to recompute k/v when a length-dependent encoding's
  frequencies change), and ``state``, what the encoding's ``content_bias`` keeps per layer
  (leading ``layers`` axis; None for most encodings). Decoding a step writes the new tokens' positions into ``positions``
  at ``length`` and the blocks use that as ``start``."""

  k: jax.Array
  v: jax.Array
  positions: jax.Array
  length: jax.Array
  tokens: jax.Array
  state: Any = None
