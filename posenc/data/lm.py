"""The causal-LM pipeline: ``loader(split, batching, max_len=...)`` -> GPT batches of a text dataset
(default "text": Austen's six novels + Moby Dick; any whose records hold "document", "paragraph"
and "text").

Tokenizer. A byte-level BPE (HF `tokenizers`: ByteLevel pre-tokenizer and decoder,
BPE model) trained with BpeTrainer on the train split's paragraph texts only, in
corpus order, with the 256 byte symbols as initial alphabet and one special token
<|endoftext|> (id 0). The trained vocabulary and merges do not depend on the number
of threads. Trained once per vocabulary size and data dir, then loaded.

Documents and streams. A document is a maximal run of consecutive paragraphs of one
book within one split, its paragraphs joined with "\\n". A split's token stream is
its documents in corpus order, each followed by <|endoftext|>.

Files (under posenc.data.data_dir() unless data_dir is given; <builder> is the dataset's TFDS
builder name, gutenberg_novels for "text"), each written atomically under a file lock, so
concurrent processes prepare them once:
  <data_dir>/<builder>_bpe/v<vocab_size>/tokenizer.json
  <data_dir>/<builder>_bpe/v<vocab_size>/<split>.npy   (int32 token stream)

Batches (dicts of numpy arrays, b = this process's rows, L = the row length):
  input_ids [b, L] int32, targets [b, L] int32 (the next token of the stream),
  weights [b, L] float32 (1 = scored), positions [b, L] int32,
  packing_ids [b, L] int32, valid [b] float32 (0 = padding row, all weights 0).

Training (``loader``): the stream cut into consecutive chunks of max_len + 1
tokens that overlap by one (inputs = chunk[:-1], targets = chunk[1:]); every target
is scored. Positions start at 0 at the start of a row and after every
<|endoftext|> (which belongs to the document it ends); packing_ids number the
documents of a row 1, 2, ... so a model can keep them apart. Rows are shuffled per
epoch by grain's index shuffle from `seed`; train=False reads them in order, once.
Sharding and iterator state: posenc.data.batching.

Evaluation (``loader(..., scored_tokens=T)``): length generalisation on the split's continuous
stream (documents not kept apart: positions 0..N-1, packing_ids all 1; N = max_len). Exactly
the targets stream[1 : T + 1] are scored, each once, at every length N:
  stride=None: windows stream[kN : kN + N], every target scored;
  stride=S:    windows end at e = S, 2S, ..., scored_tokens; the input
               stream[max(0, e - N) : e] starts the row (a short first window is
               padded at the end, weight 0) and only its last S targets are scored.
One pass in order, padded to a multiple of the global batch size with valid=0 rows.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import uuid

import grain
import numpy as np

from posenc.data import batching as batching_, datasets, registry
from posenc.data.batching import check_int

DATASET = "text"
EOT = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 4096
MIN_VOCAB_SIZE = 257  # the 256 bytes + <|endoftext|>


# ------------------------------------------------------------------------ corpus

def _check_split(split: str, dataset: str) -> str:
  names = list(registry.get(dataset).splits or ())
  if split not in names:
    raise ValueError(f"Unknown split {split!r} of the LM corpus {dataset!r}: use one of {names}.")
  return split


def _paragraphs(split: str, directory: str, dataset: str) -> list[tuple[int, int, str]]:
  """(book, paragraph index, text) of a split's paragraphs, in corpus order."""
  src = datasets.source(dataset, _check_split(split, dataset), directory)
  records = src.__getitems__(range(len(src)))
  rows = [(int(r["document"]), int(r["paragraph"]), r["text"].decode()) for r in records]
  return sorted(rows, key=lambda r: r[:2])


def train_texts(data_dir: str | None = None, *, dataset: str = DATASET) -> list[str]:
  """The tokenizer's training corpus: the train split's paragraph texts, in corpus order."""
  return [p for _, _, p in _paragraphs("train", data_dir or datasets.data_dir(), dataset)]


def documents(split: str, data_dir: str | None = None, *, dataset: str = DATASET) -> list[str]:
  """A split's documents (maximal runs of consecutive paragraphs of one book), in order."""
  docs: list[list[str]] = []
  last = None
  for book, index, paragraph in _paragraphs(split, data_dir or datasets.data_dir(), dataset):
    if last != (book, index - 1):
      docs.append([])
    docs[-1].append(paragraph)
    last = (book, index)
  return ["\n".join(d) for d in docs]


# ---------------------------------------------------------------- tokenizer, files

