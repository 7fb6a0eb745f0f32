"""Autoregressive generation from a causal LM (``posenc.models.GPT``), with or without a KV cache.

    tokens = posenc.models.generate(gpt, prompt_ids, 32)                       # greedy
    tokens = posenc.models.generate(gpt, prompt_ids, 32, temperature=0.8, rng=jax.random.key(0))

``use_cache=True`` prefills the prompt once, then decodes one token per step
(``GPT.decode``): each layer keeps its k (already rotated by the encoding) and
v in a fixed-size cache of ``prompt + max_new_tokens`` slots, and the new
token's positions are the cache offset (times ``position_scale``: position
interpolation), passed as data. An encoding with an ``attention_bias`` hook is
asked for the bias of the whole cache and the new query's row is kept: O(S^2)
per step and layer for S slots, whatever the hook.

``use_cache=False`` is the reference: every step runs the model on the whole
fixed-size buffer, with ``length`` the tokens so far, and reads the logits at
the last generated token. Attention is causal, so the not-yet-generated slots
(zeros) cannot change them: this is recomputing the sequence so far from scratch.

Both are the same for every 1D encoding and option. A dynamic context extension
(rope ``scaling="ntk"``, ``"longrope"``, or ``"yarn"`` without ``factor``) follows the length of
the sequence so far, prompt and generated tokens: recomputation runs each step
at the frequencies (and YaRN attention factor) of that length, so tokens already
cached were computed at those of an earlier one. Within ``original_length`` the
frequencies do not change and the cache is used as it is; past it they change
with every token, and since every layer's cached k and v depend on them (not only
the rotation of the keys), the decoder recomputes the whole cache from the cached
tokens at each such step (``posenc.encodings.rotary``): exact, and past
``original_length`` no cheaper than ``use_cache=False``. (HF's ``dynamic`` rope
keeps its cached keys instead, and differs from its own full forward.) A fixed
YaRN ``factor`` never changes the frequencies; ``longrope`` with a ``factor`` changes
them once, when the sequence passes ``original_length``, and the cache is recomputed
at that step only (HF drops its cache there). Packed prompts (several sequences
in a row, with ``packing_ids``) are not supported: ``GPT.decode`` has no packing ids.

Both are one ``jax.jit`` program per (model structure, shapes, ``max_new_tokens``),
with the steps in a ``lax.fori_loop``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from posenc.encodings.base import Geometry


def generate(model: nnx.Module, prompt_ids, max_new_tokens: int, *, temperature: float = 0.0,
             rng: jax.Array | None = None, use_cache: bool = True, position_scale: float = 1.0) -> jax.Array:
  """``prompt_ids [B, P]`` followed by ``max_new_tokens`` generated tokens: ``[B, P + new]`` int32.

  ``temperature=0`` picks the most likely token (greedy); ``> 0`` samples from
  ``softmax(logits / temperature)`` with the key ``rng``. Token ``t`` is at position
  ``t * position_scale`` (position interpolation; a run's ``position_scale``), real-valued
  unless 1. A clear ValueError if the model's encoding cannot serve ``P + max_new_tokens``
  positions (e.g. a learned table of ``max_len`` rows) or real-valued ones.
  """
  prompt_ids = jnp.asarray(prompt_ids)
  if prompt_ids.ndim != 2 or prompt_ids.shape[1] < 1 or not jnp.issubdtype(prompt_ids.dtype, jnp.integer):
    raise ValueError(f"prompt_ids must be integer token ids [batch, length >= 1]; got {prompt_ids.dtype} "
                     f"{prompt_ids.shape}.")
  if int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}.")
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs rng=jax.random.key(...).")
  if not position_scale > 0:
    raise ValueError(f"position_scale must be > 0 (1: positions 0, 1, 2, ...), got {position_scale}.")
  if position_scale != 1 and not model.posenc.continuous:
    raise ValueError(f"position_scale={position_scale} gives real-valued positions, but position encoding "
                     f"'{model.posenc.name}' looks integer positions up in a table; use position_scale=1.")
  prompt_len, total = prompt_ids.shape[1], prompt_ids.shape[1] + int(max_new_tokens)
  try:
    model.posenc.check(Geometry.seq(total))
  except ValueError as e:
    raise ValueError(f"cannot generate {prompt_len} prompt + {max_new_tokens} new = {total} tokens: "
                     f"{e}") from None
  prompt_ids = prompt_ids.astype(jnp.int32)
  if max_new_tokens == 0:
    return prompt_ids
  graphdef, state = nnx.split(model)
  key = jax.random.key(0) if rng is None else rng
  return _generate(graphdef, state, prompt_ids, key, jnp.float32(max(temperature, 1e-6)),
                   max_new_tokens=int(max_new_tokens), sample=temperature > 0, use_cache=use_cache,
                   position_scale=float(position_scale))


def _pick(logits: jax.Array, key: jax.Array, temperature: jax.Array, sample: bool) -> jax.Array:
  """``logits [B, vocab]`` -> next tokens ``[B]`` int32."""
  if not sample:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sample", "use_cache", "position_scale"))
def _generate(graphdef, state, prompt_ids, key, temperature, *, max_new_tokens: int, sample: bool,
              use_cache: bool, position_scale: float):
  batch, prompt_len = prompt_ids.shape
  total = prompt_len + max_new_tokens
  tokens = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(prompt_ids)
  positions = jnp.arange(total, dtype=jnp.int32)[None]
  if position_scale != 1.0:
    positions = positions.astype(jnp.float32) * position_scale
  pick = lambda logits, step: _pick(logits, jax.random.fold_in(key, step), temperature, sample)  # noqa: E731

  # The parameters travel in the loop carry: NNX refuses modules built from another trace level.
  if not use_cache:
    def step(i, carry):  # token prompt_len + i from the logits at prompt_len + i - 1
      tokens, state = carry
      logits = nnx.merge(graphdef, state)(tokens, positions=positions, length=prompt_len + i)
      last = jax.lax.dynamic_index_in_dim(logits, prompt_len + i - 1, axis=1, keepdims=False)
      return jax.lax.dynamic_update_index_in_dim(tokens, pick(last, i), prompt_len + i, axis=1), state

    return jax.lax.fori_loop(0, max_new_tokens, step, (tokens, state))[0]

  model = nnx.merge(graphdef, state)
  cache = model.init_cache(batch, total, positions_dtype=positions.dtype)
  logits, cache = model.decode(prompt_ids, cache, positions=positions[:, :prompt_len])
  tokens = tokens.at[:, prompt_len].set(pick(logits[:, -1], 0))

  def step(i, carry):  # feeds token prompt_len + i - 1, writes token prompt_len + i
    tokens, cache, state = carry
    last = jax.lax.dynamic_slice_in_dim(tokens, prompt_len + i - 1, 1, axis=1)
    at = jax.lax.dynamic_slice_in_dim(positions, prompt_len + i - 1, 1, axis=1)
    logits, cache = nnx.merge(graphdef, state).decode(last, cache, positions=at)
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, pick(logits[:, 0], i), prompt_len + i, axis=1)
    return tokens, cache, state

  return jax.lax.fori_loop(1, max_new_tokens, step, (tokens, cache, state))[0]
