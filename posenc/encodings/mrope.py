"""``mrope``: multimodal rotary embedding (Qwen2-VL's M-RoPE; Qwen3-VL's interleaved layout).

RoFormer's ``Dh/2`` frequencies ``theta**(-2i/Dh)`` are kept; what changes is which coordinate of
a ``(t, h, w)`` position turns each pair: pair ``i`` turns by ``p[axis(i)] * theta**(-2i/Dh)``.
``mrope_section = (s_t, s_h, s_w)`` (summing to ``Dh/2``) says how many pairs each axis gets, in
one of two layouts:

- chunked (Qwen2-VL, the default): contiguous, the first ``s_t`` pairs to ``t``, the next ``s_h``
  to ``h``, the last ``s_w`` to ``w``; so ``h`` and ``w`` get only the slower frequencies.
- interleaved (Qwen3-VL, ``mrope_interleaved=True``): pairs go round
  ``t, h, w, t, h, w, ...`` while ``h`` and ``w`` have pairs left (pair ``i`` is ``h`` if
  ``i % 3 == 1`` and ``i < 3 s_h``, ``w`` if ``i % 3 == 2`` and ``i < 3 s_w``), the rest to ``t``;
  every axis sees fast and slow frequencies. It needs ``3 s_h - 2`` and ``3 s_w - 1`` below ``Dh/2``.

Default sections, as the papers' proportions at any head size: chunked ``s_h = s_w = 3 Dh/16``
(Qwen2-VL's (16, 24, 24) at ``Dh = 128``), interleaved ``s_h = s_w = 5 Dh/32`` (Qwen3-VL's
(24, 20, 20)), each rounded down (at least 1), ``s_t`` the rest.

Positions: ``(t, h, w)`` on a 3D grid. A 1D position ``p`` is ``t = h = w = p`` (a text token),
which is exactly RoFormer's 1D RoPE. A 2D grid's ``(h, w)`` is ``(0, h, w)``: one image at
``t = 0``, as Qwen2-VL gives an image's tokens one ``t``; ``t``'s pairs then stay still. Called
directly, ``rotate`` also takes ``[B, L, 3]`` positions on a 1D geometry (Qwen's mixed text and
image sequence). Any real positions; no parameters; the offset alone sets q·k. Prefix tokens are
not turned.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from posenc.encodings.base import Encoding, Geometry
from posenc.encodings.options import Options, Rule, greater, option
from posenc.encodings.registry import register
from posenc.encodings.rotation import cos_sin, inverse_frequencies, turn

def default_sections(half: int, interleaved: bool) -> tuple[int, int, int]:
  """``(s_t, s_h, s_w)`` for ``half = Dh/2`` pairs: the proportions of Qwen2-VL (chunked) or Qwen3-VL
  (interleaved), rounded down, at least 1 each for ``h`` and ``w``."""
  spatial = max(1, (5 * half) // 16 if interleaved else (3 * half) // 8)
  return half - 2 * spatial, spatial, spatial


@functools.cache
def pair_axes(half: int, sections: tuple[int, int, int], interleaved: bool) -> np.ndarray:
  """The axis (0 = t, 1 = h, 2 = w) that turns each of the ``half`` pairs, ``[half]`` int."""
  if not interleaved:
    return np.repeat(np.arange(3), sections)
  i = np.arange(half)
  _, s_h, s_w = sections
  return np.where((i % 3 == 1) & (i < 3 * s_h), 1, np.where((i % 3 == 2) & (i < 3 * s_w), 2, 0))


def as_thw(positions: jax.Array) -> jax.Array:
  """float32 ``[B, N, 3]`` ``(t, h, w)`` from positions of 1 (``t = h = w``), 2 (``(0, h, w)``) or 3
  coordinates."""
  pos = positions.astype(jnp.float32)
  if pos.shape[-1] == 1:
    return jnp.concatenate([pos] * 3, axis=-1)
  if pos.shape[-1] == 2:
    return jnp.concatenate([jnp.zeros_like(pos[..., :1]), pos], axis=-1)
  return pos


@dataclasses.dataclass(frozen=True)
class MRoPEOptions(Options):
  theta: float = option(10000.0, "frequency base (RoFormer's; Qwen2-VL's language model uses 1e6)", greater(1))
  mrope_section: tuple[int, ...] | None = option(
      None, "(t, h, w): feature pairs per axis, summing to head_dim / 2",
      Rule(lambda v: len(v) == 3 and min(v) >= 1, "of three entries, every one >= 1"),
      none="Qwen2-VL's proportions (16, 24, 24) / 64 chunked, Qwen3-VL's (24, 20, 20) / 64 interleaved")
  mrope_interleaved: bool = option(False, "Qwen3-VL's layout: pairs go round t, h, w (else Qwen2-VL's "
                                          "contiguous sections)")


@register("mrope")
class MRoPE(Encoding):
  """M-RoPE: RoFormer's frequencies, each pair turned by one of the ``(t, h, w)`` coordinates
  (the module docstring); no parameters."""

  Options = MRoPEOptions
  supported_ndims = (1, 2, 3)

  def __init__(self, options: MRoPEOptions, *, dim: int | None = None, num_heads: int | None = None):
    super().__init__(options)
    self.head_dim = dim // num_heads if dim and num_heads else None
    if self.head_dim is not None:
      self.sections(self.head_dim)  # a bad mrope_section is an error when built, not at the first forward

  def sections(self, head_dim: int) -> tuple[int, int, int]:
    """The ``(s_t, s_h, s_w)`` for heads of ``head_dim`` features, or a ValueError that says the fix."""
    o = self.options
    if head_dim % 2 or head_dim < 6:
      raise ValueError(f"position encoding 'mrope' needs an even head dimension >= 6 (a feature pair for each "
                       f"of t, h, w); got head_dim={head_dim}.")
    half = head_dim // 2
    sections = o.mrope_section or default_sections(half, o.mrope_interleaved)
    if sum(sections) != half:
      raise ValueError(f"position encoding 'mrope': mrope_section={sections} sums to {sum(sections)}, but heads of "
                       f"head_dim={head_dim} have {half} feature pairs; give sections that sum to {half} "
                       f"(or mrope_section=None for {default_sections(half, o.mrope_interleaved)}).")
    counts = np.bincount(pair_axes(half, tuple(sections), o.mrope_interleaved), minlength=3)
    if tuple(counts) != tuple(sections):  # interleaved: h and w ran out of every-third pairs
      raise ValueError(f"position encoding 'mrope': with mrope_interleaved=True every third pair goes to h and to "
                       f"w, so of the {half} pairs h can have at most {(half + 1) // 3} and w {half // 3}; got "
                       f"mrope_section={sections}. Move pairs to t, or set mrope_interleaved=False.")
    return tuple(sections)

  def rotate(self, q, k, geometry: Geometry, positions, layer):
    self.check(geometry)
    if q.ndim != 4 or q.shape != k.shape or q.shape[1] != geometry.num_tokens:
      raise ValueError(f"position encoding 'mrope' expects q and k of equal shape [batch, {geometry.num_tokens} "
                       f"tokens ({geometry}), heads, head_dim]; got q {q.shape}, k {k.shape}.")
    if positions.shape[-1] not in (1, 2, 3):
      raise ValueError(f"position encoding 'mrope' takes positions of 1 (t = h = w), 2 (h, w) or 3 (t, h, w) "
                       f"coordinates; got shape {tuple(positions.shape)}.")
    head_dim = q.shape[-1]
    sections = self.sections(head_dim)
    axes = pair_axes(head_dim // 2, sections, self.options.mrope_interleaved)
    inv_freq = jnp.asarray(inverse_frequencies(head_dim, self.options.theta), jnp.float32)
    angles = jnp.take(as_thw(positions), axes, axis=-1) * inv_freq  # [B, N, Dh/2]: p[axis(i)] * freq[i]
    cos, sin = cos_sin(angles[:, :, None, :], 1.0, geometry.num_prefix)
    return turn(q, cos, sin), turn(k, cos, sin)
