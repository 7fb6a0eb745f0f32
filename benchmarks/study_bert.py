"""The BERT part of the study: which position encoding holds up at sequence lengths it was not trained at?

Per encoding (or variant) and seed, one BERT-style encoder is trained on masked language modelling
at the base length (configs/bert_small.py), then evaluated on the test split at every length
  (a) as trained: the checkpoint restored at the new length (``init_from`` with ``total_steps=0``),
      position parameters moved by posenc.transfer (learned 1D tables: cut or interpolated);
  (b) after a short fine-tune there (``init_from``, a lower learning rate, and ``posenc_lr_mult``
      on the position parameters; at the base length this is the control: the same extra steps
      without any change of length).
"""
from __future__ import annotations

import dataclasses
import os
import time

from benchmarks.study_family import StudyFamily
from benchmarks.study_tables import cell_text, seeds_text, summary

MODES = {"transfer": "(a) no fine-tuning: the trained model, position parameters transferred",
         "finetune": "(b) after a short fine-tune at each geometry"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertFamily(StudyFamily):
  """The BERT part of the study: modes are (a) ``transfer`` and (b) ``finetune``."""

  kind = "accuracy"

  field: str                # the geometry field: max_len
  sizes: tuple              # geometries evaluated
  finetune_steps: int
  finetune_lr_scale: float  # fine-tune peak lr = the config's lr x this
  posenc_lr_mult: float     # on the position parameters while fine-tuning
  variants: tuple = ()      # (label, overrides): an encoding with options, studied under its own label
  title: tuple = ("BERT-style encoder, masked language modelling", "test MLM accuracy (%) by sequence length", "")

  @property
  def budget(self) -> str:
    """Everything that makes its numbers comparable; recorded with each cell."""
    return (f"{self.overrides};finetune_steps={self.finetune_steps},lr_scale={self.finetune_lr_scale},"
            f"posenc_lr_mult={self.posenc_lr_mult}")

  def study(self, seeds, cells, root: str, log, run) -> None:
    """Train each encoding once per seed at the base length; record each length's accuracy and loss, as
    trained (a) and after a short fine-tune there (b)."""
    steps = self.finetune_steps
    finetune_lr = self.config.get_config(self.overrides).lr * self.finetune_lr_scale
    for posenc in self.encodings:
      for seed in seeds:
        name = self.run_name(posenc, seed)
        base_dir = os.path.join(root, name, f"train{self.base}")
        todo = [(mode, size) for mode in ("transfer", "finetune") for size in self.sizes
                if (self.name, posenc, seed, mode, size) not in cells]
        if not todo:
          continue
        start = time.time()
        posenc_args = dict(self.variants).get(posenc, f"posenc={posenc}")
        trained = run(self, f"{posenc_args},seed={seed},{self.field}={self.base}", base_dir)
        train_seconds = time.time() - start
        for mode, size in todo:
          began = time.time()
          if mode == "transfer" and size == self.base:
            metrics = trained  # the trained run's own final test evaluation
          elif mode == "transfer":
            metrics = run(self, f"{posenc_args},seed={seed},{self.field}={size},init_from={base_dir},"
                          f"total_steps=0", os.path.join(root, name, f"eval{size}"))
          else:
            metrics = run(self, f"{posenc_args},seed={seed},{self.field}={size},init_from={base_dir},"
                          f"total_steps={steps},warmup_steps={max(1, steps // 10)},"
                          f"lr={finetune_lr},posenc_lr_mult={self.posenc_lr_mult},"
                          f"checkpoint_every=0,keep_checkpoints=1", os.path.join(root, name, f"finetune{size}"))
          cells.add(dict(family=self.name, budget=self.budget, posenc=posenc, seed=seed, mode=mode, size=size,
                         accuracy=metrics["accuracy"], loss=metrics["loss"],
                         seconds=train_seconds if metrics is trained else time.time() - began))
        log(f"{name}: {len(todo)} cells in {time.time() - start:.0f}s")

  def details(self) -> dict:
    return dict(field=self.field, finetune_steps=self.finetune_steps, finetune_lr_scale=self.finetune_lr_scale,
                posenc_lr_mult=self.posenc_lr_mult, variants=dict(self.variants))

  @classmethod
  def lines(cls, results: dict, f: dict) -> list[str]:
    title, what, cross = f["title"]
    sizes = f["sizes"]
    label = lambda s: f"{s}{cross}{s}" if cross else str(s)  # noqa: E731
    lines = [f"## {title}: trained at {label(f['base'])}, {what}", "",
             f"Seeds recorded: {seeds_text(results, f)}. Config `{f['config_file']}:{f['overrides']}`; "
             f"fine-tune: {f['finetune_steps']} steps at {f['finetune_lr_scale']}× the config's peak lr, "
             f"position parameters at {f['posenc_lr_mult']}× that."]
    lines += [f"`{label}` is `{args}`." for label, args in f.get("variants", {}).items()] + [""]
    tables = [(mode, caption, "accuracy", 1) for mode, caption in MODES.items()]
    tables.append(("transfer", "(a) no fine-tuning, test loss (cross-entropy, nats)", "loss", 3))
    for mode, caption, metric, digits in tables:
      lines += [f"### {caption}", "",
                "| posenc | " + " | ".join(label(s) + (" (trained)" if s == f["base"] else "") for s in sizes) + " |",
                "|---|" + "---:|" * len(sizes)]
      for posenc in f["encodings"]:
        cells = [cell_text(*summary(results["cells"], f["name"], posenc, mode, s, metric), digits) for s in sizes]
        lines.append(f"| `{posenc}` | " + " | ".join(cells) + " |")
      lines.append("")
    return lines

  @classmethod
  def plot_modes(cls, f: dict) -> dict[str, str]:
    return MODES
