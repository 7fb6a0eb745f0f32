"""The maths of learned-generator rotations: LieRE, ComRoPE-AP and Cayley-STRING.

All three turn a head's features ``x [..., Dh]`` at a position ``p in R^ndim`` by an orthogonal
matrix ``R(p)``, generalising RoPE's ``R(p) = exp(sum_a p_a G_a)`` with fixed 2x2 generators:

- LieRE (Ostmeier et al. 2024): ``R(p) = expm(sum_a p_a S_a)`` with learned skew-symmetric ``S_a``,
  block-diagonal in blocks of ``block`` features (the paper's efficient form). The ``S_a`` need not
  commute, so in 2D and 3D ``q.k`` is not a function of the offset alone (in 1D it is).
- ComRoPE-AP (Yu et al. 2025, "axis partition"): as LieRE, but inside each block the generator of
  axis ``a`` touches only the features assigned to ``a``; generators on disjoint features commute,
  so ``R(p)^T R(p') = R(p' - p)`` and ``q.k`` depends on the offset only.
- Cayley-STRING (Schenck et al. 2025): ``R(p) = P RoPE(p) P^T`` with ``P = (I - S)(I + S)^-1``
  (Cayley) for a learned skew-symmetric ``S``: every family of commuting generators has this form.
  In ``q.k`` the outer ``P`` cancels, so the encoding applies ``RoPE(p) P^T`` (and ``P^T`` could be
  folded into ``W_q`` and ``W_k``).

Feature layout. posenc's RoPE pairs feature ``i`` with ``i + Dh/2`` (rotate-half); the 2D axial
layout gives the first ``Dh/4`` pairs to x and the rest to y (``rotation.axial_frequencies``). Blocks
are taken in *pair order*: features ``(i, i + Dh/2)`` become neighbours ``(2j, 2j + 1)``, and the
pairs of the ``ndim`` axes are interleaved (x0, y0, x1, y1, ...), so every block holds whole pairs
of every axis. With ``rope_generators`` as the initial ``S_a``, each form equals RoPE-Axial (RoFormer
in 1D) up to rounding.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST  # float32 products on accelerators too (no TF32 / bf16 passes)


def pair_order(head_dim: int, ndim: int) -> np.ndarray:
  """The permutation ``perm`` with ``x[..., perm]`` in pair order (see the module docstring)."""
  half = head_dim // 2
  per_axis = half // ndim
  pairs = np.arange(half).reshape(ndim, per_axis).T.reshape(-1)  # interleave the axes' pairs
  return np.stack([pairs, pairs + half], axis=-1).reshape(-1)


def pair_axes(head_dim: int, ndim: int) -> np.ndarray:
  """The axis each feature turns with in pair order, ``[Dh]``."""
  return np.repeat(np.tile(np.arange(ndim), head_dim // 2 // ndim), 2)


def rope_generators(frequencies: np.ndarray, block: int) -> np.ndarray:
  """RoPE's generators in pair order, ``[ndim, H, Dh/block, block, block]``, from frequencies
  ``[ndim, H, Dh/2]`` in rotary's layout (``rotation.axial_frequencies``: pair ``i`` of axis ``a``
  turns by ``p_a * freq[a, h, i]``)."""
  ndim, heads, half = frequencies.shape
  head_dim = 2 * half
  gens = np.zeros((ndim, heads, head_dim, head_dim), np.float64)
  order = pair_order(head_dim, ndim)[0::2]  # the rotary pair index at each pair-order slot
  for slot, i in enumerate(order):
    gens[:, :, 2 * slot + 1, 2 * slot] = frequencies[:, :, i]   # d(x2)/dt = +w x1
    gens[:, :, 2 * slot, 2 * slot + 1] = -frequencies[:, :, i]  # d(x1)/dt = -w x2
  return blocks(gens, block)


def blocks(matrix: np.ndarray | jax.Array, block: int):
  """The diagonal blocks ``[..., D/block, block, block]`` of ``[..., D, D]``."""
  d = matrix.shape[-1]
  idx = np.arange(d).reshape(d // block, block)
  return matrix[..., idx[:, :, None], idx[:, None, :]]


def skew(raw: jax.Array) -> jax.Array:
  """The skew-symmetric matrix of ``raw``'s strict upper triangle (LieRE's parametrisation)."""
  upper = jnp.triu(raw, k=1)
  return upper - jnp.swapaxes(upper, -1, -2)


def axis_partition_mask(head_dim: int, ndim: int, block: int) -> np.ndarray:
  """ComRoPE-AP: ``[ndim, 1, Dh/block, block, block]``, 1 where both features turn with that axis."""
  axes = blocks(np.broadcast_to(pair_axes(head_dim, ndim), (head_dim, head_dim)), block)[..., 0, :]
  same = (axes[:, :, None] == axes[:, None, :])
  return np.stack([same & (axes[:, :, None] == a) for a in range(ndim)])[:, None].astype(np.float32)


def generator_rotations(generators: jax.Array, positions: jax.Array) -> jax.Array:
  """``expm(sum_a p_a S_a)``: generators ``[ndim, H, nb, b, b]`` (skew-symmetric), positions
  ``[B, N, ndim]`` -> rotations ``[B, N, H, nb, b, b]`` in float32.

  Batched 1D positions that are integers in ``[0, N)`` (rows of packed documents, whose positions
  restart) take the rotations of ``0..N-1`` once and gather them per token: the same matrices, for
  ``1/B`` of the matrix exponentials. Other positions (scaled, past ``N``) compute each token's."""
  if positions.shape[0] == 1 or positions.shape[-1] != 1:
    return _rotations(generators, positions)
  n = positions.shape[1]
  index = jnp.clip(positions[..., 0], 0, n - 1).astype(jnp.int32)
  on_table = jnp.all(index == positions[..., 0])

  def from_table():
    table = _rotations(generators, jnp.arange(n, dtype=jnp.float32)[None, :, None])[0]
    return jnp.take(table, index, axis=0)

  return jax.lax.cond(on_table, from_table, lambda: _rotations(generators, positions))


