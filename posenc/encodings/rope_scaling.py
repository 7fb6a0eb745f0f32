"""``rope``'s 1D context extension (option ``scaling``), matched to Hugging Face's rope utils.

For a sequence of ``N`` tokens (below) trained at ``original_length`` ``L``, with ``f_i = theta**(-2i/Dh)``;
``rope_frequencies`` computes every one (HF's ``rope_type`` in brackets):

- ``"linear"`` (``linear``): ``f_i / factor``, position interpolation written as frequencies (the same as
  positions times ``1 / factor``, ``transfer.interpolate_positions``, which every variant takes).
- ``"ntk"`` (``dynamic``): NTK-aware base ``theta' = theta * a**(Dh/(Dh-2))``,
  ``a = factor * max(N, L) / L - (factor - 1)``; ``factor=None`` means 1, so ``a = max(1, N / L)`` and
  nothing changes while ``N <= L``.
- ``"yarn"`` (``yarn``): frequencies blend ``f / s`` (interpolation) and ``f`` (extrapolation) along a ramp
  over the pairs set by ``beta_fast``/``beta_slow`` rotations in ``L`` (the range rounded out to whole pairs
  unless ``truncate=False``, HF's ``truncate``); attention factor ``m(s, 1)``, ``m(s, a) = 0.1 a ln s + 1``
  (1 if ``s <= 1``), or DeepSeek-V3's ``m(s, mscale) / m(s, mscale_all_dim)`` given both, unless
  ``attention_factor``. (DeepSeek-V3's attention also multiplies its softmax scale by ``m(s, mscale_all_dim)**2``:
  that is the model's, not the rope's, as in HF.)
- ``"llama3"`` (``llama3``): pairs whose wavelength ``2 pi / f`` exceeds ``L / low_freq_factor`` are
  divided by ``factor``, those below ``L / high_freq_factor`` kept, and between them
  ``f ((1 - c) / factor + c)``, ``c = (L f / (2 pi) - low) / (high - low)``.
- ``"longrope"`` (``longrope``, Phi-3): ``f_i / short_factor[i]`` while ``N <= L``, ``f_i / long_factor[i]``
  past it; attention factor ``sqrt(1 + ln s / ln L)`` (1 if ``s <= 1``) unless ``attention_factor``.

``s = factor``, or ``max(1, N / L)`` when ``factor=None`` (dynamic; HF instead reads a missing yarn or
longrope factor as ``max_position_embeddings / L``, the same at the model's length). The attention
factor multiplies cos and sin (so the rotated q and k), scaling q.k by its square.
``frequency_fraction`` and ``partial_rotary_factor`` (``rotation.FewerRotated``) go with every scaling:
the spectrum is computed over the rotated features ``R`` (``Dh`` unless partial), then p-RoPE zeroes the
slowest pairs.

``N`` is the number of tokens of the sequence: the geometry's length (offsets do not change it), or
``rotate``'s ``length`` (bounded by the static ``max_length``) for tokens that continue a longer
sequence; a traced ``length`` reads a table of ``rope_frequencies`` at every length, so it is bit for bit
a full forward at that length. ``length_dependent``: ``ntk`` (past ``L``), ``longrope`` (short or long
factors; with ``factor=None`` the attention factor too) and ``yarn`` without ``factor``.

KV-cache decoding (``posenc.models.GPT.decode``) then equals recomputation, a full forward of the
sequence so far at each step. When the frequencies change (``rescales``), every cached key and value from
the second layer on depends on them (through the first layer's attention), so neither re-rotating cached
keys nor caching unrotated ones is exact; the decoder recomputes every cached slot from the cached tokens
(HF's ``dynamic`` keeps stale keys, its ``longrope`` drops the cache). For ``ntk`` and dynamic ones that is
every step past ``L``; for ``longrope`` with a ``factor`` only the one step that crosses ``L``.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np

from posenc.config import ConfigError
from posenc.encodings.base import Geometry
from posenc.encodings.rotation import FewerRotated, inverse_frequencies

SCALINGS = ("none", "linear", "ntk", "yarn", "llama3", "longrope")
DEFAULT_THETA = 10000.0
# The options each scaling needs, and those it may take besides; every other scaling option must stay unset.
NEEDS = {"linear": ("factor",), "ntk": ("original_length",), "yarn": ("original_length",),
         "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_length"),
         "longrope": ("short_factor", "long_factor", "original_length")}
TAKES = {"linear": (), "ntk": ("factor",),
         "yarn": ("factor", "beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate"),
         "llama3": (), "longrope": ("factor", "attention_factor")}
UNSET = {"beta_fast": 32.0, "beta_slow": 1.0, "truncate": True}  # the declared defaults of the options not None by default


def rope_frequencies(head_dim: int, theta: float, length: int, scaling: str = "none",
                     original_length: int | None = None, factor: float | None = None, beta_fast: float = 32.0,
                     beta_slow: float = 1.0, *, low_freq_factor: float | None = None,
                     high_freq_factor: float | None = None, short_factor: tuple | None = None,
                     long_factor: tuple | None = None, attention_factor: float | None = None,
                     mscale: float | None = None, mscale_all_dim: float | None = None, truncate: bool = True
                     ) -> tuple[np.ndarray, float]:
  """1D RoPE inverse frequencies ``[Dh/2]`` (float64) and the attention factor for a sequence of
  ``length`` positions (see the module docstring for ``scaling``)."""
  freqs = inverse_frequencies(head_dim, theta)
  if scaling == "none":
    return freqs, 1.0
  if scaling == "linear":
    return freqs / factor, 1.0
  if scaling == "ntk":
    f = 1.0 if factor is None else factor
    a = f * max(length, original_length) / original_length - (f - 1.0)
    return (theta * a ** (head_dim / (head_dim - 2))) ** -(np.arange(0, head_dim, 2) / head_dim), 1.0
  if scaling == "llama3":
    c = np.clip((original_length * freqs / (2 * math.pi) - low_freq_factor) / (high_freq_factor - low_freq_factor),
                0.0, 1.0)
    return freqs * ((1.0 - c) / factor + c), 1.0
  s = max(1.0, length / original_length) if factor is None else factor
  if scaling == "longrope":
    freqs = freqs / np.asarray(long_factor if length > original_length else short_factor, np.float64)
    default = math.sqrt(1.0 + math.log(s) / math.log(original_length)) if s > 1 else 1.0
    return freqs, default if attention_factor is None else attention_factor

  def correction_dim(rotations):  # the pair index that turns ``rotations`` times in L positions
    return head_dim * math.log(original_length / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  ramp = np.clip((np.arange(head_dim // 2) - low) / ((high - low) or 0.001), 0.0, 1.0)

  def m(scale):  # YaRN's attention factor with DeepSeek's multiplier
    return 0.1 * scale * math.log(s) + 1.0 if s > 1 else 1.0

  default = m(mscale) / m(mscale_all_dim) if mscale and mscale_all_dim else m(1.0)
  return freqs / s * ramp + freqs * (1.0 - ramp), default if attention_factor is None else attention_factor


@functools.lru_cache(maxsize=64)
def rope_frequency_table(variant: Scaled, head_dim: int, max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """``variant``'s frequencies at every length ``L..max(max_length, L)`` (``L = original_length``; every shorter
  length has the frequencies of ``L``): float32 ``[rows, R/2]`` and ``[rows]``; row ``max(N, L) - L``."""
  rows = [variant.at_length(head_dim, n) for n in range(variant.original_length,
                                                         max(max_length, variant.original_length) + 1)]
  return (np.stack([f for f, _ in rows]).astype(np.float32), np.asarray([a for _, a in rows], np.float32))


@dataclasses.dataclass(frozen=True)
class Scaled(FewerRotated):
  """1D RoPE with frequencies rescaled by ``scaling`` (module docstring), e.g. past the trained length."""

  what = "1D context extension (scaling other than 'none')"
  theta: float | None
  scaling: str
  original_length: int | None
  factor: float | None
  beta_fast: float
  beta_slow: float
  low_freq_factor: float | None
  high_freq_factor: float | None
  short_factor: tuple | None
  long_factor: tuple | None
  attention_factor: float | None
  mscale: float | None
  mscale_all_dim: float | None
  truncate: bool

  def __post_init__(self):
    super().__post_init__()
    scaling, own = self.scaling, NEEDS[self.scaling] + TAKES[self.scaling]
    stray = [n for n in sorted(set().union(*NEEDS.values(), *TAKES.values()) - set(own))
             if getattr(self, n) != UNSET.get(n)]
    if stray:
      owners = [f"{s!r}" for s in NEEDS if s != scaling and stray[0] in NEEDS[s] + TAKES[s]]
      raise ConfigError(f"{', '.join(stray)} {'is not an option' if len(stray) == 1 else 'are not options'} of "
                        f"scaling={scaling!r} (it takes {', '.join(own)}); {stray[0]} belongs to scaling="
                        f"{' or '.join(owners)}.")
    missing = [n for n in NEEDS[scaling] if getattr(self, n) is None]
    if missing:
      raise ConfigError(f"scaling={scaling!r} needs {', '.join(missing)}" + (
          ", original_length the trained sequence length (a positive int)" if "original_length" in missing else "")
                        + ".")
    if (self.mscale is None) != (self.mscale_all_dim is None):
      raise ConfigError(f"yarn's mscale and mscale_all_dim set the attention factor together (DeepSeek-V3); give "
                        f"both or neither, got mscale={self.mscale}, mscale_all_dim={self.mscale_all_dim}.")
    if self.mscale is not None and self.attention_factor is not None:
      raise ConfigError(f"attention_factor={self.attention_factor} and mscale/mscale_all_dim both set yarn's "
                        f"attention factor; give one.")
    if not self.beta_fast > self.beta_slow:
      raise ConfigError(f"needs beta_fast > beta_slow > 0; got beta_fast={self.beta_fast}, "
                        f"beta_slow={self.beta_slow}.")
    if scaling == "llama3" and not self.high_freq_factor > self.low_freq_factor:
      raise ConfigError(f"scaling='llama3' needs high_freq_factor > low_freq_factor; got high_freq_factor="
                        f"{self.high_freq_factor}, low_freq_factor={self.low_freq_factor}.")

  def check(self, geometry: Geometry) -> None:
    if geometry.ndim != 1:
      raise ValueError(f"position encoding 'rope': scaling={self.scaling!r} extends 1D sequences only, "
                       f"not {geometry}; use scaling='none' (or position interpolation) on 2D grids.")

  def check_head_dim(self, head_dim: int) -> None:
    rotated = self.rotated_dim(head_dim)
    if self.scaling == "ntk" and rotated < 4:
      raise ValueError(f"position encoding 'rope': scaling='ntk' needs head_dim >= 4; got {rotated}.")
    for name in ("short_factor", "long_factor"):
      given = getattr(self, name)
      if given is not None and len(given) != rotated // 2:
        raise ValueError(f"position encoding 'rope': {name} has {len(given)} entries; it needs one per rotated "
                         f"pair, {rotated // 2} for {rotated} rotated features (head_dim={head_dim}).")

  @property
  def length_dependent(self) -> bool:
    """Whether the frequencies depend on the sequence's length: ``ntk``, ``longrope``, ``yarn`` without ``factor``."""
    return self.scaling in ("ntk", "longrope") or (self.scaling == "yarn" and self.factor is None)

  def rescales(self, before, after):
    """Whether the frequencies at sequence length ``after`` differ from those at ``before`` (ints: a
    bool; traced int32: a bool array): only lengths past ``original_length`` change them; with a
    ``factor``, longrope's change only where one side is past it and the other not."""
    xp = np if isinstance(before, int) and isinstance(after, int) else jnp
    if self.scaling == "longrope" and self.factor is not None:
      return (xp.asarray(before) > self.original_length) != (xp.asarray(after) > self.original_length)
    return xp.maximum(before, self.original_length) != xp.maximum(after, self.original_length)

  def at_length(self, head_dim: int, length: int) -> tuple[np.ndarray, float]:
    """Frequencies ``[R/2]`` (float64, p-RoPE applied) and attention factor at ``length`` tokens."""
    rotated = self.rotated_dim(head_dim)
    names = ("original_length", "factor", "beta_fast", "beta_slow", "low_freq_factor", "high_freq_factor",
             "short_factor", "long_factor", "attention_factor", "mscale", "mscale_all_dim", "truncate")
    freqs, factor = rope_frequencies(rotated, self.theta or DEFAULT_THETA, length, self.scaling,
                                     **{n: getattr(self, n) for n in names})
    return self.kept(freqs, rotated), factor

  def _scaled(self, geometry: Geometry, head_dim: int, length=None) -> tuple:
    """Frequencies ``[R/2]`` and attention factor at the geometry's length, or at ``length = (n, max_n)``."""
    self.check_head_dim(head_dim)
    if length is None:
      return self.at_length(head_dim, geometry.shape[0])
    freqs, factors = rope_frequency_table(self, head_dim, length[1])
    row = jnp.clip(jnp.asarray(length[0], jnp.int32) - self.original_length, 0, len(factors) - 1)
    return jnp.asarray(freqs)[row], jnp.asarray(factors)[row]

  def frequencies(self, geometry, head_dim, length=None):
    return jnp.asarray(self._scaled(geometry, head_dim, length)[0], jnp.float32).reshape(1, 1, -1)

  def attention_scale(self, geometry, head_dim, length=None):
    return self._scaled(geometry, head_dim, length)[1] if self.scaling in ("yarn", "longrope") else 1.0
