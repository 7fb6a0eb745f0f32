"""posenc: position encodings for transformers, in JAX/Flax NNX."""
