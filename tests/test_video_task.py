"""The video task (posenc.tasks.video_motion, posenc.data.video): moving-object clips whose label is
their direction, sharded and resumable like the image batches, trained by train.py with a 3D encoding
and evaluated at clip lengths it never saw."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import FM, load_config, unnormalise
from posenc.config import ConfigError
from posenc.data import Batching, video
from posenc.training import setup
from test_training_runs import run_train


def centroids(clips: np.ndarray) -> np.ndarray:
  """[b, T, H, W, C] -> the pixel mass's centre [b, T, 2] (y, x) per frame."""
  mass = clips.sum(-1)
  ys, xs = np.indices(mass.shape[-2:])
  total = mass.sum((-2, -1))
  return np.stack([(mass * ys).sum((-2, -1)) / total, (mass * xs).sum((-2, -1)) / total], -1)


def test_clips_move_the_object_by_speed_per_frame_in_the_labelled_direction_and_stay_on_the_canvas():
  rng = np.random.default_rng(0)
  objects = rng.random((64, 5, 7, 2)).astype(np.float32) + 0.1  # no zero rows: every pixel counts
  directions = np.arange(64) % video.NUM_CLASSES
  fractions = np.concatenate([np.zeros((8, 2)), np.full((8, 2), 0.999999), rng.random((48, 2))])
  clips = video.moving_clips(objects, (20, 23), 6, 3, directions, fractions)
  assert clips.shape == (64, 6, 20, 23, 2)
  np.testing.assert_allclose(clips.sum((2, 3, 4)), np.broadcast_to(objects.sum((1, 2, 3))[:, None], (64, 6)),
                             rtol=1e-5)  # the whole object on every frame
  steps = np.diff(centroids(clips), axis=1)
  np.testing.assert_allclose(steps, np.broadcast_to(3 * video.DIRECTIONS[directions][:, None], steps.shape),
                             atol=1e-4)
  # the extreme starts (u = 0 and u -> 1) put some trajectory's frame on each canvas edge
  first, last = np.argwhere(clips[:16].sum((1, 4)) > 0).min(0), np.argwhere(clips[:16].sum((1, 4)) > 0).max(0)
  assert first[1:].tolist() == [0, 0] and last[1:].tolist() == [19, 22]


def test_a_clip_too_long_for_the_canvas_is_one_clear_error():
  assert video.max_frames(32, 16, 1) == 17 and video.max_frames((32, 20), 16, 2) == 3
  with pytest.raises(ValueError, match="has room for 17 frames"):
    video.ClipOptions(32, 16, frames=18)
  for arg, field in (("eval_num_frames=(4,18)", "eval_num_frames"), ("num_frames=6,tubelet=4", "num_frames"),
                     ("patch_size=5", "patch_size")):
    with pytest.raises(ConfigError, match=f"config field '{field}'"):
      setup(load_config("video_tiny", arg))


def loader(split="test", *, train, frames=4, batch_size=32, **batching):
  return video.loader(FM, split, Batching(batch_size, train, 3, **batching),
                      video.ClipOptions(32, 16, frames, speed=2))


def test_evaluation_clips_are_fixed_per_record_at_every_length_and_labelled_by_their_motion():
  a, b = (next(iter(loader(train=False))) for _ in range(2))
  np.testing.assert_array_equal(a["image"], b["image"])
  longer = next(iter(loader(train=False, frames=8)))
  np.testing.assert_array_equal(longer["label"], a["label"])  # the same direction at every length
  assert a["image"].shape == (32, 4, 32, 32, 1) and a["image"].dtype == np.float32
  assert len(set(a["label"].tolist())) > 4
  steps = np.diff(centroids(unnormalise(longer["image"])), axis=1)
  np.testing.assert_allclose(steps, np.broadcast_to(2 * video.DIRECTIONS[longer["label"]][:, None], steps.shape),
                             atol=1e-3)


def test_two_processes_see_the_rows_of_one_and_a_restored_iterator_continues_exactly():
  whole = iter(loader("train", train=True))
  halves = [iter(loader("train", train=True, process_index=p, process_count=2)) for p in (0, 1)]
  for _ in range(2):
    batch, parts = next(whole), [next(h) for h in halves]
    for key in ("image", "label"):
      np.testing.assert_array_equal(batch[key][0::2], parts[0][key])
      np.testing.assert_array_equal(batch[key][1::2], parts[1][key])
  state = whole.get_state()
  want = next(whole)
  resumed = iter(loader("train", train=True))
  resumed.set_state(json.loads(json.dumps(state)))
  got = next(resumed)
  for key in ("image", "label"):
    np.testing.assert_array_equal(got[key], want[key])


def test_train_py_trains_a_video_vit_and_evaluates_clip_lengths_it_never_saw(tmp_path):
  """M-RoPE's (t, h, w) sections and a learned 3D table (resized along t) both run from a config."""
  tiny = ("model_options.width=16,model_options.depth=1,model_options.num_heads=2,model_options.mlp_dim=32,"
          "batch_size=8,eval_batch_size=16,eval_max_batches=1,total_steps=3,warmup_steps=1,log_every=1,"
          "eval_every=0,eval_num_frames=(4,12),num_frames=6,tubelet=2")
  for posenc in ("mrope", "learned"):
    workdir = tmp_path / posenc
    out = run_train([f"--config=configs/video_tiny.py:{tiny},posenc={posenc}", f"--workdir={workdir}"], 1)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "at 3D 3x8x8 (+1 prefix)" in out.stdout, out.stdout[-2000:]
    final = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()][-1]
    for name in ("test/accuracy", "test/accuracy_4f", "test/accuracy_12f"):
      assert 0 <= final[name] <= 1, final

