"""Extractive QA data: SQuAD readers, windowed features, span decoding.

docs/method.md 4.3 and 5.1 (SQuAD v1.1 -> XQuAD), host side, in NumPy, as the
released code does it through HF run_qa:

- Readers: SQuAD v1.1 JSON files (`data[].paragraphs[].{context,
  qas[].{id, question, answers[].{text, answer_start}}}`), and `datasets`
  sources with SQuAD columns (`id`, `title`, `context`, `question`,
  `answers{text, answer_start}`) through the specs of data/task_files.py
  (`json:PATH`, `hf:NAME[:CONFIG]:SPLIT`). Every answer's `answer_start`
  must point at its text in the context.
- Features: `question + context` pairs in the tokenizer's pair template
  (BERT `[CLS] q [SEP] c [SEP]` with token type 1 on the context, XLM-R
  `<s> q </s></s> c </s>`); a context longer than a window is split into
  windows that overlap by `doc_stride` tokens (HF's `stride`; 128 at
  sequence length 384 as released), so every context token is in at least
  one window. Training features carry the answer's start and end token, or
  position 0 (`[CLS]`/`<s>`) when the answer is not inside the window.
- Decoding: per window the `n_best_size` best start and end logits; spans
  of context tokens with end >= start and at most `max_answer_length`
  tokens, scored start + end logit; the best span over all windows of an
  example, cut from the context by the token offsets.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from bistil_jax.data import task_files, tasks, tokenize
from bistil_jax.errors import BistilError

# The two outputs of the span head, in head order (its "labels").
SPAN_LABELS = ("start", "end")
# Released post-processing (docs/method.md 4.3: HF run_qa defaults).
DOC_STRIDE = 128
N_BEST_SIZE = 20
MAX_ANSWER_LENGTH = 30
NO_OFFSET = -1  # offsets of question, special and padding tokens


@dataclasses.dataclass(frozen=True)
class QAExample:
  """One question about one context.

  Attributes:
    id: the question id (SQuAD `id`).
    question: the question text.
    context: the paragraph the answer is cut from.
    answers: (text, answer_start) pairs; answer_start is a character
      offset into `context`. Training uses the first.
    title: the article title, if any.
    source: where it came from (`path: id` or `spec row i`), for messages.
  """

  id: str
  question: str
  context: str
  answers: tuple[tuple[str, int], ...]
  title: str = ""
  source: str = dataclasses.field(default="", compare=False)

  @property
  def answer_texts(self) -> tuple[str, ...]:
    return tuple(text for text, _ in self.answers)


# ------------------------------------------------------------------ readers
def _get(obj: Any, key: str, where: str, kind: type | tuple[type, ...]):
  if not isinstance(obj, dict):
    raise BistilError(f"{where}: expected a JSON object")
  if key not in obj:
    raise BistilError(f"{where}: no {key!r} key")
  value = obj[key]
  if not isinstance(value, kind) or isinstance(value, bool):
    names = (
      "/".join(k.__name__ for k in kind)
      if isinstance(kind, tuple)
      else kind.__name__
    )
    raise BistilError(
      f"{where}: {key!r} is {type(value).__name__}, expected {names}"
    )
  return value


def _answers(
  texts: Sequence[Any], starts: Sequence[Any], context: str, where: str
) -> tuple[tuple[str, int], ...]:
  """Checked (text, start) pairs: each text sits at its start offset."""
  if len(texts) != len(starts):
    raise BistilError(
      f"{where}: {len(texts)} answer texts but {len(starts)} answer_start "
      "values"
    )
  out = []
  for i, (text, start) in enumerate(zip(texts, starts, strict=True)):
    if not isinstance(text, str) or not text:
      raise BistilError(f"{where}: answer {i} has no text")
    if isinstance(start, bool) or not isinstance(start, int | np.integer):
      raise BistilError(
        f"{where}: answer {i} answer_start is {start!r}, not an integer"
      )
    start = int(start)
    found = context[start : start + len(text)] if start >= 0 else None
    if found != text:
      raise BistilError(
        f"{where}: answer {i} {text!r} does not match the context at "
        f"answer_start={start} (found {found!r})"
      )
    out.append((text, start))
  return tuple(out)


def read_squad(path: str | os.PathLike[str]) -> list[QAExample]:
  """Reads a SQuAD v1.1 JSON file.

  Args:
    path: the .json file (local or a URL, through the path layer).

  Returns:
    One example per question, in file order.

  Raises:
    BistilError: a missing, empty or non-JSON file, a missing key or a value
      of the wrong type, or an answer whose `answer_start` does not point at
      its text (named with the file and the question id), or no questions.
  """
  path = os.fspath(path)
  with task_files.open_task_file(path, "SQuAD") as f:  # noqa: SLF001 - one reader helper
    text = f.read()
  if not text.strip():
    raise BistilError(f"SQuAD file {path} is empty")
  try:
    doc = json.loads(text)
  except json.JSONDecodeError as e:
    raise BistilError(
      f"{path}:{e.lineno}: invalid JSON ({e.msg}); expected SQuAD v1.1"
    ) from None
  data = _get(doc, "data", path, list)
  examples = []
  for a, article in enumerate(data):
    where = f"{path}: data[{a}]"
    title = article.get("title", "") if isinstance(article, dict) else ""
    for p, para in enumerate(_get(article, "paragraphs", where, list)):
      pwhere = f"{where}.paragraphs[{p}]"
      context = _get(para, "context", pwhere, str)
      for q, qa in enumerate(_get(para, "qas", pwhere, list)):
        qid = str(_get(qa, "id", f"{pwhere}.qas[{q}]", (str, int)))
        qwhere = f"{path}: question {qid!r}"
        question = _get(qa, "question", qwhere, str)
        answers = _get(qa, "answers", qwhere, list)
        texts = [_get(x, "text", qwhere, str) for x in answers]
        starts = [_get(x, "answer_start", qwhere, int) for x in answers]
        examples.append(
          QAExample(
            id=qid,
            question=question,
            context=context,
            answers=_answers(texts, starts, context, qwhere),
            title=str(title or ""),
            source=qwhere,
          )
        )
  if not examples:
    raise BistilError(f"SQuAD file {path} holds no questions")
  return examples


def dataset_examples(ds, spec: str) -> Iterator[QAExample]:
  """Examples of a `datasets` split with SQuAD columns."""
  for i, row in task_files.dataset_rows(ds, spec):
    where = f"{spec} row {i}"
    if "id" in row:
      where += f" (question {str(row['id'])!r})"
    for col in ("context", "question", "answers"):
      task_files.row_column(row, col, spec)  # noqa: SLF001 - names the columns
    context, question = row["context"], row["question"]
    if not isinstance(context, str) or not isinstance(question, str):
      raise BistilError(f"{where}: context and question must be text")
    answers = row["answers"]
    if not isinstance(answers, Mapping) or not {
      "text",
      "answer_start",
    } <= set(answers):
      raise BistilError(
        f"{where}: answers must hold 'text' and 'answer_start' lists"
      )
    qid = str(row.get("id", i))
    yield QAExample(
      id=qid,
      question=question,
      context=context,
      answers=_answers(
        list(answers["text"]), list(answers["answer_start"]), context, where
      ),
      title=str(row.get("title") or ""),
      source=where,
    )


# ------------------------------------------------------------------ features
@dataclasses.dataclass(frozen=True, eq=False)
class QAData(tasks.TaskData):
  """Windowed QA features of one split (rows are windows, not examples).

  Attributes beyond TaskData:
    labels: [n, 2] int32 (start, end) token of the first answer, (0, 0)
      when it is not inside the window (or the example has no answer).
    offsets: [n, L, 2] int32 character span in the context of each context
      token, NO_OFFSET elsewhere; None for training features (not needed).
    examples: the encoded examples (`example_index` points into them).
    doc_stride: the overlap of consecutive windows it was encoded with.
    n_best_size, max_answer_length: decoding settings (see `decode`).
  """

  offsets: np.ndarray | None = None
  examples: tuple[QAExample, ...] = ()
  doc_stride: int = DOC_STRIDE
  n_best_size: int = N_BEST_SIZE
  max_answer_length: int = MAX_ANSWER_LENGTH


def _check_int(name: str, value: Any, low: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int | np.integer):
    raise BistilError(f"{name} must be an integer, got {value!r}")
  if value < low:
    raise BistilError(f"{name} must be >= {low}, got {value}")
  return int(value)


def _window_tokenizer(tok: Tokenizer, max_seq_len: int, stride: int):
  out = Tokenizer.from_str(tok.to_str())
  out.no_padding()
  out.enable_truncation(max_seq_len, stride=stride, strategy="only_second")
  return out


def _context_offsets(enc, length: int) -> np.ndarray:
  """[length, 2] character offsets of the window's context tokens,
  NO_OFFSET on the question, special tokens and padding."""
  is_ctx = np.fromiter(
    (s == 1 for s in enc.sequence_ids), bool, len(enc.sequence_ids)
  )
  off = np.full((length, 2), NO_OFFSET, np.int32)  # [L, 2]
  off[: len(is_ctx)][is_ctx] = np.asarray(enc.offsets, np.int32)[is_ctx]
  return off


def _span_labels(off: np.ndarray, start: int, end: int) -> tuple[int, int]:
  """(start token, end token) of the character span [start, end) in one
  window (offsets from `_context_offsets`), or (0, 0) when the window does
  not hold all of it."""
  ctx = np.flatnonzero(off[:, 0] != NO_OFFSET)
  if not ctx.size or off[ctx[0], 0] > start or off[ctx[-1], 1] < end:
    return 0, 0
  # The last token starting at or before the answer, the first ending at or
  # after it.
  first = int(ctx[off[ctx, 0] <= start][-1])
  last = int(ctx[off[ctx, 1] >= end][0])
  return first, max(first, last)


def encode_qa(
  examples: Sequence[QAExample],
  tokenizer: Tokenizer,
  max_seq_len: int,
  *,
  train: bool = True,
  doc_stride: int = DOC_STRIDE,
  n_best_size: int = N_BEST_SIZE,
  max_answer_length: int = MAX_ANSWER_LENGTH,
  task: str = "qa",
) -> QAData:
  """Encodes question/context pairs as overlapping windows.

  Questions are left-stripped (as HF run_qa does) and never truncated; the
  context is cut into windows of at most `max_seq_len` tokens whose
  consecutive context parts overlap by `doc_stride` tokens.

  Args:
    examples: the questions.
    tokenizer: the student's tokenizer (its own truncation and padding
      settings are ignored).
    max_seq_len: L, the window length including special tokens.
    train: training features (no offsets kept, every example must have an
      answer) or evaluation features (offsets kept for decoding).
    doc_stride: overlap of consecutive windows, in context tokens.
    n_best_size: start/end candidates per window when decoding.
    max_answer_length: longest decoded answer, in tokens.
    task: the task name stored in the result.

  Returns:
    The features; `example_index` maps each window to its example.

  Raises:
    BistilError: bad settings, no examples, a training example without an
      answer, a question that leaves no room for context, or a context
      longer than its window with `doc_stride` >= the window's context room
      (each naming the example).
  """
  tasks.check_max_seq_len(max_seq_len)
  doc_stride = _check_int("doc_stride", doc_stride, 0)
  n_best_size = _check_int("n_best_size", n_best_size, 1)
  max_answer_length = _check_int("max_answer_length", max_answer_length, 1)
  if not examples:
    raise BistilError(f"no {task} examples to encode")
  plain = tokenize.without_truncation(tokenizer)
  pad_id = tasks.pad_token_id(plain)
  questions = [ex.question.lstrip() for ex in examples]
  _check_room(examples, questions, plain, max_seq_len, doc_stride, train)
  # Contexts that need windows were checked above; for the others the
  # stride does not matter, but tokenizers wants it below L - specials.
  single = plain.num_special_tokens_to_add(False)
  tok = _window_tokenizer(
    plain, max_seq_len, min(doc_stride, max(max_seq_len - single - 1, 0))
  )
  try:
    encodings = tok.encode_batch(
      [(q, ex.context) for q, ex in zip(questions, examples, strict=True)]
    )
  except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
    raise BistilError(f"cannot encode {task} windows: {e}") from None
  rows, spans, offsets, index, num_windowed = _features(
    examples, encodings, max_seq_len, train
  )
  ids, mask, types = tasks.pad_rows(rows, max_seq_len, pad_id)
  return QAData(
    task=task,
    input_ids=ids,
    attention_mask=mask,
    token_type_ids=types,
    labels=np.asarray(spans, np.int32).reshape(-1, 2),  # [n, 2]
    label_names=SPAN_LABELS,
    example_index=np.asarray(index, np.int64),
    num_truncated=num_windowed,
    offsets=None if train else np.stack(offsets),
    examples=tuple(examples),
    doc_stride=doc_stride,
    n_best_size=n_best_size,
    max_answer_length=max_answer_length,
  )


def _check_room(examples, questions, plain, max_seq_len, doc_stride, train):
  """Every question leaves room for context, every context longer than its
  room has a stride below it, every training example has an answer.

  Raises:
    BistilError: naming the first example that does not.
  """
  specials = plain.num_special_tokens_to_add(True)
  q_lens = [
    len(e.ids) for e in plain.encode_batch(questions, add_special_tokens=False)
  ]
  rooms = [max_seq_len - q_len - specials for q_len in q_lens]
  # Only contexts whose room is at most the stride need their length.
  tight = [i for i, room in enumerate(rooms) if 1 <= room <= doc_stride]
  c_lens = dict.fromkeys(range(len(examples)), 0)
  for i, e in zip(
    tight,
    plain.encode_batch(
      [examples[i].context for i in tight], add_special_tokens=False
    ),
    strict=True,
  ):
    c_lens[i] = len(e.ids)
  for i, (ex, room) in enumerate(zip(examples, rooms, strict=True)):
    if room < 1:
      raise BistilError(
        f"{ex.source or ex.id}: the question ({q_lens[i]} tokens) leaves no "
        f"room for context in max_seq_len={max_seq_len}"
      )
    if c_lens[i] > room:
      raise BistilError(
        f"{ex.source or ex.id}: doc_stride={doc_stride} must be smaller "
        f"than the window's context room of {room} tokens (max_seq_len="
        f"{max_seq_len} minus the question and special tokens)"
      )
    if train and not ex.answers:
      raise BistilError(
        f"{ex.source or ex.id}: no answer (training needs one per question)"
      )


def _features(examples, encodings, max_seq_len: int, train: bool):
  """(rows of (ids, type ids), answer spans, context offsets (evaluation
  only), example of each window, examples with more than one window)."""
  rows, spans, offsets, index = [], [], [], []
  num_windowed = 0
  for i, (ex, enc) in enumerate(zip(examples, encodings, strict=True)):
    windows = [enc, *enc.overflowing]  # each .overflowing builds new objects
    num_windowed += len(windows) > 1
    for w in windows:
      rows.append((w.ids, w.type_ids))
      index.append(i)
      off = _context_offsets(w, max_seq_len)
      if ex.answers:
        text, start = ex.answers[0]
        spans.append(_span_labels(off, start, start + len(text)))
      else:
        spans.append((0, 0))
      if not train:
        offsets.append(off)
  return rows, spans, offsets, index, num_windowed


# ------------------------------------------------------------------ decoding
def best_span(
  start_logits: np.ndarray,
  end_logits: np.ndarray,
  offsets: np.ndarray,
  n_best_size: int = N_BEST_SIZE,
  max_answer_length: int = MAX_ANSWER_LENGTH,
) -> tuple[float, int, int] | None:
  """The best answer span of one window.

  Args:
    start_logits, end_logits: [L] logits of the window.
    offsets: [L, 2] character offsets, NO_OFFSET off the context.
    n_best_size: candidates taken from the top start and top end logits.
    max_answer_length: longest span, in tokens.

  Returns:
    (score = start + end logit, start token, end token), or None when no
    candidate pair is a valid context span.
  """
  start_logits = np.asarray(start_logits, np.float64)
  end_logits = np.asarray(end_logits, np.float64)
  ctx = np.asarray(offsets)[:, 0] >= 0  # [L]
  k = min(n_best_size, len(start_logits))
  starts = np.argsort(-start_logits, kind="stable")[:k]  # [k]
  ends = np.argsort(-end_logits, kind="stable")[:k]  # [k]
  s, e = np.meshgrid(starts, ends, indexing="ij")  # [k, k]
  ok = ctx[s] & ctx[e] & (e >= s) & (e - s + 1 <= max_answer_length)
  if not ok.any():
    return None
  score = np.where(ok, start_logits[s] + end_logits[e], -np.inf)
  j = np.unravel_index(int(np.argmax(score)), score.shape)
  return float(score[j]), int(s[j]), int(e[j])


def decode(data: QAData, logits: np.ndarray) -> list[str]:
  """The predicted answer text of every example of `data`.

  Args:
    data: evaluation features (with offsets).
    logits: [n, L', 2] start/end logits of every window, in row order
      (L' <= L: positions past L' count as padding).

  Returns:
    One answer per example (`data.examples` order); "" where no window has a
    valid span.
  """
  if data.offsets is None:
    raise BistilError("QA decoding needs evaluation features (offsets)")
  best: dict[int, tuple[float, int, int, int]] = {}
  length = logits.shape[1]
  for row in range(data.num_examples):
    hit = best_span(
      logits[row, :, 0],
      logits[row, :, 1],
      data.offsets[row, :length],
      data.n_best_size,
      data.max_answer_length,
    )
    i = int(data.example_index[row])
    if hit is not None and (i not in best or hit[0] > best[i][0]):
      best[i] = (*hit, row)
  out = []
  for i, ex in enumerate(data.examples):
    if i not in best:
      out.append("")
      continue
    _, s, e, row = best[i]
    out.append(ex.context[data.offsets[row, s, 0] : data.offsets[row, e, 1]])
  return out
