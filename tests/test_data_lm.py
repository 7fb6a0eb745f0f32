"""posenc.data.lm: the byte-level BPE tokenizer (deterministic, stored, trained on train
only), documents and token streams, packed causal-LM training rows (shuffling, resume,
process sharding) and the length-generalisation evaluation windows."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import assert_batches_equal, concat, take
from posenc.data import Batching, datasets, lm

VOCAB = 512  # small: the tokenizer trains quickly
EVAL_LENGTHS = (16, 64, 256)


def lm_loader(split, *, max_len, vocab_size=VOCAB, **batching):
  """Packed training rows (train=False: in order, once)."""
  return lm.loader(split, Batching(**{"train": True} | batching), max_len=max_len, vocab_size=vocab_size)


def lm_eval_loader(split, *, length, scored_tokens, stride=None, vocab_size=VOCAB, **batching):
  """The evaluation windows of ``length`` tokens."""
  return lm.loader(split, Batching(train=False, **batching), max_len=length, scored_tokens=scored_tokens,
                   stride=stride, vocab_size=vocab_size)


@pytest.fixture(scope="module")
def val():
  return lm.stream("validation", VOCAB)


def split_texts(split):
  src = datasets.source("text", split)
  records = sorted(src.__getitems__(range(len(src))),
                   key=lambda r: (int(r["document"]), int(r["paragraph"])))
  return [r["text"].decode() for r in records], records


def data_dir_with_corpus(path):
  """An empty data dir sharing the prepared TFDS corpus (so only the BPE files are new)."""
  path.mkdir()
  prepared = datasets.builder("text").data_dir  # <data_dir>/gutenberg_novels/<version>
  os.symlink(os.path.dirname(prepared), path / os.path.basename(os.path.dirname(prepared)))
  return str(path)


# --------------------------------------------------------------------------- tokenizer

def test_tokenizer_deterministic_and_trained_on_train_only(val, tmp_path, monkeypatch):
  """Three trainings (two data dirs, one single-threaded in another process) agree."""
  seen = []
  train = lm.train_tokenizer
  monkeypatch.setattr(lm, "train_tokenizer", lambda texts, v: seen.append(texts) or train(texts, v))
  a, b = data_dir_with_corpus(tmp_path / "a"), data_dir_with_corpus(tmp_path / "b")
  code = f"from posenc.data import lm; lm.tokenizer({VOCAB}, data_dir={b!r})"
  env = dict(os.environ, RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
  single_threaded = subprocess.Popen([sys.executable, "-c", code], env=env)
  lm.tokenizer(VOCAB, data_dir=a)
  assert single_threaded.wait(timeout=300) == 0
  files = [os.path.join(lm.store_dir(VOCAB, d), "tokenizer.json")
           for d in (a, b, datasets.data_dir())]
  first, *rest = (open(f, "rb").read() for f in files)
  assert all(r == first for r in rest)
  # trained once here, on exactly the train split's paragraphs in corpus order
  train_texts = split_texts("train")[0]
  assert len(seen) == 1 and seen[0] == train_texts
  others = set(split_texts("validation")[0]) | set(split_texts("test")[0])
  assert not others & set(train_texts)


def test_tokenizer_is_stored_and_reused(val, monkeypatch):
  path = os.path.join(lm.store_dir(VOCAB), "tokenizer.json")
  mtime, stored = os.stat(path).st_mtime_ns, open(path).read()
  lm._tokenizer.cache_clear()
  monkeypatch.setattr(lm, "train_tokenizer", lambda *a: pytest.fail("retrained"))
  tok = lm.tokenizer(VOCAB)
  assert os.stat(path).st_mtime_ns == mtime and open(path).read() == stored
  assert tok.get_vocab_size() == VOCAB and tok.token_to_id(lm.EOT) == lm.eot_id(VOCAB) == 0
  assert {"tokenizer.json", "validation.npy"} <= set(os.listdir(lm.store_dir(VOCAB)))


def test_round_trip_documents_and_stream(val):
  tok = lm.tokenizer(VOCAB)
  for s in ("Mr.  Darcy\u2014 \"Caf\u00e9\"\n\n\tnaïve \U0001F40B\n", " leading", "x" * 50):
    assert tok.decode(tok.encode(s, add_special_tokens=False).ids) == s
  texts, records = split_texts("validation")
  docs = lm.documents("validation")
  assert "\n".join(docs) == "\n".join(texts)  # every paragraph, in corpus order
  breaks = sum((a["document"], a["paragraph"] + 1) != (b["document"], b["paragraph"])
               for a, b in zip(records, records[1:]))
  assert len(docs) == breaks + 1  # a new document exactly where a run of paragraphs breaks
  eot = lm.eot_id(VOCAB)
  assert val.dtype == np.int32 and val[-1] == eot and (val == eot).sum() == len(docs)
  pieces = np.split(val[:-1], np.flatnonzero(val[:-1] == eot) + 1)
  assert [tok.decode(p[p != eot].tolist()) for p in pieces] == docs
  assert lm.stream_length("validation", VOCAB) == len(val)


# ----------------------------------------------------------------------- training rows

def reference_packing(row, eot):
  positions, ids, pos, doc = [], [], 0, 1
  for token in row:
    positions.append(pos)
    ids.append(doc)
    pos, doc = (0, doc + 1) if token == eot else (pos + 1, doc)
  return positions, ids


def test_packed_rows_cover_the_stream_once_per_epoch(val):
  max_len, batch = 64, 32
  n = (len(val) - 1) // max_len
  batches = take(lm_loader("validation", batch_size=batch, max_len=max_len, seed=0,
                           vocab_size=VOCAB), -(-2 * n // batch))
  rows = concat(batches)
  assert rows["input_ids"].shape[1] == max_len and rows["valid"].dtype == np.float32
  assert {k: v.dtype for k, v in rows.items()} == {
      "input_ids": np.int32, "targets": np.int32, "weights": np.float32, "positions": np.int32,
      "packing_ids": np.int32, "valid": np.float32}
  assert (rows["weights"] == 1).all() and (rows["valid"] == 1).all()
  chunks = {val[k * max_len:(k + 1) * max_len + 1].tobytes(): k for k in range(n)}
  full = np.concatenate([rows["input_ids"], rows["targets"][:, -1:]], axis=1)
  order = np.array([chunks[r.tobytes()] for r in full])  # every row is a chunk of the stream...
  np.testing.assert_array_equal(rows["targets"][:, :-1], rows["input_ids"][:, 1:])
  assert sorted(order[:n]) == sorted(order[n:2 * n]) == list(range(n))  # ...once per epoch
  assert not np.array_equal(order[:n], order[n:2 * n])
  eot = lm.eot_id(VOCAB)
  for r in range(len(full)):
    positions, packing_ids = reference_packing(rows["input_ids"][r], eot)
    np.testing.assert_array_equal(rows["positions"][r], positions)
    np.testing.assert_array_equal(rows["packing_ids"][r], packing_ids)
  assert rows["packing_ids"].max() > 1  # some rows hold several documents


def test_train_resume_mid_epoch_and_process_sharding():
  kw = dict(batch_size=16, max_len=32, seed=7, vocab_size=VOCAB)
  n = (lm.stream_length("validation", VOCAB) - 1) // 32 // 16  # global batches per epoch
  it = iter(lm_loader("validation", **kw))
  take(it, n - 2)
  state = it.get_state()
  expected = take(it, 5)  # crosses into the second epoch
  resumed = iter(lm_loader("validation", **kw))
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 5), expected)
  assert_batches_equal(take(lm_loader("validation", **kw), 3),
                       take(lm_loader("validation", **kw), 3))
  other = take(lm_loader("validation", **(kw | dict(seed=8))), 1)[0]
  assert not np.array_equal(other["input_ids"], expected[0]["input_ids"])
  for loader, kwargs in ((lm_loader, kw),
                         (lm_eval_loader, dict(batch_size=16, length=32, scored_tokens=32 * 40,
                                               vocab_size=VOCAB))):
    whole = take(loader("validation", process_index=0, process_count=1, **kwargs), 3)
    parts = [take(loader("validation", process_index=p, process_count=2, **kwargs), 3)
             for p in (0, 1)]
    for k in range(3):
      for key in whole[k]:
        assert parts[0][k][key].shape[0] == 8
        interleaved = np.stack([parts[0][k][key], parts[1][k][key]], axis=1)
        np.testing.assert_array_equal(interleaved.reshape(whole[k][key].shape), whole[k][key])


def test_train_false_reads_rows_in_order_once(val):
  batches = list(lm_loader("validation", batch_size=64, max_len=128, train=False, seed=0,
                           vocab_size=VOCAB))
  rows = concat(batches)
  n = (len(val) - 1) // 128
  assert len(rows["valid"]) == -(-n // 64) * 64 and rows["valid"].sum() == n
  np.testing.assert_array_equal(rows["input_ids"][:n].ravel(), val[:n * 128])
  assert not rows["weights"][n:].any() and not rows["valid"][n:].any()


# --------------------------------------------------------------------- evaluation windows

def scored_pairs(val, rows, length, stride):
  """(stream index, target) of every scored target; checks each row against the stream."""
  valid = rows["valid"].astype(bool)
  assert valid[:valid.sum()].all() and not rows["weights"][~valid].any()
  k = np.arange(valid.sum())
  ends = (k + 1) * stride
  starts = np.maximum(ends - length, 0)
  src = starts[:, None] + np.arange(length)
  real = src < ends[:, None]
  w = rows["weights"][valid]
  np.testing.assert_array_equal(rows["input_ids"][valid][real], val[src[real]])
  np.testing.assert_array_equal(rows["targets"][valid][real], val[src[real] + 1])
  assert not w[~real].any() and (w.sum(1) == stride).all()  # padding unscored; last S scored
  assert (w[real] == 1).sum() == w.sum()
  np.testing.assert_array_equal(rows["positions"], np.broadcast_to(np.arange(length),
                                                                   rows["positions"].shape))
  assert (rows["packing_ids"] == 1).all()
  idx = src[w == 1] + 1
  return idx, rows["targets"][valid][w == 1]


def test_eval_scores_the_same_targets_at_every_length_and_stride(val):
  scored = (len(val) - 1) // max(EVAL_LENGTHS) * max(EVAL_LENGTHS)
  for length in EVAL_LENGTHS:
    modes = {}
    for stride in (None, length, length // 4):
      batches = list(lm_eval_loader("validation", batch_size=64, length=length, stride=stride,
                                    scored_tokens=scored, vocab_size=VOCAB))
      rows = concat(batches)
      assert rows["input_ids"].shape[1] == length and len(rows["valid"]) % 64 == 0
      idx, targets = scored_pairs(val, rows, length, stride or length)
      np.testing.assert_array_equal(np.sort(idx), np.arange(1, scored + 1))  # each once
      np.testing.assert_array_equal(targets, val[idx])
      modes[stride] = batches
    assert_batches_equal(modes[None], modes[length])  # S = N: the non-overlapping windows


def test_eval_short_first_windows_are_padded_at_the_end(val):
  rows = concat(list(lm_eval_loader("validation", batch_size=8, length=64, stride=16,
                                    scored_tokens=160, vocab_size=VOCAB)))
  np.testing.assert_array_equal(rows["input_ids"][0, :16], val[:16])
  np.testing.assert_array_equal(rows["weights"][0], np.arange(64) < 16)
  np.testing.assert_array_equal(rows["weights"][2], (32 <= np.arange(64)) & (np.arange(64) < 48))
  np.testing.assert_array_equal(rows["input_ids"][4], val[16:80])
  np.testing.assert_array_equal(rows["weights"][4], np.arange(64) >= 48)


@pytest.mark.parametrize("kwargs, match", [
    (dict(scored_tokens=100), "must be a multiple of max_len 64"),
    (dict(stride=128), "stride 128 must be at most max_len 64"),
    (dict(stride=48), "must be a multiple of stride 48"),
    (dict(stride=0), "stride must be an integer"),
    (dict(scored_tokens=64 * 10**6), "exceeds the .* targets"),
    (dict(batch_size=10, process_count=4, process_index=0), "divisible by process_count"),
    (dict(split="valid"), "Unknown split 'valid'"),
    (dict(vocab_size=100), "vocab_size must be an integer >= 257"),
    (dict(length=0), "max_len must be an integer"),
])
def test_bad_eval_arguments_are_clear_errors(val, kwargs, match):
  args = dict(split="validation", batch_size=8, length=64, scored_tokens=64 * 20,
              vocab_size=VOCAB) | kwargs
  with pytest.raises(ValueError, match=match):
    lm_eval_loader(args.pop("split"), **args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(train=False, num_epochs=2), "num_epochs is for training"),
    (dict(max_len=10**6), "fewer than one batch"),
    (dict(seed=-1), "seed must be an integer"),
    (dict(max_len=0), "max_len must be an integer"),
    (dict(split="train[:10%]"), "Unknown split"),
])
def test_bad_train_arguments_are_clear_errors(val, kwargs, match):
  args = dict(split="validation", batch_size=8, max_len=64, seed=0, vocab_size=VOCAB) | kwargs
  with pytest.raises(ValueError, match=match):
    lm_loader(args.pop("split"), **args)
