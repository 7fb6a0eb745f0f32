"""The image pipeline: ``loader(dataset, split, batching, options)``, and its preprocessing (scale
augmentation, sizes, the two protocols). Order, sharding and resume: posenc.data.batching.

One batch of uint8 images [b, h, w, c] (the stored size) becomes float32 [b, H, W, c]:

1. **Output size** (H, W): the loader's one size, or, when it has several (training at
   several resolutions), one drawn per global batch from the batch's rng, so every row of
   a batch has it and the sequence of sizes is a function of (seed, batch index): a
   resumed iterator continues it exactly.
2. **Object size**: the side the image itself is brought to. Protocol ``zoom``: the
   output size (the image is resampled to it; the object grows with the grid).
   Protocol ``canvas``: a fixed ``object_size`` (the trained scale), whatever the output
   size.
3. **Augmentation** (training): random-resized crop with torchvision / timm semantics
   (area fraction uniform in ``crop_scale``, aspect ratio log-uniform in [3/4, 4/3], up
   to 10 attempts, else the centre crop of the largest in-ratio box), the crop resized
   to the object size, then a left-right flip with probability 1/2. Without it the
   whole image is resized to the object size. Independently of it, ``flip`` flips with
   probability 1/2 and ``translate`` t shifts the object by (dy, dx) uniform in [-t, t]^2
   pixels, filling with raw pixel 0 (the pad-and-crop of CIFAR-style training).
   ``random_erasing`` p erases one box per image with probability p after normalisation
   (Zhong et al. 2020 as timm's ``RandomErasing(mode="pixel")``: area fraction uniform in
   [0.02, 1/3], aspect log-uniform in [0.3, 1/0.3], the first of 10 attempts that fits
   strictly inside the image, else none; filled with per-pixel standard normal noise).
4. **Canvas** (protocol ``canvas``, where object and output sizes differ): per axis, an
   object smaller than the canvas is placed on a blank canvas (raw pixel 0, the
   background) at offset d in [0, canvas - object]; a larger one is cropped to the
   canvas at offset d in [0, object - canvas]. d = floor(u * (n + 1)) for a uniform u
   per image and axis: at evaluation u is fixed per image of the split (from the seed
   and the image's index: the same placement at every evaluation, and the same relative
   position at every canvas size); in training it is drawn per batch.
5. Normalisation (x - mean) / std with the train split's statistics (the registry entry's
   ``stats``; Fashion-MNIST: mean 0.2858, std 0.3529 over its 55,000 train images).

Resizing is PIL's bilinear filter on float32 (antialiased when shrinking: the same as
torch F.interpolate(mode="bilinear", antialias=True, align_corners=False)). All
randomness is drawn for the whole global batch (b * process_count rows) and each process
keeps its rows, so P processes see exactly the batches of one.
"""
from __future__ import annotations

import dataclasses
import math
import threading

import grain
import numpy as np
import PIL.Image

from posenc.data import batching as batching_, datasets, registry
from posenc.geometry import as_hw

DEFAULT_CROP_SCALE = (0.35, 1.0)  # area fraction of a random-resized crop (timm's default: (0.08, 1))
CROP_RATIO = (3 / 4, 4 / 3)       # aspect ratio (w / h) range of a random-resized crop
CROP_ATTEMPTS = 10                # tries before the centre-crop fallback (torchvision)
ERASE_SCALE = (0.02, 1 / 3)       # random erasing: area fraction (timm's RandomErasing defaults)
ERASE_RATIO = (0.3, 1 / 0.3)      # random erasing: aspect ratio range
CACHE_BYTES = 2 << 30             # ImageRecords keeps decoded splits up to this size (Fashion-MNIST: 47 MB)
CANVAS_STREAM = 0x63616e76        # seeds the fixed per-image canvas placements: ("canvas", seed)


