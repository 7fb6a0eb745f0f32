"""Learned-generator rotary encodings: ``string``, ``comrope`` and ``liere``.

Each turns a head's q and k at position ``p`` by a learned orthogonal ``R(p) = exp(sum_a p_a G_a)``,
RoPE's form with learned generators (the maths: ``posenc.encodings.learned_rotations``):

- ``string`` (STRING, Schenck et al. ICML 2025): commuting generators, so ``q.k`` depends on the
  offset only. ``form='cayley'`` (default): ``R(p) = P RoPE(p) P^T``, ``P`` the Cayley transform of a
  learned skew-symmetric matrix per head, RoPE with learned frequencies (``[ndim, H, Dh/2]``, as
  RoPE-Mixed's). ``form='commuting'``: learned block-diagonal generators restricted to commute by
  axis partition, which is ComRoPE-AP.
- ``comrope`` (ComRoPE-AP, Yu et al. 2025): an alias of ``string`` with ``form='commuting'``
  (the same module and parameters), under the name its paper uses.
- ``liere`` (LieRE, Ostmeier et al. 2024): dense skew-symmetric generators inside diagonal blocks of
  ``block`` features (the paper's block-diagonal form), ``R(p) = expm(sum_a p_a G_a)``. They need not
  commute: in 2D and 3D ``q.k`` sees absolute positions too (in 1D it is relative).

At initialisation each equals RoPE-Axial (RoFormer in 1D) with ``theta``. Positions are
``(row, col)`` as everywhere and turned into ``(x, y) = (col, row)`` as ``rope`` does; 3D positions
``(t, h, w)`` become ``(w, h, t)``, on a 3D geometry (``Geometry.grid3d``) or, with ``axes=3``, on a
flattened 1D geometry of ``t*h*w`` tokens whose positions carry three coordinates (called directly;
a model's position check wants one coordinate per axis of its geometry). No tables: a new grid or
length needs no parameter change (``transfer``). Prefix tokens are not turned. Each takes a RoPE/NoPE
layer schedule (``posenc.encodings.layer_schedule``); a NoPE layer's parameters are then unused.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from posenc.config import ConfigError
from posenc.encodings import learned_rotations as lr
from posenc.encodings.base import Encoding, Geometry
from posenc.encodings.layer_schedule import ScheduleOptions
from posenc.encodings.options import Rule, at_least, greater, one_of, option
from posenc.encodings.registry import register
from posenc.encodings.relative import layer_params
from posenc.encodings.rotation import cos_sin, turn

FORMS = ("cayley", "commuting")
HIGHEST = jax.lax.Precision.HIGHEST


def axial_frequencies(head_dim: int, ndim: int, theta: float) -> np.ndarray:
  """RoPE-Axial frequencies ``[ndim, 1, Dh/2]`` for ``ndim`` axes: axis ``a`` turns pairs
  ``a*Dh/(2 ndim)`` onwards at ``theta**(-2 ndim k / Dh)``; for 1D and 2D ``rotation.axial_frequencies``."""
  per_axis = head_dim // (2 * ndim)
  mag = theta ** (-np.arange(0, head_dim, 2 * ndim) / head_dim)
  out = np.zeros((ndim, 1, head_dim // 2))
  for a in range(ndim):
    out[a, 0, a * per_axis:(a + 1) * per_axis] = mag
  return out


@functools.cache
def free_entries(head_dim: int, ndim: int, block: int, commuting: bool) -> np.ndarray:
  """Flat indices into ``[ndim, Dh/block, block, block]`` of the learned entries: each block's strict
  upper triangle, per axis; ``commuting`` (ComRoPE-AP) keeps those whose two features turn with that axis."""
  upper = np.triu(np.ones((block, block), bool), k=1)
  keep = np.broadcast_to(upper, (ndim, head_dim // block, block, block))
  if commuting:
    keep = keep & lr.axis_partition_mask(head_dim, ndim, block)[:, 0].astype(bool)
  return np.flatnonzero(keep)


@dataclasses.dataclass(frozen=True)
class LearnedRotaryOptions(ScheduleOptions):
  """Options every learned-generator encoding has, the layer schedule (``ScheduleOptions``) among them."""

  theta: float | None = option(None, "base of the initial RoPE-Axial frequencies", greater(1),
                               none="10000 in 1D, 100 in 2D and 3D")
  per_layer: bool = option(True, "own parameters per layer (else one set shared by the layers)")
  axes: int | None = option(None, "coordinates per position", one_of(1, 2, 3),
                            none="the geometry's; 3 on a 1D geometry: (t, h, w) positions of a flattened grid")


@dataclasses.dataclass(frozen=True)
class BlockOptions(LearnedRotaryOptions):
  block: int = option(8, "features per diagonal block of the generators (divides the head dim)", at_least(2),
                      Rule(lambda v: v % 2 == 0, "even"))


@dataclasses.dataclass(frozen=True)
class StringOptions(BlockOptions):
  block: int = option(8, "form='commuting': features per diagonal block of the generators (divides the head dim)",
                      at_least(2), Rule(lambda v: v % 2 == 0, "even"))
  form: str = option("cayley", "'cayley': P RoPE P^T, learned orthogonal P and frequencies; 'commuting': "
                                "learned commuting block generators (= comrope)", one_of(*FORMS))

  def check(self) -> None:
    super().check()
    if self.form == "cayley" and self.block != BlockOptions.block:
      raise ConfigError(f"block is an option of form='commuting', not of form='cayley' (its P is dense); "
                        f"got block={self.block}.")


class _LearnedRotary(Encoding):
  """What the three share: the head and axis bookkeeping, per-layer parameters, the ``rotate``
  hook's checks and the prefix; subclasses say ``_turn``."""

  Options = LearnedRotaryOptions
  supported_ndims = (1, 2, 3)

  def __init__(self, options, *, dim: int, num_heads: int, num_layers: int, geometry: Geometry | None = None,
               param_dtype=jnp.float32):
    super().__init__(options)
    if dim % num_heads:
      raise ValueError(f"position encoding '{self.name}': dim={dim} is not divisible by num_heads={num_heads}.")
    if options.axes is None and not isinstance(geometry, Geometry):
      raise ValueError(f"position encoding '{self.name}' needs geometry=Geometry(...) or the option axes "
                       f"(how many coordinates a position has); got neither.")
    self.ndim = options.axes or geometry.ndim
    self.head_dim, self.num_heads, self.num_layers = dim // num_heads, num_heads, num_layers
    self.param_dtype = param_dtype
    if self.head_dim % (2 * self.ndim):
      raise ValueError(f"position encoding '{self.name}' needs a head dimension divisible by {2 * self.ndim} "
                       f"(whole feature pairs for each of the {self.ndim} axes); got head_dim={self.head_dim}. "
                       f"Choose width and num_heads so that width / num_heads is a multiple of {2 * self.ndim}.")
    self.theta = options.theta or (10000.0 if self.ndim == 1 else 100.0)
    options.check_layers(num_layers, self.name)

  def _param(self, init: np.ndarray, names: tuple) -> nnx.Param:
    """A parameter ``init`` (broadcast over the layers with ``per_layer``) with logical ``names``."""
    if self.options.per_layer:
      init, names = np.broadcast_to(init, (self.num_layers, *init.shape)), ("layers", *names)
    return nnx.Param(jnp.asarray(init, self.param_dtype), out_sharding=names)

  def _at(self, param: nnx.Param, layer) -> jax.Array:
    """``layer``'s slice of ``param`` (float32)."""
    return layer_params(param[...].astype(jnp.float32), self.options.per_layer, jnp.asarray(layer, jnp.int32))

  def check(self, geometry: Geometry) -> None:
    super().check(geometry)
    if geometry.ndim != self.ndim and geometry.ndim != 1:
      raise ValueError(f"position encoding '{self.name}' was built for {self.ndim}D positions, not {geometry}; "
                       f"build it at this geometry (its parameters depend on the number of axes).")
    self.options.check_geometry(geometry, self.name, self.ndim)

  def rotate(self, q, k, geometry, positions, layer):
    self.check(geometry)
    want = (geometry.num_tokens, self.num_heads, self.head_dim)
    if q.ndim != 4 or q.shape != k.shape or tuple(q.shape[1:]) != want:
      raise ValueError(f"position encoding '{self.name}' expects q and k of shape [batch, {want[0]} tokens "
                       f"({geometry}), {want[1]} heads, {want[2]}]; got q {q.shape}, k {k.shape}.")
    if positions.shape[-1] != self.ndim:
      raise ValueError(f"position encoding '{self.name}' was built for positions of {self.ndim} coordinates "
                       f"(axes={self.ndim}); got positions of shape {tuple(positions.shape)}.")
    pos = positions[..., ::-1].astype(jnp.float32)  # (row, col) -> (x, y), as rope; (t, h, w) -> (w, h, t)
    return self.options.select(q, k, self._turn(q, k, pos, geometry.num_prefix, layer), geometry, positions, layer)

  def _turn(self, q, k, pos, num_prefix: int, layer):
    raise NotImplementedError  # abstract: each form says how it turns q and k

  @classmethod
  def transfer(cls, params, source, target, options):
    """Nothing to resample: the rotations are functions of continuous positions, so a new grid or
    length keeps every parameter (position interpolation scales the positions instead). The
    generators are per axis: a 1D model cannot become a 2D one."""
    if source.ndim != target.ndim:
      raise ValueError(f"position encoding '{cls.name}' has generators for {source.ndim}D positions; "
                       f"they cannot serve {target}.")
    return params


