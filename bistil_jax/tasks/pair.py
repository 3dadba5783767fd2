"""Sentence pairs (NLI): one label per premise/hypothesis pair.

Pairs are read from JSON lines or TSV/CSV files with a header, or the
`premise`/`hypothesis`/`label` columns of a dataset, and encoded with the
tokenizer's pair template, truncated longest-first (a pair's one label
survives truncation). The head is a sequence classifier; the metric is
accuracy.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from bistil_jax.data import task_files
from bistil_jax.data import tasks as task_data
from bistil_jax.tasks import base


@dataclasses.dataclass(frozen=True)
class PairTask(base.Task):
  """A text-pair classification task."""

  kind: ClassVar[str] = "pair"
  counts: ClassVar[tuple[tuple[str, str], ...]] = (("num_examples", "pairs"),)

  def read_file(self, path, label_names, columns):
    return task_files.read_nli(path, label_names, columns)

  def dataset_examples(self, ds, spec, label_names, columns):
    return task_files.pair_rows(ds, spec, label_names, columns)

  line_format: ClassVar[str | None] = "premise<TAB>hypothesis"

  def from_line(self, line, label, where):
    """`premise<TAB>hypothesis`."""
    premise, hypothesis = base.split_fields(
      line, ("premise", "hypothesis"), where
    )
    return task_files.PairExample(premise, hypothesis, label, where)

  def encode(
    self, examples, tokenizer, label_to_id, max_seq_len, *, train, **options
  ):
    self.check_options(options)
    return task_data.encode_sequences(
      examples, tokenizer, label_to_id, max_seq_len, task=self.name
    )
