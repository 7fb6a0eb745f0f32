"""``rope``'s 1D context extension (option ``scaling``), matched to Hugging Face's rope utils.

For a sequence of ``N`` tokens (below) trained at ``original_length`` ``L``;
``rope_frequencies`` computes both:

- ``"ntk"``: NTK-aware base, HF's ``dynamic``: ``theta' = theta * a**(Dh/(Dh-2))``,
  ``a = factor * max(N, L) / L - (factor - 1)``; ``factor=None`` means 1, so
  ``a = max(1, N / L)`` and nothing changes while ``N <= L``.
- ``"yarn"``: YaRN, HF's ``yarn`` (correction range truncated to whole
  dimensions): frequencies blend ``freq / s`` (interpolation) and ``freq``
  (extrapolation) along a ramp over the pairs set by ``beta_fast``/``beta_slow``
  rotations in ``L``; cos and sin (so the rotated q and k) are multiplied by
  ``0.1 ln s + 1`` (1 if ``s <= 1``), scaling q.k by its square. ``s = factor``,
  or ``max(1, N / L)`` when ``factor=None`` (dynamic). A fixed ``factor``
  applies at every ``N``, as in HF.

Position interpolation (linear scaling, HF's ``linear``) is not an option: it is
positions times a factor (``transfer.interpolate_positions``), for every variant.

``N`` is the number of tokens of the sequence: the geometry's length (offsets do
not change it), or ``rotate``'s ``length`` (bounded by the static ``max_length``) for
tokens that continue a longer sequence; a traced ``length`` reads a table of
``rope_frequencies`` at every length, so it is bit for bit a full forward at that
length. ``length_dependent``: ``ntk`` (past ``L``) and ``yarn`` without ``factor``.

KV-cache decoding (``posenc.models.GPT.decode``) then equals recomputation, a full
forward of the sequence so far at each step: past ``L`` its frequencies change with
every token, and from the second layer on every cached key and value depends on
them (through the first layer's attention), so no rotation of cached keys is exact
(HF's ``dynamic`` keeps them as rotated). The decoder recomputes every cached slot
from the cached tokens whenever the frequencies change (``rescales``): exact, cached
within ``L``, as costly as recomputation past it.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np

from posenc.config import ConfigError
from posenc.encodings.base import Geometry
from posenc.encodings.rotation import RopeVariant

SCALINGS = ("none", "ntk", "yarn")
DEFAULT_THETA = 10000.0


def rope_frequencies(head_dim: int, theta: float, length: int, scaling: str = "none",
                     original_length: int | None = None, factor: float | None = None,
                     beta_fast: float = 32.0, beta_slow: float = 1.0) -> tuple[np.ndarray, float]:
  """1D RoPE inverse frequencies ``[Dh/2]`` (float64) and the attention factor for a
  sequence of ``length`` positions (see the module docstring for ``scaling``)."""
  exponents = np.arange(0, head_dim, 2) / head_dim
  if scaling == "none":
    return theta ** -exponents, 1.0
  if scaling == "ntk":
    f = 1.0 if factor is None else factor
    a = f * max(length, original_length) / original_length - (f - 1.0)
    return (theta * a ** (head_dim / (head_dim - 2))) ** -exponents, 1.0
  s = max(1.0, length / original_length) if factor is None else factor

  def correction_dim(rotations):  # the pair index that turns ``rotations`` times in L positions
    return head_dim * math.log(original_length / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low = max(math.floor(correction_dim(beta_fast)), 0)
  high = min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
  ramp = np.clip((np.arange(head_dim // 2) - low) / ((high - low) or 0.001), 0.0, 1.0)
  freqs = theta ** -exponents
  return freqs / s * ramp + freqs * (1.0 - ramp), (0.1 * math.log(s) + 1.0 if s > 1 else 1.0)


@functools.lru_cache(maxsize=64)
def rope_frequency_table(head_dim: int, theta: float, max_length: int, scaling: str, original_length: int,
                         factor: float | None, beta_fast: float, beta_slow: float) -> tuple[np.ndarray, np.ndarray]:
  """``rope_frequencies`` at every length ``L..max(max_length, L)`` (``L = original_length``; every shorter
  length has the frequencies of ``L``): float32 ``[rows, Dh/2]`` and ``[rows]``; row ``max(N, L) - L``."""
  rows = [rope_frequencies(head_dim, theta, n, scaling, original_length, factor, beta_fast, beta_slow)
          for n in range(original_length, max(max_length, original_length) + 1)]
  return (np.stack([f for f, _ in rows]).astype(np.float32), np.asarray([a for _, a in rows], np.float32))


@dataclasses.dataclass(frozen=True)
class Scaled(RopeVariant):
  """1D RoPE extended past the trained length ``original_length`` by ``scaling`` (ntk or yarn)."""

  what = "1D context extension (scaling='ntk' or 'yarn')"
  theta: float | None
  scaling: str
  original_length: int | None
  factor: float | None
  beta_fast: float
  beta_slow: float

  def __post_init__(self):
    if self.original_length is None:
      raise ConfigError(f"scaling={self.scaling!r} needs original_length, the trained sequence length "
                        f"(a positive int).")
    if not self.beta_fast > self.beta_slow:
      raise ConfigError(f"needs beta_fast > beta_slow > 0; got beta_fast={self.beta_fast}, "
                        f"beta_slow={self.beta_slow}.")

  def check(self, geometry: Geometry) -> None:
    if geometry.ndim != 1:
      raise ValueError(f"position encoding 'rope': scaling={self.scaling!r} extends 1D sequences only, "
                       f"not {geometry}; use scaling='none' (or position interpolation) on 2D grids.")

  @property
  def length_dependent(self) -> bool:
    """Whether the frequencies depend on the sequence's length: ``ntk``, or ``yarn`` without ``factor``."""
    return self.scaling == "ntk" or (self.scaling == "yarn" and self.factor is None)

  def rescales(self, before, after):
    """Whether the frequencies at sequence length ``after`` differ from those at ``before`` (ints: a
    bool; traced int32: a bool array): only lengths past ``original_length`` change them."""
    xp = np if isinstance(before, int) and isinstance(after, int) else jnp
    return xp.maximum(before, self.original_length) != xp.maximum(after, self.original_length)

  def _scaled(self, geometry: Geometry, head_dim: int, length=None) -> tuple:
    """Frequencies ``[Dh/2]`` and attention factor at the geometry's length, or at ``length = (n, max_n)``."""
    if self.scaling == "ntk" and head_dim < 4:
      raise ValueError(f"position encoding 'rope': scaling='ntk' needs head_dim >= 4; got {head_dim}.")
    theta = self.theta or DEFAULT_THETA
    options = (self.scaling, self.original_length, self.factor, self.beta_fast, self.beta_slow)
    if length is None:
      return rope_frequencies(head_dim, theta, geometry.shape[0], *options)
    freqs, factors = rope_frequency_table(head_dim, theta, length[1], *options)
    row = jnp.clip(jnp.asarray(length[0], jnp.int32) - self.original_length, 0, len(factors) - 1)
    return jnp.asarray(freqs)[row], jnp.asarray(factors)[row]

  def frequencies(self, geometry, head_dim, length=None):
    return jnp.asarray(self._scaled(geometry, head_dim, length)[0], jnp.float32).reshape(1, 1, -1)

  def attention_factor(self, geometry, head_dim, length=None):
    return self._scaled(geometry, head_dim, length)[1] if self.scaling == "yarn" else 1.0