def _block_generators(values: jax.Array, head_dim: int, ndim: int, block: int, commuting: bool) -> jax.Array:
  """Skew-symmetric generators ``[ndim, H, Dh/block, block, block]`` from the free entries ``[H, F]``."""
  heads = values.shape[0]
  flat = jnp.zeros((heads, ndim * head_dim * block), values.dtype)
  upper = flat.at[:, free_entries(head_dim, ndim, block, commuting)].set(values)
  upper = jnp.moveaxis(upper.reshape(heads, ndim, head_dim // block, block, block), 0, 1)
  return upper - jnp.swapaxes(upper, -1, -2)


class _BlockRotary(_LearnedRotary):
  """Learned block-diagonal generators: ``generators`` ``([num_layers,] H, F)`` holds, per head, the free
  entries (``free_entries``) of each axis's generator, initialised at RoPE-Axial's."""

  commuting = False

  def _init_blocks(self, block: int) -> None:
    if self.head_dim % block:
      raise ValueError(f"position encoding '{self.name}': block={block} must divide the head dimension "
                       f"{self.head_dim}; choose a block that does.")
    self.block = block
    freqs = np.repeat(axial_frequencies(self.head_dim, self.ndim, self.theta), self.num_heads, axis=1)
    gens = lr.rope_generators(freqs, block)  # [ndim, H, nb, b, b], skew-symmetric
    free = free_entries(self.head_dim, self.ndim, block, self.commuting)
    init = np.moveaxis(np.triu(gens, k=1), 1, 0).reshape(self.num_heads, -1)[:, free]
    self.generators = self._param(init, ("heads", None))

  def _turn_blocks(self, q, k, pos, num_prefix, layer):
    gens = _block_generators(self._at(self.generators, layer), self.head_dim, self.ndim, self.block,
                             self.commuting)
    pos = jnp.pad(pos, ((0, 0), (num_prefix, 0), (0, 0)))  # a prefix token at 0 turns by expm(0) = I
    rot = lr.generator_rotations(gens, pos)  # [1, N, ...] for the batch's shared positions
    order = lr.pair_order(self.head_dim, self.ndim)
    return lr.apply_block_rotations(q, rot, order), lr.apply_block_rotations(k, rot, order)


@register("liere")
class LieRE(_BlockRotary):
  """LieRE: dense learned skew-symmetric generators per axis and head in diagonal blocks of ``block``
  features (``BlockOptions``); ``generators`` ``([num_layers,] H, ndim * Dh/block * block(block-1)/2)``."""

  Options = BlockOptions

  def __init__(self, options: BlockOptions, *, dim: int, num_heads: int, num_layers: int,
               geometry: Geometry | None = None, param_dtype=jnp.float32):
    super().__init__(options, dim=dim, num_heads=num_heads, num_layers=num_layers, geometry=geometry,
                     param_dtype=param_dtype)
    self._init_blocks(options.block)

  def _turn(self, q, k, pos, num_prefix, layer):
    return self._turn_blocks(q, k, pos, num_prefix, layer)


@register("string")
class STRING(_BlockRotary):
  """STRING (``StringOptions.form``): Cayley ``P RoPE P^T`` with ``skew`` ``([num_layers,] H, Dh(Dh-1)/2)``
  (``P`` = identity at 0) and ``freqs`` ``([num_layers,] ndim, H, Dh/2)`` (RoPE-Axial at first), or
  ComRoPE-AP's commuting block generators (``generators``, as ``comrope``)."""

  Options = StringOptions
  commuting = True

  def __init__(self, options: StringOptions, *, dim: int, num_heads: int, num_layers: int,
               geometry: Geometry | None = None, param_dtype=jnp.float32):
    super().__init__(options, dim=dim, num_heads=num_heads, num_layers=num_layers, geometry=geometry,
                     param_dtype=param_dtype)
    self.form = options.form
    if self.form == "commuting":
      self._init_blocks(options.block)
      return
    d = self.head_dim
    self.skew = self._param(np.zeros((num_heads, d * (d - 1) // 2)), ("heads", None))
    freqs = np.repeat(axial_frequencies(d, self.ndim, self.theta), num_heads, axis=1)
    self.freqs = self._param(freqs, (None, "heads", "kv"))

  def orthogonal(self, layer) -> jax.Array:
    """Cayley form: ``P`` ``[H, Dh, Dh]`` of ``layer``."""
    d = self.head_dim
    rows, cols = np.triu_indices(d, k=1)
    upper = jnp.zeros((self.num_heads, d, d)).at[:, rows, cols].set(self._at(self.skew, layer))
    return lr.cayley(upper - jnp.swapaxes(upper, -1, -2))

  def _turn(self, q, k, pos, num_prefix, layer):
    if self.form == "commuting":
      return self._turn_blocks(q, k, pos, num_prefix, layer)
    # R(p) = P RoPE(p) P^T; in q.k the outer P cancels (P^T P = I), so q and k get RoPE(p) P^T and a
    # prefix token P^T: the same logits. P^T could equally be folded into W_q and W_k.
    p = self.orthogonal(layer)
    angles = jnp.einsum("bna,ahi->bnhi", pos, self._at(self.freqs, layer), precision=HIGHEST)
    cos, sin = cos_sin(angles, 1.0, num_prefix)

    def turned(x):
      y = jnp.einsum("hji,bnhj->bnhi", p, x.astype(jnp.float32), precision=HIGHEST)  # P^T x
      return turn(y, cos, sin).astype(x.dtype)

    return turned(q), turned(k)


@dataclasses.dataclass(frozen=True)
class ComRoPEOptions(BlockOptions):
  """``comrope``'s options: ``string``'s with ``form='commuting'`` (no ``form``)."""


@register("comrope")
class ComRoPE(STRING):
  """ComRoPE-AP: an alias of ``string`` with ``form='commuting'`` (block generators per axis, each on
  its own features inside every block, so they commute); ``generators`` as ``liere``'s, fewer entries."""

  Options = ComRoPEOptions

  def __init__(self, options: ComRoPEOptions, *, dim: int, num_heads: int, num_layers: int,
               geometry: Geometry | None = None, param_dtype=jnp.float32):
    as_string = StringOptions(**{f.name: getattr(options, f.name) for f in dataclasses.fields(options)},
                              form="commuting")
    super().__init__(as_string, dim=dim, num_heads=num_heads, num_layers=num_layers, geometry=geometry,
                     param_dtype=param_dtype)
    self.options = options
