"""Phase-2 task data: encoding examples to padded arrays, and batches.

docs/method.md 4.3, 4.4 and 5.1, host side, in NumPy. The examples come
from data/task_files.py (and data/dp.py, data/qa.py); the task kinds
(bistil_jax/tasks/) choose the encoder.

Encoding follows the released code (docs/method.md 4.3, 4.4): token tasks put
the label id on the first sub-word of each word and -100 on every other position
(continuation sub-words, special tokens, padding); examples longer than
`max_seq_len` are dropped rather than truncated. NLI pairs are truncated
longest-first, which loses no label. All arrays are padded to `max_seq_len`,
so every batch has the same shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from bistil_jax.data import tokenize, vocab
from bistil_jax.data.mlm import IGNORE_LABEL
from bistil_jax.data.task_files import Example, TokenExample
from bistil_jax.errors import BistilError

Batch = dict[str, np.ndarray]

TAG_TASK_SHUFFLE = 0x7461736B  # "task"


def label_ids(labels: Sequence[str]) -> dict[str, int]:
  """{label name: id} of a label list (id = position)."""
  return {t: i for i, t in enumerate(labels)}


# ------------------------------------------------------------------ encoding
@dataclasses.dataclass(frozen=True, eq=False)
class TaskData:
  """Encoded examples of one split, padded to `max_seq_len`.

  Attributes:
    task: the task name, or None.
    input_ids: [n, L] int32 token ids, padded with the pad id.
    attention_mask: [n, L] int32, 1 on real tokens.
    token_type_ids: [n, L] int32 segment ids (1 on the second segment of
      BERT-style pairs, whatever the tokenizer's pair template gives).
    labels: [n, L] int32 label ids on first sub-words and -100 elsewhere
      (token tasks), or [n] int32 (pair tasks).
    label_names: label names, id = position.
    example_index: [n] int64, the position of each row in the examples that
      were encoded (rows of dropped examples are missing).
    num_dropped: examples dropped for being longer than `max_seq_len`.
    num_truncated: examples truncated to `max_seq_len`.
    num_unk_words: words that produced no sub-word and were encoded as the
      unknown token (so their label is kept).
  """

  task: str | None
  input_ids: np.ndarray
  attention_mask: np.ndarray
  token_type_ids: np.ndarray
  labels: np.ndarray
  label_names: tuple[str, ...]
  example_index: np.ndarray
  num_dropped: int = 0
  num_truncated: int = 0
  num_unk_words: int = 0

  @property
  def num_examples(self) -> int:
    return int(self.input_ids.shape[0])

  @property
  def max_seq_len(self) -> int:
    return int(self.input_ids.shape[1])

  def num_batches(self, batch_size: int, *, drop_remainder: bool = True) -> int:
    """Batches per epoch: full ones only, or with a padded last one."""
    _check_batch_size(batch_size)
    if drop_remainder:
      return self.num_examples // batch_size
    return -(-self.num_examples // batch_size)

  def extra_batch(
    self, rows: np.ndarray, real: np.ndarray, length: int
  ) -> dict[str, np.ndarray]:
    """Batch entries beyond the common ones, of `rows` cut to `length`
    (`real`: False on filler rows); a kind's own TaskData adds them."""
    return {}

  def order(self, seed: int, epoch: int) -> np.ndarray:
    """The shuffled row order of one epoch, a pure function of both."""
    if seed < 0 or epoch < 0:
      raise BistilError(
        f"seed and epoch must be non-negative, got {seed}, {epoch}"
      )
    ss = np.random.SeedSequence([seed, TAG_TASK_SHUFFLE, epoch])
    return np.random.default_rng(ss).permutation(self.num_examples)


def _check_batch_size(batch_size: int) -> None:
  if isinstance(batch_size, bool) or not isinstance(
    batch_size, int | np.integer
  ):
    raise BistilError(f"batch size must be an integer, got {batch_size!r}")
  if batch_size < 1:
    raise BistilError(f"batch size must be >= 1, got {batch_size}")


def pad_token_id(tokenizer: Tokenizer) -> int:
  """The padding id: the tokenizer's padding setting, `[PAD]` or `<pad>`.

  Raises:
    BistilError: the tokenizer has none of them.
  """
  if tokenizer.padding and tokenizer.padding.get("pad_id") is not None:
    return int(tokenizer.padding["pad_id"])
  for token in ("[PAD]", "<pad>"):
    i = tokenizer.token_to_id(token)
    if i is not None:
      return int(i)
  raise BistilError("tokenizer has no padding token ([PAD] or <pad>)")


def check_labels(label_to_id: Mapping[str, int]) -> tuple[str, ...]:
  """Label names by id; ids must be exactly 0..k-1."""
  names = sorted(label_to_id, key=label_to_id.__getitem__)
  if sorted(label_to_id.values()) != list(range(len(names))) or not names:
    raise BistilError(
      "label ids must be 0..k-1, one per label; got "
      f"{dict(sorted(label_to_id.items(), key=lambda kv: kv[1]))}"
    )
  return tuple(names)


def label_id(
  label_to_id: Mapping[str, int],
  label: str,
  ex: Example,
  word: int | None = None,
) -> int:
  """The id of `label`; an unknown one is named at its word's own line
  (`word`: its index in a TokenExample), else at the example's."""
  if label not in label_to_id:
    where = ex.source or "?"
    if word is not None and isinstance(ex, TokenExample):
      where = ex.where(word)
    raise BistilError(
      f"unknown label {label!r} at {where}; known: {', '.join(label_to_id)}"
    )
  return label_to_id[label]


def check_max_seq_len(max_seq_len: int) -> None:
  if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int):
    raise BistilError(f"max_seq_len must be an integer, got {max_seq_len!r}")
  if max_seq_len < 2:
    raise BistilError(f"max_seq_len must be >= 2, got {max_seq_len}")