class ImageRecords:
  """Batched reads of a TFDS random-access source with "image" and "label" features
  (images of one fixed size, as datasets.info checks). Each record is decoded once: what a
  read decodes is kept (uint8, up to ``CACHE_BYTES`` for the split), so later epochs read memory."""

  def __init__(self, source):
    self.source = source
    first = source[0]["image"]
    self.cache = len(source) * first.nbytes <= CACHE_BYTES
    if self.cache:
      self.images = np.empty((len(source), *first.shape), first.dtype)
      self.labels = np.empty(len(source), np.int32)
      self.decoded = np.zeros(len(source), bool)
      self.lock = threading.Lock()

  def __len__(self) -> int:
    return len(self.source)

  def decode(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    records = self.source.__getitems__(np.asarray(indices).tolist())
    return {"image": np.stack([r["image"] for r in records]),
            "label": np.array([r["label"] for r in records], np.int32)}

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    if not self.cache:
      return self.decode(indices)
    indices = np.asarray(indices)
    with self.lock:
      missing = np.unique(indices[~self.decoded[indices]])
      if missing.size:
        fresh = self.decode(missing)
        self.images[missing], self.labels[missing] = fresh["image"], fresh["label"]
        self.decoded[missing] = True
      return {"image": self.images[indices], "label": self.labels[indices]}


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """float32 [h, w, c] -> [H, W, c] with PIL's (antialiased) bilinear filter (a copy if equal)."""
  return np.stack([np.asarray(PIL.Image.fromarray(np.ascontiguousarray(image[..., c]), "F")
                              .resize(size[::-1], PIL.Image.BILINEAR))
                   for c in range(image.shape[-1])], axis=-1)


def resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """float32 [b, h, w, c] -> [b, H, W, c] with PIL's (antialiased) bilinear filter."""
  return np.stack([resize_image(image, size) for image in images])


def crop_attempts(draws: np.ndarray, height: int, width: int, scale: tuple[float, float],
                  ratio: tuple[float, float]) -> np.ndarray:
  """Uniforms ``draws [n, attempts, 4]`` -> candidate boxes ``[n, attempts, 4]`` = (top, left,
  h, w), not yet checked to fit: attempt a draws area =
  H*W * U(scale), aspect = exp(U(log ratio)), w = round(sqrt(area * aspect)), h = round(sqrt(area
  / aspect)), top = floor(u * (H - h + 1)), left = floor(u * (W - w + 1))."""
  u = np.asarray(draws, np.float64)
  area = height * width * (scale[0] + u[..., 0] * (scale[1] - scale[0]))
  log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
  aspect = np.exp(log_low + u[..., 1] * (log_high - log_low))
  w = np.rint(np.sqrt(area * aspect)).astype(np.int64)
  h = np.rint(np.sqrt(area / aspect)).astype(np.int64)
  top = np.floor(u[..., 2] * (height - h + 1)).astype(np.int64)
  left = np.floor(u[..., 3] * (width - w + 1)).astype(np.int64)
  return np.stack([top, left, h, w], axis=-1)


def first_fit(boxes: np.ndarray, fits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The first fitting attempt of each row: boxes ``[n, 4]`` (attempt 0 where none fits), and
  whether any did ``[n]``."""
  first = np.argmax(fits, axis=-1)
  return np.take_along_axis(boxes, first[:, None, None], axis=1)[:, 0], fits.any(axis=-1)


def sample_crop_boxes(draws: np.ndarray, height: int, width: int, scale: tuple[float, float],
                      ratio: tuple[float, float] = CROP_RATIO) -> np.ndarray:
  """torchvision's ``RandomResizedCrop.get_params`` from uniforms: ``draws [n, attempts, 4]``
  in [0, 1) -> int boxes ``[n, 4]`` = (top, left, h, w).

  The first of ``crop_attempts`` with 0 < h <= H and 0 < w <= W wins. If none does: the
  largest box of aspect in ``ratio``, centred (the whole image if its own aspect is in range).
  """
  boxes = crop_attempts(draws, height, width, scale, ratio)
  h, w = boxes[..., 2], boxes[..., 3]
  boxes, fits = first_fit(boxes, (w > 0) & (w <= width) & (h > 0) & (h <= height))
  in_ratio = width / height
  if in_ratio < ratio[0]:
    fh, fw = int(round(width / ratio[0])), width
  elif in_ratio > ratio[1]:
    fh, fw = height, int(round(height * ratio[1]))
  else:
    fh, fw = height, width
  boxes[~fits] = ((height - fh) // 2, (width - fw) // 2, fh, fw)
  return boxes


def erase_boxes(images: np.ndarray, erase: np.ndarray, draws: np.ndarray, noise: np.ndarray) -> np.ndarray:
  """Random erasing: where ``erase [b]``, the first of ``draws [b, attempts, 4]``'s boxes
  (``crop_attempts`` at ``ERASE_SCALE`` / ``ERASE_RATIO``) with h < H and w < W (timm's test) is
  replaced by ``noise [b, H, W, c]`` there; rows without a fitting box stay as they are."""
  _, height, width, _ = images.shape
  boxes = crop_attempts(draws, height, width, ERASE_SCALE, ERASE_RATIO)
  h, w = boxes[..., 2], boxes[..., 3]
  boxes, fits = first_fit(boxes, (h > 0) & (h < height) & (w > 0) & (w < width))
  top, left, h, w = (boxes[:, i, None] for i in range(4))
  rows, cols = np.arange(height), np.arange(width)
  inside = (((rows >= top) & (rows < top + h))[:, :, None] & ((cols >= left) & (cols < left + w))[:, None, :])
  inside &= (erase & fits)[:, None, None]
  return np.where(inside[..., None], noise, images)


def translate_images(images: np.ndarray, shifts: np.ndarray) -> np.ndarray:
  """``[b, h, w, c]`` shifted by int ``shifts [b, 2]`` = (dy, dx) (down, right), zero-filled."""
  b, h, w, _ = images.shape
  t = int(np.abs(shifts).max(initial=0))
  padded = np.pad(images, ((0, 0), (t, t), (t, t), (0, 0)))
  return np.stack([padded[i, t - dy:t - dy + h, t - dx:t - dx + w] for i, (dy, dx) in enumerate(shifts)])


def canvas_offsets(fractions: np.ndarray, object_hw: tuple[int, int], canvas_hw: tuple[int, int]
                   ) -> np.ndarray:
  """Uniforms ``[b, 2]`` -> int offsets ``[b, 2]``: d = floor(u * (n + 1)) in [0, n], n = |canvas - object|."""
  n = np.abs(np.subtract(canvas_hw, object_hw))
  return np.minimum(np.floor(np.asarray(fractions) * (n + 1)).astype(np.int64), n)


def place_on_canvas(images: np.ndarray, size: tuple[int, int], fractions: np.ndarray) -> np.ndarray:
  """Objects ``[b, oh, ow, c]`` on blank (zero) canvases ``[b, H, W, c]`` at the offsets of
  ``fractions`` (per axis: placed at d where the canvas is larger, cropped at d where smaller)."""
  b, oh, ow, c = images.shape
  out = np.zeros((b, *size, c), images.dtype)
  offsets = canvas_offsets(fractions, (oh, ow), size)
  for i, (dy, dx) in enumerate(offsets):
    (dst_y, src_y), (dst_x, src_x) = (
        (slice(d, d + o), slice(0, o)) if s >= o else (slice(0, s), slice(d, d + s))
        for d, o, s in ((dy, oh, size[0]), (dx, ow, size[1])))
    out[i, dst_y, dst_x] = images[i, src_y, src_x]
  return out


def canvas_draws(seed: int, num_records: int) -> np.ndarray:
  """The fixed placement uniforms ``[num_records, 2]`` of an evaluated split (from the seed)."""
  return np.random.default_rng([CANVAS_STREAM, seed]).random((num_records, 2))


@dataclasses.dataclass
class ImagePreprocess(grain.transforms.RandomMap):
  """uint8 images -> sized, augmented, placed, normalised float32 images (this process's rows).
  See the module docstring. ``sizes``: the output sizes (one drawn per batch when several;
  None: the stored size); ``object_size``: the canvas protocol's object size (None: zoom);
  ``fixed_draws``: per-record canvas uniforms (evaluation), else drawn per batch."""
  sizes: tuple[tuple[int, int] | None, ...]
  mean: float
  std: float
  augment: bool
  object_size: tuple[int, int] | None = None
  crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE
  flip: bool = False
  translate: int = 0
  random_erasing: float = 0.0
  fixed_draws: np.ndarray | None = None
  process_index: int = 0
  process_count: int = 1

  def random_map(self, batch: dict[str, np.ndarray], rng: np.random.Generator):
    images = batch["image"].astype(np.float32) / 255.0
    b, height, width, _ = images.shape
    rows = b * self.process_count  # draws are for the global batch; this process keeps its rows
    mine = slice(self.process_index, None, self.process_count)
    size = self.sizes[rng.integers(len(self.sizes))] if len(self.sizes) > 1 else self.sizes[0]
    size = size or (height, width)
    object_hw = self.object_size or size
    if self.augment:
      boxes = sample_crop_boxes(rng.random((rows, CROP_ATTEMPTS, 4))[mine], height, width, self.crop_scale)
      images = np.stack([resize_image(image[top:top + h, left:left + w], object_hw)
                         for image, (top, left, h, w) in zip(images, boxes)])
    elif object_hw != (height, width):
      images = resize_images(images, object_hw)
    if self.augment or self.flip:
      flips = (rng.random(rows) < 0.5)[mine]
      images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
    if self.translate:
      images = translate_images(images, rng.integers(-self.translate, self.translate + 1, (rows, 2))[mine])
    if object_hw != size:
      fractions = (self.fixed_draws[batch["index"]] if self.fixed_draws is not None
                   else rng.random((rows, 2))[mine])
      images = place_on_canvas(images, size, fractions)
    images = (images - self.mean) / self.std
    if self.random_erasing:
      erase = (rng.random(rows) < self.random_erasing)[mine]
      draws = rng.random((rows, CROP_ATTEMPTS, 4))[mine]
      images = erase_boxes(images, erase, draws, rng.standard_normal((rows, *images.shape[1:]))[mine])
    return {"image": images.astype(np.float32),
            "label": batch["label"], "valid": batch["valid"]}


@dataclasses.dataclass(frozen=True)
class ImageOptions:
  """How a loader sizes and augments images (see the module docstring). ``image_size`` (int or
  (h, w); None: as stored) is the output size; ``image_sizes`` (training only) draws one of them per
  global batch instead. ``augment`` (default: train) is a random-resized crop of area fraction in
  ``crop_scale`` + flip; ``flip`` alone flips, ``translate`` t shifts by up to t pixels per axis and
  ``random_erasing`` p erases a box with probability p (training only). ``protocol`` "zoom"
  resamples the image to the output size; "canvas" resizes it to ``object_size`` and places it on
  (or crops it from) the output-size canvas at a seeded position (object_size None: zoom)."""
  image_size: int | tuple[int, int] | None = None
  image_sizes: tuple = ()
  object_size: int | tuple[int, int] | None = None
  protocol: str = "zoom"
  augment: bool | None = None
  crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE
  flip: bool = False
  translate: int = 0
  random_erasing: float = 0.0

  def preprocess(self, stats: tuple[float, float], *, num_records: int, train: bool, seed: int,
                 process_index: int = 0, process_count: int = 1) -> ImagePreprocess:
    """The ``ImagePreprocess`` of these options, normalising with ``stats``. The values are a config's,
    already checked there (posenc.tasks.image_classification declares each field and its checks)."""
    image_sizes = tuple(self.image_sizes or ())
    if image_sizes and not train:
      raise ValueError("image_sizes (one size drawn per batch) is for training; evaluate at one image_size.")
    sizes = tuple(as_hw(s) for s in image_sizes) or (None if self.image_size is None else as_hw(self.image_size),)
    canvas = self.protocol == "canvas" and self.object_size is not None
    mean, std = stats
    return ImagePreprocess(
        sizes, mean, std, train if self.augment is None else bool(self.augment),
        object_size=as_hw(self.object_size) if canvas else None, crop_scale=tuple(map(float, self.crop_scale)),
        flip=train and bool(self.flip), translate=self.translate if train else 0,
        random_erasing=float(self.random_erasing) if train else 0.0,
        fixed_draws=canvas_draws(seed, num_records) if canvas and not train else None,
        process_index=process_index, process_count=process_count)


def loader(dataset: str, split: str, batching: batching_.Batching, options: ImageOptions = ImageOptions(), *,
           data_dir: str | None = None) -> grain.IterDataset:
  """Preprocessed image batches of ``dataset``/``split`` for this process: "image" float32
  [b, H, W, C], "label" int32 [b], "valid" bool [b] (False: evaluation padding)."""
  directory = data_dir or datasets.data_dir()
  datasets.info(dataset, directory)  # a clear error unless it has fixed-size images + labels
  records = ImageRecords(datasets.source(dataset, split, directory))
  transform = options.preprocess(registry.get(dataset).stats, num_records=len(records), train=batching.train,
                                 seed=batching.seed, **batching.shard)
  return batching_.batches(len(records), batching, batching_.ReadBatch(records), transform,
                           what=f"Split {split!r} of {dataset!r}")
