"""The image part of the study: which position encoding holds up at grids it was not trained at?

Per encoding (or variant) and seed, one ViT is trained at the base size (Fashion-MNIST resized to
32 px, patch 4: an 8x8 grid; random-resized-crop + flip), then evaluated on the test split at
grids from 0.5x to 2x under two protocols (``posenc.tasks.image_classification``):
  zoom    the image resampled to the new size: the object grows with the grid (what fine-tuning
          at 384 after 224 does);
  canvas  the image kept at its trained scale on a larger blank canvas at a seeded position, or
          cropped from a smaller one: more positions at the same object scale, the cleanest test
          of position extrapolation;
each as trained (one evaluation run per protocol, ``init_from`` + ``total_steps=0``: parameters
transferred to each grid) and after a short fine-tune at the smallest and largest grid. Evaluation
variants (e.g. RoPE with position interpolation) are scored from another label's run, untrained.
"""
from __future__ import annotations

import dataclasses
import os
import time

from benchmarks.study_family import StudyFamily
from benchmarks.study_stats import diff_text, paired
from benchmarks.study_tables import cell_text, notes, ordering_lines, row_label, seeds_text, summary

PROTOCOLS = {"zoom": "zoom: the image resampled to each size (the object grows with the grid)",
             "canvas": "canvas: the image at its trained scale on a larger canvas / cropped from a smaller one"}
