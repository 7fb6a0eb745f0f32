"""Resolution transfer: map a model's parameters from one geometry to another.

The seed's protocol (reshape the table to its grid, resample, flatten, then
fine-tune with a lower learning rate on positions) for every encoding: each
encoding says what its own parameters need (``Encoding.transfer``: learned
grids resample, relative-bias tables resample, fixed encodings pass through);
this module applies that to a whole model's parameter tree and checks that
everything else fits unchanged.

Everything here is a pure function of arrays with the geometry static, so it
runs under ``jax.jit`` with ``in_shardings``/``out_shardings`` on a mesh and
never leaves the device:

    fn = jax.jit(functools.partial(transfer_params, source=old_model, target=new_model),
                 out_shardings=target_shardings)
    new_params = fn(old_params)
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from posenc.resize import METHODS

EXTEND_MODES = ("interpolate", "copy")
POSENC_KEY = "posenc"  # every model keeps its encoding at this attribute


class TransferError(ValueError):
  """A parameter tree that the transfer rules cannot map onto the target model."""


@dataclasses.dataclass(frozen=True)
class TransferOptions:
  """How position tables are resampled.

  method: a ``posenc.resize`` method ("bicubic", "bicubic_torch", "bilinear",
    "bilinear_aligned", "nearest").
  antialias: for "bicubic" / "bilinear" (torch's ``antialias`` flag).
  extend: how a learned 1D table grows to a longer ``max_len``: "interpolate"
    (resample) or "copy" (repeat the trained table, as Longformer does).
  """

  method: str = "bicubic"
  antialias: bool = True
  extend: str = "interpolate"

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"transfer method {self.method!r} is unknown; choose one of {METHODS}.")
    if self.extend not in EXTEND_MODES:
      raise ValueError(f"transfer extend mode {self.extend!r} is unknown; choose one of {EXTEND_MODES}.")


def param_dict(model: nnx.Module) -> dict:
  """The model's parameters as a nested dict of arrays (or ShapeDtypeStructs)."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _flat(tree: dict) -> dict[tuple, jax.Array]:
  return {tuple(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _name(path: tuple) -> str:
  return "/".join(path)


def transfer_params(params: dict, *, source: nnx.Module, target: nnx.Module,
                    options: TransferOptions = TransferOptions()) -> dict:
  """``source``'s parameters ``params`` mapped onto ``target``'s geometry.

  ``source`` and ``target`` are models (concrete or abstract, from
  ``nnx.eval_shape``) that say the geometries; only ``params`` is data.
  Raises TransferError naming each parameter whose stored shape does not fit
  the target and that no rule covers (a different patch size, width, depth...).
  """
  want = param_dict(target)
  out = dict(params)
  if POSENC_KEY in params:
    out[POSENC_KEY] = target.posenc.transfer(params[POSENC_KEY], source.geometry, target.geometry,
                                             options)
  check_fits(out, want, source=source, target=target)
  return out


def check_fits(params: dict, want: dict, *, source=None, target=None) -> None:
  """TransferError unless ``params`` has exactly ``want``'s names and shapes."""
  have, need = _flat(params), _flat(want)
  problems = [f"  {_name(p)}: stored {tuple(have[p].shape)}, wanted {tuple(need[p].shape)}"
              for p in sorted(set(have) & set(need)) if tuple(have[p].shape) != tuple(need[p].shape)]
  problems += [f"  {_name(p)}: in the checkpoint, not in the model" for p in sorted(set(have) - set(need))]
  problems += [f"  {_name(p)}: in the model, not in the checkpoint" for p in sorted(set(need) - set(have))]
  if problems:
    where = ""
    if source is not None and target is not None:
      where = (f" (checkpoint geometry {source.geometry}, position encoding "
               f"'{source.posenc.name}'; model geometry {target.geometry}, position encoding "
               f"'{target.posenc.name}')")
    raise TransferError(
        f"the checkpoint's parameters do not fit the model{where}:\n" + "\n".join(problems) +
        "\nOnly position-encoding parameters change with the image size or sequence length; "
        "restore into a model of the same architecture (model, width, depth, heads, patch size, "
        "vocabulary) and the same position encoding.")


def describe(params: dict, new_params: dict, options: TransferOptions) -> list[str]:
  """One line per parameter whose shape the transfer changed: name, old -> new, method."""
  old, new = _flat(params), _flat(new_params)
  return [f"{_name(p)}: {tuple(old[p].shape)} -> {tuple(new[p].shape)} ({options.method}"
          f"{', antialias' if options.antialias and options.method in ('bicubic', 'bilinear') else ''})"
          for p in sorted(old) if p in new and tuple(old[p].shape) != tuple(new[p].shape)]


def jit_transfer(source: nnx.Module, target: nnx.Module, options: TransferOptions = TransferOptions(),
                 *, in_shardings=None, out_shardings=None):
  """``transfer_params`` compiled for these two geometries, placing its output on ``out_shardings``."""

  def fn(params):
    return transfer_params(params, source=source, target=target, options=options)

  return jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings)


def abstract_params(model: nnx.Module) -> dict:
  """``ShapeDtypeStruct``s of ``model``'s parameters (no memory)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), param_dict(model))
