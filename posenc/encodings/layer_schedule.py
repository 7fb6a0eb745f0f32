"""RoPE/NoPE layer schedules: which layers of a rotary encoding rotate, declared as options.

Llama 4 (iRoPE), SmolLM3 and Cohere2 rotate q and k in most layers and leave them as they are (NoPE) in
the others; Yang et al. 2025 ("RoPE to NoPE and back again") study such interleavings. Every rotary
encoding (``rope``, ``rope_mixed``, ``string``, ``comrope``, ``liere``) takes the options of
``ScheduleOptions``:

- ``nope_every=k``: layer ``i`` (0-based) is NoPE when ``(i + 1) % k == 0`` (so the k-th, 2k-th, ...
  layer), as HF's ``no_rope_layer_interval`` (Llama 4, SmolLM3); ``k=1`` is NoPE everywhere.
- ``rotate_layers=(i, j, ...)``: only those layers rotate (HF's ``no_rope_layers``: flag 1 = RoPE).
- ``nope_temperature``: Llama 4's attention temperature tuning (Nakanishi 2025, scalable softmax):
  the queries of NoPE layers are multiplied by ``log(floor((p + 1) / nope_floor_scale) + 1) *
  nope_attn_scale + 1`` at position ``p``, as HF's ``Llama4TextAttention`` (``attn_scale``, ``floor_scale``).
  HF's ``p`` is the token's index in the sequence (``arange + past_seen_tokens``); here it is the token's
  1D position as the hook sees it, the same for the default positions and exact under KV-cache decoding
  (each query's scale depends on its own position only). Prefix tokens keep scale 1.

The layer index the models pass is an int32 array, traced under ``nnx.scan``: the schedule selects with
``jnp.where``, never a Python branch on it. No parameters: nothing to transfer.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from posenc.config import ConfigError
from posenc.encodings.base import Geometry
from posenc.encodings.options import Options, Rule, at_least, greater, option

SCHEDULE_OPTIONS = ("nope_every", "rotate_layers", "nope_temperature", "nope_attn_scale", "nope_floor_scale")
_LAYERS = Rule(lambda v: min(v, default=0) >= 0 and len(set(v)) == len(v), "of distinct layer indices >= 0")


@dataclasses.dataclass(frozen=True)
class ScheduleOptions(Options):
  """The layer-schedule options every rotary encoding has (module docstring)."""

  nope_every: int | None = option(None, "NoPE in every k-th layer: layer i (0-based) does not rotate when "
                                        "(i + 1) % k == 0 (HF's no_rope_layer_interval)", at_least(1),
                                  none="no NoPE layers")
  rotate_layers: tuple[int, ...] | None = option(None, "rotate only in these layers (0-based), NoPE in the "
                                                       "others (HF's no_rope_layers)", _LAYERS, none="every layer")
  nope_temperature: bool = option(False, "Llama 4's temperature tuning: queries of NoPE layers at 1D position p "
                                         "times log(floor((p + 1) / nope_floor_scale) + 1) * nope_attn_scale + 1")
  nope_attn_scale: float = option(0.1, "temperature tuning: strength (HF's attn_scale)", greater(0))
  nope_floor_scale: float = option(8192.0, "temperature tuning: tokens per step (HF's floor_scale)", greater(0))

  def check(self) -> None:
    super().check()
    if self.nope_every is not None and self.rotate_layers is not None:
      raise ConfigError(f"nope_every (NoPE every k-th layer) and rotate_layers (the layers that rotate) both say "
                        f"which layers rotate; give one, got nope_every={self.nope_every}, "
                        f"rotate_layers={self.rotate_layers}.")
    if self.nope_temperature and not self.scheduled:
      raise ConfigError("nope_temperature scales the queries of NoPE layers, and every layer rotates; set "
                        "nope_every or rotate_layers too (or nope_temperature=False).")
    stray = [n for n in ("nope_attn_scale", "nope_floor_scale")
             if not self.nope_temperature and getattr(self, n) != ScheduleOptions.__dataclass_fields__[n].default]
    if stray:
      raise ConfigError(f"{', '.join(stray)} tune the temperature of NoPE layers; set nope_temperature=True too "
                        f"(or leave {' and '.join(stray)} at the default).")

  @property
  def scheduled(self) -> bool:
    """Whether some layers may not rotate."""
    return self.nope_every is not None or self.rotate_layers is not None

  def check_layers(self, num_layers: int | None, name: str) -> None:
    """A clear ValueError if ``rotate_layers`` names a layer a model of ``num_layers`` does not have."""
    outside = [i for i in self.rotate_layers or () if num_layers is not None and i >= num_layers]
    if outside:
      raise ValueError(f"position encoding '{name}': rotate_layers={self.rotate_layers} names layer(s) {outside}, "
                       f"but the model has {num_layers} layers (0..{num_layers - 1}).")

  def check_geometry(self, geometry: Geometry, name: str, axes: int | None = None) -> None:
    """A clear ValueError for temperature tuning on positions of more than one coordinate (``axes``:
    their number, if not the geometry's)."""
    if self.nope_temperature and (axes or geometry.ndim) != 1:
      raise ValueError(f"position encoding '{name}': nope_temperature scales queries by their 1D position, "
                       f"not on {geometry} with {axes or geometry.ndim} coordinates per position; use it on 1D "
                       f"sequences only.")

  def rotates(self, layer) -> jax.Array:
    """Whether ``layer`` (an int or int32 array, maybe traced) rotates: a bool array."""
    layer = jnp.asarray(layer, jnp.int32)
    if self.nope_every is not None:
      return (layer + 1) % self.nope_every != 0
    if self.rotate_layers is None:
      return jnp.asarray(True)
    return jnp.any(layer == jnp.asarray(self.rotate_layers + (-1,), jnp.int32))  # -1: never a layer

  def temperature(self, positions: jax.Array, num_prefix: int = 0) -> jax.Array:
    """float32 ``[B or 1, T, 1, 1]`` query scales at 1D ``positions [B or 1, N, 1]`` (prefix tokens: 1)."""
    pos = positions[..., 0].astype(jnp.float32)
    scale = jnp.log1p(jnp.floor((pos + 1.0) / self.nope_floor_scale)) * self.nope_attn_scale + 1.0
    return jnp.pad(scale, ((0, 0), (num_prefix, 0)), constant_values=1.0)[..., None, None]

  def select(self, q: jax.Array, k: jax.Array, turned: tuple[jax.Array, jax.Array], geometry: Geometry,
             positions: jax.Array, layer) -> tuple[jax.Array, jax.Array]:
    """What ``layer`` attends with: ``turned`` (the rotated q and k) where it rotates, else ``q`` and ``k``
    as they are, the queries scaled with ``nope_temperature``. No schedule: ``turned`` itself."""
    if not self.scheduled:
      return turned
    rotates = self.rotates(layer)
    q_out, k_out = jnp.where(rotates, turned[0], q), jnp.where(rotates, turned[1], k)
    if self.nope_temperature:
      scale = jnp.where(rotates, 1.0, self.temperature(positions, geometry.num_prefix))
      q_out = (q_out.astype(jnp.float32) * scale).astype(q.dtype)
    return q_out, k_out
