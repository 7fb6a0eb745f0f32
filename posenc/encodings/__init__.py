"""Position encodings: one NNX module per kind, one registry.

    enc = posenc.encodings.make("rope_mixed", dim=192, num_heads=3, num_layers=12,
                                geometry=Geometry.grid(7, 7, num_prefix=1), rngs=nnx.Rngs(0))
    x = enc.embed(x, geometry, geometry.positions())   # positions are data: [B or 1, N, ndim]

Every other keyword of ``make`` is one of the encoding's declared options (``options(name, **kw)``,
``posenc.encodings.options``).
"""
from posenc.encodings.base import POSENC_KEY, Encoding, Geometry, as_hw, check_positions
from posenc.encodings.options import Options
from posenc.encodings.registry import CONTEXT_KEYS, get, make, names, options, options_table, register

# Importing the family modules registers their encodings.
from posenc.encodings import (absolute, conditional, content, functional_bias, learned_rotary,  # noqa: E402,F401
                              mrope, relative, rotary)

__all__ = ["CONTEXT_KEYS", "POSENC_KEY", "Encoding", "Geometry", "Options", "as_hw", "check_positions", "get",
           "make", "names", "options", "options_table", "register"]