def truncating(tokenizer: Tokenizer, max_seq_len: int) -> Tokenizer:
  tok = Tokenizer.from_str(tokenizer.to_str())
  tok.no_padding()
  tok.enable_truncation(max_seq_len, strategy="longest_first")
  return tok


def _windows(enc, labels: np.ndarray, max_seq_len: int):
  """Overlapping windows of one over-long encoded sentence.

  The content between the leading and trailing special tokens is cut into
  scored spans of S = W // 2 sub-words (W = the content room of a window);
  the window of a span adds up to (W - S) / 2 sub-words of context on each
  side (shifted inward at the ends) and the special tokens around it. Labels
  outside a window's scored span are -100, so every labelled sub-word is
  scored exactly once, with context on both sides where there is any.

  Yields:
    (ids, type ids, labels) rows of at most `max_seq_len` tokens.
  """
  special = np.asarray(enc.special_tokens_mask, bool)
  ids = np.asarray(enc.ids, np.int32)
  types = np.asarray(enc.type_ids, np.int32)
  n = len(ids)
  lead = int(np.argmax(~special)) if (~special).any() else n
  trail = int(np.argmax(~special[::-1])) if (~special).any() else 0
  body = slice(lead, n - trail)
  room = max_seq_len - lead - trail
  if room < 2:
    raise BistilError(
      f"max_seq_len={max_seq_len} leaves no room for windows between "
      f"{lead + trail} special tokens"
    )
  c_ids, c_types, c_labels = ids[body], types[body], labels[body]
  m = len(c_ids)
  span = max(room // 2, 1)
  ctx = (room - span) // 2
  for a in range(0, m, span):
    b = min(a + span, m)
    start = min(max(a - ctx, 0), max(m - room, 0))
    stop = min(start + room, m)
    lab = np.full(stop - start, IGNORE_LABEL, np.int32)
    lab[a - start : b - start] = c_labels[a:b]
    yield (
      np.concatenate([ids[:lead], c_ids[start:stop], ids[n - trail :]]),
      np.concatenate([types[:lead], c_types[start:stop], types[n - trail :]]),
      np.concatenate([labels[:lead], lab, labels[n - trail :]]),
    )


def _lost_words(encoding, num_words: int) -> list[int]:
  """Words that produced no sub-word."""
  covered = {w for w in encoding.word_ids if w is not None}
  return [w for w in range(num_words) if w not in covered]


def encode_token_task(
  examples: Sequence[TokenExample],
  tokenizer: Tokenizer,
  label_to_id: Mapping[str, int],
  max_seq_len: int,
  *,
  drop_long: bool = True,
  window: bool = False,
  task: str | None = None,
) -> TaskData:
  """Encodes word-labelled sentences with labels on first sub-words.

  Each sentence is encoded as pre-tokenized words with the tokenizer's
  special tokens. The label id of a word goes on its first sub-word; every
  other position (continuation sub-words, special tokens, padding) gets -100
  (docs/method.md 4.3: distillation is masked to these positions). A word
  with no sub-word becomes the unknown token (`with_unknown_words`), so
  every word of a kept example has exactly one labelled position.

  Args:
    examples: the sentences.
    tokenizer: the student's tokenizer; its own truncation and padding
      settings are ignored.
    label_to_id: {label name: id}, ids 0..k-1 (a task's `label_set`).
    max_seq_len: L, the padded length including special tokens.
    drop_long: drop examples with more than L tokens, as the released code
      does (counted in `num_dropped`); if False, truncate them (the labels
      of cut words are lost; counted in `num_truncated`) or window them.
    window: with drop_long False, split a long example into overlapping
      windows of L tokens (see `_windows`) instead of truncating it: every
      labelled sub-word is scored in exactly one window, so evaluation
      counts every gold word (counted in `num_truncated`; its rows share
      the example's `example_index`, in order).
    task: the task name stored in the result (and used in messages).

  Returns:
    The encoded split.

  Raises:
    BistilError: bad label ids or max_seq_len, no examples, a label outside
      `label_to_id`, a word without sub-words and no unknown token, or every
      example dropped.
  """
  names, tok, pad_id, unk, encodings = encode_words(
    examples, tokenizer, label_to_id, max_seq_len, task
  )
  cut = None
  rows, kept = [], []
  num_dropped = num_truncated = num_unk = 0
  for i, (ex, enc) in enumerate(zip(examples, encodings, strict=True)):
    enc, words, n_unk = with_unknown_words(tok, ex, enc, unk)
    num_unk += n_unk
    if len(enc.ids) > max_seq_len:
      if drop_long:
        num_dropped += 1
        continue
      num_truncated += 1
      if not window:
        cut = cut or truncating(tok, max_seq_len)
        enc = cut.encode(words, is_pretokenized=True)
    labels = word_labels(enc, ex, label_to_id)
    if len(enc.ids) > max_seq_len:  # window mode
      new = list(_windows(enc, labels, max_seq_len))
    else:
      new = [(enc.ids, enc.type_ids, labels)]
    rows += new
    kept += [i] * len(new)
  if not rows:
    raise all_too_long(examples, task, max_seq_len)
  ids, mask, types = pad_rows([(r[0], r[1]) for r in rows], max_seq_len, pad_id)
  return TaskData(
    task=task,
    input_ids=ids,
    attention_mask=mask,
    token_type_ids=types,
    labels=pad_labels([r[2] for r in rows], max_seq_len),
    label_names=names,
    example_index=np.asarray(kept, np.int64),
    num_dropped=num_dropped,
    num_truncated=num_truncated,
    num_unk_words=num_unk,
  )


def encode_words(
  examples: Sequence[TokenExample],
  tokenizer: Tokenizer,
  label_to_id: Mapping[str, int],
  max_seq_len: int,
  task: str | None,
):
  """The checks and the untruncated encodings every word-level task
  starts from: (label names, the untruncating tokenizer, its pad id, its
  unknown token, one encoding of each example's words).

  Raises:
    BistilError: bad label ids or max_seq_len, or no examples.
  """
  check_max_seq_len(max_seq_len)
  names = check_labels(label_to_id)
  if not examples:
    raise BistilError(f"no {task or 'task'} examples to encode")
  tok = tokenize.without_truncation(tokenizer)
  encodings = tok.encode_batch(
    [list(ex.words) for ex in examples], is_pretokenized=True
  )
  return names, tok, pad_token_id(tok), unk_token(tok), encodings


def word_labels(encoding, ex, label_to_id: Mapping[str, int]) -> np.ndarray:
  """[l] each word's label id on its first sub-word, -100 elsewhere (a word
  cut by truncation has none)."""
  labels = np.full(len(encoding.ids), IGNORE_LABEL, np.int32)
  for w, pos in enumerate(first_subwords(encoding, len(ex.words))):
    if pos >= 0:
      labels[pos] = label_id(label_to_id, ex.labels[w], ex, w)
  return labels


def first_subwords(encoding, num_words: int) -> np.ndarray:
  """[num_words] the position of each word's first sub-word, -1 for a word
  with none in the encoding."""
  first = np.full(num_words, -1, np.int64)
  prev = None
  for pos, w in enumerate(encoding.word_ids):
    if w is not None and w != prev and first[w] < 0:
      first[w] = pos
    prev = w
  return first


def all_too_long(examples, task: str | None, max_seq_len: int) -> BistilError:
  """The error of a training split whose every example was dropped."""
  return BistilError(
    f"all {len(examples)} {task or 'task'} examples are longer than "
    f"max_seq_len={max_seq_len} tokens (first at "
    f"{examples[0].source or '?'})"
  )


def with_unknown_words(tok: Tokenizer, ex, enc, unk: str | None):
  """(encoding, words, number replaced) of an example whose words that
  produce no sub-word are replaced by the unknown token `unk`; `enc` is the
  example's plain encoding.

  NOTE: a word that the tokenizer turns into no sub-word at all (e.g. a
  lone zero-width or control character, removed by the normaliser) would
  silently lose its label and shift word-level metrics; as the unknown
  token (counted in `num_unk_words`) it keeps its labelled position.

  Raises:
    BistilError: such a word and no unknown token, or one that produces no
      sub-word even as the unknown token.
  """
  lost = _lost_words(enc, len(ex.words))
  if not lost:
    return enc, list(ex.words), 0
  if unk is None:
    raise BistilError(
      f"word {ex.words[lost[0]]!r} at {ex.where(lost[0])} produces no "
      "sub-word and the tokenizer has no unknown token"
    )
  words = [unk if w in lost else x for w, x in enumerate(ex.words)]
  enc = tok.encode(words, is_pretokenized=True)
  if _lost_words(enc, len(words)):
    raise BistilError(
      f"word {ex.words[lost[0]]!r} at {ex.where(lost[0])} produces no "
      f"sub-word, not even as {unk!r}"
    )
  return enc, words, len(lost)


def pad_labels(rows: Sequence[np.ndarray], max_seq_len: int) -> np.ndarray:
  """Per-row label vectors -> [n, L] int32, IGNORE_LABEL past each row."""
  out = np.full((len(rows), max_seq_len), IGNORE_LABEL, np.int32)  # [n, L]
  for j, lab in enumerate(rows):
    out[j, : len(lab)] = lab
  return out


def unk_token(tokenizer: Tokenizer) -> str | None:
  unk_id = vocab.unk_token_id(tokenizer)
  return None if unk_id is None else tokenizer.id_to_token(unk_id)


def pad_rows(
  rows: Sequence[tuple[Sequence[int], Sequence[int]]],
  max_seq_len: int,
  pad_id: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(ids, type ids) rows -> padded input_ids, attention_mask, token types."""
  n = len(rows)
  ids = np.full((n, max_seq_len), pad_id, np.int32)  # [n, L]
  mask = np.zeros((n, max_seq_len), np.int32)  # [n, L]
  types = np.zeros((n, max_seq_len), np.int32)  # [n, L]
  for j, (row_ids, row_types) in enumerate(rows):
    k = len(row_ids)
    ids[j, :k] = row_ids
    mask[j, :k] = 1
    types[j, :k] = row_types
  return ids, mask, types


def encode_sequences(
  examples: Sequence[Any],
  tokenizer: Tokenizer,
  label_to_id: Mapping[str, int],
  max_seq_len: int,
  *,
  task: str | None = None,
) -> TaskData:
  """Encodes one- or two-text examples for sequence classification.

  Each example has `segments` (one text, or two such as premise and
  hypothesis) and a `label`. Pairs are encoded with the tokenizer's pair
  template (e.g. `[CLS] A [SEP] B [SEP]` with segment 1 on B, or
  `<s> A </s></s> B </s>`), single texts with its single template; both
  are truncated (longest-first) to `max_seq_len`: a classification label
  survives truncation, so nothing is dropped.

  Args:
    examples: the examples.
    tokenizer: the student's tokenizer; its own truncation and padding
      settings are ignored.
    label_to_id: {label name: id}, ids 0..k-1.
    max_seq_len: L, the padded length including special tokens.
    task: the task name stored in the result (and used in messages).

  Returns:
    The encoded split, labels [n].

  Raises:
    BistilError: bad label ids or max_seq_len, no examples, or a label
      outside `label_to_id`.
  """
  check_max_seq_len(max_seq_len)
  names = check_labels(label_to_id)
  if not examples:
    raise BistilError(f"no {task or 'task'} examples to encode")
  tok = truncating(tokenizer, max_seq_len)
  pad_id = pad_token_id(tok)
  labels = np.asarray(
    [label_id(label_to_id, ex.label, ex) for ex in examples], np.int32
  )  # [n]
  try:
    encodings = tok.encode_batch(
      [
        ex.segments if len(ex.segments) > 1 else ex.segments[0]
        for ex in examples
      ]
    )
  except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
    raise BistilError(
      f"cannot encode {task or 'nli'} examples with max_seq_len={max_seq_len}: "
      f"{e}"
    ) from None
  num_truncated = sum(1 for enc in encodings if enc.overflowing)
  ids, mask, types = pad_rows(
    [(enc.ids, enc.type_ids) for enc in encodings], max_seq_len, pad_id
  )
  return TaskData(
    task=task,
    input_ids=ids,
    attention_mask=mask,
    token_type_ids=types,
    labels=labels,
    label_names=names,
    example_index=np.arange(len(examples), dtype=np.int64),
    num_truncated=num_truncated,
  )


# ------------------------------------------------------------------ batches
def bucket_lengths(max_seq_len: int, smallest: int = 16) -> tuple[int, ...]:
  """The padded lengths task batches use: powers of two from `smallest`
  below `max_seq_len`, then `max_seq_len`, so jit compiles a bounded number
  of shapes (at most log2(L / smallest) + 2)."""
  out, n = [], smallest
  while n < max_seq_len:
    out.append(n)
    n *= 2
  return (*out, max_seq_len)


def _bucket(lengths: np.ndarray, buckets: Sequence[int]) -> int:
  longest = int(lengths.max()) if lengths.size else 1
  return next(b for b in buckets if b >= longest)


def host_batch(
  data: TaskData,
  rows: np.ndarray,
  buckets: Sequence[int],
  process_index: int = 0,
  num_processes: int = 1,
) -> Batch:
  """This host's slice of the global batch `rows` (-1: a filler row, whose
  example_mask is 0 and labels -100), padded to the bucket of the longest
  row of the whole global batch (the same on every host)."""
  real = rows >= 0
  rows = np.where(real, rows, 0)
  length = _bucket(data.attention_mask[rows].sum(-1), buckets)
  per = len(rows) // num_processes
  mine = slice(process_index * per, (process_index + 1) * per)
  rows, real = rows[mine], real[mine]
  labels = data.labels[rows].copy()
  labels[~real] = IGNORE_LABEL
  if labels.ndim == 2:
    labels = labels[:, :length]  # [b, l]
  out = {
    "input_ids": data.input_ids[rows, :length],  # [b, l]
    "attention_mask": data.attention_mask[rows, :length],  # [b, l]
    "token_type_ids": data.token_type_ids[rows, :length],  # [b, l]
    "labels": labels,
    "example_mask": real.astype(np.int32),  # [b]
  }
  out.update(data.extra_batch(rows, real, length))
  return out


class TaskBatches:
  """Endless shuffled training batches; batch k is a pure function of k.

  Each epoch is a permutation seeded by (seed, epoch) of the rows; every
  host computes the global batch and keeps its own slice of it, so a run
  on H hosts feeds the devices exactly what one host would. Batches are
  padded to the bucket of their longest row (`bucket_lengths`), not to
  `max_seq_len`.
  """

  def __init__(
    self,
    data: TaskData,
    batch_size: int,
    seed: int,
    *,
    process_index: int = 0,
    num_processes: int = 1,
  ):
    self.data = data
    self.batch_size = batch_size
    self.seed = seed
    self.per_epoch = data.num_batches(batch_size)
    if self.per_epoch < 1:
      raise BistilError(
        f"training split has {data.num_examples} examples, fewer than one "
        f"batch of {batch_size}"
      )
    self.buckets = bucket_lengths(data.max_seq_len)
    self._host = (process_index, num_processes)
    self._step = 0
    self._order: tuple[int, np.ndarray | None] = (-1, None)

  def batch(self, step: int) -> Batch:
    epoch, i = divmod(step, self.per_epoch)
    if self._order[0] != epoch:
      self._order = (epoch, self.data.order(self.seed, epoch))
    rows = self._order[1][i * self.batch_size : (i + 1) * self.batch_size]
    return host_batch(self.data, rows, self.buckets, *self._host)

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    out = self.batch(self._step)
    self._step += 1
    return out

  def state(self) -> dict[str, Any]:
    return {"step": self._step, "seed": self.seed, "batch": self.batch_size}

  def restore(self, state: Mapping[str, Any]) -> None:
    if state.get("seed") != self.seed or state.get("batch") != self.batch_size:
      raise BistilError(f"data state {dict(state)} is from another run")
    self._step = int(state["step"])


def eval_batches(
  data: TaskData,
  batch_size: int,
  process_index: int = 0,
  num_processes: int = 1,
) -> Iterator[tuple[np.ndarray, Batch]]:
  """Every row once, in order: (global rows, this host's bucketed batch).

  The last batch is filled up to `batch_size` with filler rows (-1 in the
  global rows; example_mask 0 in the batch).
  """
  _check_batch_size(batch_size)
  buckets = bucket_lengths(data.max_seq_len)
  n = data.num_examples
  for start in range(0, n, batch_size):
    rows = np.full(batch_size, -1, np.int64)
    real = np.arange(start, min(start + batch_size, n))
    rows[: len(real)] = real
    yield rows, host_batch(data, rows, buckets, process_index, num_processes)