def _rotations(generators: jax.Array, positions: jax.Array) -> jax.Array:
  gen = jnp.einsum("bna,ahkij->bnhkij", positions.astype(jnp.float32), generators.astype(jnp.float32),
                   precision=HIGHEST)
  return expm(gen)


MAX_SQUARINGS = 24  # scaling and squaring reaches generator norms up to 0.5 * 2**24


def expm(a: jax.Array, order: int = 10) -> jax.Array:
  """``exp(a)`` of ``[..., b, b]`` matrices: scaled by 2**-s to a 1-norm <= 1/2 (s per matrix),
  Taylor to ``order``, squared s times. A fixed loop (where s is exceeded, the matrix stays), so
  reverse-mode differentiates it. Unlike ``jax.scipy.linalg.expm``'s float32 Pade choice, its error
  stays near float32 rounding of the angle for rotations by tens to thousands of radians (RoPE's
  angles at long positions); tests/test_learned_rotations.py checks both."""
  norm = jnp.max(jnp.sum(jnp.abs(a), axis=-1), axis=-1)
  squarings = jnp.clip(jnp.ceil(jnp.log2(jnp.maximum(norm, 1e-30) / 0.5)), 0, MAX_SQUARINGS)
  a = a * (2.0 ** -squarings)[..., None, None]
  eye = jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=a.dtype), a.shape)
  out, term = eye, eye
  for i in range(1, order + 1):
    term = jnp.matmul(term, a, precision=HIGHEST) / i
    out = out + term

  def square(i, r):
    return jnp.where((i < squarings)[..., None, None], jnp.matmul(r, r, precision=HIGHEST), r)

  return jax.lax.fori_loop(0, MAX_SQUARINGS, square, out)


def apply_block_rotations(x: jax.Array, rotations: jax.Array, order: np.ndarray) -> jax.Array:
  """``x [B, N, H, Dh]`` turned by block rotations ``[B or 1, N, H, nb, b, b]`` that act in pair
  order ``order``; returned in ``x``'s layout and dtype. One set of rotations for the whole batch is
  one matmul per (token, head, block) over the batch, never broadcast into B * N * H * nb matvecs."""
  *lead, head_dim = x.shape
  nb, b = rotations.shape[-3], rotations.shape[-1]
  y = x.astype(jnp.float32)[..., order].reshape(*lead, nb, b)
  if rotations.shape[0] == 1:
    y = jnp.einsum("nhkij,bnhkj->bnhki", rotations[0], y, precision=HIGHEST)
  else:
    y = jnp.einsum("bnhkij,bnhkj->bnhki", rotations, y, precision=HIGHEST)
  y = y.reshape(*lead, head_dim)
  return y[..., np.argsort(order)].astype(x.dtype)


@jax.custom_vjp
def cayley(s: jax.Array) -> jax.Array:
  """``(I - S)(I + S)^-1 = 2 (I + S)^-1 - I`` for skew-symmetric ``S [..., D, D]``: orthogonal, the
  identity at 0. The inverse is a Gauss-Jordan loop, not LAPACK: jaxlib's batched CPU LU fans out
  into the intra-op thread pool from inside it, and a few concurrent ones deadlock a 2-core host."""
  return _cayley_fwd(s)[0]


def _cayley_fwd(s):
  inv = unpivoted_inverse(jnp.eye(s.shape[-1], dtype=jnp.float32) + s.astype(jnp.float32))
  return (2.0 * inv - jnp.eye(s.shape[-1], dtype=jnp.float32)).astype(s.dtype), inv


def _cayley_bwd(inv, g):
  """``dP = -2 A^-1 dS A^-1`` with ``A = I + S``, so ``dL/dS = -2 A^-T G A^-T``."""
  inv_t = jnp.swapaxes(inv, -1, -2)
  return (-2.0 * jnp.matmul(jnp.matmul(inv_t, g.astype(jnp.float32), precision=HIGHEST), inv_t,
                            precision=HIGHEST).astype(g.dtype),)


cayley.defvjp(_cayley_fwd, _cayley_bwd)


def unpivoted_inverse(a: jax.Array) -> jax.Array:
  """Inverse of ``[..., n, n]`` matrices whose symmetric part is >= I (``I + S``, S skew), by
  Gauss-Jordan without pivoting. Every Schur complement of such a matrix again has symmetric part
  >= I, so every pivot is >= 1: no pivoting is needed and none can vanish."""
  n = a.shape[-1]
  eye = jnp.broadcast_to(jnp.eye(n, dtype=a.dtype), a.shape)

  def eliminate(k, m):
    row = jax.lax.dynamic_index_in_dim(m, k, axis=-2, keepdims=False)  # [..., 2n]
    row = row / jax.lax.dynamic_index_in_dim(row, k, axis=-1)
    col = jax.lax.dynamic_index_in_dim(m, k, axis=-1) - jax.nn.one_hot(k, n, dtype=m.dtype)[:, None]
    return m - col * row[..., None, :]  # row k becomes the scaled pivot row; the others lose column k

  return jax.lax.fori_loop(0, n, eliminate, jnp.concatenate([a, eye], axis=-1))[..., n:]
