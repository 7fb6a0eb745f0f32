"""Parameters each position encoding adds, measured on the real modules.

    python benchmarks/param_counts.py      # prints the README's comparison table

Counts come from ``nnx.eval_shape`` (no memory, no compute) at ViT-B/16 224px
(14x14 grid, D=768, 12 heads, 12 layers), BERT-base (512 positions) and a video ViT-B
(16 frames of 224px in 2x16x16 tubelets: an 8x14x14 grid).
"""
from __future__ import annotations

import math

import jax
from flax import nnx

from posenc import encodings
from posenc.encodings import Geometry

D, HEADS, LAYERS = 768, 12, 12
GEOMETRIES = {"2D 14x14 (ViT-B/16, 224px)": Geometry.grid(14, 14, num_prefix=1),
              "1D 512 (BERT-base)": Geometry.seq(512),
              "3D 8x14x14 (16 frames, 2x16x16 tubelets)": Geometry.grid3d(8, 14, 14, num_prefix=1)}


def count(name: str, geometry: Geometry) -> int | None:
  """Parameters of encoding ``name`` at ``geometry``; None where it does not apply."""
  build = lambda: encodings.make(name, dim=D, num_heads=HEADS, num_layers=LAYERS, geometry=geometry,
                                 rngs=nnx.Rngs(0))
  try:
    enc = nnx.eval_shape(build)
  except ValueError:
    return None
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(enc, nnx.Param)))


def table() -> str:
  heads = list(GEOMETRIES)
  lines = ["| encoding | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
  for name in encodings.names():
    cells = [count(name, g) for g in GEOMETRIES.values()]
    lines.append(f"| `{name}` | " + " | ".join("—" if c is None else f"{c:,}" for c in cells) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  print(table())
