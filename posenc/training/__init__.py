"""Training: ``setup(config) -> Run``, ``train(run, workdir)``; task-agnostic.

Config validation, mesh/sharding, optimizer, steps, Orbax checkpoints, metrics and
the loop. Nothing here asks which model family or dataset it trains: the config's
task (``posenc.tasks``) says that.
"""
from posenc.config import ConfigError
from posenc.training.config import default_workdir, validate
from posenc.training.guard import Preempted, RunError, StorageError, WorkdirBusy
from posenc.training.loop import NonFiniteLossError, evaluate, train
from posenc.training.run import Run, setup

__all__ = ["ConfigError", "NonFiniteLossError", "Preempted", "Run", "RunError", "StorageError", "WorkdirBusy",
           "default_workdir", "evaluate", "setup", "train", "validate"]