def store_dir(vocab_size: int, data_dir: str | None = None, *, dataset: str = DATASET) -> str:
  directory = data_dir or datasets.data_dir()
  return os.path.join(directory, f"{datasets.builder(dataset, directory).name}_bpe", f"v{vocab_size}")


def _atomic_write(path: str, write) -> None:
  """Calls write(file) on a new file next to `path` (mode by umask), then renames it to `path`."""
  tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex}"
  try:
    with open(tmp, "xb") as f:
      write(f)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _check_vocab_size(vocab_size) -> int:
  return check_int("vocab_size", vocab_size, MIN_VOCAB_SIZE)


def train_tokenizer(texts: list[str], vocab_size: int):
  """A byte-level BPE tokenizer trained on `texts` (see the module docstring)."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=_check_vocab_size(vocab_size), special_tokens=[EOT],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer, length=len(texts))
  return tok


@functools.lru_cache(maxsize=8)
def _tokenizer(vocab_size: int, directory: str, dataset: str):
  import tokenizers
  path = os.path.join(store_dir(vocab_size, directory, dataset=dataset), "tokenizer.json")
  if not os.path.isfile(path):
    with datasets.file_lock(os.path.join(os.path.dirname(path), ".lock")):
      if not os.path.isfile(path):  # another process may have trained it while we waited
        tok = train_tokenizer(train_texts(directory, dataset=dataset), vocab_size)
        _atomic_write(path, lambda f: f.write(tok.to_str(pretty=True).encode()))
  return tokenizers.Tokenizer.from_file(path)


def tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE, *, data_dir: str | None = None, dataset: str = DATASET):
  """The corpus's byte-level BPE `tokenizers.Tokenizer` (trained on first use, then loaded)."""
  return _tokenizer(_check_vocab_size(vocab_size), data_dir or datasets.data_dir(), dataset)


def eot_id(vocab_size: int = DEFAULT_VOCAB_SIZE, *, data_dir: str | None = None, dataset: str = DATASET) -> int:
  return tokenizer(vocab_size, data_dir=data_dir, dataset=dataset).token_to_id(EOT)


@functools.lru_cache(maxsize=16)
def _stream(split: str, vocab_size: int, directory: str, dataset: str) -> np.ndarray:
  tok = _tokenizer(vocab_size, directory, dataset)  # before the lock: it takes the same one
  path = os.path.join(store_dir(vocab_size, directory, dataset=dataset), f"{split}.npy")
  if not os.path.isfile(path):
    with datasets.file_lock(os.path.join(os.path.dirname(path), ".lock")):
      if not os.path.isfile(path):
        eot = tok.token_to_id(EOT)
        encoded = tok.encode_batch_fast(documents(split, directory, dataset=dataset), add_special_tokens=False)
        ids = np.concatenate([np.asarray(e.ids + [eot], np.int32) for e in encoded])
        _atomic_write(path, lambda f: np.save(f, ids))
  ids = np.load(path)
  ids.setflags(write=False)
  return ids


def stream(split: str, vocab_size: int = DEFAULT_VOCAB_SIZE, *,
           data_dir: str | None = None, dataset: str = DATASET) -> np.ndarray:
  """A split's token stream (read-only int32): its documents, each followed by <|endoftext|>."""
  return _stream(_check_split(split, dataset), _check_vocab_size(vocab_size),
                 data_dir or datasets.data_dir(), dataset)


def stream_length(split: str, vocab_size: int = DEFAULT_VOCAB_SIZE, *,
                  data_dir: str | None = None, dataset: str = DATASET) -> int:
  """Tokens in a split's stream; at most stream_length - 1 targets can be scored."""
  return len(stream(split, vocab_size, data_dir=data_dir, dataset=dataset))


# ----------------------------------------------------------------------- batches

def packing(inputs: np.ndarray, eot: int) -> tuple[np.ndarray, np.ndarray]:
  """positions and packing_ids of rows of input ids: a new document starts at the start
  of a row and after every `eot`."""
  starts = np.zeros(inputs.shape, bool)
  starts[:, 0] = True
  starts[:, 1:] = inputs[:, :-1] == eot
  cols = np.broadcast_to(np.arange(inputs.shape[1]), inputs.shape)
  first = np.maximum.accumulate(np.where(starts, cols, 0), axis=1)
  return (cols - first).astype(np.int32), np.cumsum(starts, axis=1).astype(np.int32)


