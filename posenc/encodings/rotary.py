"""Rotary position embeddings: ``rope`` (1D text, 2D axial images) and ``rope_mixed``.

A rotary encoding turns each pair of features of q and k by an angle that is a
linear function of the token's position, so q·k depends on positions only
through their offset (Su et al. 2021, "RoFormer").

Pairing convention: rotate-half (GPT-NeoX / HF Llama): feature ``i`` turns
together with feature ``i + Dh/2`` by ``angle[i]``, ``i < Dh/2``. (RoFormer and
rope-vit pair neighbours ``(2i, 2i+1)``; that is the same rotation after a fixed
permutation of the head features, which the learned q/k projections absorb.)

Angles: ``angle[b, n, h, i] = sum_a pos[b, n, a] * freqs[a, h, i]`` with
``pos = (t,)`` in 1D and ``pos = (x, y) = (column, row)`` on a 2D grid, computed
in float32 from the ``positions`` data, which may be real-valued: position
interpolation is positions times a factor < 1 (``posenc.transfer.interpolation_scale``).

- ``rope`` 1D: ``freqs[0, i] = theta**(-2i/Dh)``, theta 10000.
- ``rope`` 2D, RoPE-Axial (Heo et al. 2024, "Rotary Position Embedding for
  Vision Transformer"): the first Dh/4 pairs turn with x, the last Dh/4 with y,
  both at ``theta**(-4k/Dh)``, ``k < Dh/4``, theta 100.
- ``rope_mixed``, RoPE-Mixed (same paper): learned ``freqs`` of shape
  ``(num_layers, 2, H, Dh/2)``: per layer and head, x and y components of each
  pair's frequency, so a pair can turn along any direction of the grid.

No tables: both work at any sequence length or grid size. Prefix tokens (class
token, registers) are not rotated.

Context extension (``rope`` 1D, option ``scaling``), matched to Hugging Face's
rope utils for a sequence of ``N`` tokens (below)
trained at ``original_length`` ``L``; ``rope_frequencies`` computes both:

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

Normalised coordinates (``rope`` 2D, option ``normalize_coords``; DINOv3's
``RopePositionEmbedding``): ``coordinates`` maps the grid positions to patch
centres in ``[-1, 1]`` (``posenc.encodings.coordinates.normalize``: ``u = 2 (p + 1/2) / d - 1``
with ``d`` the axis length, ``"separate"``, or the longer / shorter side, ``"max"`` /
``"min"``), so a larger grid samples the trained range more densely instead of
reaching angles never seen in training. Frequencies are then given by periods, as
in DINOv3: ``angle = 2 pi u / period``, ``period_k = base**(4k/Dh)`` for ``k < Dh/4``
(``base`` 100), or ``min_period * (max_period / min_period)**(k / (Dh/4 - 1))``.
Pairs are laid out as above (the first Dh/4 turn with the column ``x``, the last
with the row ``y``; DINOv3 puts the row first, a fixed permutation of the head
features). Train-time augmentation (``augment=True``; DINOv3's ``shift_coords``,
``jitter_coords``, ``rescale_coords``, drawn per example;
``posenc.encodings.coordinates.dinov3_augment``): ``u' = ((u + s) * j) * r``.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from posenc.encodings import coordinates as coords_lib
from posenc.encodings.base import Encoding, Geometry, split_prefix
from posenc.encodings.registry import register


def rotate_half_pairs(x: jax.Array, angles: jax.Array, scale: float = 1.0) -> jax.Array:
  """Turn features ``(i, i + Dh/2)`` of ``x [..., Dh]`` by ``angles [..., Dh/2]``; cos and sin
  are multiplied by ``scale`` (YaRN's attention factor).

  Computed in float32, returned in ``x.dtype``.
  """
  return turn(x, *cos_sin(angles, scale))


def cos_sin(angles: jax.Array, scale: float | jax.Array = 1.0, num_prefix: int = 0) -> tuple[jax.Array, jax.Array]:
  """float32 ``(cos, sin)`` of ``angles [B, N, H, Dh/2]`` times ``scale`` (a float or a traced
  scalar), with ``num_prefix`` leading tokens that do not turn (cos 1, sin 0: the identity)."""
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  if isinstance(scale, jax.Array) or scale != 1.0:
    cos, sin = cos * scale, sin * scale
  if num_prefix:
    pad = ((0, 0), (num_prefix, 0)) + ((0, 0),) * (angles.ndim - 2)
    cos, sin = jnp.pad(cos, pad, constant_values=1.0), jnp.pad(sin, pad)
  return cos, sin


def turn(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """``x [..., Dh]`` with features ``(i, i + Dh/2)`` turned by the angles of ``cos``/``sin`` ``[..., Dh/2]``."""
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def axial_frequencies(head_dim: int, ndim: int, theta: float) -> np.ndarray:
  """Fixed RoPE frequencies ``[ndim, 1, Dh/2]`` (1D: RoFormer; 2D: RoPE-Axial)."""
  half = head_dim // 2
  if ndim == 1:
    return (theta ** (-np.arange(0, head_dim, 2) / head_dim)).reshape(1, 1, half)
  mag = theta ** (-np.arange(0, head_dim, 4) / head_dim)  # Dh/4 magnitudes per axis
  zeros = np.zeros_like(mag)
  return np.stack([np.concatenate([mag, zeros]), np.concatenate([zeros, mag])])[:, None, :]


def period_frequencies(head_dim: int, base: float | None = 100.0, min_period: float | None = None,
                       max_period: float | None = None) -> np.ndarray:
  """DINOv3's 2D RoPE frequencies for normalised coordinates, ``[2, 1, Dh/2]`` (the layout of
  ``axial_frequencies``): ``2 pi / period_k`` with ``period_k = base**(4k/Dh)``, ``k < Dh/4``, or,
  with ``min_period`` and ``max_period``, ``max_period * (max_period/min_period)**(e_k - 1)``,
  ``e_k = linspace(0, 1, Dh/4)`` (from ``min_period`` to ``max_period``)."""
  quarter = head_dim // 4
  if base is not None:
    periods = float(base) ** (2 * np.arange(quarter) / (head_dim // 2))
  else:
    ratio = max_period / min_period
    periods = ratio ** np.linspace(0.0, 1.0, quarter) / ratio * max_period
  mag = 2 * np.pi / periods
  zeros = np.zeros_like(mag)
  return np.stack([np.concatenate([mag, zeros]), np.concatenate([zeros, mag])])[:, None, :]


SCALINGS = ("none", "ntk", "yarn")


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


def random_mixed_frequencies(key: jax.Array, num_layers: int, num_heads: int, head_dim: int,
                             theta: float = 10.0) -> jax.Array:
  """RoPE-Mixed initialisation ``(num_layers, 2, H, Dh/2)`` float32.

  Per layer and head, a random angle ``a``; the first Dh/4 pairs point along
  ``a``, the last Dh/4 along ``a + pi/2``, with magnitudes ``theta**(-4k/Dh)``
  (rope-vit's ``init_random_2d_freqs``).
  """
  mag = jnp.asarray(theta ** (-np.arange(0, head_dim, 4) / head_dim), jnp.float32)
  a = jax.random.uniform(key, (num_layers, num_heads, 1), jnp.float32, 0.0, 2 * math.pi)
  direction = jnp.concatenate([jnp.broadcast_to(a, a.shape[:-1] + mag.shape),
                               jnp.broadcast_to(a + math.pi / 2, a.shape[:-1] + mag.shape)], -1)
  mag2 = jnp.concatenate([mag, mag])
  return jnp.stack([mag2 * jnp.cos(direction), mag2 * jnp.sin(direction)], axis=1)


class _Rotary(Encoding):
  """Shared ``rotate``: subclasses say the frequencies ``[ndim, H or 1, Dh/2]``."""

  length_dependent = False  # whether the frequencies depend on the sequence's length (``rotate``'s ``length``)

  def _frequencies(self, geometry: Geometry, layer, head_dim: int, num_heads: int, length=None) -> jax.Array:
    raise NotImplementedError  # abstract: rope and rope_mixed say their frequencies

  def _attention_factor(self, geometry: Geometry, head_dim: int, length=None) -> float | jax.Array:
    return 1.0  # what cos and sin are multiplied by

  def _check_head_dim(self, head_dim: int, ndim: int) -> None:
    step = 2 * ndim  # a pair per frequency; in 2D half the pairs for x, half for y
    if head_dim % step:
      why = "even" if ndim == 1 else "divisible by 4 (half the feature pairs for x, half for y)"
      raise ValueError(f"position encoding '{self.name}' needs a head dimension that is {why} "
                       f"for {ndim}D inputs; got head_dim={head_dim}. Choose width and num_heads "
                       f"so that width / num_heads is a multiple of {step}.")

  def rotate(self, q, k, geometry, positions, layer, *, length=None, max_length: int | None = None):
    """The hook; ``length`` (an int or traced int32 scalar, at most the static ``max_length``) is the
    number of tokens of the sequence these continue, for ``length_dependent`` frequencies (default:
    the geometry's length)."""
    self.check(geometry)
    if q.ndim != 4 or q.shape != k.shape or q.shape[1] != geometry.num_tokens:
      raise ValueError(f"position encoding '{self.name}' expects q and k of equal shape "
                       f"[batch, {geometry.num_tokens} tokens ({geometry}), heads, head_dim]; "
                       f"got q {q.shape}, k {k.shape}.")
    _, _, num_heads, head_dim = q.shape
    self._check_head_dim(head_dim, geometry.ndim)
    length = (length, geometry.num_positions if max_length is None else int(max_length)) if (
        length is not None and self.length_dependent) else None
    freqs = self._frequencies(geometry, layer, head_dim, num_heads, length).astype(jnp.float32)
    pos = positions[..., ::-1].astype(jnp.float32)  # (row, col) -> rope-vit's (x, y)
    angles = jnp.sum(pos[..., None, None] * freqs, axis=-3)  # [B, N, H or 1, Dh/2]
    # One cos/sin for q and k; prefix tokens turn by nothing, so q and k are never split apart.
    cos, sin = cos_sin(angles, self._attention_factor(geometry, head_dim, length), geometry.num_prefix)
    return turn(q, cos, sin), turn(k, cos, sin)


@register("rope")
class RoPE(_Rotary):
  """Fixed rotary embedding: RoFormer in 1D, RoPE-Axial on 2D grids. No parameters.

  Options: ``theta`` (frequency base; default 10000 in 1D, 100 in 2D as in RoPE-ViT);
  1D context extension (module docstring): ``scaling`` in ``"none"`` (default),
  ``"ntk"``, ``"yarn"``; ``original_length`` (the trained length, required unless
  ``"none"``); ``factor`` (None: from the sequence length); ``beta_fast=32``,
  ``beta_slow=1`` (YaRN's ramp).

  2D, DINOv3-style (module docstring): ``normalize_coords`` (None: the integer
  grid, the default; ``"separate"``, ``"max"``, ``"min"``: patch centres in
  ``[-1, 1]``); with it, the periods ``base`` (default 100, DINOv3's) or
  ``min_period`` and ``max_period``; ``augment=True`` draws, per example when
  training, a shift ``U[-shift_coords, shift_coords]`` per axis, a jitter
  ``[1/jitter_coords, jitter_coords]`` (log-uniform) per axis and a rescale
  ``[1/rescale_coords, rescale_coords]`` (log-uniform) shared by the axes; None
  turns one off. The defaults are DINOv3's released ViT-S/B/L/H+/7B recipe:
  ``shift_coords=None``, ``jitter_coords=None``, ``rescale_coords=2``.
  """

  def __init__(self, *, dim: int | None = None, num_heads: int | None = None,
               theta: float | None = None, scaling: str = "none", original_length: int | None = None,
               factor: float | None = None, beta_fast: float = 32.0, beta_slow: float = 1.0,
               normalize_coords: str | None = None, base: float | None = None,
               min_period: float | None = None, max_period: float | None = None, augment: bool = False,
               shift_coords: float | None = None, jitter_coords: float | None = None,
               rescale_coords: float | None = 2.0):
    self.head_dim = dim // num_heads if dim and num_heads else None
    if theta is not None and not float(theta) > 1:
      raise ValueError(f"position encoding 'rope': theta must be > 1, got {theta}.")
    self.theta = None if theta is None else float(theta)
    self._init_normalized(normalize_coords, base, min_period, max_period, theta, scaling)
    self._init_augment(augment, shift_coords, jitter_coords, rescale_coords)
    if scaling not in SCALINGS:
      raise ValueError(f"position encoding 'rope': scaling must be one of {SCALINGS}, got {scaling!r}.")
    if scaling == "none" and (original_length is not None or factor is not None):
      raise ValueError("position encoding 'rope': original_length and factor apply only with "
                       "scaling='ntk' or 'yarn'; scaling is 'none'.")
    if scaling != "none" and (isinstance(original_length, bool) or original_length is None
                              or not isinstance(original_length, int | np.integer) or original_length < 1):
      raise ValueError(f"position encoding 'rope': scaling={scaling!r} needs original_length, the "
                       f"trained sequence length (a positive int); got {original_length!r}.")
    if factor is not None and not float(factor) >= 1:
      raise ValueError(f"position encoding 'rope': factor must be >= 1 (or None: from the sequence "
                       f"length); got {factor}.")
    if not float(beta_fast) > float(beta_slow) > 0:
      raise ValueError(f"position encoding 'rope': needs beta_fast > beta_slow > 0; got "
                       f"beta_fast={beta_fast}, beta_slow={beta_slow}.")
    self.scaling = scaling
    self.original_length = None if original_length is None else int(original_length)
    self.factor = None if factor is None else float(factor)
    self.beta_fast, self.beta_slow = float(beta_fast), float(beta_slow)

  def _init_normalized(self, normalize_coords, base, min_period, max_period, theta, scaling) -> None:
    err = "position encoding 'rope': "
    if normalize_coords is None:
      if base is not None or min_period is not None or max_period is not None:
        raise ValueError(err + "base, min_period and max_period are periods of normalised coordinates; "
                         "set normalize_coords ('separate', 'max' or 'min'), or use theta on the integer grid.")
    else:
      if normalize_coords not in coords_lib.NORMALIZE_MODES:
        raise ValueError(err + f"normalize_coords must be None or one of {coords_lib.NORMALIZE_MODES}; "
                         f"got {normalize_coords!r}.")
      if theta is not None or scaling != "none":
        raise ValueError(err + "theta and scaling apply to the integer grid; with normalize_coords the "
                         "frequencies are periods (base, or min_period and max_period).")
      if (min_period is None) != (max_period is None):
        raise ValueError(err + "min_period and max_period go together; got "
                         f"min_period={min_period}, max_period={max_period}.")
      if min_period is not None:
        if base is not None:
          raise ValueError(err + "give either base or min_period and max_period, not both.")
        if not 0 < float(min_period) < float(max_period):
          raise ValueError(err + f"needs 0 < min_period < max_period; got {min_period}, {max_period}.")
      elif base is None:
        base = 100.0  # DINOv3's pos_embed_rope_base
      if base is not None and not float(base) > 1:
        raise ValueError(err + f"base must be > 1, got {base}.")
    self.normalize_coords = normalize_coords
    self.base = None if base is None else float(base)
    self.min_period = None if min_period is None else float(min_period)
    self.max_period = None if max_period is None else float(max_period)

  def _init_augment(self, augment, shift_coords, jitter_coords, rescale_coords) -> None:
    err = "position encoding 'rope': "
    for name, value, low in (("shift_coords", shift_coords, 0.0), ("jitter_coords", jitter_coords, 1.0),
                             ("rescale_coords", rescale_coords, 1.0)):
      if value is not None and not float(value) >= low:
        raise ValueError(err + f"{name} must be None (off) or >= {low:g}; got {value}.")
    if not augment and (shift_coords is not None or jitter_coords is not None
                        or rescale_coords not in (None, 2.0)):
      raise ValueError(err + "shift_coords, jitter_coords and rescale_coords apply only with augment=True.")
    if augment and self.normalize_coords is None:
      raise ValueError(err + "augment=True augments normalised coordinates (DINOv3); set normalize_coords "
                       "('separate', 'max' or 'min').")
    self.augments = bool(augment)
    self.shift_coords = None if shift_coords is None else float(shift_coords)
    self.jitter_coords = None if jitter_coords is None else float(jitter_coords)
    self.rescale_coords = None if rescale_coords is None else float(rescale_coords)

  def check(self, geometry: Geometry) -> None:
    super().check(geometry)
    if self.scaling != "none" and geometry.ndim != 1:
      raise ValueError(f"position encoding 'rope': scaling={self.scaling!r} extends 1D sequences only, "
                       f"not {geometry}; use scaling='none' (or position interpolation) on 2D grids.")
    if self.normalize_coords is not None and geometry.ndim != 2:
      raise ValueError(f"position encoding 'rope': normalize_coords={self.normalize_coords!r} normalises 2D "
                       f"grids, not {geometry}; leave it None for 1D sequences.")
    if self.head_dim is not None:
      self._check_head_dim(self.head_dim, geometry.ndim)

  def coordinates(self, positions, geometry, key=None):
    """Integer grid (default): unchanged. ``normalize_coords``: patch centres in ``[-1, 1]``,
    then, with a ``key`` (training, ``augment=True``), DINOv3's shift / jitter / rescale."""
    if self.normalize_coords is None:
      return positions
    self.check(geometry)
    coords = coords_lib.normalize(positions, geometry.shape, self.normalize_coords)
    if key is not None and self.augments:
      coords = coords_lib.dinov3_augment(coords, key, shift=self.shift_coords, jitter=self.jitter_coords,
                                         rescale=self.rescale_coords)
    return coords

  @property
  def length_dependent(self) -> bool:
    """Whether the frequencies depend on the sequence's length: ``ntk``, or ``yarn`` without ``factor``."""
    return self.scaling == "ntk" or (self.scaling == "yarn" and self.factor is None)

  def rescales(self, before, after):
    """Whether a ``length_dependent`` rope's frequencies at sequence length ``after`` differ from those at
    ``before`` (ints: a bool; traced int32: a bool array): only lengths past ``original_length`` change them."""
    xp = np if isinstance(before, int) and isinstance(after, int) else jnp
    return xp.maximum(before, self.original_length) != xp.maximum(after, self.original_length)

  def _scaled(self, geometry: Geometry, head_dim: int, length=None) -> tuple:
    """Frequencies ``[Dh/2]`` and attention factor at the geometry's length, or at ``length = (n, max_n)``."""
    if self.scaling == "ntk" and head_dim < 4:
      raise ValueError(f"position encoding 'rope': scaling='ntk' needs head_dim >= 4; got {head_dim}.")
    options = (self.scaling, self.original_length, self.factor, self.beta_fast, self.beta_slow)
    if length is None:
      return rope_frequencies(head_dim, self.theta or 10000.0, geometry.shape[0], *options)
    freqs, factors = rope_frequency_table(head_dim, self.theta or 10000.0, length[1], *options)
    row = jnp.clip(jnp.asarray(length[0], jnp.int32) - self.original_length, 0, len(factors) - 1)
    return jnp.asarray(freqs)[row], jnp.asarray(factors)[row]

  def _frequencies(self, geometry, layer, head_dim, num_heads, length=None):
    if self.scaling != "none":
      return jnp.asarray(self._scaled(geometry, head_dim, length)[0], jnp.float32).reshape(1, 1, -1)
    if self.normalize_coords is not None:
      return jnp.asarray(period_frequencies(head_dim, self.base, self.min_period, self.max_period), jnp.float32)
    theta = self.theta or (10000.0 if geometry.ndim == 1 else 100.0)
    return jnp.asarray(axial_frequencies(head_dim, geometry.ndim, theta), jnp.float32)

  def _attention_factor(self, geometry, head_dim, length=None):
    return self._scaled(geometry, head_dim, length)[1] if self.scaling == "yarn" else 1.0


@register("rope_mixed")
class RoPEMixed(_Rotary):
  """RoPE-Mixed: learned per-layer, per-head 2D frequencies (Heo et al. 2024).

  ``freqs`` ``(num_layers, 2, H, Dh/2)``; the angle of pair ``i`` of head ``h`` at
  ``(x, y)`` in layer ``l`` is ``x * freqs[l, 0, h, i] + y * freqs[l, 1, h, i]``.
  Option: ``theta`` (base of the initial magnitudes, 10 as in rope-vit).
  """

  supported_ndims = (2,)

  def __init__(self, *, dim: int, num_heads: int, num_layers: int, theta: float = 10.0,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"position encoding 'rope_mixed': dim={dim} is not divisible by "
                       f"num_heads={num_heads}.")
    self.head_dim = dim // num_heads
    self._check_head_dim(self.head_dim, 2)
    init = random_mixed_frequencies(rngs.params(), num_layers, num_heads, self.head_dim, theta)
    self.freqs = nnx.Param(init.astype(param_dtype), out_sharding=("layers", None, "heads", "kv"))

  def check(self, geometry: Geometry) -> None:
    if geometry.ndim != 2:
      raise ValueError(f"position encoding 'rope_mixed' learns 2D (x, y) frequencies and supports "
                       f"only 2D grids, not {geometry}; use 'rope' for 1D sequences.")

  def _frequencies(self, geometry, layer, head_dim, num_heads, length=None):
    freqs = self.freqs[...]
    num_layers, _, heads, half = freqs.shape
    if (heads, 2 * half) != (num_heads, head_dim):
      raise ValueError(f"position encoding 'rope_mixed' was built for {heads} heads of dim "
                       f"{2 * half}; got q/k with {num_heads} heads of dim {head_dim}.")
    if isinstance(layer, (int, np.integer)) and not 0 <= layer < num_layers:
      raise ValueError(f"position encoding 'rope_mixed' has {num_layers} layers; got layer={layer}.")
    return jax.lax.dynamic_index_in_dim(freqs, jnp.asarray(layer, jnp.int32), 0, keepdims=False)
