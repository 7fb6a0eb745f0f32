"""Image classification with a ViT (Fashion-MNIST, or any TFDS image dataset online).

Sizes: the model is built at ``image_size``; training draws one of ``train_image_sizes``
per step when given (the jitted step compiles once per size); evaluation runs at
``image_size`` and every ``eval_image_sizes``. How an image is shown at a size is
``eval_protocol``: ``zoom`` resamples it to the size (the object grows with the grid);
``canvas`` keeps it at ``object_size`` (default: ``image_size``, the trained scale) and
places it on a blank canvas of the size, or crops it, at a seeded position (fixed per
image at evaluation). It applies to the evaluated sizes and to training at
``image_size`` (e.g. fine-tuning from ``init_from`` on canvas images: set ``object_size``
to the source run's ``image_size``); training at several sizes always resamples
(FlexiViT's recipe).
"""
from __future__ import annotations

import numpy as np

from posenc.config import ConfigError
from posenc.config_fields import (BOOL, INT, NUMBER, SIZE, SIZES, STR, TUPLE, Field, Rule, at_least,
                                  greater, one_of)
from posenc.geometry import Geometry, as_hw, patch_grid
from posenc.tasks.base import Task, build_model, classify, dataset_info


def _crop_scale(v) -> bool:
  pair = isinstance(v, tuple | list) and len(v) == 2 and all(isinstance(s, int | float) for s in v)
  return pair and 0 < v[0] <= v[1] <= 1


