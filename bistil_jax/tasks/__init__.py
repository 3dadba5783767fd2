"""The task registry: a task name -> its kind (docs/adding-a-task.md).

    from bistil_jax import tasks
    task = tasks.get("ner")       # an EntityTask
    task.head                     # "token_classification"
    examples = task.read("train.conll")

Every command takes `--task NAME` / `config.task = NAME` from `NAMES`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bistil_jax.data import task_files
from bistil_jax.errors import BistilError
from bistil_jax.tasks import base, dp, pair, qa, sentence, token
from bistil_jax.tasks.base import Task

REGISTRY: dict[str, Task] = {
  "pos": token.TokenTask("pos", task_files.UPOS_LABELS, "upos"),
  "ner": token.EntityTask("ner", task_files.NER_LABELS, "ner_tags"),
  "nli": pair.PairTask("nli", task_files.NLI_LABELS, "label"),
  "dp": dp.DependencyTask("dp", task_files.DP_RELATIONS, "deprel"),
  "qa": qa.QATask("qa", (), "answers"),
  "sentiment": sentence.TextClassificationTask(
    "sentiment", ("negative", "positive")
  ),
  "topic": sentence.TextClassificationTask("topic"),
}
NAMES = tuple(REGISTRY)
# What a task run records with its export for `bistil evaluate`: the window
# length and every kind's own options.
RECORDED = ("max_seq_len",) + tuple(
  dict.fromkeys(k for t in REGISTRY.values() for k in t.options)
)


def get(name: str) -> Task:
  """The task of a name.

  Raises:
    BistilError: an unknown name (the known ones listed).
  """
  if name not in REGISTRY:
    raise BistilError(f"unknown task {name!r}; known: {', '.join(NAMES)}")
  return REGISTRY[name]


def score(
  name: str,
  predictions: Any,
  golds: Any,
  label_names: Sequence[str],
  example_mask: Any = None,
) -> dict[str, Any]:
  """`get(name).score` of predictions against gold label ids, leaving out
  the rows where `example_mask` is 0 (a padded last batch's filler rows).

  Raises:
    BistilError: an unknown task.
    ValueError: shapes that do not fit.
  """
  task = get(name)
  pred, gold = np.asarray(predictions), np.asarray(golds)
  if example_mask is not None:
    keep = np.asarray(example_mask).astype(bool)  # [n]
    if keep.shape != gold.shape[:1]:
      raise ValueError(
        f"example_mask {keep.shape} does not match {gold.shape[0]} rows"
      )
    pred, gold = pred[keep], gold[keep]
  return task.score(pred, gold, label_names)


__all__ = ["NAMES", "RECORDED", "REGISTRY", "Task", "base", "get", "score"]