class TrainRows:
  """The stream in chunks of max_len + 1 tokens overlapping by one, with packing."""

  def __init__(self, ids: np.ndarray, max_len: int, eot: int):
    self.ids, self.max_len, self.eot = ids, max_len, eot

  def __len__(self) -> int:
    return (len(self.ids) - 1) // self.max_len

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    chunks = self.ids[indices[:, None] * self.max_len + np.arange(self.max_len + 1)]
    inputs = chunks[:, :-1]
    positions, packing_ids = packing(inputs, self.eot)
    return {"input_ids": inputs, "targets": chunks[:, 1:],
            "weights": np.ones(inputs.shape, np.float32), "positions": positions,
            "packing_ids": packing_ids}


class EvalWindows:
  """Windows of `length` tokens ending at stride, 2 stride, ..., scored_tokens; the last
  `stride` targets of each are scored (stride = length: non-overlapping windows)."""

  def __init__(self, ids: np.ndarray, length: int, stride: int, scored_tokens: int, pad: int):
    self.ids, self.length, self.stride, self.pad = ids, length, stride, pad
    self.count = scored_tokens // stride

  def __len__(self) -> int:
    return self.count

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    ends = (indices[:, None] + 1) * self.stride
    starts = np.maximum(ends - self.length, 0)
    src = starts + np.arange(self.length)
    real = src < ends
    src = np.where(real, src, 0)
    scored = real & (src >= ends - self.stride)
    shape = src.shape
    return {"input_ids": np.where(real, self.ids[src], self.pad).astype(np.int32),
            "targets": np.where(real, self.ids[src + 1], self.pad).astype(np.int32),
            "weights": scored.astype(np.float32),
            "positions": np.broadcast_to(np.arange(self.length, dtype=np.int32), shape).copy(),
            "packing_ids": np.ones(shape, np.int32)}


@dataclasses.dataclass
class ReadRows(grain.transforms.Map):
  """Global row indices -> a batch; indices past the end are padding rows (valid 0)."""
  rows: TrainRows | EvalWindows

  def map(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = np.asarray(indices, np.int64)
    valid = indices < len(self.rows)
    batch = self.rows.read(np.where(valid, indices, len(self.rows) - 1))
    batch["weights"] = batch["weights"] * valid[:, None]
    return {**batch, "valid": valid.astype(np.float32)}


def loader(split: str, batching: batching_.Batching, *, max_len: int, vocab_size: int = DEFAULT_VOCAB_SIZE,
           scored_tokens: int | None = None, stride: int | None = None, dataset: str = DATASET,
           data_dir: str | None = None) -> grain.IterDataset:
  """Causal-LM batches of ``split`` for this process (see the module docstring): packed rows of
  ``max_len`` tokens, or, given ``scored_tokens``, the evaluation windows of length ``max_len``
  (every ``stride`` tokens; None: non-overlapping) that score exactly the first ``scored_tokens``
  targets of the stream."""
  max_len = check_int("max_len", max_len, 1)
  ids = stream(split, vocab_size, data_dir=data_dir, dataset=dataset)
  eot = eot_id(vocab_size, data_dir=data_dir, dataset=dataset)
  if scored_tokens is None:
    if stride is not None:
      raise ValueError("stride is for evaluation windows: give scored_tokens too.")
    rows = TrainRows(ids, max_len, eot)
    return batching_.batches(len(rows), batching, ReadRows(rows), what=(
        f"Split {split!r} ({len(ids)} tokens: {len(rows)} rows of max_len {max_len})"))
  if batching.train:
    raise ValueError("scored_tokens selects the evaluation windows: use train=False.")
  scored_tokens = check_int("scored_tokens", scored_tokens, 1)
  if stride is None:
    if scored_tokens % max_len:
      raise ValueError(f"scored_tokens {scored_tokens} must be a multiple of max_len {max_len} "
                       "for non-overlapping windows (stride=None).")
  else:
    stride = check_int("stride", stride, 1)
    if stride > max_len:
      raise ValueError(f"stride {stride} must be at most max_len {max_len}.")
    if scored_tokens % stride:
      raise ValueError(f"scored_tokens {scored_tokens} must be a multiple of stride {stride}.")
  if scored_tokens >= len(ids):
    raise ValueError(f"scored_tokens {scored_tokens} exceeds the {len(ids) - 1} targets of "
                     f"split {split!r} (stream_length - 1).")
  rows = EvalWindows(ids, max_len, stride or max_len, scored_tokens, eot)
  return batching_.batches(len(rows), batching, ReadRows(rows), what=f"Split {split!r}")
