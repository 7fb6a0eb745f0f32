"""posenc.data's image pipeline: resize parity with torch, augmentation against torchvision's
random-resized-crop semantics, per-batch training sizes, the zoom and canvas protocols (the canvas
image found pixel for pixel at its seeded offset), and the decoded-record cache."""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import FM, assert_batches_equal, image_loader, take, unnormalise
from posenc.data import datasets, images, registry


@pytest.mark.parametrize("size", [(14, 40), (56, 21), (28, 28)])
def test_resize_matches_torch_bilinear_antialias(size):
  torch = pytest.importorskip("torch", reason="no torch (pip install -e .[test])")
  native = next(iter(image_loader(FM, "test", batch_size=8, train=False, seed=0)))["image"]
  resized = next(iter(image_loader(FM, "test", batch_size=8, train=False, seed=0,
                                  image_size=size)))["image"]
  expected = torch.nn.functional.interpolate(
      torch.from_numpy(native).permute(0, 3, 1, 2), size=size, mode="bilinear",
      align_corners=False, antialias=True).permute(0, 2, 3, 1).numpy()
  assert resized.shape == (8, *size, 1)
  np.testing.assert_allclose(resized, expected, atol=2e-5)


def crop_box_reference(u, height, width, scale, ratio=images.CROP_RATIO):
  """torchvision's RandomResizedCrop.get_params, line by line, on given uniforms [attempts, 4]:
  ((top, left, h, w), whether it fell back to the centre crop)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for a in u:
    target_area = area * (scale[0] + a[0] * (scale[1] - scale[0]))
    aspect_ratio = math.exp(log_ratio[0] + a[1] * (log_ratio[1] - log_ratio[0]))
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      return (int(a[2] * (height - h + 1)), int(a[3] * (width - w + 1)), h, w), False
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return ((height - h) // 2, (width - w) // 2, h, w), True


def reachable_box(top, left, h, w, height, width, scale, ratio=images.CROP_RATIO) -> bool:
  """Inside the image and, up to rounding h and w to integers, of area fraction in ``scale``
  and aspect ratio w / h in ``ratio`` (the closed form of a random-resized crop's box)."""
  inside = h > 0 and w > 0 and 0 <= top <= height - h and 0 <= left <= width - w
  area = (h - 0.5) * (w - 0.5) <= scale[1] * height * width
  area = area and (h + 0.5) * (w + 0.5) >= scale[0] * height * width
  aspect = (w - 0.5) / (h + 0.5) <= ratio[1] and (w + 0.5) / max(h - 0.5, 1e-9) >= ratio[0]
  return inside and area and aspect


@pytest.mark.parametrize("height, width, scale", [(28, 28, (0.35, 1.0)), (28, 28, (0.08, 1.0)),
                                                  (20, 40, (0.5, 1.0)), (40, 12, (0.9, 1.0))])
def test_crop_boxes_follow_torchvision_semantics(height, width, scale):
  draws = np.random.default_rng(0).random((4000, images.CROP_ATTEMPTS, 4))
  boxes = images.sample_crop_boxes(draws, height, width, scale)
  assert boxes.dtype == np.int64 and boxes.shape == (4000, 4)
  reference = [crop_box_reference(u, height, width, scale) for u in draws]
  np.testing.assert_array_equal(boxes, [box for box, _ in reference])
  fell_back = np.array([f for _, f in reference])
  # the closed-form constraints of a sampled box
  assert all(reachable_box(*box, height, width, scale) for box in boxes[~fell_back])
  # the fallback: the largest centred box of aspect ratio in [3/4, 4/3] (the image if it is one)
  fh, fw = ((height, width) if 3 / 4 <= width / height <= 4 / 3 else
            (round(width * 4 / 3), width) if width / height < 3 / 4 else (height, round(height * 4 / 3)))
  assert (boxes[fell_back] == [(height - fh) // 2, (width - fw) // 2, fh, fw]).all()
  if (height, width) == (40, 12):  # no box of area >= 0.9 fits the ratio: always the fallback
    assert fell_back.all()
    return
  sampled = boxes[~fell_back]
  if height == width:  # ten attempts nearly always find a box, over the whole range of areas
    fractions = sampled[:, 2] * sampled[:, 3] / (height * width)
    assert fell_back.mean() < 0.01 and fractions.min() < scale[0] + 0.05 and fractions.max() == 1
  # the offset is uniform over the positions a box size has: its mean is the middle
  room = np.stack([height - sampled[:, 2], width - sampled[:, 3]], 1)
  moved = room > 0
  assert np.all(np.abs((sampled[:, :2][moved] / room[moved]).mean() - 0.5) < 0.03)


def test_augmentation_is_a_seeded_random_resized_crop_and_flip():
  kw = dict(batch_size=64, train=True, seed=9)
  plain = unnormalise(next(iter(image_loader(FM, "validation", augment=False, **kw)))["image"])[..., 0]
  # crop_scale (1, 1): the box is the whole image (or the centre crop, the whole image too)
  whole = unnormalise(next(iter(image_loader(FM, "validation", crop_scale=(1, 1), **kw)))["image"])[..., 0]
  same = np.array([np.array_equal(x, y) for x, y in zip(plain, whole)])  # the same float ops: exact
  mirrored = np.array([np.array_equal(x[:, ::-1], y) for x, y in zip(plain, whole)])
  assert (same | mirrored).all()
  symmetric = np.array([np.array_equal(x, x[:, ::-1]) for x in plain])  # look flipped and not alike
  flipped = mirrored[~symmetric]
  assert len(flipped) > 55 and abs(flipped.mean() - 0.5) < 4 * np.sqrt(0.25 / len(flipped))
  # crop_scale (0.35, 1): each image is its source's crop, in the closed-form range, resized back
  loader = image_loader(FM, "validation", crop_scale=(0.35, 1.0), **kw)
  augmented = unnormalise(next(iter(loader))["image"])[..., 0]
  assert_batches_equal(take(loader, 2), take(image_loader(FM, "validation", crop_scale=(0.35, 1.0), **kw), 2))
  other = next(iter(image_loader(FM, "validation", crop_scale=(0.35, 1.0), **(kw | dict(seed=10)))))
  assert not np.array_equal(other["image"], augmented)
  scaled = 0
  for x, y in zip(plain[:4], augmented[:4]):
    matches = [(t, l, h, w) for h in range(1, 29) for w in range(1, 29)
               if reachable_box(0, 0, h, w, 28, 28, (0.35, 1.0))
               for t in range(29 - h) for l in range(29 - w)
               for z in [images.resize_image(x[t:t + h, l:l + w, None], (28, 28))[..., 0]]
               if np.abs(z - y).max() < 1e-5 or np.abs(z[:, ::-1] - y).max() < 1e-5]
    assert matches, "augmented image is no random-resized crop of its source"
    scaled += min(h * w for _, _, h, w in matches) < 28 * 28
  assert scaled >= 2  # not just flips: most crops are smaller than the image


def test_train_image_sizes_drawn_per_batch_seeded_and_resumable():
  kw = dict(batch_size=8, train=True, image_size=32, image_sizes=(24, 32, (40, 16)))
  it = iter(image_loader(FM, "validation", seed=0, **kw))
  batches = take(it, 12)
  sizes = [b["image"].shape[1:3] for b in batches]
  assert set(sizes) == {(24, 24), (32, 32), (40, 16)}
  assert all(b["image"].shape[0] == 8 and b["label"].shape == (8,) for b in batches)
  assert_batches_equal(batches, take(image_loader(FM, "validation", seed=0, **kw), 12))
  other = [b["image"].shape[1:3] for b in take(image_loader(FM, "validation", seed=1, **kw), 12)]
  assert other != sizes
  state = it.get_state()
  expected = take(it, 6)
  resumed = iter(image_loader(FM, "validation", seed=0, **kw))
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 6), expected)
  with pytest.raises(ValueError, match="image_sizes.*for training"):
    image_loader(FM, "test", batch_size=8, train=False, seed=0, image_sizes=(24, 32))
  # crop_scale and protocol are config fields, checked where they are declared (test_training_config.py)


def eval_images(size, protocol="zoom", object_size=None, seed=0, split="test[:48]"):
  batches = list(image_loader(FM, split, batch_size=16, train=False, seed=seed, image_size=size,
                             protocol=protocol, object_size=object_size))
  return np.concatenate([b["image"] for b in batches])[..., 0]


def test_zoom_is_the_resize_and_ignores_object_size(idx_test):
  raw = idx_test[0][:48].reshape(48, 28, 28, 1).astype(np.float32) / 255
  mean, std = registry.get(FM).stats
  expected = (images.resize_images(raw, (44, 44))[..., 0] - mean) / std
  np.testing.assert_array_equal(eval_images(44), expected.astype(np.float32))
  np.testing.assert_array_equal(eval_images(44, "zoom", object_size=32), expected.astype(np.float32))


def blank_pixel():
  """A raw 0 pixel, normalised as the pipeline does (in float32)."""
  mean, std = registry.get(FM).stats
  return ((np.zeros((), np.float32) - mean) / std).astype(np.float32)


def find_offsets(canvas, obj, blank):
  """Every (dy, dx) where ``canvas`` is ``obj`` on a ``blank`` background (canvas larger), or
  ``obj``'s window (canvas smaller)."""
  (H, W), (h, w) = canvas.shape, obj.shape
  if H >= h:
    found = []
    for dy in range(H - h + 1):
      for dx in range(W - w + 1):
        rest = canvas.copy()
        rest[dy:dy + h, dx:dx + w] = blank
        if np.array_equal(canvas[dy:dy + h, dx:dx + w], obj) and (rest == blank).all():
          found.append((dy, dx))
    return found
  return [(dy, dx) for dy in range(h - H + 1) for dx in range(w - W + 1)
          if np.array_equal(obj[dy:dy + H, dx:dx + W], canvas)]


@pytest.mark.parametrize("size", [48, 24, (40, 32)])
def test_canvas_places_the_trained_scale_image_at_a_seeded_offset(size):
  blank = blank_pixel()  # a raw 0 pixel: background
  trained = eval_images(32)  # the image at the trained scale (object_size 32)
  canvas = eval_images(size, "canvas", object_size=32)
  H, W = (size, size) if isinstance(size, int) else size
  assert canvas.shape == (48, H, W)
  offsets = []
  for c, obj in zip(canvas, trained):
    found = find_offsets(c, obj, blank)
    assert len(found) == 1, found
    (dy, dx), = found
    assert 0 <= dy <= abs(H - 32) and 0 <= dx <= abs(W - 32)
    offsets.append((dy, dx))
  positions = (abs(H - 32) + 1) * (abs(W - 32) + 1)
  assert len(set(offsets)) >= min(12, 0.7 * positions)  # a position per image
  np.testing.assert_array_equal(eval_images(size, "canvas", object_size=32), canvas)  # every evaluation
  assert not np.array_equal(eval_images(size, "canvas", object_size=32, seed=1), canvas)  # seeded
  # per image, not per batch position: the first 16 images of another slice of the split keep theirs
  np.testing.assert_array_equal(eval_images(size, "canvas", object_size=32, split="test[:16]"), canvas[:16])


def test_canvas_at_the_object_size_is_the_trained_image_and_padding_is_valid_false():
  np.testing.assert_array_equal(eval_images(32, "canvas", object_size=32), eval_images(32))
  batches = list(image_loader(FM, "test[:40]", batch_size=16, train=False, seed=0, image_size=56,
                             protocol="canvas", object_size=28))
  valid = np.concatenate([b["valid"] for b in batches])
  assert len(valid) == 48 and valid[:40].all() and not valid[40:].any()
  # the same relative position at every canvas size: u in [d/(n+1), (d+1)/(n+1)) for both
  small, large = eval_images(40, "canvas", object_size=28), eval_images(56, "canvas", object_size=28)
  raw, blank = eval_images(28), blank_pixel()
  for s, l, obj in zip(small, large, raw):
    (d40,), (d56,) = find_offsets(s, obj, blank), find_offsets(l, obj, blank)
    for a, b in zip(d40, d56):
      assert max(a / 13, b / 29) < min((a + 1) / 13, (b + 1) / 29)


class CountingSource:
  """A TFDS source that counts the records it decodes."""

  def __init__(self, source):
    self.source, self.decoded = source, 0

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    self.decoded += 1
    return self.source[i]

  def __getitems__(self, indices):
    self.decoded += len(indices)
    return self.source.__getitems__(indices)


def test_records_are_decoded_once_and_read_back_unchanged(monkeypatch):
  source = CountingSource(datasets.source(FM, "validation", datasets.data_dir()))
  records = images.ImageRecords(source)
  first = np.array([7, 3, 7, 4999, 0])
  got = records.read(first)
  assert source.decoded == 1 + 4  # the shape probe, then each distinct record once
  again = records.read(np.array([4999, 7, 1, 3]))
  assert source.decoded == 1 + 4 + 1  # only record 1 is new
  reference = images.ImageRecords.decode(records, np.array([7, 3, 7, 4999, 0, 1]))
  np.testing.assert_array_equal(got["image"], reference["image"][:5])
  np.testing.assert_array_equal(got["label"], reference["label"][:5])
  np.testing.assert_array_equal(again["image"], reference["image"][[3, 0, 5, 1]])
  # a split larger than CACHE_BYTES is decoded on every read
  monkeypatch.setattr(images, "CACHE_BYTES", 0)
  uncached = images.ImageRecords(CountingSource(source.source))
  uncached.read(first), uncached.read(first)
  assert uncached.source.decoded == 1 + 2 * 5 and not uncached.cache
