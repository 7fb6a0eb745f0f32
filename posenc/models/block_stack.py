"""The layer stack: ``num_layers`` blocks with stacked parameters, run scanned or unrolled (per
backend), with the KV cache a decoder carries through it."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from posenc.encodings.base import Encoding, Geometry
from posenc.models.attention import Block, LayerCache


def resolve_scan_layers(scan_layers: bool | None, backend: str | None = None) -> bool:
  """None -> per backend: unrolled on CPU and GPU (the faster step on both, and on an H200 the
  faster compile too: benchmarks/results/speed_gpu.md), scanned on TPU (compile time independent
  of depth, as maxtext; not measured here)."""
  if scan_layers is None:
    return (backend or jax.default_backend()) == "tpu"
  return bool(scan_layers)


@jax.custom_vjp
def unstack_layers(leaves: list[jax.Array]) -> list[list[jax.Array]]:
  """Arrays stacked on a leading layer axis -> one list of slices per layer.

  Its gradient stacks the per-layer gradients in one op (plain indexing would
  pad and add a full-size gradient per layer).
  """
  return [[a[i] for a in leaves] for i in range(leaves[0].shape[0])]


def _unstack_fwd(leaves):
  return unstack_layers(leaves), None


def _unstack_bwd(_, grads):
  return ([jnp.stack(per_leaf) for per_leaf in zip(*grads)],)


unstack_layers.defvjp(_unstack_fwd, _unstack_bwd)


class BlockStack(nnx.Module):
  """``num_layers`` blocks with parameters stacked on a leading ``layers`` axis.

  ``scan_layers=True`` runs them with ``nnx.scan``: compile time does not grow
  with depth, and the layer index enters as a traced int32 (encodings index
  their per-layer parameters with it). ``scan_layers=False`` runs a Python loop
  over per-layer slices (layer index a Python int): longer compiles for deep
  models, but no scan bookkeeping (stacking residuals and gradients), which
  makes a CPU train step markedly faster. The parameters are the same either way.
  """

  def __init__(self, num_layers: int, *, rngs: nnx.Rngs, scan_layers: bool | None = None, **block_kwargs):
    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
      return Block(num_layers=num_layers, rngs=rngs, **block_kwargs)

    self.layers = make(rngs)
    self.num_layers, self.scan_layers = num_layers, resolve_scan_layers(scan_layers)

  def __call__(self, x: jax.Array, encoding: Encoding, geometry: Geometry, positions: jax.Array,
               mask: jax.Array | None, key: jax.Array | None, length=None) -> jax.Array:
    """``length``: the sequence's length for a length-dependent ``rotate`` (default: the geometry's)."""
    keys = [None] * self.num_layers if key is None else jax.random.split(key, self.num_layers)
    shared = encoding.attention_bias(geometry, positions, 0) if encoding.bias_shared_by_layers else None
    if not self.scan_layers:
      graphdef, state = nnx.split(self.layers)
      leaves, treedef = jax.tree.flatten(state)
      for layer, layer_leaves in enumerate(unstack_layers(leaves)):
        block = nnx.merge(graphdef, jax.tree.unflatten(treedef, layer_leaves))
        x = block(x, encoding, geometry, positions, layer, mask, keys[layer], shared, length)
      return x

    @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0, None), out_axes=nnx.Carry,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def run(x, block, layer, key, encoding):
      return block(x, encoding, geometry, positions, layer, mask, key, shared, length)

    keys = None if key is None else keys
    return run(x, self.layers, jnp.arange(self.num_layers, dtype=jnp.int32), keys, encoding)

  def empty_cache(self, batch_size: int, positions: jax.Array, dtype) -> "KVCache":
    """A KV cache of one empty slot per row of ``positions`` ``[1, S, ndim]``, k/v in ``dtype``."""
    attn, slots = self.layers.attn, positions.shape[1]
    zeros = jnp.zeros((self.num_layers, batch_size, slots, attn.num_heads, attn.head_dim), dtype)
    return KVCache(zeros, zeros, positions, jnp.zeros((), jnp.int32), jnp.zeros((batch_size, slots), jnp.int32))

  def decode(self, x: jax.Array, encoding: Encoding, geometry: Geometry, positions: jax.Array,
             cache: "KVCache", length=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """New tokens ``x [B, T, D]`` through every block with the KV cache ``cache``: its
    ``positions`` already hold the new tokens' at slot ``cache.length``, where their k/v go;
    ``length`` is the sequence's (default ``cache.length + T``). Returns ``x`` and the new
    ``k``, ``v`` ``[layers, B, S, H, Dh]``."""
    length = cache.length + x.shape[1] if length is None else length

    def one(block, encoding, x, layer, k, v):
      view = LayerCache(k, v, cache.positions, cache.length, length)
      return block.decode(x, encoding, geometry, positions, layer, view)

    if not self.scan_layers:
      graphdef, state = nnx.split(self.layers)
      leaves, treedef = jax.tree.flatten(state)
      ks, vs = [], []
      for layer, layer_leaves in enumerate(unstack_layers(leaves)):
        block = nnx.merge(graphdef, jax.tree.unflatten(treedef, layer_leaves))
        x, (k, v) = one(block, encoding, x, layer, cache.k[layer], cache.v[layer])
        ks.append(k)
        vs.append(v)
      return x, jnp.stack(ks), jnp.stack(vs)

    @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0, 0, None), out_axes=(nnx.Carry, 0, 0),
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def run(x, block, layer, k, v, encoding):
      x, (k, v) = one(block, encoding, x, layer, k, v)
      return x, k, v

    return run(x, self.layers, jnp.arange(self.num_layers, dtype=jnp.int32), cache.k, cache.v, encoding)


class KVCache(NamedTuple):
  """The KV cache of a decoder: ``k``/``v`` ``[layers, B, S, H, Dh]`` in the compute dtype (k
  already rotated by the encoding), the positions of the ``S`` slots ``[B or 1, S, ndim]``
  (data: what ``attention_bias`` sees), ``length``, the slots filled (int32 scalar), and the
  token ids of the slots ``[B, S]`` int32 (to recompute k/v when a length-dependent encoding's
  frequencies change). Decoding a step writes the new tokens' positions into ``positions``
  at ``length`` and the blocks use that as ``start``."""

  k: jax.Array
  v: jax.Array
  positions: jax.Array
  length: jax.Array
  tokens: jax.Array
