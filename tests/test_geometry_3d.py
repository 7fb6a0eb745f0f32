"""3D geometries (posenc/geometry.py): a (t, h, w) grid of tokens, row-major, with prefix tokens as in 2D."""
from __future__ import annotations

import numpy as np
import pytest

import posenc  # noqa: F401  (flax config)
from posenc import encodings
from posenc.encodings import Geometry, check_positions


def test_grid3d_shape_counts_and_round_trip():
  g = Geometry.grid3d(2, 3, 4, num_prefix=1)
  assert g == Geometry((2, 3, 4), 1) and g.ndim == 3
  assert (g.num_positions, g.num_tokens) == (24, 25)
  assert str(g) == "3D 2x3x4 (+1 prefix)"
  assert Geometry.from_dict(g.to_dict()) == g
  assert hash(g) == hash(Geometry.grid3d(2, 3, 4, 1))  # a static jit argument


def test_coords_are_row_major_t_h_w():
  g = Geometry.grid3d(2, 3, 4)
  coords = np.asarray(g.coords())
  expected = np.stack(np.meshgrid(np.arange(2), np.arange(3), np.arange(4), indexing="ij"), -1).reshape(-1, 3)
  np.testing.assert_array_equal(coords, expected)
  # Token n sits at t = n // (h w), row = (n // w) % h, col = n % w.
  n = np.arange(24)
  np.testing.assert_array_equal(coords, np.stack([n // 12, (n // 4) % 3, n % 4], -1))
  positions = g.positions()
  assert positions.shape == (1, 24, 3) and positions.dtype == np.int32


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 0, 3), ()])
def test_bad_shapes_are_one_clear_error(shape):
  with pytest.raises(ValueError, match=r"shape \(L,\), \(h, w\) or \(t, h, w\) of positive sizes"):
    Geometry(shape)


def test_check_positions_names_the_3d_form():
  g = Geometry.grid3d(2, 2, 3, num_prefix=1)
  assert check_positions(g.positions(), g).shape == (1, 12, 3)
  with pytest.raises(ValueError, match=r"positions must be \[B, t\*h\*w, 3\] with 12 positions for 3D 2x2x3 "
                                       r"\(\+1 prefix\); got shape \(1, 12, 2\)"):
    check_positions(np.zeros((1, 12, 2), np.int32), g)


def test_a_2d_only_encoding_refuses_a_3d_geometry_by_name():
  with pytest.raises(ValueError, match=r"'sincos2d' supports 2D inputs, not 3D 2x2x2; choose an encoding "
                                       r"that supports 3D"):
    encodings.make("sincos2d", dim=16, geometry=Geometry.grid3d(2, 2, 2))


def test_the_encodings_that_take_3d_grids():
  assert encodings.names(ndim=3) == ["comrope", "learned", "liere", "mrope", "none", "sincos3d", "string"]
