"""Resolution transfer inside a run: from a stored run's config to this run's geometry.

A checkpoint stores its run's config (``meta``), which says the model it was
made by; the target config says the model wanted. Both are built abstractly
(``nnx.eval_shape``: no memory, no compute) and ``posenc.transfer`` maps the
parameters under ``jax.jit`` with the target shardings as ``out_shardings``.
"""
from __future__ import annotations

import functools

import jax
import ml_collections
from flax import nnx

from posenc import encodings, transfer
from posenc.training.config import ConfigError
from posenc.training.state import model_factory


def options(config) -> transfer.TransferOptions:
  """The config's ``transfer`` fields as TransferOptions (a clear error if invalid)."""
  t = config.transfer
  try:
    return transfer.TransferOptions(method=t.method, antialias=bool(t.antialias), extend=t.extend)
  except ValueError as e:
    raise ConfigError(f"config field 'transfer': {e}") from None


def as_config(config) -> ml_collections.ConfigDict:
  return config if isinstance(config, ml_collections.ConfigDict) else ml_collections.ConfigDict(config)


def abstract_model(config, info, image_size=None) -> nnx.Module:
  return nnx.eval_shape(model_factory(as_config(config), info, image_size=image_size))


def interpolated(config, source_config, info) -> ml_collections.ConfigDict:
  """``config`` with its encoding's position-interpolation options for ``source_config``'s
  geometry merged in (``transfer.interpolate_positions``; e.g. RoPE's ``scale``)."""
  if not config.transfer.interpolate_positions:
    return config
  source = abstract_model(source_config, info).geometry
  target = abstract_model(config, info).geometry
  extra = encodings.get(config.posenc).interpolation_options(source, target)
  config = as_config(config.to_dict())
  config.posenc_options.update(extra)
  return config


def make_transfer(source_config, target_config, info, opts: transfer.TransferOptions,
                  out_shardings=None):
  """A jitted ``params -> params`` from the model ``source_config`` describes to the one of
  ``target_config``, placing its output on ``out_shardings``. Build once, call often."""
  source = abstract_model(source_config, info)
  target = abstract_model(target_config, info)
  run = jax.jit(functools.partial(transfer.transfer_params, source=source, target=target,
                                  options=opts), out_shardings=out_shardings)

  def fn(params):
    try:
      return run(params)
    except transfer.TransferError as e:
      raise ConfigError(f"config field 'init_from': {e}") from None

  return fn
