"""Task data files: label sets, examples, readers and split specs.

docs/method.md 5.1, host side. The file formats the task kinds read:

- UD CoNLL-U (`read_conllu`: FORM and UPOS; data/dp.py reads HEAD and
  DEPREL), CoNLL-style NER column files (`read_conll_ner`, IOB1/IOB2), NLI
  pairs and other labelled rows in JSON lines, TSV or CSV with a header
  (`read_table`, `read_nli`); SQuAD v1.1 JSON is data/qa.py's.

A task SPEC names one split:

- `PATH`: a local file in the task's own format.
- `json:PATH`, `csv:PATH`, `parquet:PATH`: local files in the column layout
  of Hugging Face datasets, read with that `datasets` builder
  (`load_dataset(builder, data_files=PATH, split="train")`); PATH may be a
  glob. Token tasks want a `tokens` column and a tag column (`upos` for pos,
  `ner_tags` for ner), NLI wants `premise`, `hypothesis` and `label`.
- `hf:NAME:SPLIT`, `hf:NAME:CONFIG:SPLIT`: `load_dataset(NAME, CONFIG,
  split=SPLIT)` from the hub (or a local dataset directory), same columns
  (the layout of the UD, CoNLL-03, MasakhaNER and MultiNLI datasets); leave
  CONFIG empty for none (`hf:NAME::SPLIT`).

Integer tags map through the dataset's ClassLabel names when the features
carry them, otherwise through `label_names` (default: the task's default
label set). Datasets are streamed, so nothing is written to the HF cache.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from bistil_jax import paths
from bistil_jax.data import corpus
from bistil_jax.errors import BistilError

UPOS_LABELS = (
  "ADJ",
  "ADP",
  "ADV",
  "AUX",
  "CCONJ",
  "DET",
  "INTJ",
  "NOUN",
  "NUM",
  "PART",
  "PRON",
  "PROPN",
  "PUNCT",
  "SCONJ",
  "SYM",
  "VERB",
  "X",
)
# CoNLL-03 without MISC (docs/method.md 5.1: MISC and DATE -> O), sorted as the
# released code sorts label names.
NER_LABELS = ("B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER", "O")
# The 37 universal dependency relations of UD v2 and "_", sorted: the
# released parser has 38 relation labels (UD_HEAD_LABELS incl. "_") and
# sorts label names.
DP_RELATIONS = (
  "_",
  "acl",
  "advcl",
  "advmod",
  "amod",
  "appos",
  "aux",
  "case",
  "cc",
  "ccomp",
  "clf",
  "compound",
  "conj",
  "cop",
  "csubj",
  "dep",
  "det",
  "discourse",
  "dislocated",
  "expl",
  "fixed",
  "flat",
  "goeswith",
  "iobj",
  "list",
  "mark",
  "nmod",
  "nsubj",
  "nummod",
  "obj",
  "obl",
  "orphan",
  "parataxis",
  "punct",
  "reparandum",
  "root",
  "vocative",
  "xcomp",
)
# MultiNLI / XNLI ClassLabel order, which the NLI teacher head uses.
NLI_LABELS = ("entailment", "neutral", "contradiction")

# Seed-stream domain tag for batch order (see mlm.TAG_MASK).
# Builders of `BUILDER:PATH` specs (local files in HF column layout).
LOCAL_BUILDERS = ("json", "csv", "parquet")
# Column aliases of NLI files, first match wins (XNLI TSVs use sentence1/2).
NLI_COLUMNS = {
  "premise": ("premise", "sentence1"),
  "hypothesis": ("hypothesis", "sentence2"),
  "label": ("label", "gold_label"),
}
_NER_TAG = re.compile(r"^(O|[BI]-\S+)$")


@dataclasses.dataclass(frozen=True)
class TokenExample:
  """One sentence of a token task.

  Attributes:
    words: the words (pre-tokenized, as in the file).
    labels: one label per word.
    source: where it came from, `path:line` or `spec row i`, for messages.
    lines: for files, the line of each word, so a message can name the
      offending word's own line.
  """

  words: tuple[str, ...]
  labels: tuple[str, ...]
  source: str = dataclasses.field(default="", compare=False)
  lines: tuple[int, ...] = dataclasses.field(default=(), compare=False)

  def where(self, i: int) -> str:
    """`path:line` of word i (the example's source without line info)."""
    if len(self.lines) > i and ":" in self.source:
      return f"{self.source.rsplit(':', 1)[0]}:{self.lines[i]}"
    return self.source or "?"


@dataclasses.dataclass(frozen=True)
class PairExample:
  """One premise/hypothesis pair.

  Attributes:
    premise: the first text.
    hypothesis: the second text.
    label: the label name.
    source: where it came from, `path:line` or `spec row i`, for messages.
  """

  premise: str
  hypothesis: str
  label: str
  source: str = dataclasses.field(default="", compare=False)

  @property
  def segments(self) -> tuple[str, ...]:
    """The texts `encode_sequences` encodes, in order."""
    return (self.premise, self.hypothesis)


Example = TokenExample | PairExample


# ------------------------------------------------------------------ readers
def open_task_file(path: str, what: str):
  """Opens a UTF-8 text file (BOM tolerated), failing with one line."""
  try:
    p = paths.path(path)
    if p.is_dir():
      raise IsADirectoryError(path)
    return paths.open_text(p, encoding="utf-8-sig")
  except FileNotFoundError:
    raise BistilError(f"{what} file not found: {path}") from None
  except IsADirectoryError:
    raise BistilError(f"{what} path is a directory: {path}") from None
  except OSError as e:
    raise BistilError(
      f"cannot read {what} file {path}: {e.strerror or e}"
    ) from None


def _lines(path: str, what: str) -> Iterator[tuple[int, str]]:
  """(1-based line number, line without its end) of a text file."""
  open_task_file(
    path, what
  ).close()  # one-line errors for missing/unreadable files
  # Decoded line by line (not in chunks), so an error names its own line.
  with paths.path(path).open("rb") as f:
    for lineno, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
      except UnicodeDecodeError:
        raise BistilError(
          f"{path}:{lineno}: not valid UTF-8 ({what} files must be UTF-8)"
        ) from None
      yield lineno, line.rstrip("\r\n")


def nonempty(examples: list[Any], path: str, what: str) -> list[Any]:
  if not examples:
    raise BistilError(f"{what} file {path} holds no examples")
  return examples


def conllu_sentences(
  path: str,
) -> Iterator[tuple[int, list[tuple[int, list[str]]]]]:
  """The sentences of a CoNLL-U file: (the line where the sentence's block,
  comments included, starts; [(line number, its 10 columns)] of the
  syntactic words). Comments, multiword-token ranges (`1-2`) and empty
  nodes (`1.1`) are skipped, as UD scores syntactic words.

  Raises:
    BistilError: a missing or undecodable file, a line without 10
      tab-separated columns or a bad or out-of-order word id (`path:line`).
  """
  rows: list[tuple[int, list[str]]] = []
  start = 0
  for lineno, line in _lines(path, "CoNLL-U"):
    if not line.strip():
      if rows:
        yield start, rows
      rows, start = [], 0
      continue
    start = start or lineno
    if line.startswith("#"):
      continue
    cols = line.split("\t")
    if len(cols) != 10:
      raise BistilError(
        f"{path}:{lineno}: expected 10 tab-separated CoNLL-U columns, got "
        f"{len(cols)}"
      )
    word_id = cols[0]
    if "-" in word_id or "." in word_id:
      continue
    if not word_id.isdigit() or int(word_id) != len(rows) + 1:
      raise BistilError(
        f"{path}:{lineno}: word id {word_id!r} where {len(rows) + 1} was "
        "expected (missing blank line between sentences?)"
      )
    rows.append((lineno, cols))
  if rows:
    yield start, rows


def read_conllu(path: str | os.PathLike[str]) -> list[TokenExample]:
  """Reads UPOS-tagged sentences from a UD CoNLL-U file.

  Comment lines (`#`), multiword-token ranges (`1-2`) and empty nodes
  (`1.1`) are skipped: the words are the syntactic words, as UD scores them.

  Args:
    path: the .conllu file.

  Returns:
    One example per sentence: FORM (column 2) and UPOS (column 4); its
    source is the line where the sentence's block (comments included)
    starts.

  Raises:
    BistilError: a missing or undecodable file, a line without 10
      tab-separated columns, a bad or out-of-order word id, an empty FORM or
      UPOS (all with `path:line`), or a file without sentences.
  """
  path = os.fspath(path)
  examples = []
  for start, rows in conllu_sentences(path):
    for lineno, cols in rows:
      if not cols[1] or not cols[3]:
        raise BistilError(f"{path}:{lineno}: empty FORM or UPOS column")
    examples.append(
      TokenExample(
        tuple(cols[1] for _, cols in rows),
        tuple(cols[3] for _, cols in rows),
        f"{path}:{start}",
        tuple(lineno for lineno, _ in rows),
      )
    )
  return nonempty(examples, path, "CoNLL-U")


def read_conll_ner(path: str | os.PathLike[str]) -> list[TokenExample]:
  """Reads NER sentences from a CoNLL-style column file.

  One word per line: the token in the first and its tag in the last
  whitespace-separated column (CoNLL-03 has 4 columns, MasakhaNER 2).
  Blank lines separate sentences; `-DOCSTART-` lines are skipped. Tags must
  look like IOB1/IOB2 tags (`O`, `B-X`, `I-X`); IOB1 files need no
  conversion since the metrics apply the conlleval rules.

  Args:
    path: the column file.

  Returns:
    One example per sentence.

  Raises:
    BistilError: a missing or undecodable file, a line with one column or a
      malformed tag (with `path:line`), or a file without sentences.
  """
  path = os.fspath(path)
  examples = []
  words, tags, start = [], [], 0
  for lineno, line in _lines(path, "NER"):
    cols = line.split()
    if not cols or cols[0] == "-DOCSTART-":
      if words:
        examples.append(
          TokenExample(tuple(words), tuple(tags), f"{path}:{start}")
        )
      words, tags = [], []
      continue
    if len(cols) < 2:
      raise BistilError(
        f"{path}:{lineno}: expected a token and a tag, got {line.strip()!r}"
      )
    tag = cols[-1]
    if not _NER_TAG.match(tag):
      raise BistilError(
        f"{path}:{lineno}: malformed NER tag {tag!r} (expected O, B-TYPE or "
        "I-TYPE)"
      )
    if not words:
      start = lineno
    words.append(cols[0])
    tags.append(tag)
  if words:
    examples.append(TokenExample(tuple(words), tuple(tags), f"{path}:{start}"))
  return nonempty(examples, path, "NER")


def label_name(value: Any, label_names: Sequence[str], where: str) -> str:
  """A label name from a name, an int index or a digit string."""
  if isinstance(value, bool) or value is None:
    raise BistilError(f"{where}: bad label {value!r}")
  if isinstance(value, str) and value.strip().lstrip("-").isdigit():
    value = int(value)
  if isinstance(value, int | np.integer):
    if value < 0:
      raise BistilError(f"{where}: label {value} (unlabelled example?)")
    if value >= len(label_names):
      raise BistilError(
        f"{where}: label index {value} out of range for "
        f"{len(label_names)} labels ({', '.join(label_names)})"
      )
    return label_names[value]
  if isinstance(value, str) and value.strip():
    return value.strip()
  raise BistilError(f"{where}: bad label {value!r}")


def find_columns(
  names: Iterable[str],
  aliases: Mapping[str, Sequence[str]],
  where: str,
  columns: Mapping[str, str] | None,
) -> dict[str, str]:
  """Which column holds each field: the first of its aliases present, or
  the column `columns` names for it.

  Args:
    names: the columns there are (a header, or a row's keys).
    aliases: {field: accepted column names, in order of preference}.
    where: the file and line, for messages.
    columns: optional {field: column name} overrides.
  """
  names = list(names)
  keys = {}
  for field, accepted in aliases.items():
    wanted = (columns[field],) if columns and field in columns else accepted
    found = [a for a in wanted if a in names]
    if not found:
      raise BistilError(
        f"{where}: no {field} column ({' or '.join(wanted)}); columns: "
        f"{', '.join(names)}"
      )
    keys[field] = found[0]
  return keys


def read_table(
  path: str,
  what: str,
  aliases: Mapping[str, Sequence[str]],
  columns: Mapping[str, str] | None = None,
) -> Iterator[tuple[dict[str, Any], str]]:
  """The rows of a JSON-lines, TSV or CSV file as ({field: value}, where).

  `.jsonl`/`.json`: one object per line. `.tsv` (unquoted, as XNLI and
  AmericasNLI ship them) and `.csv` (quoted): a header row naming the
  columns. Each field is found by `find_columns`; other columns are
  ignored; blank lines are skipped.

  Raises:
    BistilError: a missing file, an unknown extension, a malformed line or
      row, or a missing column or key (all with `path:line`).
  """
  ext = paths.path(path).suffix.lower()
  if ext in (".jsonl", ".json"):
    return _jsonl_rows(path, what, aliases, columns)
  if ext in (".tsv", ".csv"):
    return _table_rows(path, ext, what, aliases, columns)
  raise BistilError(
    f"{what} file {path}: unknown extension {ext or '(none)'!r}; expected "
    ".jsonl, .json, .tsv or .csv"
  )


def read_nli(
  path: str | os.PathLike[str],
  label_names: Sequence[str] = NLI_LABELS,
  columns: Mapping[str, str] | None = None,
) -> list[PairExample]:
  """Reads NLI pairs from a JSON-lines, TSV or CSV file (`read_table`):
  premise, hypothesis and label columns; `sentence1`, `sentence2` and
  `gold_label` are accepted as aliases.

  Args:
    path: the file.
    label_names: names of integer labels (index i -> label_names[i]).
    columns: optional {"premise"|"hypothesis"|"label": column name}
      overrides.

  Returns:
    The pairs, labels as names (not yet checked against a label set).

  Raises:
    BistilError: a missing file, an unknown extension, a malformed line or
      row, a missing column or key, a negative or out-of-range label index
      (all with `path:line`), or a file without pairs.
  """
  path = os.fspath(path)
  rows = read_table(path, "NLI", NLI_COLUMNS, columns)
  examples = [_pair(values, label_names, where) for values, where in rows]
  return nonempty(examples, path, "NLI")


def _jsonl_rows(path, what, aliases, columns):
  for lineno, line in _lines(path, what):
    if not line.strip():
      continue
    where = f"{path}:{lineno}"
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise BistilError(f"{where}: invalid JSON ({e.msg})") from None
    if not isinstance(row, dict):
      raise BistilError(f"{where}: expected a JSON object per line")
    keys = find_columns(row, aliases, where, columns)
    yield {field: row[key] for field, key in keys.items()}, where


def _table_rows(path, ext, what, aliases, columns):
  kwargs = (
    {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if ext == ".tsv" else {}
  )
  with open_task_file(path, what) as f:
    reader = csv.reader(f, **kwargs)
    try:
      header = next(reader, None)
      if header is None:
        raise BistilError(f"{what} file {path} holds no examples")
      keys = find_columns(header, aliases, f"{path}:1", columns)
      index = {field: header.index(col) for field, col in keys.items()}
      for row in reader:
        where = f"{path}:{reader.line_num}"
        if not any(cell.strip() for cell in row):
          continue
        if len(row) != len(header):
          raise BistilError(
            f"{where}: {len(row)} columns where the header has {len(header)}"
          )
        yield {field: row[i] for field, i in index.items()}, where
    except UnicodeDecodeError:
      raise BistilError(f"{what} file {path} is not valid UTF-8") from None
    except csv.Error as e:
      raise BistilError(f"{path}:{reader.line_num}: {e}") from None


def text_field(values: Mapping[str, Any], field: str, where: str) -> str:
  """A text field of a row, checked to be a string."""
  value = values[field]
  if not isinstance(value, str):
    raise BistilError(f"{where}: {field} is {type(value).__name__}, not text")
  return value


def _pair(
  values: Mapping[str, Any], label_names: Sequence[str], where: str
) -> PairExample:
  """A PairExample of a row's {premise, hypothesis, label} fields."""
  premise = text_field(values, "premise", where)
  hypothesis = text_field(values, "hypothesis", where)
  label = label_name(values["label"], label_names, where)
  return PairExample(premise, hypothesis, label, where)


# ------------------------------------------------------------------ specs
@dataclasses.dataclass(frozen=True)
class TaskSource:
  """A parsed task SPEC (see the module docstring).

  Attributes:
    kind: "file" (the task's own format), "local" (a `datasets` builder over
      local files) or "hf" (`load_dataset` by name).
    path: the file path (file, local) or the dataset name (hf).
    builder: the `datasets` builder for kind "local".
    config: the dataset config for kind "hf", or None.
    split: the split for kind "hf" ("train" otherwise).
  """

  kind: str
  path: str
  builder: str | None = None
  config: str | None = None
  split: str = "train"


def parse_source(spec: str) -> TaskSource:
  """Parses a task SPEC string.

  Raises:
    BistilError: an empty or malformed spec, or a local file that does not
      exist.
  """
  if not isinstance(spec, str) or not spec.strip():
    raise BistilError(f"empty task data spec {spec!r}")
  if paths.is_path(spec) and paths.path(spec).exists():
    return TaskSource(kind="file", path=spec)
  prefix, sep, rest = spec.partition(":")
  if sep and prefix == "hf":
    parts = rest.split(":")
    if len(parts) == 2:
      (name, split), config = parts, None
    elif len(parts) == 3:
      name, config, split = parts
    else:
      raise BistilError(
        f"bad task data spec {spec!r}: expected hf:NAME[:CONFIG]:SPLIT"
      )
    if not name or not split:
      raise BistilError(
        f"bad task data spec {spec!r}: NAME and SPLIT must be non-empty"
      )
    return TaskSource(kind="hf", path=name, config=config or None, split=split)
  if sep and prefix in LOCAL_BUILDERS:
    if not rest:
      raise BistilError(f"bad task data spec {spec!r}: no path after {prefix}:")
    matches = paths.glob(rest)
    if not matches or not matches[0].is_file():
      raise BistilError(f"task data file not found: {rest}")
    return TaskSource(kind="local", path=rest, builder=prefix)
  raise BistilError(f"task data file not found: {spec}")


def load_task_dataset(source: TaskSource, spec: str):
  return corpus.open_dataset(
    source.kind,
    source.path,
    builder=source.builder,
    config=source.config,
    split=source.split,
    what=f"task data {spec}",
  )


def class_names(ds, column: str) -> tuple[str, ...] | None:
  """ClassLabel names of a column (or of its list items), if any."""
  import datasets  # noqa: PLC0415

  features = getattr(ds, "features", None)
  if not features or column not in features:
    return None
  feature = features[column]
  feature = getattr(feature, "feature", feature)  # List/Sequence items.
  if isinstance(feature, datasets.ClassLabel):
    return tuple(feature.names)
  return None


def dataset_rows(ds, spec: str) -> Iterator[tuple[int, Mapping[str, Any]]]:
  it = iter(ds)
  i = 0
  while True:
    try:
      row = next(it)
    except StopIteration:
      return
    except Exception as e:  # noqa: BLE001 - decoding errors of any builder
      msg = (
        str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      )
      raise BistilError(f"cannot read task data {spec}: {msg}") from None
    yield i, row
    i += 1


def row_column(row: Mapping[str, Any], name: str, spec: str) -> Any:
  if name not in row:
    raise BistilError(
      f"task data {spec} has no column {name!r}; columns: "
      f"{', '.join(sorted(row))}"
    )
  return row[name]


def token_rows(
  ds,
  spec: str,
  label_names: Sequence[str],
  columns: Mapping[str, str] | None,
  *,
  label_column: str,
  ner_tags: bool = False,
) -> Iterator[TokenExample]:
  """TokenExamples of a dataset's `tokens` and `label_column` lists (or
  the columns named in `columns`); `ner_tags`: tags must look like IOB
  tags."""
  columns = dict(columns or {})
  tok_col = columns.get("tokens", "tokens")
  tag_col = columns.get("labels", label_column)
  names = class_names(ds, tag_col) or tuple(label_names)
  for i, row in dataset_rows(ds, spec):
    where = f"{spec} row {i}"
    words = row_column(row, tok_col, spec)
    tags = row_column(row, tag_col, spec)
    if not isinstance(words, list | tuple) or not isinstance(
      tags, list | tuple
    ):
      raise BistilError(f"{where}: {tok_col!r} and {tag_col!r} must be lists")
    if len(words) != len(tags):
      raise BistilError(f"{where}: {len(words)} tokens but {len(tags)} tags")
    if not words:
      continue
    if not all(isinstance(w, str) for w in words):
      raise BistilError(f"{where}: tokens must be strings")
    labels = tuple(label_name(t, names, where) for t in tags)
    if ner_tags:
      bad = [t for t in labels if not _NER_TAG.match(t)]
      if bad:
        raise BistilError(f"{where}: malformed NER tag {bad[0]!r}")
    yield TokenExample(tuple(words), labels, where)


def pair_rows(
  ds,
  spec: str,
  label_names: Sequence[str],
  columns: Mapping[str, str] | None,
) -> Iterator[PairExample]:
  keys = None
  names = None
  for i, row in dataset_rows(ds, spec):
    where = f"{spec} row {i}"
    if keys is None:
      keys = find_columns(row, NLI_COLUMNS, spec, columns)
      names = class_names(ds, keys["label"]) or tuple(label_names)
    yield _pair({f: row[k] for f, k in keys.items()}, names, where)


# ------------------------------------------------------------------ labels
def relabel(
  examples: Sequence[Example], mapping: Mapping[str, str]
) -> list[Example]:
  """Examples with some labels renamed, e.g. {"B-DATE": "O", "I-DATE": "O"}.

  docs/method.md 5.1 maps MasakhaNER's DATE and CoNLL-03's MISC to O.
  """
  out = []
  for ex in examples:
    if isinstance(ex, TokenExample):
      labels = tuple(mapping.get(t, t) for t in ex.labels)
      out.append(dataclasses.replace(ex, labels=labels))
    else:
      out.append(dataclasses.replace(ex, label=mapping.get(ex.label, ex.label)))
  return out
