"""Train-time regularisers: label smoothing (against optax's smoothed targets), and the image
pipeline's flip and translation (against scipy's shift) and random erasing (against its closed form);
all seeded, training only."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import FM, image_loader, unnormalise
from posenc.config import ConfigError
from posenc.data import images
from posenc.tasks.base import cross_entropy

scipy = pytest.importorskip("scipy", reason="no scipy (pip install -e .[test])")
import scipy.ndimage  # noqa: E402

@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.3])
def test_label_smoothing_matches_optax_smoothed_targets(alpha):
  logits = jax.random.normal(jax.random.key(0), (6, 11)) * 3
  targets = jnp.array([0, 3, 10, 5, 5, 1])
  weights = jnp.array([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
  loss, stats = cross_entropy(logits, targets, weights, alpha)
  smoothed = optax.smooth_labels(jax.nn.one_hot(targets, 11), alpha)
  expected = optax.softmax_cross_entropy(logits, smoothed)
  np.testing.assert_allclose(stats["loss_sum"], jnp.sum(expected * weights), rtol=1e-6)
  np.testing.assert_allclose(loss, jnp.sum(expected * weights) / 5, rtol=1e-6)
  assert stats["correct"] == jnp.sum((jnp.argmax(logits, -1) == targets) * weights)


def test_label_smoothing_is_training_only_and_checked():
  from configs.vit_tiny import get_config
  from posenc.training import config as config_lib
  from posenc.training.steps import task_forward
  from posenc import tasks
  forward = task_forward(tasks.get("image_classification"), 1.0, 0.2)
  assert forward.keywords == {"position_scale": 1.0, "label_smoothing": 0.2}
  for bad in ("label_smoothing=1.0", "label_smoothing=-0.1", "translate=-2", "translate=1.5", "flip=1",
              "random_erasing=1.5", "random_erasing=-0.1"):
    with pytest.raises(ConfigError, match=bad.split("=")[0]):
      config_lib.validate(get_config(bad), num_devices=1)


def test_translate_images_is_a_zero_filled_shift():
  x = np.random.default_rng(0).random((5, 9, 7, 2)).astype(np.float32)
  shifts = np.array([[0, 0], [2, -1], [-3, 3], [1, 1], [-2, 0]])
  out = images.translate_images(x, shifts)
  for xi, oi, (dy, dx) in zip(x, out, shifts):
    np.testing.assert_array_equal(oi, scipy.ndimage.shift(xi, (dy, dx, 0), order=0, cval=0.0))


def _batch(seed, train=True, **kw):
  return next(iter(image_loader(FM, "validation", batch_size=64, train=train, seed=seed, **kw)))["image"][..., 0]


def test_flip_and_translate_are_seeded_draws_of_the_closed_form():
  plain = unnormalise(_batch(3, augment=False))
  moved = unnormalise(_batch(3, augment=False, flip=True, translate=2))
  np.testing.assert_array_equal(moved, unnormalise(_batch(3, augment=False, flip=True, translate=2)))
  assert not np.array_equal(moved, unnormalise(_batch(4, augment=False, flip=True, translate=2)))
  seen = set()
  for x, y in zip(plain, moved):
    found = [(dy, dx, f) for f in (False, True) for dy in range(-2, 3) for dx in range(-2, 3)
             if np.abs(scipy.ndimage.shift(x[:, ::-1] if f else x, (dy, dx), order=0) - y).max() < 1e-6]
    assert found, "not a flip + shift of its source"
    seen.update(found)
  assert len({s[:2] for s in seen}) >= 15 and {s[2] for s in seen} == {False, True}
  # evaluation (train=False) is never shifted or flipped
  np.testing.assert_array_equal(_batch(3, train=False, flip=True, translate=2), _batch(3, train=False))


def test_random_erasing_boxes_follow_the_closed_form_and_the_first_fit_rule():
  x = np.zeros((3, 28, 28, 1), np.float32)
  noise = np.ones_like(x)
  # row 0, attempt 0: area 784 * (0.02 + 0.5 * (1/3 - 0.02)) = 138.5..., aspect exp(0) = 1 -> 12 x 12
  #   (round(sqrt(138.5)) = 12), top = floor(0.5 * 17) = 8, left = floor(0.99 * 17) = 16
  # row 1: attempt 0 is 1/3 of the image at aspect 1/0.3 (h = round(sqrt(261.3 * 0.3)) = 9,
  #   w = round(sqrt(261.3 / 0.3)) = 30 >= 28: no fit); attempt 1 is the smallest square: 4 x 4 at (0, 0)
  # row 2: erase is False
  draws = np.full((3, 10, 4), 0.5)
  draws[0, 0] = (0.5, 0.5, 0.5, 0.99)
  draws[1, 0] = (1.0, 1.0, 0.0, 0.0)
  draws[1, 1] = (0.0, 0.5, 0.0, 0.0)
  out = images.erase_boxes(x, np.array([True, True, False]), draws, noise)
  expected = np.zeros_like(x)
  expected[0, 8:20, 16:28] = 1
  expected[1, 0:4, 0:4] = 1
  np.testing.assert_array_equal(out, expected)
  # no attempt fits (all ten are the 9 x 30 box): the image stays as it was
  never = np.broadcast_to(draws[1, 0], (1, 10, 4))
  np.testing.assert_array_equal(images.erase_boxes(x[:1], np.array([True]), never, noise[:1]), x[:1])


def test_random_erasing_is_a_seeded_noise_rectangle_in_training_only():
  plain = _batch(5, augment=False)
  erased = _batch(5, augment=False, random_erasing=0.5)
  np.testing.assert_array_equal(erased, _batch(5, augment=False, random_erasing=0.5))
  assert not np.array_equal(erased, _batch(6, augment=False, random_erasing=0.5))
  changed = erased != plain
  hit = changed.any(axis=(1, 2))
  assert 16 <= hit.sum() <= 48  # 64 rows at p = 1/2 (a few boxes may land on equal pixels: never all)
  for c, e in zip(changed[hit], erased[hit]):
    rows, cols = np.flatnonzero(c.any(1)), np.flatnonzero(c.any(0))
    box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    assert c[box].mean() > 0.99 and not c.sum() - c[box].sum()  # one rectangle of changed pixels
    assert 0.02 * 784 * 0.5 <= c[box].size <= 784 / 3 * 1.5
    assert abs(e[box].mean()) < 0.5 and 0.6 < e[box].std() < 1.4  # standard normal noise
  np.testing.assert_array_equal(_batch(5, train=False, random_erasing=1.0), _batch(5, train=False))
