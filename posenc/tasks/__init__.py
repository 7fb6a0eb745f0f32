"""Tasks: everything that differs between model families, one module per task.

A task owns its config fields and their validation, ``geometry(config, size)``
(a pure function: no model is built), model construction, the input pipeline,
forward / loss / metrics, and which other geometries it evaluates at.
``posenc.training`` calls these and never asks which task it runs; a new family
is one module here plus one config. Tasks: image_classification (ViT),
masked_lm (BERT), causal_lm (GPT), algorithmic (GPT on copy / reverse / addition / lookup),
video_motion (a video ViT on moving-object clips).

    task = posenc.tasks.get(config.task)
    geometry = task.geometry(config)            # Geometry.grid(4, 4, num_prefix=1), ...
"""
from __future__ import annotations

from posenc.config import did_you_mean
from posenc.tasks.algorithmic import Algorithmic
from posenc.tasks.base import Task
from posenc.tasks.causal_lm import CausalLM
from posenc.tasks.image_classification import ImageClassification
from posenc.tasks.masked_lm import MaskedLM
from posenc.tasks.video_motion import VideoMotion

TASKS: dict[str, Task] = {t.name: t for t in (ImageClassification(), MaskedLM(), CausalLM(), Algorithmic(),
                                          VideoMotion())}


def names() -> list[str]:
  return sorted(TASKS)


def get(name) -> Task:
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}{did_you_mean(name, names())}; choose one of: {', '.join(names())}.")
  return TASKS[name]


__all__ = ["TASKS", "Task", "get", "names"]
