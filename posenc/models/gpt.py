"""GPT-2-style decoder-only causal language model.

    gpt = GPT(posenc="rope", vocab_size=4096, max_len=128, rngs=nnx.Rngs(0), **GPT_SIZES["nano"])
    logits = gpt(input_ids)                                   # [B, L, vocab], causal
    logits = gpt(input_ids, positions=pos, packing_ids=ids)   # several sequences in a row
    cache = gpt.init_cache(batch_size=2, length=64)           # incremental decoding
    logits, cache = gpt.decode(prompt_ids, cache)             # prefill
    logits, cache = gpt.decode(next_ids[:, None], cache)      # one step
    logits = gpt(buffer_ids, length=n)                        # the first n tokens of a longer buffer

Position information enters only through the encoding's hooks (default
``learned``, a table of ``max_len`` rows like GPT-2's). Attention is causal by
token order; ``packing_ids`` additionally confine each token to its own packed
sequence (pass ``positions`` that restart in each), ``padding_mask`` (True = real
token) hides padded keys. ``posenc.models.generate`` decodes with the KV cache.

An encoding whose frequencies depend on the sequence's length (rope's ``ntk``, ``longrope``;
``yarn`` without ``factor``) sees the number of tokens, or ``length``: how a fixed-size buffer
whose later slots are not yet written is the sequence of its first ``length`` tokens
(causal attention keeps those slots out of the earlier ones). ``decode`` gives it
``cache.length + T`` and recomputes the cache when that changes its frequencies
(``posenc.encodings.rotary``): cached logits equal a full forward of the tokens so far.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from posenc.encodings.base import Geometry, check_positions
from posenc.models.attention import BlockConfig, attention_mask, layer_norm, param
from posenc.models.block_stack import KVCache
from posenc.models.kernels import dense
from posenc.models.trunk import Trunk

# nano/mini are CPU sizes; small is GPT-2 small (124M parameters at vocab 50257, max_len 1024).
GPT_SIZES = {
    "nano": dict(width=128, depth=4, num_heads=4, mlp_dim=512),
    "mini": dict(width=256, depth=4, num_heads=4, mlp_dim=1024),
    "small": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
}


class GPT(Trunk):
  """Token embedding, position via the encoding hooks, pre-LN blocks, final LayerNorm, tied head.

  As GPT-2: GELU tanh approximation, LayerNorm eps 1e-5, weights N(0, 0.02^2)
  and zero biases, the residual projections (attention output, second MLP
  layer) N(0, (0.02 / sqrt(2 depth))^2), and the head is the token embedding
  matrix transposed (no bias). ``max_len`` is the length the encoding is built
  for (e.g. the rows of a learned table).
  """

  def __init__(self, *, posenc: str = "learned", rngs: nnx.Rngs, posenc_options: dict | None = None,
               vocab_size: int = 50257, max_len: int = 1024, width: int = 768, depth: int = 12,
               num_heads: int = 12, mlp_dim: int = 3072, dropout: float = 0.0, attention_dropout: float = 0.0,
               scan_layers: bool | None = None, attention_impl: str = "auto", dtype=jnp.float32,
               param_dtype=jnp.float32):
    # GPT-2 scales the init of the projections that write into the residual stream.
    block = BlockConfig(width, num_heads, mlp_dim, depth, pre_ln=True, ln_eps=1e-5, gelu_approximate=True,
                        init_std=0.02, residual_std=0.02 * (2 * depth) ** -0.5, dropout=dropout,
                        attention_dropout=attention_dropout, attention_impl=attention_impl, dtype=dtype,
                        param_dtype=param_dtype)
    self.vocab_size, self.max_len = vocab_size, max_len
    self.token_embed = param(jax.nn.initializers.normal(0.02), rngs, (vocab_size, width), param_dtype,
                             ("vocab", "embed"))
    self._build_trunk(block, posenc=posenc, posenc_options=posenc_options, geometry=Geometry.seq(max_len),
                      rngs=rngs, scan_layers=scan_layers, causal=True)
    self.final_norm = layer_norm(width, 1e-5, dtype, param_dtype, rngs)
    self._build_dropout_stream(rngs)

  def _check(self, input_ids, padding_mask, packing_ids) -> None:
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise ValueError(f"GPT expects integer input_ids [batch, length], got {input_ids.dtype} "
                       f"{input_ids.shape}.")
    for name, arr in (("padding_mask", padding_mask), ("packing_ids", packing_ids)):
      if arr is not None and arr.shape != input_ids.shape:
        raise ValueError(f"{name} has shape {arr.shape} but input_ids has {input_ids.shape}; they must match.")

  def _tokens(self, input_ids) -> jax.Array:
    return jnp.take(self.token_embed[...], input_ids, axis=0).astype(self.dtype)

  def _logits(self, x: jax.Array) -> jax.Array:
    x = self.final_norm(x)
    return dense(x, self.token_embed[...].astype(self.dtype).T).astype(jnp.float32)

  def __call__(self, input_ids: jax.Array, *, positions: jax.Array | None = None,
               padding_mask: jax.Array | None = None, packing_ids: jax.Array | None = None,
               train: bool = False, length=None) -> jax.Array:
    """Next-token logits ``[B, L, vocab]`` in float32; position ``t`` sees tokens ``<= t``. ``length``
    (int or traced int32, at most L): the sequence's length a length-dependent encoding sees."""
    self._check(input_ids, padding_mask, packing_ids)
    geometry = Geometry.seq(input_ids.shape[1])
    positions, key = self._start(positions, geometry, input_ids.shape[0], train)
    mask = attention_mask(padding_mask, packing_ids, causal=True, length=input_ids.shape[1])
    x = self._encode(self._tokens(input_ids), geometry, positions, mask, key, length)
    return self._logits(x)

  def init_cache(self, batch_size: int, length: int, *, positions_dtype=jnp.int32) -> KVCache:
    """An empty KV cache of ``length`` slots; a clear error if the encoding cannot serve
    ``length`` tokens (e.g. more than a learned table's ``max_len``). Slots' positions start
    as ``0..length-1``; ``decode`` overwrites them with the positions it is given."""
    geometry = Geometry.seq(length)
    self.posenc.check(geometry)
    return self.blocks.empty_cache(batch_size, geometry.positions().astype(positions_dtype), self.dtype, self.posenc)

  def decode(self, input_ids: jax.Array, cache: KVCache, *,
             positions: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Logits ``[B, T, vocab]`` of ``T`` new tokens that follow the ``cache.length`` cached ones,
    and the cache with them added. ``positions`` of the new tokens (``[B or 1, T]`` or
    ``[B or 1, T, 1]``) default to ``cache.length + 0..T-1``. Inference only (no dropout);
    the caller keeps ``cache.length + T`` within the cache (under ``jit`` it is not checked).
    When the encoding's frequencies at ``cache.length + T`` tokens differ from those the cache
    was built with, every cached slot is recomputed from the cached tokens (module docstring).
    """
    self._check(input_ids, None, None)
    geometry = Geometry.seq(input_ids.shape[1])
    start, num_slots = cache.length, cache.k.shape[2]
    if positions is None:
      positions = (start + jnp.arange(geometry.num_positions, dtype=jnp.int32))[None, :, None]
    positions = self.posenc.coordinates(check_positions(positions, geometry), geometry, None)
    if positions.dtype != cache.positions.dtype:
      raise ValueError(f"positions are {positions.dtype} but the cache holds {cache.positions.dtype} "
                       f"positions; build it with init_cache(..., positions_dtype={positions.dtype}).")
    batch = max(positions.shape[0], cache.positions.shape[0])
    slots = jnp.broadcast_to(cache.positions, (batch, *cache.positions.shape[1:]))
    slots = jax.lax.dynamic_update_slice_in_dim(
        slots, jnp.broadcast_to(positions, (batch, *positions.shape[1:])), start, axis=1)
    tokens = jax.lax.dynamic_update_slice_in_dim(cache.tokens, input_ids.astype(cache.tokens.dtype), start, axis=1)
    cache = cache._replace(positions=slots, tokens=tokens)
    length = start + geometry.num_positions

    def new_tokens(model):  # the new tokens over the cached ones
      x = model._embed_positions(model._tokens(input_ids), geometry, positions)
      x, k, v, state = model.blocks.decode(x, model.posenc, geometry, positions, cache)
      return model._logits(x), k, v, state

    def every_slot(model):  # every slot again, at the new length (later, unwritten slots are causally unseen)
      everything = Geometry.seq(num_slots)
      x = model._embed_positions(model._tokens(tokens), everything, slots)
      empty = cache._replace(length=jnp.zeros_like(start))
      x, k, v, state = model.blocks.decode(x, model.posenc, everything, slots, empty, length)
      return model._logits(jax.lax.dynamic_slice_in_dim(x, start, geometry.num_positions, axis=1)), k, v, state

    enc = self.posenc
    if not (getattr(enc, "length_dependent", False) and bool(enc.rescales(1, num_slots))):
      logits, k, v, state = new_tokens(self)  # the cache never needs recomputing
    else:  # NNX modules cross a lax.cond as (graphdef, state)
      graphdef, state = nnx.split(self)
      logits, k, v, state = jax.lax.cond((start > 0) & enc.rescales(start, length),
                                  lambda state: every_slot(nnx.merge(graphdef, state)),
                                  lambda state: new_tokens(nnx.merge(graphdef, state)), state)
    return logits, KVCache(k, v, slots, length, tokens, state)
