"""Extractive QA: an answer span in a context (docs/method.md 4.1, 4.3, 4.4).

Reading (SQuAD v1.1 JSON, or SQuAD columns of a dataset), windowing long
contexts and decoding spans live in data/qa.py. The span head gives logits
[b, l, 2] (start at [..., 0], end at [..., 1]); each of the two is a
distribution over the window's positions. Softmaxes run over the real
(non-padding) positions only: task batches are padded to a bucket length,
and padding must not change the loss. (The released code pads every window
to 384 and keeps padding in the softmax, where the trained logits there are
very negative anyway.)
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import numpy as np

from bistil_jax import losses, metrics
from bistil_jax.data import qa as qa_data
from bistil_jax.tasks import base


@dataclasses.dataclass(frozen=True)
class QATask(base.Task):
  """Extractive QA scored by SQuAD F1 and exact match."""

  kind: ClassVar[str] = "qa"
  head: ClassVar[str] = "question_answering"
  headline: ClassVar[str] = "f1"
  scores: ClassVar[tuple[str, ...]] = ("exact_match",)
  counts: ClassVar[tuple[tuple[str, str], ...]] = (
    ("num_examples", "questions"),
    ("num_features", "windows"),
  )
  options: ClassVar[dict[str, int]] = {
    "doc_stride": qa_data.DOC_STRIDE,
    "n_best_size": qa_data.N_BEST_SIZE,
    "max_answer_length": qa_data.MAX_ANSWER_LENGTH,
  }
  fixed_labels: ClassVar[tuple[str, ...]] = qa_data.SPAN_LABELS

  def read_file(self, path, label_names, columns):
    return qa_data.read_squad(path)

  def dataset_examples(self, ds, spec, label_names, columns):
    return qa_data.dataset_examples(ds, spec)

  def encode(
    self, examples, tokenizer, label_to_id, max_seq_len, *, train, **options
  ):
    """Windows of every context; training windows carry answer positions,
    evaluation windows the offsets decoding needs."""
    self.check_options(options)
    return qa_data.encode_qa(
      examples, tokenizer, max_seq_len, train=train, task=self.name, **options
    )

  line_format: ClassVar[str | None] = "question<TAB>context"

  def from_line(self, line, label, where):
    """`question<TAB>context`."""
    q, c = base.split_fields(line, ("question", "context"), where)
    return qa_data.QAExample(where, q, c, (), source=where)

  def records(self, examples, data, logits, label_names):
    """{"answer": text}, decoded over each question's windows."""
    return [{"answer": a} for a in qa_data.decode(data, logits)]

  def gold_loss(self, logits, batch, rows):
    return gold_loss(logits, batch)

  def soft_loss(self, logits, teacher_logits, batch, rows, temperature):
    return soft_loss(logits, teacher_logits, batch, temperature)

  def predict(self, logits):
    """The span logits [b, l, 2]: decoded on the host over all windows."""
    return logits

  def evaluate(self, predict, data, batch_size, hosts=(0, 1)):
    """SQuAD F1 / exact match of one split: span logits of every window,
    decoded per example over its windows."""
    logits = np.zeros((data.num_examples, data.max_seq_len, 2), np.float32)
    for global_rows, out in base.predictions(predict, data, batch_size, hosts):
      out = np.asarray(out, np.float32)  # [B, l, 2]
      keep = global_rows >= 0  # the last batch's filler rows are -1
      logits[global_rows[keep], : out.shape[1]] = out[keep]
    predictions = qa_data.decode(data, logits)
    golds = [ex.answer_texts for ex in data.examples]
    out = metrics.squad_scores(predictions, golds)
    out["num_features"] = data.num_examples
    return out

  def score(self, pred, gold, label_names):
    raise ValueError("qa predictions are texts: use metrics.squad_scores")


def _ends(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  return logits[..., 0], logits[..., 1]  # [b, l] each


def gold_loss(logits: jax.Array, batch) -> losses.LossTerm:
  """(CE(start) + CE(end)) / 2 against the gold span, per window.

  Args:
    logits: [b, l, 2] span logits.
    batch: with "labels" [b, 2] (start, end; -100 on filler rows) and
      "attention_mask" [b, l].

  Returns:
    LossTerm(sum over real windows, number of real windows).
  """
  real = batch["attention_mask"] > 0  # [b, l]
  start, end = _ends(logits)
  labels = batch["labels"]  # [b, 2]
  s = losses.token_cross_entropy(start, labels[:, 0], logits_mask=real)
  e = losses.token_cross_entropy(end, labels[:, 1], logits_mask=real)
  return losses.LossTerm((s.total + e.total) / 2, s.count)


def soft_loss(
  logits: jax.Array, teacher_logits: jax.Array, batch, temperature: float
) -> losses.LossTerm:
  """Soft cross-entropy on start plus soft cross-entropy on end logits
  (docs/method.md 4.3: summed), at temperature T, over the real positions.

  Args:
    logits, teacher_logits: [b, l, 2] span logits of student and teacher.
    batch: with "example_mask" [b] (0 on filler rows) and "attention_mask".
    temperature: T (2 as released).

  Returns:
    LossTerm(sum over real windows, number of real windows).
  """
  real = batch["attention_mask"] > 0  # [b, l]
  rows = batch["example_mask"] > 0  # [b]
  s_start, s_end = _ends(logits)
  t_start, t_end = _ends(teacher_logits)
  s = losses.soft_cross_entropy(
    s_start, t_start, temperature, mask=rows, logits_mask=real
  )
  e = losses.soft_cross_entropy(
    s_end, t_end, temperature, mask=rows, logits_mask=real
  )
  return losses.LossTerm(s.total + e.total, s.count)
