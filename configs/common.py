"""The start of every config: each field of a task at its declared default.

The fields, their defaults, docs and checks are declared once: the ones every run has in
posenc/training/config.py (``COMMON``), each task's own in posenc/tasks/<task>.py (``FIELDS``).
List them with ``python -m posenc.config_fields [TASK]`` (README, Config fields). A config file
starts from ``base(task)`` and sets only what differs, each with a comment.
"""
from __future__ import annotations

import ml_collections

from posenc.config import get_config_with_arg  # noqa: F401  (what config files' get_config use)
from posenc.training.config import defaults


def base(task: str) -> ml_collections.ConfigDict:
  return defaults(task)
