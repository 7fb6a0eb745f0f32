"""Moving-object clips made from an image dataset: ``loader(dataset, split, batching, options)``.

Each record's image becomes a clip ``[T, H, W, C]``: the image, resized to ``object_size``
(PIL bilinear, antialiased: ``images.resize_images``), moves in a straight line by ``speed``
pixels per frame across a blank canvas (raw pixel 0) of ``image_size``, in one of the 8 compass
directions of ``DIRECTIONS``. The label is the direction, not the image's class: telling east
from west needs the order of the frames, so the task measures what an encoding gives a video
model in time as well as in space (Moving MNIST, Srivastava et al. 2015, moves digits the same
way, bouncing; here nothing bounces, so every clip has one direction).

The start is uniform among the positions that keep the whole trajectory on the canvas: per
axis, the object's offset at frame 0 is ``floor(u * (room + 1))``, with ``room`` the canvas
minus the object minus the axis's travel. Training draws the direction and ``u`` for the whole
global batch from the batch's rng (each process keeps its rows, as in ``images``); evaluation
fixes them per record from the seed, so every evaluation, at any number of frames, sees the same
object in the same direction. Pixels are normalised with the dataset's train statistics.
"""
from __future__ import annotations

import dataclasses

import grain
import numpy as np

from posenc.data import batching as batching_, datasets, registry
from posenc.data.images import ImageRecords, resize_images
from posenc.geometry import as_hw

# (dy, dx) per frame, label order: E, NE, N, NW, W, SW, S, SE (y grows downwards).
DIRECTIONS = np.array([(0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1)])
NUM_CLASSES = len(DIRECTIONS)
MOTION_STREAM = 0x6d6f7665  # seeds the fixed per-record directions and starts: ("move", seed)


def max_frames(image_size, object_size, speed: int) -> int:
  """The most frames a clip can hold with every trajectory on the canvas (diagonals travel on both axes)."""
  room = min(c - o for c, o in zip(as_hw(image_size), as_hw(object_size)))
  return room // speed + 1


def start_offsets(fractions: np.ndarray, steps: np.ndarray, room: np.ndarray) -> np.ndarray:
  """Uniforms ``[b, 2]``, per-axis travels ``steps [b, 2]`` (signed pixels over the clip) and the
  canvas room ``[2]`` -> the object's offsets ``[b, 2]`` at frame 0, every frame on the canvas."""
  free = room - np.abs(steps)
  return np.minimum(np.floor(fractions * (free + 1)).astype(np.int64), free) + np.maximum(-steps, 0)


def moving_clips(objects: np.ndarray, canvas_hw: tuple[int, int], frames: int, speed: int,
                 directions: np.ndarray, fractions: np.ndarray) -> np.ndarray:
  """Objects ``[b, oh, ow, c]`` -> clips ``[b, frames, H, W, c]`` of each moving by ``speed`` pixels per
  frame in its direction (an index into ``DIRECTIONS``) from the start that ``fractions`` picks."""
  b, oh, ow, c = objects.shape
  velocity = DIRECTIONS[directions] * speed
  start = start_offsets(fractions, velocity * (frames - 1), np.subtract(canvas_hw, (oh, ow)))
  clips = np.zeros((b, frames, *canvas_hw, c), objects.dtype)
  for i in range(b):
    for t in range(frames):
      y, x = start[i] + velocity[i] * t
      clips[i, t, y:y + oh, x:x + ow] = objects[i]
  return clips


def motion_draws(seed: int, num_records: int) -> tuple[np.ndarray, np.ndarray]:
  """The fixed directions ``[num_records]`` and start uniforms ``[num_records, 2]`` of an evaluated split."""
  rng = np.random.default_rng([MOTION_STREAM, seed])
  return rng.integers(NUM_CLASSES, size=num_records), rng.random((num_records, 2))


@dataclasses.dataclass
class ClipPreprocess(grain.transforms.RandomMap):
  """uint8 images -> normalised float32 moving clips labelled by direction (see the module docstring).
  ``fixed``: per-record (directions, start uniforms) at evaluation, else drawn per global batch."""
  image_size: tuple[int, int]
  object_size: tuple[int, int]
  frames: int
  speed: int
  mean: float
  std: float
  fixed: tuple[np.ndarray, np.ndarray] | None = None
  process_index: int = 0
  process_count: int = 1

  def random_map(self, batch: dict[str, np.ndarray], rng: np.random.Generator):
    objects = resize_images(batch["image"].astype(np.float32) / 255.0, self.object_size)
    rows, mine = len(objects) * self.process_count, slice(self.process_index, None, self.process_count)
    if self.fixed is not None:
      directions, fractions = (a[batch["index"]] for a in self.fixed)
    else:
      directions, fractions = rng.integers(NUM_CLASSES, size=rows)[mine], rng.random((rows, 2))[mine]
    clips = moving_clips(objects, self.image_size, self.frames, self.speed, directions, fractions)
    return {"image": ((clips - self.mean) / self.std).astype(np.float32),
            "label": directions.astype(np.int32), "valid": batch["valid"]}


@dataclasses.dataclass(frozen=True)
class ClipOptions:
  """Clips of ``frames`` frames on an ``image_size`` canvas; the object at ``object_size`` moves
  ``speed`` pixels per frame (every trajectory must fit: ``max_frames``)."""
  image_size: int | tuple[int, int] = 32
  object_size: int | tuple[int, int] = 16
  frames: int = 8
  speed: int = 1

  def __post_init__(self):
    if not (isinstance(self.speed, int) and self.speed >= 1 and isinstance(self.frames, int) and self.frames >= 1):
      raise ValueError(f"speed and frames must be integers >= 1, got speed={self.speed!r}, frames={self.frames!r}.")
    most = max_frames(self.image_size, self.object_size, self.speed)
    if self.frames > most:
      raise ValueError(f"a {self.frames}-frame clip at {self.speed} pixel(s) per frame does not fit: an object of "
                       f"{self.object_size} on a canvas of {self.image_size} has room for {most} frames; use fewer "
                       f"frames, a smaller object_size or speed, or a larger image_size.")


def loader(dataset: str, split: str, batching: batching_.Batching, options: ClipOptions = ClipOptions(), *,
           data_dir: str | None = None) -> grain.IterDataset:
  """Moving clips of ``dataset``/``split``'s images for this process: "image" float32
  [b, T, H, W, C], "label" int32 [b] (the direction), "valid" bool [b] (False: evaluation padding)."""
  directory = data_dir or datasets.data_dir()
  datasets.info(dataset, directory)  # a clear error unless it has fixed-size images
  records = ImageRecords(datasets.source(dataset, split, directory))
  mean, std = registry.get(dataset).stats
  transform = ClipPreprocess(as_hw(options.image_size), as_hw(options.object_size), options.frames, options.speed,
                             mean, std, None if batching.train else motion_draws(batching.seed, len(records)),
                             **batching.shard)
  return batching_.batches(len(records), batching, batching_.ReadBatch(records), transform,
                           what=f"Split {split!r} of {dataset!r}")
