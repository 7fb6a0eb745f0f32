"""Image classification with a ViT (Fashion-MNIST, or any TFDS image dataset online)."""
from __future__ import annotations

import jax

from posenc.config import ConfigError
from posenc.encodings import Geometry, as_hw
from posenc.tasks.base import Task, build_model, cross_entropy, dataset_info


def _hw(config, field: str, size) -> tuple[int, int]:
  try:
    return as_hw(size)
  except ValueError as e:
    raise ConfigError(f"config field '{field}': {e}") from None


class ImageClassification(Task):
  name = "image_classification"
  FIELDS = {
      "image_size": "size the model is built and trained at: int or (h, w)",
      "patch_size": "patch side; must divide image_size and every eval_image_sizes",
      "augment": "train-time random crop (pad size//8) + horizontal flip",
      "eval_image_sizes": "also evaluate at these sizes (parameters transferred on the fly)",
  }
  NDIM = 2
  ITEMS = "images"
  SIZE_FIELD = "image_size"

  def validate(self, config) -> None:
    p = config.patch_size
    for field, sizes in (("image_size", [config.image_size]), ("eval_image_sizes", list(config.eval_image_sizes))):
      for size in sizes:
        hw = _hw(config, field, size)
        if not isinstance(p, int) or isinstance(p, bool) or p <= 0 or any(s % p for s in hw):
          raise ConfigError(f"config field 'patch_size': {p!r} does not divide {field}={size!r}; "
                            f"pick a patch size that divides every image size.")

  def check_dataset(self, config) -> None:
    dataset_info(config, "num_classes", "it holds no labelled images; use 'fashion_mnist'")

  def size_label(self, config) -> str:
    h, w = as_hw(config.image_size)
    return str(h) if h == w else f"{h}x{w}"

  def eval_sizes(self, config) -> tuple:
    return tuple(config.eval_image_sizes)

  def geometry(self, config, size=None) -> Geometry:
    from posenc.models import ViT  # imported late: models import every encoding
    h, w = as_hw(config.image_size if size is None else size)
    options = {k: config.model_options[k] for k in ("pool", "num_registers") if k in config.model_options}
    return Geometry.grid(h // config.patch_size, w // config.patch_size, ViT.prefix_tokens(**options))

  def legacy_geometry(self, old_config: dict) -> Geometry | None:
    if not old_config.get("image_size") or not old_config.get("patch_size"):
      return None
    from posenc.models import ViT
    (h, w), p = as_hw(old_config["image_size"]), old_config["patch_size"]
    options = old_config.get("model_options") or {}
    return Geometry.grid(h // p, w // p, ViT.prefix_tokens(options.get("pool", "cls"),
                                                           options.get("num_registers", 0)))

  def create_model(self, config, size=None):
    info = dataset_info(config, "num_classes", "")
    return build_model(config, num_classes=info.num_classes, channels=info.channels,
                       patch_size=config.patch_size, image_size=as_hw(config.image_size if size is None else size))

  def loader(self, config, split, *, train, batch_size, size=None):
    from posenc import data
    return data.make_loader(config.dataset, split, batch_size=batch_size, train=train, seed=config.seed,
                            image_size=config.image_size if size is None else size,
                            augment=train and config.augment, process_index=jax.process_index(),
                            process_count=jax.process_count())

  def forward(self, model, batch, *, train, position_scale=1.0):
    images = batch["image"]
    positions = None
    if position_scale != 1.0:
      positions = model.geometry_for(images.shape[1:3]).positions() * position_scale
    logits = model(images, positions=positions, train=train)
    return cross_entropy(logits, batch["label"], batch["valid"].astype(logits.dtype))

  def items(self, batch) -> int:
    return int(batch["label"].size)
