"""The one transfer seam: a model's parameters moved from one geometry to another.

The seed's protocol (reshape the table to its grid, resample, flatten, then
fine-tune with a lower learning rate on positions) for every encoding: each
encoding class says what its own parameters need (``Encoding.transfer``:
learned grids resample, relative-bias tables resample, fixed encodings pass
through). Geometries are data: the source comes from a checkpoint's metadata,
the target from the config; no model is built to learn either.

Everything is a pure function of arrays with the geometries static, so it runs
under ``jax.jit`` with ``out_shardings`` on a mesh and never leaves the device:

    move = jit_transfer("learned", Geometry.grid(7, 7, 1), Geometry.grid(14, 14, 1),
                        wanted)   # ShapeDtypeStructs (with shardings) of the target's parameters
    new_params = move(params)

Position interpolation is not a parameter change but a scaling of the
positions a model is given (``interpolation_scale``).
"""
from __future__ import annotations

import dataclasses

import jax

from posenc import encodings
from posenc.encodings.base import POSENC_KEY, Geometry
from posenc.resize import METHODS

EXTEND_MODES = ("interpolate", "copy")


class TransferError(ValueError):
  """A parameter tree that the transfer rules cannot map onto the target."""


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


def flat_shapes(tree) -> dict[str, tuple[int, ...]]:
  """``{"a/b/c": shape}`` of arrays, ShapeDtypeStructs or Orbax metadata in a nested dict."""
  tree = getattr(tree, "tree", tree)  # Orbax TreeMetadata wraps the tree
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): tuple(x.shape)
          for path, x in leaves}


def shape_diff(stored: dict, wanted: dict) -> list[str]:
  """One line per difference between two ``flat_shapes`` dicts (empty when they fit)."""
  out = [f"{k}: stored {stored[k]}, wanted {wanted[k]}"
         for k in sorted(stored.keys() & wanted.keys()) if stored[k] != wanted[k]]
  out += [f"{k}: in the checkpoint, not in the model" for k in sorted(stored.keys() - wanted.keys())]
  out += [f"{k}: in the model, not in the checkpoint" for k in sorted(wanted.keys() - stored.keys())]
  return out


def transfer_params(params: dict, posenc: str, source: Geometry, target: Geometry,
                    options: TransferOptions = TransferOptions()) -> dict:
  """``params`` of a model with encoding ``posenc`` built at ``source``, mapped to ``target``.

  Only the encoding's parameters (under ``POSENC_KEY``) change; pure and traceable.
  """
  if POSENC_KEY not in params:
    return params
  moved = encodings.get(posenc).transfer(params[POSENC_KEY], source, target, options)
  return {**params, POSENC_KEY: moved}


def jit_transfer(posenc: str, source: Geometry, target: Geometry, wanted: dict,
                 options: TransferOptions = TransferOptions(), *, in_shardings=None):
  """``transfer_params`` compiled for these geometries; its output has ``wanted``'s shapes and
  shardings (``wanted``: ShapeDtypeStructs, e.g. from ``jax.eval_shape`` with ``.sharding`` set).

  Raises TransferError naming each parameter whose shape no rule maps onto ``wanted``
  (a different patch size, width, depth, encoding, ...).
  """
  shardings = [getattr(x, "sharding", None) for x in jax.tree.leaves(wanted)]
  out_shardings = (None if any(s is None for s in shardings)
                   else jax.tree.unflatten(jax.tree.structure(wanted), shardings))

  def move(params):
    try:
      out = transfer_params(params, posenc, source, target, options)
    except ValueError as e:  # an encoding's own rule refused (e.g. a 1D table onto a 2D grid)
      raise TransferError(str(e)) from None
    problems = shape_diff(flat_shapes(out), flat_shapes(wanted))
    if problems:
      raise TransferError(
          f"the parameters of the {source} model (position encoding '{posenc}') do not fit the "
          f"{target} model:\n  " + "\n  ".join(problems) + "\nOnly position-encoding parameters change "
          "with the image size or sequence length; use the same architecture (model, width, depth, "
          "heads, patch size, vocabulary) and the same position encoding.")
    return out

  return jax.jit(move, in_shardings=in_shardings, out_shardings=out_shardings)


def interpolation_scale(source: Geometry, target: Geometry) -> float:
  """Position interpolation: the factor that maps ``target``'s positions into ``source``'s
  range (the most shrunk axis decides; 1 when ``target`` fits). For continuous encodings."""
  return min(1.0, *(s / t for s, t in zip(source.shape, target.shape)))
