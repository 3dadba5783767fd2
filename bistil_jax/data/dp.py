"""Dependency-parsing data: UD CoNLL-U heads and relations, encoding, scoring.

docs/method.md 4.3 and 5.1, host side, in NumPy. The task `dp` reads HEAD
(column 7) and DEPREL (column 8) of the syntactic words of a CoNLL-U file:
multiword-token ranges (`1-2`) and empty nodes (`1.1`) are skipped, as UD
defines them (HEAD refers to word ids, 0 = root); relation subtypes are
stripped (`nsubj:pass` -> `nsubj`), as released. Every sentence must be a
tree: exactly one root and no cycle (the CoNLL 2018 evaluation's checks).

Encoding puts each word on its first sub-word (as the token tasks do):

- `labels` [n, L]: the relation id at each word's first sub-word, -100
  elsewhere (continuation sub-words, special tokens, padding);
- `heads` [n, L]: the *position* of the head word's first sub-word there
  (position 0, the [CLS] / <s> token, is the root), -100 elsewhere.

Training drops sentences longer than `max_seq_len` tokens (as released for
token tasks). Evaluation never drops a word silently: a sentence longer than
`max_seq_len` cannot be windowed (its arcs may leave any window), so it is
left out of the model's rows and each of its words is scored as wrong (head
and relation); `num_unscored_words` / `num_unscored_sentences` say how many,
in the metrics too, and a warning names the first one. Raise max_seq_len to
score them.

Hugging Face datasets (`json:`, `csv:`, `parquet:`, `hf:` specs) need the
columns of the UD dataset: `tokens`, `head` (ints or digit strings, 0 =
root) and `deprel`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from bistil_jax import metrics
from bistil_jax.data import task_files, tasks
from bistil_jax.data.mlm import IGNORE_LABEL
from bistil_jax.errors import BistilError

log = logging.getLogger(__name__)

# Relation labels, in head order (see task_files.DP_RELATIONS).
UD_RELATIONS = task_files.DP_RELATIONS


@dataclasses.dataclass(frozen=True)
class DepExample(task_files.TokenExample):
  """One parsed sentence: words, relations (`labels`) and heads.

  Attributes:
    heads: the head of each word, 1-based word ids (0 = root).
  """

  heads: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True, eq=False)
class DepData(tasks.TaskData):
  """An encoded dp split (see the module docstring).

  Attributes:
    heads: [n, L] int32 head positions on first sub-words, -100 elsewhere.
    num_unscored_words: words of evaluation sentences too long to encode,
      scored as wrong.
    num_unscored_sentences: those sentences.
  """

  heads: np.ndarray | None = None
  num_unscored_words: int = 0
  num_unscored_sentences: int = 0

  def extra_batch(self, rows, real, length):
    """The gold `heads` [b, l] of the rows (-100 on filler rows)."""
    if self.heads is None:
      return {}
    out = self.heads[rows, :length].copy()  # [b, l]
    out[~real] = IGNORE_LABEL
    return {"heads": out}


# ------------------------------------------------------------------ readers
def strip_subtype(deprel: str) -> str:
  """`nsubj:pass` -> `nsubj` (the released label set has no subtypes)."""
  return deprel.split(":", 1)[0]


def check_tree(heads: Sequence[int], where) -> None:
  """Raises unless `heads` (1-based, 0 = root) form one rooted tree.

  Args:
    heads: one head per word.
    where: word index -> `path:line` (or a row name) for messages.

  Raises:
    BistilError: a head out of range, no root or several, or a cycle.
  """
  n = len(heads)
  for i, h in enumerate(heads):
    if not 0 <= h <= n:
      raise BistilError(
        f"{where(i)}: HEAD {h} out of range 0..{n} (the sentence has {n} words)"
      )
  roots = [i for i, h in enumerate(heads) if h == 0]
  if not roots:
    raise BistilError(
      f"{where(0)}: the sentence is not a tree: no word has HEAD 0 (root)"
    )
  if len(roots) > 1:
    raise BistilError(
      f"{where(roots[1])}: the sentence is not a tree: a second root (HEAD "
      f"0; the first is word {roots[0] + 1})"
    )
  state = [0] * n  # 0 unseen, 1 on the current path, 2 reaches the root
  for start in range(n):
    path, i = [], start
    while i >= 0 and state[i] == 0:
      state[i] = 1
      path.append(i)
      i = heads[i] - 1
    if i >= 0 and state[i] == 1:
      cycle = path[path.index(i) :]
      ids = " -> ".join(str(j + 1) for j in [*cycle, i])
      raise BistilError(f"{where(i)}: the sentence is not a tree: cycle {ids}")
    for j in path:
      state[j] = 2


def read_conllu_dp(path: str | os.PathLike[str]) -> list[DepExample]:
  """Reads dependency trees from a UD CoNLL-U file.

  Args:
    path: the .conllu file.

  Returns:
    One example per sentence: FORM (column 2), DEPREL without subtype
    (column 8) as labels and HEAD (column 7) as heads; its source is the
    line where the sentence's block starts.

  Raises:
    BistilError: a missing or undecodable file, a line without 10 columns,
      a bad or out-of-order word id, an empty FORM or DEPREL, a HEAD that
      is not an integer or out of range (0..words), a sentence that is not
      a tree (no root, two roots, a cycle), all with `path:line`; or a file
      without sentences.
  """
  path = os.fspath(path)
  examples = []
  for start, rows in task_files.conllu_sentences(path):
    heads = []
    for lineno, cols in rows:
      head, deprel = cols[6].strip(), cols[7].strip()
      if not cols[1] or not deprel:
        raise BistilError(f"{path}:{lineno}: empty FORM or DEPREL column")
      if not head.isdigit():
        raise BistilError(
          f"{path}:{lineno}: HEAD {head!r} is not an integer word id"
        )
      heads.append(int(head))
    lines = tuple(lineno for lineno, _ in rows)
    check_tree(heads, lambda i, lines=lines: f"{path}:{lines[i]}")
    examples.append(
      DepExample(
        tuple(cols[1] for _, cols in rows),
        tuple(strip_subtype(cols[7].strip()) for _, cols in rows),
        f"{path}:{start}",
        lines,
        heads=tuple(heads),
      )
    )
  return task_files.nonempty(examples, path, "CoNLL-U")


def dataset_rows(
  ds, spec: str, columns: Mapping[str, str] | None = None
) -> Iterator[DepExample]:
  """DepExamples from rows with `tokens`, `head` and `deprel` columns."""
  columns = dict(columns or {})
  names = {k: columns.get(k, k) for k in ("tokens", "head", "deprel")}
  for i, row in task_files.dataset_rows(ds, spec):
    where = f"{spec} row {i}"
    words, heads, rels = (
      task_files.row_column(row, names[k], spec) for k in names
    )
    if not all(isinstance(x, list | tuple) for x in (words, heads, rels)):
      raise BistilError(f"{where}: tokens, head and deprel must be lists")
    if not len(words) == len(heads) == len(rels):
      raise BistilError(
        f"{where}: {len(words)} tokens, {len(heads)} heads and "
        f"{len(rels)} relations"
      )
    if not words:
      continue
    out = []
    for h in heads:
      text = str(h).strip()
      if isinstance(h, bool) or not text.isdigit():
        raise BistilError(f"{where}: HEAD {h!r} is not an integer word id")
      out.append(int(text))
    check_tree(out, lambda _, w=where: w)
    yield DepExample(
      tuple(str(w) for w in words),
      tuple(strip_subtype(str(r)) for r in rels),
      where,
      heads=tuple(out),
    )


# ------------------------------------------------------------------ encoding
def encode_dp(
  examples: Sequence[DepExample],
  tokenizer: Tokenizer,
  label_to_id: Mapping[str, int],
  max_seq_len: int,
  *,
  drop_long: bool = True,
  task: str = "dp",
) -> DepData:
  """Encodes trees on first sub-words (see the module docstring).

  Args:
    examples: the sentences.
    tokenizer: the student's tokenizer (its truncation/padding ignored).
    label_to_id: {relation: id}, ids 0..R-1.
    max_seq_len: L, the padded length including special tokens.
    drop_long: training: drop sentences longer than L tokens (counted in
      `num_dropped`). Evaluation (False): such sentences get no row; their
      words count as wrong (`num_unscored_words`).
    task: the task name stored in the result.

  Raises:
    BistilError: bad labels or max_seq_len, no examples, an unknown
      relation, a word without sub-words and no unknown token, every
      training sentence too long, or an example without heads.
  """
  names, tok, pad_id, unk, encodings = tasks.encode_words(
    examples, tokenizer, label_to_id, max_seq_len, task
  )
  rows, kept, long = [], [], []
  num_dropped = num_unk = 0
  for i, (ex, enc) in enumerate(zip(examples, encodings, strict=True)):
    if len(getattr(ex, "heads", ())) != len(ex.words):
      raise BistilError(
        f"{ex.source or '?'}: a dp example needs one head per word"
      )
    enc, _, n_unk = tasks.with_unknown_words(tok, ex, enc, unk)
    num_unk += n_unk
    if len(enc.ids) > max_seq_len:
      if drop_long:
        num_dropped += 1
      else:
        long.append(ex)
      continue
    rows.append((enc.ids, enc.type_ids, *_tree_labels(enc, ex, label_to_id)))
    kept.append(i)
  unscored_words = sum(len(ex.words) for ex in long)
  if long:
    log.warning(
      "%s: %d sentence(s) (%d words) longer than max_seq_len=%d tokens are "
      "scored as wrong (first at %s); raise max_seq_len to score them",
      task,
      len(long),
      unscored_words,
      max_seq_len,
      long[0].source or "?",
    )
  if not rows and drop_long:
    raise tasks.all_too_long(examples, task, max_seq_len)
  ids, mask, types = tasks.pad_rows(
    [(r[0], r[1]) for r in rows], max_seq_len, pad_id
  )
  labels = tasks.pad_labels([r[2] for r in rows], max_seq_len)  # [n, L]
  heads = tasks.pad_labels([r[3] for r in rows], max_seq_len)  # [n, L]
  return DepData(
    task=task,
    input_ids=ids,
    attention_mask=mask,
    token_type_ids=types,
    labels=labels,
    label_names=names,
    example_index=np.asarray(kept, np.int64),
    num_dropped=num_dropped,
    num_unk_words=num_unk,
    heads=heads,
    num_unscored_words=unscored_words,
    num_unscored_sentences=len(long),
  )


def _tree_labels(enc, ex: DepExample, label_to_id: Mapping[str, int]):
  """([l] relation ids, [l] head positions) on each word's first sub-word
  (-100 elsewhere); a head is its word's first sub-word, the root 0."""
  first = tasks.first_subwords(enc, len(ex.words))
  rel = np.full(len(enc.ids), IGNORE_LABEL, np.int32)
  head = np.full(len(enc.ids), IGNORE_LABEL, np.int32)
  for w, pos in enumerate(first):
    rel[pos] = tasks.label_id(label_to_id, ex.labels[w], ex, w)
    h = ex.heads[w]
    head[pos] = 0 if h == 0 else first[h - 1]
  return rel, head


def scores(pred: np.ndarray, data: DepData, rows: np.ndarray) -> dict[str, Any]:
  """UAS/LAS of predictions [n, L, 2] (head position, relation id) for the
  given rows of `data`, with its unscored words counted as wrong."""
  out = metrics.attachment_scores(
    pred[..., 0],
    pred[..., 1],
    data.heads[rows],
    data.labels[rows],
    num_unscored=data.num_unscored_words,
  )
  out["num_sentences"] = int(len(rows)) + data.num_unscored_sentences
  out["num_unscored_sentences"] = data.num_unscored_sentences
  return out
