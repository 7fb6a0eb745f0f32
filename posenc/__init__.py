"""posenc: position encodings for transformers, in JAX/Flax NNX.

Import-time side effects (the only ones in the package):
  * ``flax_always_shard_variable`` is set False: parameters carry logical axis names
    (``nnx.Param(..., out_sharding=names)``) that ``posenc.training.sharding`` maps onto a
    mesh; Flax must not try to place them when they are created.
Run-time ones, on first use: ``posenc.data`` turns TFDS's GCS look-ups off when it first
builds a dataset (no machine here reaches GCS), and ``posenc.training.checkpoint``
registers an Orbax array handler (``MIN_REPLICA_SLICE_BYTES``) when it first opens a
checkpoint.
"""
import flax

flax.config.update("flax_always_shard_variable", False)
