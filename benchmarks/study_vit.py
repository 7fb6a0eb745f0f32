"""The image half of the study: which position encoding holds up at grids it was not trained at?

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
import hashlib
import os
import time


@dataclasses.dataclass(frozen=True)
class ImageFamily:
  """The ViT part of the study."""

  name: str                 # "vit"
  config: object            # configs/vit_tiny.py
  overrides: str            # its get_config argument (besides posenc, seed and sizes)
  base: int                 # image side trained at
  sizes: tuple              # image sides evaluated (0.5x .. 2x)
  protocols: tuple          # ("zoom", "canvas")
  finetune_sizes: tuple     # sides fine-tuned at, per protocol
  finetune_steps: int
  finetune_lr_scale: float  # fine-tune peak lr = the config's lr x this
  posenc_lr_mult: float     # on the position parameters while fine-tuning
  encodings: tuple          # labels
  variants: tuple = ()      # (label, overrides): an encoding with options / a training recipe
  finetune_batch: int = 0   # fine-tune batch size (0 = the config's)
  seeds: tuple = ()         # () = the profile's
  eval_variants: tuple = ()  # (label, trained label, eval overrides): evaluated from that run, not trained
  superseded: tuple = ()    # (label, why): cells of an earlier protocol's setting, reported apart

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


def study(family: ImageFamily, seeds, cells, root: str, log, run) -> None:
  """Train each label once per seed; record (protocol[+ft], size) accuracy and loss cells. An
  evaluation variant is scored from its trained label's run (no fine-tuning)."""
  others = tuple(s for s in family.sizes if s != family.base)
  finetune_lr = family.config.get_config(family.overrides).lr * family.finetune_lr_scale
  for trained in [e for e in family.encodings if family.trained_label(e) == e]:
    labels = [e for e in family.encodings if family.trained_label(e) == trained]
    for seed in seeds:
      name = f"{family.name}-{trained}-s{seed}-{hashlib.sha1(family.budget.encode()).hexdigest()[:8]}"
      evals = [(p, s) for p in family.protocols for s in family.sizes]
      tunes = [(f"{p}+ft", s) for p in family.protocols for s in family.finetune_sizes]
      todo = {label: [(mode, s) for mode, s in evals + (tunes if label == trained else [])
                      if (family.name, label, seed, mode, s) not in cells] for label in labels}
      if not any(todo.values()):
        continue
      start = time.time()
      base_dir = os.path.join(root, name, f"train{family.base}")
      trained_metrics = run(family, f"{family.args(trained)},seed={seed},image_size={family.base}", base_dir)
      seconds = time.time() - start

      def add(label, mode, size, metrics, suffix, spent):
        cells.add(dict(family=family.name, budget=family.budget, posenc=label, seed=seed, mode=mode, size=size,
                       accuracy=metrics[f"accuracy{suffix}"], loss=metrics[f"loss{suffix}"], seconds=spent))

      for label in labels:
        for protocol in family.protocols:
          if not any(mode == protocol for mode, _ in todo[label]):
            continue
          began = time.time()
          metrics = run(family, f"{family.eval_args(label)},seed={seed},image_size={family.base},init_from={base_dir},"
                        f"total_steps=0,train_image_sizes=(),eval_image_sizes={others},eval_protocol={protocol},"
                        f"object_size={family.base}", os.path.join(root, name, f"eval-{label}-{protocol}"))
          spent = (time.time() - began) / len(family.sizes)
          for size in family.sizes:
            at_base = size == family.base  # the trained run's own evaluation (position scale 1)
            add(label, protocol, size, trained_metrics if at_base else metrics, "" if at_base else f"_{size}",
                seconds if at_base else spent)
      for mode, size in [(m, s) for m, s in todo[trained] if m.endswith("+ft")]:
        began = time.time()
        steps = family.finetune_steps
        metrics = run(family, f"{family.args(trained)},seed={seed},image_size={size},init_from={base_dir},"
                      f"train_image_sizes=(),eval_protocol={mode[:-3]},object_size={family.base},total_steps={steps},"
                      f"warmup_steps={max(1, steps // 10)},lr={finetune_lr},posenc_lr_mult={family.posenc_lr_mult},"
                      f"checkpoint_every=0,keep_checkpoints=1"
                      + (f",batch_size={family.finetune_batch}" if family.finetune_batch else ""),
                      os.path.join(root, name, f"{mode}{size}"))
        add(trained, mode, size, metrics, "", time.time() - began)
      log(f"{name}: {sum(map(len, todo.values()))} cells in {time.time() - start:.0f}s")
