"""Training: config validation, mesh/sharding, optimizer, steps, checkpoints, metrics, loop."""
from posenc.training.config import ConfigError, default_workdir, validate
from posenc.training.loop import NonFiniteLossError, Trainer, train

__all__ = ["ConfigError", "NonFiniteLossError", "Trainer", "default_workdir", "train", "validate"]
