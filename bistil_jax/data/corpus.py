"""Streaming readers for unlabeled text corpora.

A CORPUS spec names one stream of documents (one document = one string):

- `path/to/file.txt` or `path/to/file.txt.gz`: a local text file, one
  document per line; blank lines are skipped.
- `text:PATH`, `json:PATH[:COLUMN]`, `csv:PATH[:COLUMN]`,
  `parquet:PATH[:COLUMN]`: local files read with the `datasets` builder of
  that name (`load_dataset(builder, data_files=PATH, streaming=True)`);
  PATH may be a glob. COLUMN defaults to `text`.
- `hf:NAME:SPLIT`, `hf:NAME:CONFIG:SPLIT`, `hf:NAME:CONFIG:SPLIT:COLUMN`: a
  dataset loaded by `load_dataset(NAME, CONFIG, split=SPLIT,
  streaming=True)`; NAME may be a hub name or a local dataset directory.
  Leave CONFIG empty to give a column without one (`hf:NAME::SPLIT:COLUMN`).

A local path that exists is always read as a text file, even if it starts
with one of the prefixes above. Everything streams: nothing holds more than
one document (or one `datasets` shard buffer) in memory.
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import io
import logging
import os
from collections.abc import Iterator

from bistil_jax import paths
from bistil_jax.errors import BistilError

log = logging.getLogger(__name__)

# `datasets` builders accepted as `BUILDER:PATH[:COLUMN]` specs.
LOCAL_BUILDERS = ("text", "json", "csv", "parquet")
DEFAULT_COLUMN = "text"


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
  """A parsed CORPUS spec.

  Attributes:
    kind: "file" (plain or gzipped text), "local" (a `datasets` builder over
      local files) or "hf" (`load_dataset` by name or dataset directory).
    path: the file path (file, local) or the dataset name (hf).
    builder: the `datasets` builder for kind "local".
    config: the dataset config name for kind "hf", or None.
    split: the split for kind "hf" ("train" for kind "local").
    column: the text column (kinds "local" and "hf").
  """

  kind: str
  path: str
  builder: str | None = None
  config: str | None = None
  split: str = "train"
  column: str = DEFAULT_COLUMN


def _is_existing_path(s: str) -> bool:
  """Whether `s` is a local or remote path that exists (not `hf:...`)."""
  return paths.is_path(s) and paths.path(s).exists()


def parse_spec(spec: str) -> CorpusSpec:
  """Parses a CORPUS spec string (see the module docstring).

  Args:
    spec: the spec string.

  Returns:
    The parsed spec.

  Raises:
    BistilError: for an empty or malformed spec.
  """
  if not isinstance(spec, str) or not spec.strip():
    raise BistilError(f"empty corpus spec {spec!r}")
  if _is_existing_path(spec):
    return CorpusSpec(kind="file", path=spec)
  prefix, sep, rest = spec.partition(":")
  if sep and prefix == "hf":
    parts = rest.split(":")
    if len(parts) == 2:
      name, split = parts
      config, column = None, DEFAULT_COLUMN
    elif len(parts) == 3:
      name, config, split = parts
      column = DEFAULT_COLUMN
    elif len(parts) == 4:
      name, config, split, column = parts
    else:
      raise BistilError(
        f"bad corpus spec {spec!r}: expected hf:NAME[:CONFIG]:SPLIT"
        "[:COLUMN] (empty CONFIG allowed: hf:NAME::SPLIT:COLUMN)"
      )
    if not name or not split or not column:
      raise BistilError(
        f"bad corpus spec {spec!r}: NAME, SPLIT and COLUMN must be non-empty"
      )
    return CorpusSpec(
      kind="hf", path=name, config=config or None, split=split, column=column
    )
  if sep and prefix in LOCAL_BUILDERS:
    path, column = rest, DEFAULT_COLUMN
    if prefix != "text":
      head, csep, tail = rest.rpartition(":")
      # A trailing `:COLUMN` unless the whole rest is an existing path.
      if csep and head and not _is_existing_path(rest):
        path, column = head, tail
    if not path:
      raise BistilError(f"bad corpus spec {spec!r}: no path after {prefix}:")
    if not column:
      raise BistilError(f"bad corpus spec {spec!r}: empty column name")
    return CorpusSpec(kind="local", path=path, builder=prefix, column=column)
  # Anything else is a local file that does not exist.
  raise BistilError(f"corpus file not found: {spec}")


def iter_lines(spec: str, max_lines: int | None = None) -> Iterator[str]:
  """Streams the documents of a corpus.

  Checks that the corpus can be opened before returning, so a missing file
  fails at the call, not at the first `next()`.

  Args:
    spec: a CORPUS spec (see the module docstring).
    max_lines: stop after this many non-empty documents; None reads all.

  Returns:
    An iterator over the non-empty documents, without their line ends.

  Raises:
    BistilError: for a malformed spec, a missing or unreadable file, an
      unloadable dataset or a missing column; while iterating, for an
      undecodable file or a corpus with no non-empty document.
  """
  if max_lines is not None and max_lines < 1:
    raise BistilError(f"max_lines must be >= 1, got {max_lines}")
  parsed = parse_spec(spec)
  if parsed.kind == "file":
    docs = _file_lines(parsed.path)
  else:
    docs = _dataset_lines(parsed, spec)
  return _capped(docs, spec, max_lines)


def _capped(
  docs: Iterator[str], spec: str, max_lines: int | None
) -> Iterator[str]:
  n = 0
  try:
    for doc in docs:
      if max_lines is not None and n >= max_lines:
        break
      n += 1
      yield doc
  finally:
    close = getattr(docs, "close", None)
    if close is not None:
      close()
  if n == 0:
    raise BistilError(f"corpus {spec} is empty (no non-empty lines)")


# Lines longer than this are read in pieces of about this size, split at
# whitespace: a pathological multi-megabyte line (a dump without newlines)
# costs bounded memory, not its length times the tokenizer's overhead.
MAX_LINE_BYTES = 1 << 20
# Bytes decoded by `check_corpus` to catch a wrong encoding up front.
PROBE_BYTES = 1 << 16


def _open_binary(path: str):
  """Opens a plain or gzipped file as a binary stream, failing in one line."""
  p = paths.path(path)
  try:
    if p.is_dir():
      raise IsADirectoryError(path)
    raw = p.open("rb")
    if not isinstance(raw, io.BufferedIOBase):
      # fsspec files (gs://) lack readline(size): give them the standard
      # buffered reader, which bounds memory on long lines too.
      raw = io.BufferedReader(raw, buffer_size=1 << 20)
  except FileNotFoundError:
    raise BistilError(f"corpus file not found: {path}") from None
  except IsADirectoryError:
    raise BistilError(
      f"corpus path is a directory, not a file: {path}"
    ) from None
  except OSError as e:
    raise BistilError(
      f"cannot read corpus file {path}: {e.strerror or e}"
    ) from None
  try:
    magic = raw.read(2)
    raw.seek(0)
  except OSError as e:
    raw.close()
    raise BistilError(
      f"cannot read corpus file {path}: {e.strerror or e}"
    ) from None
  if magic == b"\x1f\x8b":
    return gzip.GzipFile(fileobj=raw, mode="rb")
  if path.endswith(".gz"):
    raw.close()
    raise BistilError(f"corpus file {path} ends in .gz but is not gzipped")
  return raw


def _not_utf8(path: str, lineno: int, err: UnicodeDecodeError) -> BistilError:
  bad = err.object[err.start : err.start + 4]
  return BistilError(
    f"{path}:{lineno}: not valid UTF-8 (byte {bad[:1]!r}); corpus files "
    "must be UTF-8 text"
  )


def check_corpus(spec: str) -> None:
  """Cheap up-front checks of a corpus, before anything is counted.

  For text files: exists, is readable, holds a non-blank line, and its
  first PROBE_BYTES decode as UTF-8 (the error names file:line). Dataset
  specs get the checks `iter_lines` makes when opening them.

  Raises:
    BistilError: naming the corpus and the problem.
  """
  parsed = parse_spec(spec)
  if parsed.kind != "file":
    if parsed.kind == "local":
      _check_local_files(parsed.path)
    return
  path = parsed.path
  with _open_binary(path) as f:
    try:
      head = f.read(PROBE_BYTES)
      # Skip leading blank space cheaply, in bounded chunks.
      chunk = head
      while chunk and not chunk.strip():
        chunk = f.read(PROBE_BYTES)
    except (OSError, EOFError) as e:  # e.g. a truncated gzip stream
      raise BistilError(f"cannot read corpus file {path}: {e}") from None
  if not chunk.strip():
    raise BistilError(f"corpus {spec} is empty (no non-empty lines)")
  try:
    codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
  except UnicodeDecodeError as e:
    raise _not_utf8(path, head[: e.start].count(b"\n") + 1, e) from None


def check_corpora(specs) -> None:
  """`check_corpus` for each non-empty spec, all before any is read."""
  for spec in specs:
    if spec:
      check_corpus(spec)


def _file_lines(path: str) -> Iterator[str]:
  return _read_file(_open_binary(path), path)


def _read_file(f, path: str) -> Iterator[str]:
  """The non-blank lines of a binary stream, decoded one line at a time
  (so a decoding error names its exact line), long lines in pieces."""
  decoder = codecs.getincrementaldecoder("utf-8")()
  lineno = 0
  buf = ""  # the part of a long line read but not yet yielded
  in_line = False  # the last chunk ended inside a line
  warned = False
  with f:
    try:
      while True:
        raw = f.readline(MAX_LINE_BYTES)
        if not raw:
          break
        if not in_line:
          lineno += 1
        ends = raw.endswith(b"\n")
        try:
          buf += decoder.decode(raw, final=ends)
        except UnicodeDecodeError as e:
          raise _not_utf8(path, lineno, e) from None
        in_line = not ends
        if ends:
          line, buf = buf.rstrip("\r\n"), ""
          if line.strip():
            yield line
        elif len(buf) >= MAX_LINE_BYTES:
          if not warned:
            log.warning(
              "%s:%d is longer than %d bytes: read in pieces split at "
              "whitespace",
              path,
              lineno,
              MAX_LINE_BYTES,
            )
            warned = True
          cut = max(buf.rfind(" ", 0, MAX_LINE_BYTES), 0) or MAX_LINE_BYTES
          piece, buf = buf[:cut], buf[cut:].lstrip()
          if piece.strip():
            yield piece
      try:
        buf += decoder.decode(b"", final=True)
      except UnicodeDecodeError as e:
        raise _not_utf8(path, lineno, e) from None
      if buf.strip():
        yield buf.rstrip("\r\n")
    except (OSError, EOFError) as e:  # e.g. a truncated gzip stream
      raise BistilError(f"cannot read corpus file {path}: {e}") from None


def open_dataset(
  kind: str,
  path: str,
  *,
  builder: str | None = None,
  config: str | None = None,
  split: str = "train",
  what: str,
):
  """A streaming `datasets` split: local files through a builder (kind
  "local": json, csv, parquet, text) or a hub dataset (kind "hf").

  Raises:
    BistilError: "cannot load {what}: ..." with the first line of the error.
  """
  import datasets  # noqa: PLC0415 - heavy import, only for dataset specs

  if kind == "local":
    args = (builder,)
    kwargs = {"data_files": path, "split": "train"}
  else:
    args = (path,) + ((config,) if config else ())
    kwargs = {"split": split}
  try:
    return datasets.load_dataset(*args, streaming=True, **kwargs)
  except Exception as e:  # noqa: BLE001 - datasets raises many types
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise BistilError(f"cannot load {what}: {msg}") from None


def _dataset_lines(parsed: CorpusSpec, spec: str) -> Iterator[str]:
  """Opens a `datasets` stream and yields its non-empty text column."""
  if parsed.kind == "local":
    _check_local_files(parsed.path)
  ds = open_dataset(
    parsed.kind,
    parsed.path,
    builder=parsed.builder,
    config=parsed.config,
    split=parsed.split,
    what=f"corpus {spec}",
  )
  columns = ds.column_names
  if columns is not None and parsed.column not in columns:
    raise BistilError(
      f"corpus {spec} has no column {parsed.column!r}; columns: {columns}"
    )
  return _read_dataset(ds, parsed.column, spec)


def _read_dataset(ds, column: str, spec: str) -> Iterator[str]:
  it = iter(ds)
  while True:
    try:
      row = next(it)
    except StopIteration:
      return
    except Exception as e:  # noqa: BLE001 - decoding errors of any builder
      raise BistilError(f"cannot read corpus {spec}: {e}") from None
    if column not in row:
      raise BistilError(
        f"corpus {spec} has no column {column!r}; columns: {sorted(row)}"
      )
    text = row[column]
    if text is None:
      continue
    if not isinstance(text, str):
      raise BistilError(
        f"corpus {spec}: column {column!r} holds {type(text).__name__}, "
        "not text"
      )
    if text.strip():
      yield text


def _check_local_files(path: str) -> None:
  """Fails early for a missing or unreadable data file (or glob)."""
  import glob  # noqa: PLC0415 - only for has_magic

  p = paths.path(path)
  if glob.has_magic(path):
    # Magic in the last part only (epath globs one level on remote paths).
    matches = sorted(p.parent.glob(p.name)) if p.parent.exists() else []
  else:
    matches = [p]
  if not matches or not matches[0].exists():
    raise BistilError(f"corpus file not found: {path}")
  for m in matches:
    local = not paths.is_remote(m)
    if local and m.is_file() and not os.access(m, os.R_OK):
      raise BistilError(f"cannot read corpus file {m}: permission denied")
