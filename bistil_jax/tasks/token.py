"""Token labelling (POS, NER): one label per word, on its first sub-word.

Reading: UD CoNLL-U (pos), CoNLL column files (ner) or `tokens` + tag-list
columns of a dataset (the readers are in data/task_files.py, the encoder in
data/tasks.py; docs/method.md 4.3, 5.1). The losses and predictions run over the
labelled positions; the metric joins an over-long sentence's windows back,
so every gold word counts once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from bistil_jax import metrics
from bistil_jax.data import task_files
from bistil_jax.data import tasks as task_data
from bistil_jax.tasks import base

IGNORE_LABEL = base.IGNORE_LABEL


@dataclasses.dataclass(frozen=True)
class TokenTask(base.Task):
  """A word-labelling task; `file_format` names its local file reader."""

  file_format: str = "conllu"  # conllu (UPOS column) | conll (last column)

  kind: ClassVar[str] = "token"
  head: ClassVar[str] = "token_classification"
  counts: ClassVar[tuple[tuple[str, str], ...]] = (
    ("num_sentences", "sentences"),
    ("num_tokens", "tokens"),
  )

  def read_file(self, path, label_names, columns):
    if self.file_format == "conllu":
      return task_files.read_conllu(path)
    return task_files.read_conll_ner(path)

  def dataset_examples(self, ds, spec, label_names, columns):
    return task_files.token_rows(
      ds,
      spec,
      label_names,
      columns,
      label_column=self.hf_label_column,
      ner_tags=self.file_format == "conll",
    )

  def example_labels(self, example):
    return example.labels

  def where(self, example, label):
    return example.where(example.labels.index(label))

  def encode(
    self, examples, tokenizer, label_to_id, max_seq_len, *, train, **options
  ):
    self.check_options(options)
    return task_data.encode_token_task(
      examples,
      tokenizer,
      label_to_id,
      max_seq_len,
      drop_long=train,
      window=not train,
      task=self.name,
    )

  line_format: ClassVar[str | None] = "words separated by spaces"

  def from_line(self, line, label, where):
    """A sentence of whitespace-separated words."""
    words = tuple(line.split())
    return task_files.TokenExample(words, (label,) * len(words), where)

  def blank_record(self):
    return {"words": [], "labels": []}

  def records(self, examples, data, logits, label_names):
    """{"words", "labels"}: each word's label is its first sub-word's (a
    word the encoding lost would be None; none is, since a word without
    sub-words is encoded as the unknown token)."""
    pred = np.asarray(self.predict(logits))
    ids, _ = per_example(pred, data.labels, data.example_index)
    return [
      {
        "words": list(ex.words),
        "labels": [
          label_names[j] if j >= 0 else None for j in row[: len(ex.words)]
        ],
      }
      for ex, row in zip(examples, ids, strict=True)
    ]

  def loss_rows(self, batch):
    """Labelled first sub-words, [b, l]."""
    return batch["labels"] != IGNORE_LABEL

  def evaluate(self, predict, data, batch_size, hosts=(0, 1)):
    pred, rows = base.collect(predict, data, batch_size, hosts)
    pred, gold = per_example(pred, data.labels[rows], data.example_index[rows])
    out = self.score(pred, gold, data.label_names)
    out["num_sentences"] = int(gold.shape[0])
    return out

  def score(self, pred, gold, label_names) -> dict[str, Any]:
    """Token accuracy over the labelled positions (gold != -100)."""
    check_shape(pred, gold, self.name)
    return {
      "accuracy": metrics.token_accuracy(pred, gold),
      "num_tokens": int(np.sum(np.asarray(gold) != IGNORE_LABEL)),
    }


@dataclasses.dataclass(frozen=True)
class EntityTask(TokenTask):
  """Named entities in IOB tags, scored by exact-span F1 (conlleval)."""

  file_format: str = "conll"

  headline: ClassVar[str] = "f1"
  scores: ClassVar[tuple[str, ...]] = ("precision", "recall")
  counts: ClassVar[tuple[tuple[str, str], ...]] = (
    ("num_sentences", "sentences"),
    ("num_gold", "entities"),
  )

  def complete_labels(self, seen: set[str]) -> set[str]:
    """Every entity type gets both its B- and I- tag, and O."""
    types = {t[2:] for t in seen if t != "O"}
    return {"O"} | {f"{p}-{x}" for x in types for p in "BI"}

  def score(self, pred, gold, label_names) -> dict[str, Any]:
    """Exact-span precision, recall and F1, overall and per entity type."""
    check_shape(pred, gold, self.name)
    result = metrics.ner_f1(*metrics.word_tags(pred, gold, label_names))
    out: dict[str, Any] = {k: v for k, v in result.items() if k != "per_type"}
    per_type: Mapping[str, Mapping[str, float]] = result["per_type"]
    for kind, scores in per_type.items():
      out[f"f1/{kind}"] = scores["f1"]
    return out


def per_example(
  values: np.ndarray, gold: np.ndarray, index: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """Rows -> one row per example: the labelled positions of the example's
  rows (windows) in order, padded with -100. Returns (values, gold) of
  shape [examples, max words]."""
  starts = np.flatnonzero(np.r_[True, index[1:] != index[:-1]])
  groups = np.split(np.arange(len(index)), starts[1:])
  keep = gold != IGNORE_LABEL
  words = [np.concatenate([np.flatnonzero(keep[r]) for r in g]) for g in groups]
  width = max((len(w) for w in words), default=0)
  out_v = np.full((len(groups), width), IGNORE_LABEL, np.int64)
  out_g = out_v.copy()
  for i, g in enumerate(groups):
    v = np.concatenate([values[r][keep[r]] for r in g])
    out_v[i, : len(v)] = v
    out_g[i, : len(v)] = np.concatenate([gold[r][keep[r]] for r in g])
  return out_v, out_g


def check_shape(pred, gold, name: str) -> None:
  """Predictions and gold labels of one shape, [n, L]."""
  metrics.check_shapes(np.asarray(pred), np.asarray(gold))
  if np.ndim(gold) != 2:
    raise ValueError(
      f"{name} labels must be [n, L], got shape {np.shape(gold)}"
    )
