"""Rotary position embeddings: ``rope`` (1D text, 2D axial images) and ``rope_mixed``.

A rotary encoding turns each pair of features of q and k by an angle that is a
linear function of the token's position, so q·k depends on positions only
through their offset (Su et al. 2021, "RoFormer"). The rotation and its
conventions: ``posenc.encodings.rotation``.

- ``rope``: fixed frequencies, one of three variants chosen by its options
  (``RoPEOptions.variant``): RoFormer (1D, ``theta`` 10000) and RoPE-Axial (2D, Heo
  et al. 2024, "Rotary Position Embedding for Vision Transformer": the first Dh/4
  pairs turn with x, the last Dh/4 with y, both at ``theta**(-4k/Dh)``, ``k < Dh/4``,
  theta 100) on the integer grid (``rotation.Axial``); 1D frequency scaling, every HF rope
  type (``rope_scaling``); DINOv3's normalised coordinates (``rope_normalized``). In 1D, p-RoPE
  (``frequency_fraction``) or HF's ``partial_rotary_factor`` leave features unrotated
  (``rotation.FewerRotated``).
- ``rope_mixed``, RoPE-Mixed (same paper): learned ``freqs`` of shape
  ``(num_layers, 2, H, Dh/2)``: per layer and head, x and y components of each
  pair's frequency, so a pair can turn along any direction of the grid.

No tables: both work at any sequence length or grid size. Prefix tokens (class
token, registers) are not rotated. Both take a RoPE/NoPE layer schedule
(``posenc.encodings.layer_schedule``).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from posenc.config import ConfigError
from posenc.encodings import coordinates as coords_lib
from posenc.encodings.base import Encoding, Geometry
from posenc.encodings.layer_schedule import SCHEDULE_OPTIONS, ScheduleOptions
from posenc.encodings.options import Rule, at_least, at_most, greater, one_of, option
from posenc.encodings.registry import register
from posenc.encodings.rope_normalized import Augmented, Normalized
from posenc.encodings.rope_scaling import SCALINGS, Scaled
from posenc.encodings.rotation import Axial, RopeVariant, cos_sin, turn


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
    return self.options.select(q, k, (turn(q, cos, sin), turn(k, cos, sin)), geometry, positions, layer)


_POSITIVE = Rule(lambda v: len(v) > 0 and min(v) > 0, "of at least one entry, every one > 0")


@dataclasses.dataclass(frozen=True)
class RoPEOptions(ScheduleOptions):
  """``rope``'s options. Which are set chooses the variant (``variant``); an option of another
  variant is an error naming it. The layer schedule (``ScheduleOptions``) goes with every variant."""

  theta: float | None = option(None, "frequency base on the integer grid", greater(1),
                               none="10000 in 1D, 100 in 2D")
  scaling: str = option("none", "1D frequency scaling, as HF's rope types: linear, ntk (HF's dynamic), yarn, "
                        "llama3, longrope", one_of(*SCALINGS))
  original_length: int | None = option(None, "the trained sequence length (ntk, yarn, llama3, longrope)", at_least(1))
  factor: float | None = option(None, "scaling factor (linear and llama3 need it)", at_least(1),
                                none="ntk, yarn, longrope: from the sequence length")
  beta_fast: float = option(32.0, "YaRN's ramp: rotations of the fastest interpolated pair", greater(0))
  beta_slow: float = option(1.0, "YaRN's ramp: rotations of the slowest extrapolated pair", greater(0))
  low_freq_factor: float | None = option(None, "llama3: wavelengths past original_length / this are divided "
                                               "by factor", greater(0))
  high_freq_factor: float | None = option(None, "llama3: wavelengths below original_length / this are kept",
                                          greater(0))
  short_factor: tuple[float, ...] | None = option(None, "longrope: per-pair frequency divisors up to "
                                                  "original_length", _POSITIVE)
  long_factor: tuple[float, ...] | None = option(None, "longrope: per-pair frequency divisors past "
                                                 "original_length", _POSITIVE)
  attention_factor: float | None = option(None, "yarn, longrope: what cos and sin are multiplied by",
                                          greater(0), none="from factor, as HF")
  mscale: float | None = option(None, "yarn: DeepSeek-V3's attention factor m(s, mscale) / m(s, mscale_all_dim), "
                                "m(s, a) = 0.1 a ln s + 1 (with mscale_all_dim)", greater(0), none="0.1 ln s + 1")
  mscale_all_dim: float | None = option(None, "yarn: the denominator's multiplier (with mscale)", greater(0),
                                        none="0.1 ln s + 1")
  truncate: bool = option(True, "yarn: round the correction range out to whole pairs (HF's truncate)")
  frequency_fraction: float | None = option(None, "p-RoPE (HF's proportional), 1D: keep the fastest fraction "
                                            "of the head's frequencies, zero the rest", at_least(0), at_most(1),
                                            none="all")
  partial_rotary_factor: float | None = option(None, "HF's, 1D: rotate only this fraction of each head's "
                                               "features, over the whole spectrum", greater(0), at_most(1),
                                               none="all")
  normalize_coords: str | None = option(None, "DINOv3: patch centres in [-1, 1] per axis or by the longer "
                                        "or shorter side", one_of(*coords_lib.NORMALIZE_MODES))
  base: float | None = option(None, "period base with normalize_coords", greater(1), none="100")
  min_period: float | None = option(None, "shortest period (with max_period, instead of base)", greater(0))
  max_period: float | None = option(None, "longest period (with min_period, instead of base)", greater(0))
  augment: bool = option(False, "DINOv3's coordinate augmentation when training (with normalize_coords)")
  shift_coords: float | None = option(None, "augmentation: shift U[-s, s] per axis", at_least(0), none="off")
  jitter_coords: float | None = option(None, "augmentation: jitter [1/j, j] per axis", at_least(1), none="off")
  rescale_coords: float | None = option(2.0, "augmentation: rescale [1/r, r] of both axes", at_least(1),
                                        none="off")

  def check(self) -> None:
    super().check()
    self.variant()

  def check_run(self, config) -> None:
    self.variant().check_run(config)

  def variant(self) -> RopeVariant:
    """The RoPE these options choose: DINOv3's normalised coordinates (augmented or not), 1D context
    extension, or the integer grid; a ConfigError naming any set option of another variant."""
    if self.normalize_coords is not None:
      chosen = Augmented if self.augment else Normalized
    else:
      chosen = Scaled if self.scaling != "none" else Axial
    own = {f.name for f in dataclasses.fields(chosen)}
    stray = [f.name for f in dataclasses.fields(self) if f.name not in own and f.name not in SCHEDULE_OPTIONS
             and getattr(self, f.name) != f.default]
    if stray:
      owners = [v.what for v in (Axial, Scaled, Normalized, Augmented)
                if any(f.name in stray for f in dataclasses.fields(v))]
      one = len(stray) == 1
      raise ConfigError(f"{', '.join(stray)} {'is not an option' if one else 'are not options'} of "
                        f"{chosen.what}; {'it belongs' if one else 'they belong'} to {' or '.join(owners)}.")
    return chosen(**{name: getattr(self, name) for name in own})


@register("rope")
class RoPE(_Rotary):
  """Fixed rotary embedding, no parameters: RoFormer in 1D, RoPE-Axial on 2D grids, 1D context
  extension or DINOv3's normalised coordinates (``RoPEOptions``; the variants' modules say how)."""

  Options = RoPEOptions

  def __init__(self, options: RoPEOptions, *, dim: int | None = None, num_heads: int | None = None,
               num_layers: int | None = None):
    super().__init__(options)
    options.check_layers(num_layers, self.name)
    self.variant = options.variant()
    self.head_dim = dim // num_heads if dim and num_heads else None
    if self.head_dim is not None:
      self.variant.check_head_dim(self.head_dim)  # e.g. partial_rotary_factor, longrope's factor lists

  @property
  def augments(self) -> bool:
    return self.variant.augments

  @property
  def length_dependent(self) -> bool:
    return self.variant.length_dependent

  def rescales(self, before, after):
    """For a ``length_dependent`` rope: whether its frequencies at sequence length ``after`` differ from
    those at ``before`` (``rope_scaling.Scaled.rescales``)."""
    return self.variant.rescales(before, after)

  def check(self, geometry: Geometry) -> None:
    super().check(geometry)
    self.variant.check(geometry)
    self.options.check_geometry(geometry, self.name)
    if self.head_dim is not None:
      self._check_head_dim(self.head_dim, geometry.ndim)

  def coordinates(self, positions, geometry, key=None):
    """The variant's coordinates: unchanged on the integer grid; patch centres in ``[-1, 1]`` with
    ``normalize_coords``, augmented when given a ``key`` (training) with ``augment=True``."""
    self.check(geometry)
    return self.variant.coordinates(positions, geometry, key)

  def _frequencies(self, geometry, layer, head_dim, num_heads, length=None):
    return self.variant.frequencies(geometry, head_dim, length)

  def _attention_factor(self, geometry, head_dim, length=None):
    return self.variant.attention_scale(geometry, head_dim, length)


@dataclasses.dataclass(frozen=True)
class RoPEMixedOptions(ScheduleOptions):
  theta: float = option(10.0, "base of the initial frequency magnitudes (rope-vit's 10)", greater(0))


@register("rope_mixed")
class RoPEMixed(_Rotary):
  """RoPE-Mixed: learned per-layer, per-head 2D frequencies (Heo et al. 2024).

  ``freqs`` ``(num_layers, 2, H, Dh/2)``; the angle of pair ``i`` of head ``h`` at
  ``(x, y)`` in layer ``l`` is ``x * freqs[l, 0, h, i] + y * freqs[l, 1, h, i]``,
  initialised as ``random_mixed_frequencies`` with ``theta``.
  """

  Options = RoPEMixedOptions
  supported_ndims = (2,)

  def __init__(self, options: RoPEMixedOptions, *, dim: int, num_heads: int, num_layers: int,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(options)
    if dim % num_heads:
      raise ValueError(f"position encoding 'rope_mixed': dim={dim} is not divisible by "
                       f"num_heads={num_heads}.")
    options.check_layers(num_layers, self.name)
    self.head_dim = dim // num_heads
    self._check_head_dim(self.head_dim, 2)
    init = random_mixed_frequencies(rngs.params(), num_layers, num_heads, self.head_dim, options.theta)
    self.freqs = nnx.Param(init.astype(param_dtype), out_sharding=("layers", None, "heads", "kv"))

  def check(self, geometry: Geometry) -> None:
    if geometry.ndim != 2:
      raise ValueError(f"position encoding 'rope_mixed' learns 2D (x, y) frequencies and supports "
                       f"only 2D grids, not {geometry}; use 'rope' for 1D sequences.")
    self.options.check_geometry(geometry, self.name)

  def _frequencies(self, geometry, layer, head_dim, num_heads, length=None):
    freqs = self.freqs[...]
    _, _, heads, half = freqs.shape
    if (heads, 2 * half) != (num_heads, head_dim):
      raise ValueError(f"position encoding 'rope_mixed' was built for {heads} heads of dim "
                       f"{2 * half}; got q/k with {num_heads} heads of dim {head_dim}.")
    # One path for every layer index (the model's are int32 arrays): clamped to range.
    return jax.lax.dynamic_index_in_dim(freqs, jnp.asarray(layer, jnp.int32), 0, keepdims=False)
