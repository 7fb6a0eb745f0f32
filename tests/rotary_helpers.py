"""What the rotary tests share (test_encodings_rotary.py, test_encodings_rope_variants.py): builders,
q/k, a compiled ``rotate``, and the reference layouts."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import posenc  # noqa: F401  (flax config)
from posenc.encodings import make

H, DH, L = 2, 16, 3  # heads, head dim, layers


def make_rope(**kw):
  return make("rope", dim=H * DH, num_heads=H, **kw)


def make_mixed(seed=0, **kw):
  return make("rope_mixed", dim=H * DH, num_heads=H, num_layers=L, rngs=nnx.Rngs(seed), **kw)


def qk(geometry, seed=0, dtype=jnp.float32, batch=2, dh=DH):
  rng = np.random.default_rng(seed)
  shape = (batch, geometry.num_tokens, H, dh)
  return (jnp.asarray(rng.standard_normal(shape), dtype),
          jnp.asarray(rng.standard_normal(shape), dtype))


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _jit_rotate(graphdef, state, q, k, geometry, layer, positions):
  return nnx.merge(graphdef, state).rotate(q, k, geometry, positions, layer)


def rotate(enc, q, k, geometry, layer, positions=None):
  """``enc.rotate`` compiled once per shape (eager JAX compiles every op separately);
  ``positions`` (default: the geometry's grid) are traced data, as in a model."""
  positions = geometry.positions() if positions is None else jnp.asarray(positions)
  return _jit_rotate(*nnx.split(enc), q, k, geometry, layer, positions)


def xy_positions(geometry):
  """Integer positions [N, ndim] in the (x, y) = (column, row) order, numpy."""
  return np.asarray(geometry.coords())[:, ::-1]


def to_interleaved(x):
  """Our rotate-half layout [.., Dh] -> complex pairs [.., Dh/2] (real, imag)."""
  half = x.shape[-1] // 2
  x = np.asarray(x, np.float64)
  return x[..., :half] + 1j * x[..., half:]


def real_positions(geometry, batch=2, low=-20.0, high=20.0, seed=0):
  """``[batch, N, ndim]`` float32 (row, col) coordinates, uniform in ``[low, high)``."""
  rng = np.random.default_rng(seed)
  return rng.uniform(low, high, size=(batch, geometry.num_positions, geometry.ndim)).astype(np.float32)


def logits(qr, kr):
  return np.asarray(jnp.einsum("bnhd,bmhd->bhnm", qr, kr, precision="highest"))
