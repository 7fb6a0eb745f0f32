"""cpe (conditional position encoding): a depthwise 3x3 convolution after chosen blocks, checked
against torch's conv2d and its autograd, with translation equivariance away from the borders."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="no torch (pip install -e .[test])")

from conftest import BIAS_DIM as C, GRID, build_bias as build, randomize  # noqa: E402
from posenc.encodings import Geometry  # noqa: E402


@nnx.jit(static_argnums=(2, 3))
def _peg(enc, x, geometry, layer, positions):
  return enc.after_block(x, geometry, positions, layer)


def peg_of(enc, x, geometry, layer=0):
  return _peg(enc, x, geometry, layer, geometry.positions())


def grid_input(geometry, seed=0, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(2, geometry.num_tokens, C)), dtype)


def test_cpe_matches_torch_depthwise_conv():
  enc = randomize(build("cpe"))
  geometry = Geometry.grid(5, 6, num_prefix=2)
  x = grid_input(geometry)
  out = np.asarray(peg_of(enc, x, geometry))
  np.testing.assert_array_equal(out[:, :2], np.asarray(x)[:, :2])  # prefix passes through
  grid = torch.from_numpy(np.array(x)[:, 2:].reshape(2, 5, 6, C)).permute(0, 3, 1, 2)
  kernel = torch.from_numpy(np.asarray(enc.kernel[...]).transpose(3, 2, 0, 1).copy())
  bias = torch.from_numpy(np.array(enc.bias[...]))
  conv = torch.nn.functional.conv2d(grid, kernel, bias, padding=1, groups=C)
  expected = (grid + conv).permute(0, 2, 3, 1).reshape(2, 30, C).numpy()
  np.testing.assert_allclose(out[:, 2:], expected, rtol=1e-5, atol=1e-5)


def test_cpe_depthwise_conv_gradients_match_torch_autograd():
  from posenc.encodings.conditional import depthwise_conv3x3  # hand-written backward
  rng = np.random.default_rng(3)
  grid, kernel, cot = rng.normal(size=(2, 5, 6, C)), rng.normal(size=(3, 3, C)), rng.normal(size=(2, 5, 6, C))
  loss = lambda g, k: jnp.sum(jnp.sin(depthwise_conv3x3(g, k)) * cot)
  d_grid, d_kernel = jax.grad(loss, (0, 1))(jnp.asarray(grid, jnp.float32), jnp.asarray(kernel, jnp.float32))
  tg = torch.tensor(grid.transpose(0, 3, 1, 2), requires_grad=True)
  tk = torch.tensor(kernel.transpose(2, 0, 1)[:, None], requires_grad=True)
  out = torch.nn.functional.conv2d(tg, tk, padding=1, groups=C)
  (torch.sin(out) * torch.tensor(cot.transpose(0, 3, 1, 2))).sum().backward()
  np.testing.assert_allclose(d_grid, tg.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(d_kernel, tk.grad.numpy()[:, 0].transpose(1, 2, 0), rtol=1e-4, atol=1e-4)


def test_cpe_translation_equivariant_away_from_borders():
  enc = randomize(build("cpe"))
  geometry, (h, w), (sy, sx) = Geometry.grid(7, 8), (7, 8), (1, 2)
  x = grid_input(geometry)
  shifted = jnp.roll(x.reshape(2, h, w, C), (sy, sx), axis=(1, 2)).reshape(x.shape)
  out = np.asarray(peg_of(enc, x, geometry)).reshape(2, h, w, C)
  out_shifted = np.asarray(peg_of(enc, shifted, geometry)).reshape(2, h, w, C)
  # Interior of the shifted grid whose 3x3 windows touch neither border nor wrap.
  np.testing.assert_allclose(out_shifted[:, sy + 1:h - 1, sx + 1:w - 1],
                             out[:, 1:h - 1 - sy, 1:w - 1 - sx], rtol=1e-6, atol=1e-6)
  # At the border the zero padding breaks equivariance: that is where position enters.
  assert not np.allclose(out_shifted[:, sy:sy + 1, sx:], out[:, :1, :w - sx], atol=1e-3)


@pytest.mark.parametrize("layers", [(0,), (0, 2)])
def test_cpe_acts_only_in_chosen_layers(layers):
  enc = randomize(build("cpe", layers=layers))
  x = grid_input(GRID)
  peg = lambda v: peg_of(enc, v, GRID)  # noqa: E731
  for layer in range(3):  # Python ints
    got = peg_of(enc, x, GRID, layer)
    np.testing.assert_array_equal(got, peg(x) if layer in layers else x)
  traced = nnx.jit(lambda e, v, layer: e.after_block(v, GRID, GRID.positions(), layer))
  for layer in range(3):  # traced scalar under jit
    np.testing.assert_allclose(traced(enc, x, jnp.int32(layer)),
                               peg(x) if layer in layers else x, rtol=1e-6, atol=1e-6)

  @nnx.jit
  def scanned(e, v):  # blocks under scan: the layer is a traced loop index
    step = lambda carry, layer: (e.after_block(carry, GRID, GRID.positions(), layer), None)  # noqa: E731
    return jax.lax.scan(step, v, jnp.arange(3))[0]

  expected = x
  for layer in range(3):
    expected = peg_of(enc, expected, GRID, layer)
  assert not np.allclose(expected, x)
  np.testing.assert_allclose(scanned(enc, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpe_jit_dtypes_and_gradients(dtype):
  enc = randomize(build("cpe", param_dtype=dtype))
  reference = randomize(build("cpe"))
  # bfloat16 rounds the input, the parameters and the output to 8 bits of mantissa; float32 only sums
  # the 3x3 taps in another order than the reference.
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=5e-2, atol=1e-1)
  for geometry in [GRID, Geometry.grid(9, 7, num_prefix=0)]:
    x = grid_input(geometry).astype(dtype)

    def loss(e, v):
      out = e.after_block(v, geometry, geometry.positions(), jnp.int32(0))
      return jnp.sum(out.astype(jnp.float32) ** 2), out

    (grads, dx), out = nnx.jit(nnx.grad(loss, argnums=(0, 1), has_aux=True))(enc, x)
    assert out.dtype == dtype and out.shape == x.shape
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               peg_of(reference, x.astype(jnp.float32), geometry), **tol)
    assert dx.dtype == dtype
    for g in [*jax.tree.leaves(grads), dx]:
      g = np.asarray(g, np.float32)
      assert np.isfinite(g).all() and np.abs(g).sum() > 0