class ImageClassification(Task):
  name = "image_classification"
  FIELDS = {
      "image_size": Field(28, "size the model is built and trained at: int or (h, w)", SIZE),
      "patch_size": Field(7, "patch side; must divide image_size and every eval_image_sizes / train_image_sizes",
                          INT, greater(0)),
      "augment": Field(False, "train-time random-resized crop (area fraction in crop_scale) + horizontal flip",
                       BOOL),
      "crop_scale": Field((0.35, 1.0), "(low, high): the crop's area fraction, uniform; aspect ratio log-uniform "
                          "in [3/4, 4/3]", TUPLE, Rule(_crop_scale, "(low, high) with 0 < low <= high <= 1")),
      "flip": Field(False, "train-time horizontal flip with probability 1/2 (also part of augment)", BOOL),
      "translate": Field(0, "train-time random shift by up to this many pixels per axis, zero-filled (0 = none)",
                         INT, at_least(0)),
      "random_erasing": Field(0.0, "train-time probability of erasing one random box with noise (Zhong et al. "
                              "2020, timm's RandomErasing); 0 = none", NUMBER,
                              Rule(lambda v: 0 <= v <= 1, "in [0, 1]")),
      "train_image_sizes": Field((), "train at one of these sizes per step, drawn from (seed, step), always "
                                 "resampled (zoom); () = image_size only", SIZES),
      "eval_image_sizes": Field((), "also evaluate at these sizes (parameters transferred on the fly)", SIZES),
      "eval_protocol": Field("zoom", "images at a size other than object_size (evaluation; training at "
                             "image_size): 'zoom' (resampled) | 'canvas' (placed at a seeded position on a blank "
                             "canvas, or cropped from it)", STR, one_of("zoom", "canvas")),
      "object_size": Field(0, "canvas protocol: the object's size (the trained scale); 0 = image_size",
                           Rule(lambda v: v == 0 or SIZE.holds(v), "0 or " + SIZE.need, object)),
      "train_split": Field("train", "the split trained on: 'train' or a TFDS split string ('train[:100%]': "
                           "Fashion-MNIST's 60,000, validation included)", STR),
  }
  NDIM = 2
  ITEMS = "images"

  def validate(self, config) -> None:
    p = config.patch_size
    for field in ("image_size", "eval_image_sizes", "train_image_sizes"):
      for size in [config[field]] if field == "image_size" else config[field]:
        if any(s % p for s in as_hw(size)):
          raise ConfigError(f"config field 'patch_size': {p!r} does not divide {field}={size!r}; "
                            f"pick a patch size that divides every image size.")
    self._check_train_grids(config)

  def _check_train_grids(self, config) -> None:
    """ConfigError unless the encoding, built at image_size, serves every train_image_sizes grid
    (a learned grid table serves only its own unless it resamples)."""
    built = as_hw(config.image_size)
    others = [s for s in config.train_image_sizes if as_hw(s) != built]
    if not others:
      return
    from flax import nnx
    try:  # abstractly; bad model options are reported (with their fields) by setup
      model = nnx.eval_shape(lambda: build_model(config, num_classes=2, channels=1, patch_size=config.patch_size,
                                                 image_size=built))
    except (ValueError, TypeError):
      return
    for size in others:
      try:
        model.posenc.check(model.geometry_for(as_hw(size)))
      except ValueError as e:
        raise ConfigError(f"config field 'train_image_sizes': posenc '{config.posenc}' built at image_size="
                          f"{config.image_size!r} cannot run at {size!r}: {e} Train at several sizes with an "
                          f"encoding that serves any grid (rope, sincos2d, ...) or, for 'learned', with "
                          f"posenc_options.resample=True (FlexiViT).") from None

  def check_dataset(self, config) -> None:
    from posenc.data import datasets, registry
    dataset_info(config, "num_classes", "it holds no labelled images; use 'fashion_mnist'")
    if registry.get(config.dataset).builder is None:  # generated: no split to read
      return
    try:
      datasets.source(config.dataset, config.train_split)
    except ValueError as e:
      raise ConfigError(f"config field 'train_split': {e}") from None

  def size_label(self, config) -> str:
    h, w = as_hw(config.image_size)
    return str(h) if h == w else f"{h}x{w}"

  def eval_sizes(self, config) -> tuple:
    return tuple(config.eval_image_sizes)

  def geometry(self, config, size=None) -> Geometry:
    from posenc.models import ViT  # imported late: models import every encoding
    options = {k: config.model_options[k] for k in ("pool", "num_registers") if k in config.model_options}
    return patch_grid(as_hw(config.image_size if size is None else size), config.patch_size,
                      ViT.prefix_tokens(**options))

  def create_model(self, config, size=None):
    info = dataset_info(config, "num_classes", "")
    return build_model(config, num_classes=info.num_classes, channels=info.channels,
                       patch_size=config.patch_size, image_size=as_hw(config.image_size if size is None else size))

  def loader(self, config, split, *, train, batch_size, size=None):
    from posenc.data import images
    split = config.train_split if train and split == "train" else split  # the training role
    sizes = tuple(config.train_image_sizes) if train and size is None else ()
    options = images.ImageOptions(
        image_size=config.image_size if size is None else size, image_sizes=sizes,
        protocol="zoom" if sizes else config.eval_protocol,  # several sizes: FlexiViT
        object_size=self.object_size(config), augment=train and config.augment,
        crop_scale=tuple(config.crop_scale), flip=train and config.flip,
        translate=config.translate if train else 0, random_erasing=config.random_erasing if train else 0.0)
    return images.loader(config.dataset, split, self.batching(config, batch_size, train), options)

  def random_batch(self, config, rng, rows, *, train, size=None):
    h, w = as_hw(config.image_size if size is None else size)
    info = dataset_info(config, "num_classes", "")
    return {"image": rng.standard_normal((rows, h, w, info.channels), dtype=np.float32),
            "label": rng.integers(0, info.num_classes, rows, dtype=np.int32), "valid": np.ones(rows, bool)}

  @staticmethod
  def object_size(config):
    """The canvas protocol's object size: ``object_size``, or ``image_size`` where it is 0."""
    return config.object_size or config.image_size

  def forward(self, model, batch, *, train, position_scale=1.0, label_smoothing=0.0):
    return classify(model, batch, train=train, position_scale=position_scale, label_smoothing=label_smoothing)

  def items(self, batch) -> int:
    return int(batch["label"].size)