VARIANT_STYLES = {"multires": "--", "dinov3": ":", "cape": ":"}  # image variants' line styles


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageFamily(StudyFamily):
  """A ViT part of the study: modes are evaluation protocols (and ``+ft`` after fine-tuning)."""

  kind = "image"

  sizes: tuple              # image sides evaluated (0.5x .. 2x)
  protocols: tuple          # ("zoom", "canvas")
  finetune_sizes: tuple     # sides fine-tuned at, per protocol
  finetune_steps: int
  finetune_lr_scale: float  # fine-tune peak lr = the config's lr x this
  posenc_lr_mult: float     # on the position parameters while fine-tuning
  variants: tuple = ()      # (label, overrides): an encoding with options / a training recipe
  finetune_batch: int = 0   # fine-tune batch size (0 = the config's)
  eval_variants: tuple = ()  # (label, trained label, eval overrides): evaluated from that run, not trained
  title: tuple = ("ViT on Fashion-MNIST", "test accuracy (%) by image side", "×")

  @property
  def budget(self) -> str:
    """Everything that makes its numbers comparable; recorded with each cell."""
    return (f"{self.overrides};base={self.base},sizes={self.sizes},protocols={self.protocols},"
            f"finetune={self.finetune_sizes}x{self.finetune_steps}x{self.finetune_batch},lr_scale={self.finetune_lr_scale},"
            f"posenc_lr_mult={self.posenc_lr_mult}")

  def trained_label(self, label: str) -> str:
    return next((base for name, base, _ in self.eval_variants if name == label), label)

  def args(self, label: str) -> str:
    """The overrides a label trains with (an evaluation variant: its trained label's)."""
    label = self.trained_label(label)
    return dict(self.variants).get(label, f"posenc={label}")

  def eval_args(self, label: str) -> str:
    extra = next((args for name, _, args in self.eval_variants if name == label), "")
    return f"{self.args(label)},{extra}" if extra else self.args(label)

  def study(self, seeds, cells, root: str, log, run) -> None:
    """Train each label once per seed; record (protocol[+ft], size) accuracy and loss cells. An
    evaluation variant is scored from its trained label's run (no fine-tuning)."""
    others = tuple(s for s in self.sizes if s != self.base)
    finetune_lr = self.config.get_config(self.overrides).lr * self.finetune_lr_scale
    for trained in [e for e in self.encodings if self.trained_label(e) == e]:
      labels = [e for e in self.encodings if self.trained_label(e) == trained]
      for seed in seeds:
        name = self.run_name(trained, seed)
        evals = [(p, s) for p in self.protocols for s in self.sizes]
        tunes = [(f"{p}+ft", s) for p in self.protocols for s in self.finetune_sizes]
        todo = {label: [(mode, s) for mode, s in evals + (tunes if label == trained else [])
                        if (self.name, label, seed, mode, s) not in cells] for label in labels}
        if not any(todo.values()):
          continue
        start = time.time()
        base_dir = os.path.join(root, name, f"train{self.base}")
        trained_metrics = run(self, f"{self.args(trained)},seed={seed},image_size={self.base}", base_dir)
        seconds = time.time() - start

        def add(label, mode, size, metrics, suffix, spent):
          cells.add(dict(family=self.name, budget=self.budget, posenc=label, seed=seed, mode=mode, size=size,
                         accuracy=metrics[f"accuracy{suffix}"], loss=metrics[f"loss{suffix}"], seconds=spent))

        for label in labels:
          for protocol in self.protocols:
            if not any(mode == protocol for mode, _ in todo[label]):
              continue
            began = time.time()
            metrics = run(self, f"{self.eval_args(label)},seed={seed},image_size={self.base},init_from={base_dir},"
                          f"total_steps=0,train_image_sizes=(),eval_image_sizes={others},eval_protocol={protocol},"
                          f"object_size={self.base}", os.path.join(root, name, f"eval-{label}-{protocol}"))
            spent = (time.time() - began) / len(self.sizes)
            for size in self.sizes:
              at_base = size == self.base  # the trained run's own evaluation (position scale 1)
              add(label, protocol, size, trained_metrics if at_base else metrics, "" if at_base else f"_{size}",
                  seconds if at_base else spent)
        for mode, size in [(m, s) for m, s in todo[trained] if m.endswith("+ft")]:
          began = time.time()
          steps = self.finetune_steps
          metrics = run(self, f"{self.args(trained)},seed={seed},image_size={size},init_from={base_dir},"
                        f"train_image_sizes=(),eval_protocol={mode[:-3]},object_size={self.base},total_steps={steps},"
                        f"warmup_steps={max(1, steps // 10)},lr={finetune_lr},posenc_lr_mult={self.posenc_lr_mult},"
                        f"checkpoint_every=0,keep_checkpoints=1"
                        + (f",batch_size={self.finetune_batch}" if self.finetune_batch else ""),
                        os.path.join(root, name, f"{mode}{size}"))
          add(trained, mode, size, metrics, "", time.time() - began)
        log(f"{name}: {sum(map(len, todo.values()))} cells in {time.time() - start:.0f}s")

  def details(self) -> dict:
    variants = {k: f"`{v}`" for k, v in self.variants if k in self.encodings}
    variants.update({label: f"evaluated from the `{base}` run with `{args}`"
                     for label, base, args in self.eval_variants})
    return dict(field="image_size", protocols=list(self.protocols), finetune_sizes=list(self.finetune_sizes),
                finetune_steps=self.finetune_steps, finetune_lr_scale=self.finetune_lr_scale,
                posenc_lr_mult=self.posenc_lr_mult, variants=variants,
                reference="learned" if self.eval_variants else None)

  @classmethod
  def lines(cls, results: dict, f: dict) -> list[str]:
    title, what, cross = f["title"]
    label = lambda s: f"{s}{cross}{s} ({s // 4}×{s // 4} grid)"  # noqa: E731
    lines = [f"## {title}: trained at {f['base']}{cross}{f['base']}, {what}", "",
             f"Seeds recorded: {seeds_text(results, f)}. Config `{f['config_file']}:{f['overrides']}`; "
             + (f"fine-tune: {f['finetune_steps']} steps at {f['finetune_lr_scale']}× the config's peak lr, position "
                f"parameters at {f['posenc_lr_mult']}× that, on the protocol's images at that size."
                if f["finetune_steps"] else "no fine-tuning.")]
    lines += [f"`{name}`: {args}." for name, args in f.get("variants", {}).items()] + [""]
    for protocol in f["protocols"]:
      for mode, sizes, caption in ((protocol, f["sizes"], "no fine-tuning"),
                                   (f"{protocol}+ft", f["finetune_sizes"], "after fine-tuning at that size")):
        if not sizes:
          continue
        lines += [f"### {PROTOCOLS[protocol]}; {caption}: test accuracy (%)", "",
                  "| posenc | " + " | ".join(label(s) + (" (trained)" if s == f["base"] else "") for s in sizes) + " |",
                  "|---|" + "---:|" * len(sizes)]
        for posenc in f["encodings"] + list(f.get("superseded", {})):
          row = [cell_text(*summary(results["cells"], f["name"], posenc, mode, s), 1) for s in sizes]
          lines.append(f"| {row_label(f, posenc)} | " + " | ".join(row) + " |")
        lines.append("")
    lines += notes(results, f)
    if f.get("reference"):
      lines += cls.reference_lines(results, f)
    return lines + ordering_lines(results, f, f["protocols"], "accuracy")


  @staticmethod
  def reference_lines(results: dict, f: dict) -> list[str]:
    """Each label minus the reference (``learned``) at each size, paired by seed: mean [95 % CI] in points."""
    ref, cells = f["reference"], results["cells"]
    lines = []
    for protocol in f["protocols"]:
      lines += [f"### {protocol}: accuracy minus `{ref}`'s, paired by seed (points, mean [95 % CI])", "",
                "| posenc | " + " | ".join(str(s) for s in f["sizes"]) + " |", "|---|" + "---:|" * len(f["sizes"])]
      for label in f["encodings"]:
        if label != ref:
          lines.append(f"| `{label}` | " + " | ".join(
              diff_text(paired(cells, f["name"], ref, label, protocol, s, "accuracy"), "accuracy")
              for s in f["sizes"]) + " |")
      lines.append("")
    return lines

  @classmethod
  def plot_modes(cls, f: dict) -> dict[str, str]:
    return {p: PROTOCOLS[p] for p in f["protocols"]}

  @classmethod
  def plot_rows(cls, f: dict) -> list[list[str]]:
    """Plain encodings in one row; the labelled variants in a second, each beside its base encoding
    (drawn thin, for reference)."""
    if not any("+" in e for e in f["encodings"]):
      return [f["encodings"]]
    variants = [e for e in f["encodings"] if "+" in e]
    bases = [e for e in f["encodings"] if "+" not in e]
    return [bases, [e for e in bases if any(v.split("+")[0] == e for v in variants)] + variants]

  @classmethod
  def line_style(cls, names: list[str], posenc: str, colours: dict, dashes: dict) -> tuple[str, str, bool]:
    """A variant in its base's colour, in the variant's line style; in a row of variants, the bases thin."""
    reference = any("+" in n for n in names) and "+" not in posenc
    return (colours.get(posenc.split("+")[0], colours[posenc]),
            VARIANT_STYLES.get(posenc.partition("+")[2], dashes[posenc]), reference)

  @classmethod
  def title_note(cls, names: list[str]) -> str:
    variants = any("+" in n for n in names)
    return " (stars: after fine-tuning)" + ("\nvariants; thin: their base encoding" if variants else "")

  @classmethod
  def decorate(cls, ax, results: dict, f: dict, mode: str, posenc: str, colour: str) -> None:
    """Fine-tuned points: stars of the line's colour."""
    tuned = [summary(results["cells"], f["name"], posenc, f"{mode}+ft", s) for s in f["finetune_sizes"]]
    ax.plot(f["finetune_sizes"], [m for m, _, _ in tuned], "*", ms=9, color=colour)
