"""Video: a ViViT-style video ViT names the direction an image moves in (posenc.data.video).

Clips of ``num_frames`` frames on an ``image_size`` canvas, cut into tubelets of ``tubelet`` frames x
``patch_size``^2 pixels: a (t, h, w) token grid for the 3D encodings (``encodings.names(3)``). The
label is one of 8 directions, so an encoding that orders neither frames nor patches leaves the model
only what a tubelet sees of the motion inside it. ``eval_num_frames`` also evaluates clips of other
lengths (the parameters transferred on the fly): the same objects and directions, moving for longer
or shorter, the temporal counterpart of a new image size.
"""
from __future__ import annotations

import numpy as np

from posenc.config import ConfigError
from posenc.config_fields import INT, SIZE, TUPLE, Field, Rule, greater
from posenc.geometry import Geometry, as_hw, patch_grid
from posenc.tasks.base import Task, build_model, classify, dataset_info


def _frame_counts(v) -> bool:
  return isinstance(v, tuple | list) and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in v)


class VideoMotion(Task):
  name = "video_motion"
  FIELDS = {
      "image_size": Field(32, "the canvas the object moves on (frames' size): int or (h, w)", SIZE),
      "object_size": Field(16, "the moving image's size: int or (h, w)", SIZE),
      "speed": Field(1, "pixels the object moves per frame (on each axis it moves along)", INT, greater(0)),
      "num_frames": Field(8, "frames per clip in training (and the model's built size)", INT, greater(0)),
      "tubelet": Field(2, "frames per token (ViViT's tubelet); must divide num_frames and eval_num_frames",
                       INT, greater(0)),
      "patch_size": Field(4, "tubelet side in pixels; must divide image_size", INT, greater(0)),
      "eval_num_frames": Field((), "also evaluate clips of these lengths (parameters transferred on the fly)",
                               TUPLE, Rule(_frame_counts, "of frame counts > 0")),
  }
  NDIM = 3
  ITEMS = "clips"

  def validate(self, config) -> None:
    from posenc.data import video
    if any(s % config.patch_size for s in as_hw(config.image_size)):
      raise ConfigError(f"config field 'patch_size': {config.patch_size!r} does not divide image_size="
                        f"{config.image_size!r}; pick a patch size that divides it.")
    for field, frames in [("num_frames", config.num_frames)] + [("eval_num_frames", n) for n in config.eval_num_frames]:
      if frames % config.tubelet:
        raise ConfigError(f"config field '{field}': {frames} frames are not divisible by tubelet={config.tubelet}; "
                          f"use a multiple of {config.tubelet} frames.")
      try:
        video.ClipOptions(config.image_size, config.object_size, frames, config.speed)
      except ValueError as e:
        raise ConfigError(f"config field '{field}': {e}") from None

  def check_dataset(self, config) -> None:
    dataset_info(config, "channels", "it holds no images; use 'fashion_mnist'")

  def size_label(self, config) -> str:
    h, w = as_hw(config.image_size)
    return f"{config.num_frames}f{h if h == w else f'{h}x{w}'}"

  def eval_sizes(self, config) -> tuple:
    return tuple(config.eval_num_frames)

  def size_suffix(self, size) -> str:
    return f"_{size}f"

  def _clip(self, config, frames=None) -> tuple[int, int, int]:
    return (config.num_frames if frames is None else frames, *as_hw(config.image_size))

  def geometry(self, config, size=None) -> Geometry:
    from posenc.models import ViT  # imported late: models import every encoding
    options = {k: config.model_options[k] for k in ("pool", "num_registers") if k in config.model_options}
    return patch_grid(self._clip(config, size), config.patch_size, ViT.prefix_tokens(**options), config.tubelet)

  def create_model(self, config, size=None):
    from posenc.data import video
    frames, h, w = self._clip(config, size)
    return build_model(config, num_classes=video.NUM_CLASSES, channels=dataset_info(config, "channels", "").channels,
                       patch_size=config.patch_size, image_size=(h, w), num_frames=frames, tubelet=config.tubelet)

  def loader(self, config, split, *, train, batch_size, size=None):
    from posenc.data import video
    frames = config.num_frames if size is None else size
    options = video.ClipOptions(config.image_size, config.object_size, frames, config.speed)
    return video.loader(config.dataset, split, self.batching(config, batch_size, train), options)

  def random_batch(self, config, rng, rows, *, train, size=None):
    from posenc.data import video
    clip = self._clip(config, size)
    info = dataset_info(config, "channels", "")
    return {"image": rng.standard_normal((rows, *clip, info.channels), dtype=np.float32),
            "label": rng.integers(0, video.NUM_CLASSES, rows, dtype=np.int32), "valid": np.ones(rows, bool)}

  def forward(self, model, batch, *, train, position_scale=1.0, label_smoothing=0.0):
    return classify(model, batch, train=train, position_scale=position_scale, label_smoothing=label_smoothing)

  def items(self, batch) -> int:
    return int(batch["label"].size)
