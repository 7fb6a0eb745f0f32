"""The wiring ViT, BERT and GPT share: the position encoding, the block stack, the model's dropout
stream and what happens to positions once per forward.

A model subclasses ``Trunk`` (its parameters keep their paths: ``posenc/...``, ``blocks/...``,
``rngs/...`` at the model's top level), calls ``_build_trunk`` where the encoding and the blocks
come in its order of parameters, ``_build_dropout_stream`` last, and in its forward pass:

    positions, key = self._start(positions, geometry, batch, train)
    x = ...its own token embedding...
    x = self._encode(x, geometry, positions, mask, key)
"""
from __future__ import annotations

import jax
from flax import nnx

from posenc import encodings
from posenc.encodings.base import Geometry, forward_coordinates
from posenc.models.attention import BlockConfig, layer_norm
from posenc.models.block_stack import BlockStack
from posenc.models.kernels import apply_dropout


class Trunk(nnx.Module):
  """Encoding + blocks + dropout stream; the model around it embeds tokens and reads outputs."""

  def _build_trunk(self, config: BlockConfig, *, posenc: str, posenc_options: dict | None, geometry: Geometry,
                   rngs: nnx.Rngs, scan_layers: bool | None, causal: bool = False, embed_norm: bool = False):
    """``self.posenc`` (built at ``geometry``), ``self.embed_norm`` (a LayerNorm after the
    embedding, BERT's; else None) and ``self.blocks``."""
    c = config
    self.geometry, self.dtype, self.dropout = geometry, c.dtype, c.dropout
    self.any_dropout = bool(c.dropout or c.attention_dropout or c.drop_path)
    self.posenc = encodings.make(posenc, dim=c.dim, num_heads=c.num_heads, num_layers=c.num_layers,
                                 geometry=geometry, **({"causal": True} if causal else {}),
                                 param_dtype=c.param_dtype, rngs=rngs, **(posenc_options or {}))
    if self.posenc.causal_only and not causal:
      raise ValueError(f"position encoding '{posenc}' is causal only (it sums over the keys up to each query) "
                       f"and this model attends both ways; use it in a causal decoder (GPT) or choose "
                       f"one of: {', '.join(encodings.names(geometry.ndim, causal=False))}.")
    self.embed_norm = layer_norm(c.dim, c.ln_eps, c.dtype, c.param_dtype, rngs) if embed_norm else None
    self.blocks = BlockStack(c, rngs=rngs, scan_layers=scan_layers)

  def _build_dropout_stream(self, rngs: nnx.Rngs) -> None:
    """``self.rngs``: the model's dropout stream. Called last in ``__init__``: an ``nnx.Rngs`` with
    only a default stream draws params and dropout keys from one counter."""
    self.rngs = nnx.Rngs(dropout=rngs.dropout())

  def _start(self, positions: jax.Array | None, geometry: Geometry, batch: int,
             train: bool) -> tuple[jax.Array, jax.Array | None]:
    """This forward's positions (``forward_coordinates``) and its dropout key (None unless training
    with dropout)."""
    positions = forward_coordinates(self.posenc, positions, geometry, batch, self.rngs, train)
    return positions, (self.rngs.dropout() if train and self.any_dropout else None)

  def _embed_positions(self, x: jax.Array, geometry: Geometry, positions: jax.Array) -> jax.Array:
    """The encoding's ``embed`` hook, then ``embed_norm`` (if any)."""
    x = self.posenc.embed(x, geometry, positions)
    return x if self.embed_norm is None else self.embed_norm(x)

  def _encode(self, x: jax.Array, geometry: Geometry, positions: jax.Array, mask: jax.Array | None,
              key: jax.Array | None, length=None) -> jax.Array:
    """Token embeddings ``x [B, T, D]`` -> the last blocks' output (position embedding, dropout,
    blocks; ``length``: see ``BlockStack``)."""
    embed_key, blocks_key = (None, None) if key is None else jax.random.split(key)
    x = apply_dropout(self._embed_positions(x, geometry, positions), self.dropout, embed_key)
    return self.blocks(x, self.posenc, geometry, positions, mask, blocks_key, length)
