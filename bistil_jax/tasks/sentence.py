"""Single-text classification (sentiment, topic): one label per text.

A split is a JSON-lines, TSV or CSV file with a text column (`text` or
`sentence`) and a `label` column (names, or integer ids into the label
set), or the same columns of a Hugging Face dataset (`json:`, `csv:`,
`parquet:` or `hf:` specs, e.g. `hf:imdb:test`, `hf:ag_news::test`;
integer labels map through the dataset's ClassLabel names). Texts are
encoded with the tokenizer's single-sequence template and truncated to
`max_seq_len` (the label survives truncation). The head is the
sequence classifier (exported as `*ForSequenceClassification`); the
metrics are accuracy and macro-averaged F1 (the mean over labels of the
per-label F1, so rare classes count as much as frequent ones).

This kind was added by following docs/adding-a-task.md: this module, one
line per task name in the registry, and its tests.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar

import numpy as np

from bistil_jax import metrics
from bistil_jax.data import task_files
from bistil_jax.data import tasks as task_data
from bistil_jax.tasks import base

# Accepted column names of each field, in order of preference.
COLUMNS = {"text": ("text", "sentence"), "label": ("label", "labels")}


@dataclasses.dataclass(frozen=True)
class TextExample:
  """One labelled text.

  Attributes:
    text: the text.
    label: the label name.
    source: where it came from, `path:line` or `spec row i`, for messages.
  """

  text: str
  label: str
  source: str = dataclasses.field(default="", compare=False)

  @property
  def segments(self) -> tuple[str, ...]:
    """The texts `task_data.encode_sequences` encodes: one."""
    return (self.text,)


@dataclasses.dataclass(frozen=True)
class TextClassificationTask(base.Task):
  """A single-text classification task (accuracy and macro-F1)."""

  kind: ClassVar[str] = "text"
  scores: ClassVar[tuple[str, ...]] = ("macro_f1",)
  counts: ClassVar[tuple[tuple[str, str], ...]] = (("num_examples", "texts"),)

  def read_file(self, path, label_names, columns):
    """Labelled texts of a JSON-lines, TSV or CSV file (see the module
    docstring); a text that is not a string or a bad label is an error."""
    path = os.fspath(path)
    rows = task_files.read_table(path, "text classification", COLUMNS, columns)
    examples = [_example(values, label_names, where) for values, where in rows]
    return task_files.nonempty(examples, path, "text classification")

  def dataset_examples(self, ds, spec, label_names, columns):
    keys = names = None
    for i, row in task_files.dataset_rows(ds, spec):
      where = f"{spec} row {i}"
      if keys is None:
        keys = task_files.find_columns(row, COLUMNS, spec, columns)
        names = task_files.class_names(ds, keys["label"]) or label_names
      yield _example({f: row[k] for f, k in keys.items()}, names, where)

  line_format: ClassVar[str | None] = "the text"

  def from_line(self, line, label, where):
    """The text."""
    return TextExample(line, label, where)

  def encode(
    self, examples, tokenizer, label_to_id, max_seq_len, *, train, **options
  ):
    self.check_options(options)
    return task_data.encode_sequences(
      examples, tokenizer, label_to_id, max_seq_len, task=self.name
    )

  def score(self, pred, gold, label_names) -> dict[str, Any]:
    """Accuracy and macro-F1 over the labels the gold or predictions use."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    metrics.check_shapes(pred, gold)
    return {
      "accuracy": metrics.accuracy(pred, gold),
      "macro_f1": macro_f1(pred, gold),
      "num_examples": int(gold.size),
    }


def macro_f1(pred: np.ndarray, gold: np.ndarray) -> float:
  """The mean over labels (those in gold or predictions) of each label's F1
  = 2 TP / (2 TP + FP + FN); 0.0 with no examples."""
  labels = np.union1d(np.unique(pred), np.unique(gold))
  if not labels.size:
    return 0.0
  f1 = []
  for y in labels:
    tp = int(np.sum((pred == y) & (gold == y)))
    wrong = int(np.sum(pred == y)) + int(np.sum(gold == y)) - 2 * tp
    f1.append(2 * tp / (2 * tp + wrong) if tp or wrong else 0.0)
  return float(np.mean(f1))


def _example(values, label_names, where: str) -> TextExample:
  text = task_files.text_field(values, "text", where)
  label = task_files.label_name(values["label"], label_names, where)
  return TextExample(text, label, where)
