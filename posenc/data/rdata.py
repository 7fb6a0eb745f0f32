"""A small reader for R's serialization format and R lazy-load databases.

R packages ship their data sets as a lazy-load database: `Rdata.rdx` (a gzipped,
serialized index: for every object its byte offset and length in the `.rdb`) and
`Rdata.rdb` (for every object a 4-byte big-endian uncompressed length followed
by a zlib stream of the serialized object). Serialization is R's XDR format
(`serialize()`, versions 2 and 3; see R's src/main/serialize.c).

We read the types data sets are made of: NULL, symbols, pairlists (attributes),
logical / integer / double / character vectors and lists, with their attributes.
Closures, environments, byte code and ALTREP objects are refused with a clear
error. R values map to Python as follows:

  character vector -> RVector(list[str | None])  (None is NA)
  integer/logical  -> RVector(np.ndarray int32)   (NA is -2**31)
  double           -> RVector(np.ndarray float64)
  list             -> RVector(list)
  NULL             -> None
An RVector keeps its attributes (e.g. "names") in `.attributes`.
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import struct
import zlib
from typing import Any

import numpy as np

# SEXP types (R's Rinternals.h) and serialization pseudo-types (serialize.c).
NILSXP, SYMSXP, LISTSXP, CHARSXP, LGLSXP = 0, 1, 2, 9, 10
INTSXP, REALSXP, STRSXP, VECSXP, EXPRSXP = 13, 14, 16, 19, 20
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP = 255, 254, 253, 242, 241
_NAMED_TYPES = {3: "closure", 4: "environment", 5: "promise", 6: "language object",
                21: "byte code", 25: "S4 object", 238: "ALTREP object",
                247: "persistent reference", 248: "package environment",
                249: "namespace", 250: "base namespace"}
_NA_INT = -(2**31)


class RDataError(ValueError):
  """A file is not the R data we can read (corrupt, or an unsupported type)."""


@dataclasses.dataclass
class RVector:
  """An R vector: its values and its attributes (e.g. {"names": RVector([...])})."""
  values: Any
  attributes: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def names(self) -> list[str] | None:
    names = self.attributes.get("names")
    return None if names is None else names.values


class _Reader:
  """Reads one serialized R object from a byte string (XDR format only)."""

  def __init__(self, data: bytes, source: str):
    self.data, self.pos, self.source = data, 0, source
    self.refs: list[Any] = []  # symbols, in order of first appearance

  def fail(self, what: str) -> RDataError:
    return RDataError(f"{self.source}: {what} (at byte {self.pos}).")

  def take(self, n: int) -> bytes:
    if self.pos + n > len(self.data):
      raise self.fail("truncated R serialization stream")
    chunk = self.data[self.pos:self.pos + n]
    self.pos += n
    return chunk

  def int(self) -> int:
    return struct.unpack(">i", self.take(4))[0]

  def length(self) -> int:
    n = self.int()
    if n == -1:  # long vector: two 32-bit halves
      upper, lower = self.int(), self.int()
      n = (upper << 32) + (lower & 0xFFFFFFFF)
    return n

  def header(self) -> None:
    if self.take(2) != b"X\n":
      raise self.fail("not an R serialization stream in XDR format (expected 'X\\n')")
    version = self.int()
    self.int(), self.int()  # R version that wrote it, minimal R version to read it
    if version == 3:
      self.take(self.int())  # native encoding name, e.g. "UTF-8"
    elif version != 2:
      raise self.fail(f"unsupported R serialization version {version}")

  def item(self) -> Any:
    flags = self.int()
    kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
    if kind in (NILVALUE_SXP, NILSXP, GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP):
      return None  # environments only appear as enclosures we do not need
    if kind == REFSXP:
      index = flags >> 8 or self.int()
      return self.refs[index - 1]
    if kind == SYMSXP:
      name = self.item()
      self.refs.append(name)
      return name
    if kind == LISTSXP:
      return self.pairlist(has_attr, has_tag)
    if kind == CHARSXP:
      n = self.int()
      return None if n == -1 else self.take(n).decode("latin-1" if flags & (1 << 2) else "utf-8")
    if kind in (LGLSXP, INTSXP):
      values = np.frombuffer(self.take(4 * self.length()), ">i4").astype(np.int32)
    elif kind == REALSXP:
      values = np.frombuffer(self.take(8 * self.length()), ">f8").astype(np.float64)
    elif kind in (STRSXP, VECSXP, EXPRSXP):
      values = [self.item() for _ in range(self.length())]
    else:
      what = _NAMED_TYPES.get(kind, f"SEXP type {kind}")
      raise self.fail(f"cannot read a serialized {what}; only data vectors are supported")
    attributes = self.item() if has_attr else {}
    return RVector(values, attributes or {})

  def pairlist(self, has_attr: bool, has_tag: bool) -> dict[str, Any]:
    """Reads a pairlist (how attributes are stored) as a dict tag -> value."""
    out: dict[str, Any] = {}
    while True:
      if has_attr:
        self.item()  # attributes of a pairlist cell: unused
      tag = self.item() if has_tag else f"#{len(out)}"
      out[tag] = self.item()
      flags = self.int()  # the CDR: another cell or the terminating NULL
      if flags & 0xFF == NILVALUE_SXP:
        return out
      if flags & 0xFF != LISTSXP:
        raise self.fail(f"malformed pairlist (SEXP type {flags & 0xFF})")
      has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))


def unserialize(data: bytes, source: str = "<bytes>") -> Any:
  """Decodes one R object serialized by `serialize()` (XDR format)."""
  reader = _Reader(data, source)
  reader.header()
  return reader.item()


def read_lazyload_db(path_without_extension: str | os.PathLike) -> dict[str, Any]:
  """Reads every object of an R lazy-load database (`<path>.rdx` + `<path>.rdb`)."""
  base = os.fspath(path_without_extension)
  index_file, data_file = base + ".rdx", base + ".rdb"
  try:
    index = unserialize(gzip.decompress(_read(index_file)), index_file)
  except (OSError, EOFError, zlib.error) as e:
    raise RDataError(f"{index_file}: not a gzipped R index ({e}).") from e
  if not isinstance(index, RVector) or "variables" not in (index.names or []):
    raise RDataError(f"{index_file}: not an R lazy-load index (no 'variables' entry).")
  variables = index.values[index.names.index("variables")]
  compressed = index.values[index.names.index("compressed")].values[0]
  if compressed != 1:  # 2 and 3 (bzip2, xz) add a type byte: not used by Debian's packages
    raise RDataError(f"{index_file}: compression type {compressed} unsupported (only zlib).")
  blob = _read(data_file)
  objects = {}
  for name, where in zip(variables.names, variables.values):
    offset, length = (int(v) for v in where.values)
    entry = blob[offset:offset + length]
    if len(entry) != length or length < 4:
      raise RDataError(f"{data_file}: entry {name!r} is truncated.")
    expected = struct.unpack(">I", entry[:4])[0]
    try:
      raw = zlib.decompress(entry[4:])
    except zlib.error as e:
      raise RDataError(f"{data_file}: entry {name!r} is not zlib-compressed ({e}).") from e
    if len(raw) != expected:
      raise RDataError(f"{data_file}: entry {name!r} has {len(raw)} bytes, header says {expected}.")
    objects[name] = unserialize(raw, f"{data_file}[{name}]")
  return objects


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()
