"""The protocol every part of the study implements: ``StudyFamily``.

A family trains its models (``study``), says what makes its numbers comparable (``budget``),
describes itself to the report (``describe``: a JSON-able dict), and renders its tables and plot
panels from that description (``lines``, ``plot_modes``, ...). ``study.py`` and
``study_report.py`` only call these methods; a subclass with a ``kind`` registers itself in
``KINDS``, through which a description finds its renderer. Adding a family means one subclass.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import ClassVar

KINDS: dict[str, type[StudyFamily]] = {}


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudyFamily:
  """One part of the study: its runs, its record and its report. A subclass sets ``kind``,
  ``metric`` and ``ylabel``, and has ``sizes`` (the evaluated sizes, a field or a property)."""

  kind: ClassVar[str] = ""           # the key of KINDS, recorded in the description
  metric: ClassVar[str] = "accuracy"  # the plotted metric
  ylabel: ClassVar[str] = "accuracy (%)"

  name: str                 # the family's name: a key of every cell it records
  config: object            # the configs/ module
  overrides: str            # its get_config argument (besides posenc, seed and geometry)
  base: int                 # the size the models are trained at
  encodings: tuple          # labels
  seeds: tuple = ()         # () = the profile's
  failed: tuple = ()        # labels whose training failed (reported, never ranked)
  superseded: tuple = ()    # (label, why): cells of an earlier protocol's setting, reported apart
  title: tuple = ()         # (heading, what the tables show, the sign between an image's sides or "")

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if cls.kind:
      KINDS[cls.kind] = cls

  # --------------------------------------------------------------------------- running

  @property
  def budget(self) -> str:
    """Everything that makes its numbers comparable; recorded with each cell."""
    raise NotImplementedError

  def study(self, seeds, cells, root: str, log, run) -> None:
    """Train and evaluate what ``cells`` lacks; ``run(family, overrides, workdir)`` trains one run."""
    raise NotImplementedError

  def run_name(self, label: str, seed: int) -> str:
    """The directory of ``label``'s runs at ``seed`` (the budget's hash keeps settings apart)."""
    return f"{self.name}-{label}-s{seed}-{hashlib.sha1(self.budget.encode()).hexdigest()[:8]}"

  def baselines(self) -> dict | None:
    """Numbers the report shows beside the cells (none by default)."""
    return None

  # --------------------------------------------------------------------------- reporting

  def describe(self) -> dict:
    """What the report needs to know of this family (JSON-able)."""
    return dict(name=self.name, kind=self.kind, title=list(self.title), config_file=self.config_file,
                overrides=self.overrides, base=self.base, sizes=list(self.sizes), encodings=list(self.encodings),
                failed=list(self.failed), superseded=dict(self.superseded), **self.details())

  @property
  def config_file(self) -> str:
    return self.config.__name__.replace(".", "/") + ".py"

  def details(self) -> dict:
    """The description's family-specific part."""
    return {}

  @classmethod
  def lines(cls, results: dict, f: dict) -> list[str]:
    """The markdown of description ``f`` with ``results``' cells."""
    raise NotImplementedError

  @classmethod
  def plot_modes(cls, f: dict) -> dict[str, str]:
    """A plot row's panels, one per mode: {mode: caption} (text before a colon titles the panel)."""
    raise NotImplementedError

  @classmethod
  def plot_rows(cls, f: dict) -> list[list[str]]:
    """The encodings drawn in each row of panels."""
    return [f["encodings"]]

  @classmethod
  def line_style(cls, names: list[str], posenc: str, colours: dict, dashes: dict) -> tuple[str, str, bool]:
    """(colour, line style, drawn thin for reference) of ``posenc``'s line in a row of ``names``."""
    return colours[posenc], dashes[posenc], False

  @classmethod
  def title_note(cls, names: list[str]) -> str:
    """Added to a panel's title."""
    return ""

  @classmethod
  def decorate(cls, ax, results: dict, f: dict, mode: str, posenc: str, colour: str) -> None:
    """Draws more of ``posenc``'s results on a panel (nothing by default)."""

  @classmethod
  def decorate_panel(cls, ax, results: dict, f: dict) -> None:
    """Draws references on a panel (nothing by default)."""
