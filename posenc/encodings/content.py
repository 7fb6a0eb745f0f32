"""Content-dependent position encodings (1D, causal only): ``cope`` and ``forgetting``.

Both use the ``content_bias`` hook: a bias computed from what the attention sees (its input ``x``,
its ``q`` and ``k``), not from the positions, so both are translation invariant and nothing in them
depends on the sequence's length (no transfer rule: a new length moves nothing). Both sum over the
keys between a key and its query, so they serve causal decoders only (``causal_only``).

- ``cope``: CoPE (Golovneva et al. 2024). Gates ``g_ij = sigmoid(q_i . k_j / sqrt(Dh))`` (zero
  where the mask hides key j), positions ``p_ij = sum_{k=j..i} g_ik`` clamped to ``npos_max - 1``,
  bias ``q_i . e[p_ij] / sqrt(Dh)`` with ``e`` linearly interpolated between ``floor(p)`` and
  ``ceil(p)``. As the paper's reference code: ``e`` is a zero-initialised ``[npos_max, Dh]`` table
  per layer shared by the heads, and the bias is added before the logits' ``1/sqrt(Dh)`` (so it
  is ``q_scaled . e[p]`` with this model's scaled queries). The reference code's default table has
  ``block_size + 1`` rows; ``npos_max`` (default 64) fixes it, so it is length independent.
- ``forgetting``: the Forgetting Transformer's forget gate (Lin et al., ICLR 2025). Per head and
  token ``log f_t = log sigmoid(w_h . x_t + b_h)`` from the attention's input, bias
  ``sum_{l=j+1..i} log f_l = c_i - c_j`` with ``c`` the running sum. As the reference code's
  ``fgate_type="full"``: ``w`` N(0, 0.02^2), ``b`` zeros (``init_bias``), per layer. The KV cache
  keeps every slot's ``log f`` (as the reference code's cache), so cached decoding is exact.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from posenc.encodings.base import ContentInputs, Encoding
from posenc.encodings.options import Options, at_least, option
from posenc.encodings.registry import register


class _Causal1D(Encoding):
  supported_ndims = (1,)
  causal_only = True

  def check(self, geometry) -> None:
    super().check(geometry)
    if geometry.num_prefix:
      raise ValueError(f"position encoding '{self.name}' has no prefix tokens; got {geometry}.")


def _visible(mask, shape) -> jax.Array:
  """``mask`` as float ``[B or 1, 1, T, S]`` (1 = may attend), all ones where None."""
  if mask is None:
    return jnp.ones((1, 1) + shape, jnp.float32)
  return jnp.broadcast_to(mask, mask.shape[:-2] + shape)[:, None].astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class CoPEOptions(Options):
  npos_max: int = option(64, "positions counted up to npos_max - 1 (the table's rows)", at_least(2))


@register("cope")
class CoPE(_Causal1D):
  """CoPE: contextual positions counted by gates on q . k (module docstring). Parameter: ``table``
  ``(num_layers, npos_max, head_dim)``, zeros."""

  Options = CoPEOptions

  def __init__(self, options: CoPEOptions, *, dim: int, num_heads: int, num_layers: int = 1,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(options)
    self.npos_max = options.npos_max
    shape = (num_layers, options.npos_max, dim // num_heads)
    self.table = nnx.Param(jnp.zeros(shape, param_dtype), out_sharding=("layers", None, "kv"))

  def positions_of(self, inputs: ContentInputs) -> jax.Array:
    """``p_ij = sum_{k=j..i} g_ik``, ``[B, H, T, S]`` float32, clamped to ``npos_max - 1``."""
    q, k = inputs.q.astype(jnp.float32), inputs.k.astype(jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)  # q is already scaled by 1/sqrt(Dh)
    gates = jax.nn.sigmoid(logits) * _visible(inputs.mask, logits.shape[-2:])
    counted = jnp.flip(jnp.cumsum(jnp.flip(gates, -1), axis=-1), -1)  # sum over keys k >= j
    return jnp.minimum(counted, self.npos_max - 1)

  def content_bias(self, inputs, geometry, positions, layer):
    table = self.table[...][layer].astype(jnp.float32)  # [npos, Dh]
    p = self.positions_of(inputs)
    per_position = jnp.einsum("bqhd,nd->bhqn", inputs.q.astype(jnp.float32), table)  # [B, H, T, npos]
    low = jnp.floor(p)
    at = lambda i: jnp.take_along_axis(per_position, i.astype(jnp.int32), axis=-1)  # noqa: E731
    w = p - low
    return at(low) * (1 - w) + at(jnp.ceil(p)) * w, inputs.state


@dataclasses.dataclass(frozen=True)
class ForgettingOptions(Options):
  init_bias: float = option(0.0, "initial forget-gate bias (the reference code's 0: gates near 1/2)")
  init_std: float = option(0.02, "std of the gate weights' N(0, std^2) initialisation", at_least(0))


@register("forgetting")
class Forgetting(_Causal1D):
  """Forgetting Transformer's forget gate (module docstring). Parameters per layer: ``gate``
  ``(num_layers, dim, num_heads)`` and ``gate_bias`` ``(num_layers, num_heads)``."""

  Options = ForgettingOptions

  def __init__(self, options: ForgettingOptions, *, dim: int, num_heads: int, num_layers: int = 1,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(options)
    self.num_heads = num_heads
    w = options.init_std * jax.random.normal(rngs.params(), (num_layers, dim, num_heads), jnp.float32)
    self.gate = nnx.Param(w.astype(param_dtype), out_sharding=("layers", "embed", "heads"))
    self.gate_bias = nnx.Param(jnp.full((num_layers, num_heads), options.init_bias, param_dtype),
                               out_sharding=("layers", "heads"))

  def log_gates(self, x: jax.Array, layer) -> jax.Array:
    """``log f`` ``[B, T, H]`` float32 of the attention's input ``x [B, T, D]``."""
    w, b = self.gate[...][layer].astype(jnp.float32), self.gate_bias[...][layer].astype(jnp.float32)
    return jax.nn.log_sigmoid(jnp.einsum("btd,dh->bth", x.astype(jnp.float32), w) + b)

  def content_state(self, batch: int, slots: int):
    return jnp.zeros((batch, slots, self.num_heads), jnp.float32)

  def content_bias(self, inputs, geometry, positions, layer):
    log_f = self.log_gates(inputs.x, layer)
    state = inputs.state
    if state is not None:  # decoding: the new gates go into the cache at their slots
      state = jax.lax.dynamic_update_slice_in_dim(state, log_f, inputs.start, axis=1)
      log_f = state
    total = jnp.cumsum(log_f, axis=1)  # c_t = sum_{l <= t} log f_l, [B, S, H]
    queries = jax.lax.dynamic_slice_in_dim(total, inputs.start, inputs.q.shape[1], axis=1)
    bias = jnp.moveaxis(queries, -1, 1)[..., :, None] - jnp.moveaxis(total, -1, 1)[..., None, :]
    return bias, state
