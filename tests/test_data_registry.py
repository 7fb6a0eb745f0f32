"""posenc.data's seams: the dataset registry (entries, features, statistics), the one batching chain
(batches pinned to those of the chain before the registry), and the dataset added through the
registry alone: scikit-learn's digits, checked against ``sklearn.datasets.load_digits`` and trained on."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import FM, take
from posenc.data import Batching, datasets, digits, images, info, lm, masked_lm, registry
from posenc.data.images import ImageOptions

REPO = Path(__file__).resolve().parents[1]


def digest(batches) -> str:
  h = hashlib.sha256()
  for batch in batches:
    for key in sorted(batch):
      a = np.asarray(batch[key])
      for part in (key.encode(), str(a.dtype).encode(), str(a.shape).encode(), a.tobytes()):
        h.update(part)
  return h.hexdigest()[:16]


# sha256 prefixes of two batches of each pipeline, computed with make_loader / lm_loader /
# lm_eval_loader before the registry and the shared chain replaced them: same seed, same batches.
PINNED = {
    "image_train": "10cf76cefeb30955",
    "image_canvas_eval": "e89030094896ea1b",
    "image_regularised_shard": "bb1241c35dc32892",
    "mlm_train": "0b514c35e0d5e235",
    "mlm_eval": "d2be6817df6bfa60",
    "lm_train": "c5373dac7b975c62",
    "lm_eval": "884c89cb23f52b52",
}
LOADERS = {
    "image_train": lambda: images.loader(FM, "validation", Batching(16, True, 3), ImageOptions(image_size=(20, 12))),
    "image_canvas_eval": lambda: images.loader(FM, "test[:100]", Batching(32, False, 0), ImageOptions(
        image_size=24, protocol="canvas", object_size=20)),
    "image_regularised_shard": lambda: images.loader(
        FM, "validation", Batching(16, True, 4, process_index=1, process_count=2),
        ImageOptions(flip=True, translate=2, random_erasing=0.5, image_sizes=(16, 28))),
    "mlm_train": lambda: masked_lm.loader("text", "validation", Batching(8, True, 11), max_len=32),
    "mlm_eval": lambda: masked_lm.loader("text", "validation", Batching(16, False, 0), max_len=64),
    "lm_train": lambda: lm.loader("validation", Batching(8, True, 1), max_len=32),
    "lm_eval": lambda: lm.loader("validation", Batching(8, False), max_len=64, stride=16, scored_tokens=1024),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_batches_are_those_of_the_chain_before_the_registry(name):
  assert digest(take(LOADERS[name](), 2)) == PINNED[name]


def test_registered_features_are_what_the_builders_store():
  for name in registry.names():
    entry = registry.get(name)
    if entry.builder is None or entry.features is None or entry.features.image_size is None:
      continue
    stored = datasets.image_features(name, datasets.builder(name).info.features)
    assert stored == entry.features, name


def test_unknown_names_are_tfds_datasets_and_bad_ones_a_clear_error(tmp_path):
  assert {"fashion_mnist", "digits", "text", "synthetic", "algorithmic"} <= set(registry.names())
  assert registry.get("mnist").builder is not None and registry.get("mnist").splits is None
  with pytest.raises(ValueError, match=r"Unknown dataset 'no_such_dataset': use one of \[.*'digits'"):
    datasets.builder("no_such_dataset", str(tmp_path))
  with pytest.raises(ValueError, match="registered twice"):
    registry.register(registry.Dataset(name="digits"))
  with pytest.raises(ValueError, match="generated in memory"):
    datasets.builder("synthetic")


def test_batching_checks_its_fields():
  for kwargs, match in ((dict(batch_size=10, process_count=3, process_index=0), "divisible by process_count"),
                        (dict(seed=2**32), r"seed must be an integer in \[0, 4294967296\)"),
                        (dict(num_epochs=0), "num_epochs must be an integer >= 1"),
                        (dict(worker_count=-1), "worker_count")):
    with pytest.raises(ValueError, match=match):
      Batching(**(dict(batch_size=8, train=True) | kwargs))


# ----------------------------------------------------------------------- digits

@pytest.fixture(scope="module")
def reference():
  sklearn_datasets = pytest.importorskip("sklearn.datasets", reason="no scikit-learn (requirements.txt)")
  ref = sklearn_datasets.load_digits()
  return np.rint(ref.images * 255 / 16).astype(np.uint8), ref.target


def test_digits_splits_are_deterministic_disjoint_and_complete(reference):
  ref_images, ref_labels = reference
  assert info("digits") == datasets.DatasetInfo(
      name="digits", splits={"train": 1437, "validation": 180, "test": 180}, num_classes=10, channels=1,
      image_size=(8, 8))
  seen = []
  for split, rows in (("train", slice(0, 1437)), ("validation", slice(1437, 1617)), ("test", slice(1617, 1797))):
    src = datasets.source("digits", split)
    records = src.__getitems__(range(len(src)))
    stored = np.stack([r["image"][..., 0] for r in records])
    np.testing.assert_array_equal(stored, ref_images[rows])  # in file order: the same rows every time
    np.testing.assert_array_equal([r["label"] for r in records], ref_labels[rows])
    seen.append(rows)
  assert [r.start for r in seen[1:]] == [r.stop for r in seen[:-1]] and seen[-1].stop == len(ref_labels)


def test_digits_statistics_are_the_train_split_pixels(reference):
  pixels = reference[0][:1437].astype(np.float64) / 255
  mean, std = registry.get("digits").stats
  assert abs(pixels.mean() - mean) < 1e-4 and abs(pixels.std() - std) < 1e-4
  batch = next(iter(images.loader("digits", "test", Batching(180, False))))
  np.testing.assert_allclose(batch["image"][..., 0] * std + mean, reference[0][1617:] / 255, atol=1e-6)


def test_damaged_digits_file_is_one_clear_error(tmp_path):
  (tmp_path / digits.FILE).write_bytes(b"not a csv")
  with pytest.raises(ValueError, match=r"digits\.csv\.gz is not a readable CSV.*scikit-learn"):
    datasets.builder("digits", str(tmp_path / "data"), str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"does not exist.*scikit-learn"):
    digits.check_source(str(tmp_path / "missing"))


@pytest.mark.slow
def test_vit_trains_on_digits_through_its_preset(tmp_path):
  tiny = ("model_options.width=16,model_options.depth=1,model_options.num_heads=2,model_options.mlp_dim=32,"
          "batch_size=32,eval_batch_size=64,total_steps=2,warmup_steps=1,log_every=1,eval_every=0,"
          "checkpoint_every=2")
  out = subprocess.run([sys.executable, str(REPO / "train.py"), f"--config=configs/vit_tiny.py:digits,{tiny}",
                        f"--workdir={tmp_path / 'w'}"], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  records = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "train/loss" in r] == [1, 2]
  assert all(np.isfinite(r["train/loss"]) for r in records if "train/loss" in r)
  assert [r for r in records if "test/accuracy" in r]  # evaluated on the 180 test digits
