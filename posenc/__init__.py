"""posenc: position encodings for transformers, in JAX/Flax NNX."""
import flax

# Parameters carry logical axis names (nnx.Param(..., out_sharding=names)); they are
# placed on a mesh by the training code, not at creation time.
flax.config.update("flax_always_shard_variable", False)
