"""BERT-style encoder with a tied masked-language-model head.

    bert = BERT(posenc="alibi", vocab_size=30522, max_len=128, rngs=nnx.Rngs(0), **BERT_SIZES["mini"])
    logits = bert(input_ids, segment_ids=segment_ids, padding_mask=padding_mask)   # [B, L, vocab]
    logits = bert(input_ids, positions=pos, packing_ids=ids)  # several sequences in a row
    logits = bert(input_ids, predict_at=positions)                                # [B, P, vocab]
    hidden = bert.encode(input_ids, padding_mask=padding_mask)                    # [B, L, D]

Two kinds of ids, not to be confused:
  * ``segment_ids`` -- BERT's segment (sentence A/B, "token type") ids; they
    select a learned segment embedding (``type_vocab_size`` of them). This is
    what ``posenc.data`` text batches carry.
  * ``packing_ids`` -- optional ids of the sequences packed into one row; when
    given, a token attends only to tokens with the same packing id
    (block-diagonal attention). Pass ``positions`` that restart in each
    sequence, and each sequence is encoded exactly as on its own.
``positions`` (``[B or 1, L]`` or ``[B or 1, L, 1]``) default to 0..L-1.
``padding_mask`` (True = real token) keeps every query away from padded keys:
they get exactly zero attention weight, also when ``attention_bias`` hooks
(ALiBi, T5 buckets) add to the logits.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from posenc.encodings.base import Geometry
from posenc.models.attention import BlockConfig, attention_mask, layer_norm, param
from posenc.models.kernels import dense
from posenc.models.trunk import Trunk

# Turc et al. 2019 ("Well-Read Students Learn Better") sizes and BERT-base.
BERT_SIZES = {
    "tiny": dict(width=128, depth=2, num_heads=2, mlp_dim=512),
    "mini": dict(width=256, depth=4, num_heads=4, mlp_dim=1024),
    "small": dict(width=512, depth=4, num_heads=8, mlp_dim=2048),
    "base": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
}


class BERT(Trunk):
  """Token + segment embeddings, position via the encoding hooks, LayerNorm, blocks, MLM head.

  ``pre_ln=False`` is BERT's post-LN block; ``pre_ln=True`` moves each
  LayerNorm in front of its sub-layer and adds a final LayerNorm. The MLM head
  is HF ``BertForMaskedLM``'s: dense + GELU + LayerNorm, then the token
  embedding matrix (tied) plus a bias. GELU is exact (erf) as in BERT unless
  ``gelu_approximate``. ``max_len`` is the length the encoding is built for
  (e.g. the rows of a learned table).
  """

  def __init__(self, *, posenc: str, rngs: nnx.Rngs, posenc_options: dict | None = None,
               vocab_size: int = 30522, max_len: int = 512, type_vocab_size: int = 2,
               width: int = 256, depth: int = 4, num_heads: int = 4, mlp_dim: int = 1024,
               pre_ln: bool = False, dropout: float = 0.1, attention_dropout: float = 0.1,
               ln_eps: float = 1e-12, gelu_approximate: bool = False, scan_layers: bool | None = None,
               attention_impl: str = "auto",
               dtype=jnp.float32, param_dtype=jnp.float32):
    if type_vocab_size < 1:
      raise ValueError(f"type_vocab_size must be >= 1, got {type_vocab_size}.")
    block = BlockConfig(width, num_heads, mlp_dim, depth, pre_ln=pre_ln, ln_eps=ln_eps,
                        gelu_approximate=gelu_approximate, init_std=0.02, dropout=dropout,
                        attention_dropout=attention_dropout, attention_impl=attention_impl, dtype=dtype,
                        param_dtype=param_dtype)
    init = jax.nn.initializers.normal(0.02)  # BERT's initializer_range
    zeros = jax.nn.initializers.zeros
    self.vocab_size, self.type_vocab_size, self.max_len = vocab_size, type_vocab_size, max_len
    self.pre_ln = pre_ln

    self.token_embed = param(init, rngs, (vocab_size, width), param_dtype, ("vocab", "embed"))
    self.segment_embed = param(init, rngs, (type_vocab_size, width), param_dtype, (None, "embed"))
    self._build_trunk(block, posenc=posenc, posenc_options=posenc_options, geometry=Geometry.seq(max_len),
                      rngs=rngs, scan_layers=scan_layers, embed_norm=True)
    self.final_norm = layer_norm(width, ln_eps, dtype, param_dtype, rngs) if pre_ln else None
    # MLM head (the decoder matrix is token_embed, transposed).
    self.mlm_dense = param(init, rngs, (width, width), param_dtype, (None, "embed"))
    self.mlm_dense_bias = param(zeros, rngs, (width,), param_dtype, ("embed",))
    self.mlm_norm = layer_norm(width, ln_eps, dtype, param_dtype, rngs)
    self.mlm_bias = param(zeros, rngs, (vocab_size,), param_dtype, ("vocab",))
    self.gelu_approximate = gelu_approximate
    self._build_dropout_stream(rngs)

  def _check(self, input_ids, segment_ids, padding_mask, packing_ids) -> None:
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise ValueError(f"BERT expects integer input_ids [batch, length], got {input_ids.dtype} "
                       f"{input_ids.shape}.")
    for name, arr in (("segment_ids", segment_ids), ("padding_mask", padding_mask),
                      ("packing_ids", packing_ids)):
      if arr is not None and arr.shape != input_ids.shape:
        raise ValueError(f"{name} has shape {arr.shape} but input_ids has {input_ids.shape}; they must match.")

  def encode(self, input_ids: jax.Array, *, positions: jax.Array | None = None,
             segment_ids: jax.Array | None = None, padding_mask: jax.Array | None = None,
             packing_ids: jax.Array | None = None, train: bool = False) -> jax.Array:
    """Last hidden states ``[B, L, D]`` (compute dtype)."""
    self._check(input_ids, segment_ids, padding_mask, packing_ids)
    geometry = Geometry.seq(input_ids.shape[1])
    positions, key = self._start(positions, geometry, input_ids.shape[0], train)
    dt = self.dtype
    x = jnp.take(self.token_embed[...], input_ids, axis=0).astype(dt)
    segments = jnp.zeros_like(input_ids) if segment_ids is None else segment_ids
    x = x + jnp.take(self.segment_embed[...], segments, axis=0).astype(dt)
    x = self._encode(x, geometry, positions, attention_mask(padding_mask, packing_ids), key)
    return x if self.final_norm is None else self.final_norm(x)

  def __call__(self, input_ids: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, padding_mask: jax.Array | None = None,
               packing_ids: jax.Array | None = None, predict_at: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    """Masked-language-model logits ``[B, L, vocab]`` in float32.

    ``predict_at`` (int ``[B, P]``) runs the head only at those positions and returns
    ``[B, P, vocab]``: training needs logits only where tokens were masked (~15%).
    """
    x = self.encode(input_ids, positions=positions, segment_ids=segment_ids, padding_mask=padding_mask,
                    packing_ids=packing_ids, train=train)
    if predict_at is not None:
      x = jnp.take_along_axis(x, predict_at[..., None], axis=1)
    dt = self.dtype
    h = dense(x, self.mlm_dense[...].astype(dt), self.mlm_dense_bias[...].astype(dt))
    h = self.mlm_norm(jax.nn.gelu(h, approximate=self.gelu_approximate))
    logits = dense(h, self.token_embed[...].astype(dt).T, self.mlm_bias[...].astype(dt))
    return logits.astype(jnp.float32)
