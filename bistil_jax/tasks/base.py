"""What a kind of task is: the one interface training, evaluation and export
call (docs/architecture.md, "A kind of task is one module").

A `Task` is a task name bound to its kind: the kind (a subclass) says how
examples are read and encoded, which head the model needs, the gold and the
distillation loss on that head's logits, how logits become predictions and
predictions a metric; the instance carries what differs between tasks of one
kind (the name, the default label set, the label column of Hugging Face
datasets). The registry (`bistil_jax/tasks/__init__.py`) maps names to
instances.

The defaults here are those of a classification head with one label per
example (`sequence_classification`): losses over the real rows of a batch,
argmax predictions, accuracy. Kinds override what differs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

from bistil_jax import losses, metrics
from bistil_jax.data import task_files
from bistil_jax.data import tasks as task_data
from bistil_jax.errors import BistilError

IGNORE_LABEL = task_data.IGNORE_LABEL
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")

# predict(arrays) -> host predictions of one batch: what evaluation needs of
# the model (the caller binds the params, jit and the batch sharding).
Predict = Callable[[Mapping[str, np.ndarray]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Task:
  """A task name bound to its kind.

  Attributes:
    name: the task name (`pos`, `nli`, ...), as `--task` and `config.task`
      spell it.
    default_labels: the label set used, in head order, when the data's
      labels are a subset of it (so splits and languages agree on ids).
    hf_label_column: the label column of Hugging Face datasets.
  """

  name: str
  default_labels: tuple[str, ...] = ()
  hf_label_column: str = "label"

  # What the kind says (class attributes of each kind).
  kind: ClassVar[str] = "sequence"
  head: ClassVar[str] = "sequence_classification"  # model/config.py HEADS
  headline: ClassVar[str] = "accuracy"  # the metric reported first
  scores: ClassVar[tuple[str, ...]] = ()  # then these, in this order
  # (results key, what it counts) for the evaluation table.
  counts: ClassVar[tuple[tuple[str, str], ...]] = (
    ("num_examples", "examples"),
  )
  # Encoding and decoding options beyond max_seq_len, with their defaults;
  # runs read them from `config.data.<name>` and record them for evaluation.
  options: ClassVar[Mapping[str, int]] = {}
  # Output names of a head whose outputs are not labels of the data (QA's
  # start and end); None: the labels come from the data or the teacher.
  fixed_labels: ClassVar[tuple[str, ...] | None] = None
  # What one raw input line of `bistil predict` is (`from_line`); None:
  # the kind is not predicted from raw text.
  line_format: ClassVar[str | None] = None

  # ---------------------------------------------------------------- data
  def read(
    self,
    spec: str,
    *,
    label_names: Sequence[str] | None = None,
    columns: Mapping[str, str] | None = None,
  ) -> list[Any]:
    """The examples of one split: a local file in the kind's own format
    (`read_file`) or rows of a dataset (`dataset_examples`) named by a
    `BUILDER:PATH` or `hf:` spec (see data/task_files.py).

    Args:
      spec: the split.
      label_names: names of integer labels that carry no ClassLabel names
        (default: the task's default label set).
      columns: column overrides, {field: column name}.

    Raises:
      BistilError: a bad spec, missing data or columns, malformed rows, or
        an empty split.
    """
    names = tuple(label_names or self.default_labels)
    source = task_files.parse_source(spec)
    if source.kind == "file":
      return self.read_file(source.path, names, columns)
    ds = task_files.load_task_dataset(source, spec)
    examples = list(self.dataset_examples(ds, spec, names, columns))
    if not examples:
      raise BistilError(f"task data {spec} holds no examples")
    return examples

  def read_file(
    self,
    path: str,
    label_names: Sequence[str],
    columns: Mapping[str, str] | None,
  ) -> list[Any]:
    """The examples of a local file in the kind's own format, at least one."""
    raise NotImplementedError

  def dataset_examples(
    self,
    ds: Any,
    spec: str,
    label_names: Sequence[str],
    columns: Mapping[str, str] | None,
  ) -> Iterator[Any]:
    """The examples of the rows of a `datasets` split."""
    raise NotImplementedError

  def example_labels(self, example: Any) -> tuple[str, ...]:
    """The label names one example uses."""
    return (example.label,)

  def where(self, example: Any, label: str) -> str:
    """Where an example's label sits, for messages."""
    return example.source or "?"

  def complete_labels(self, seen: set[str]) -> set[str]:
    """The inferred label set from the labels the data uses."""
    return seen

  def label_set(
    self, examples: Sequence[Any], given: Sequence[str] | None = None
  ) -> tuple[str, ...]:
    """The label names, in head order (label id = position).

    Given labels win (the teacher head's, or the training split's when
    labelling dev and test). Otherwise the default set when the data's
    labels are a subset of it, else the sorted labels of the data (as the
    released code sorts them), completed by `complete_labels`.

    Raises:
      BistilError: no examples, duplicate or empty given labels, or a label
        of the data outside `given` (named with where it is).
    """
    if self.fixed_labels is not None:
      return self.fixed_labels
    name = self.name
    if not examples:
      raise BistilError(f"no {name} examples to take labels from")
    if given is not None:
      labels = tuple(given)
      if not labels or any(not isinstance(t, str) or not t for t in labels):
        raise BistilError(f"given {name} labels must be non-empty strings")
      dupes = sorted({t for t in labels if labels.count(t) > 1})
      if dupes:
        raise BistilError(f"{name} label(s) given twice: {', '.join(dupes)}")
      known = set(labels)
      for ex in examples:
        for t in self.example_labels(ex):
          if t not in known:
            raise BistilError(
              f"unknown {name} label {t!r} at {self.where(ex, t)}; known: "
              f"{', '.join(labels)}"
            )
      return labels
    seen = {t for ex in examples for t in self.example_labels(ex)}
    if seen <= set(self.default_labels):
      return self.default_labels
    return tuple(sorted(self.complete_labels(seen)))

  def encode(
    self,
    examples: Sequence[Any],
    tokenizer: Tokenizer,
    label_to_id: Mapping[str, int],
    max_seq_len: int,
    *,
    train: bool,
    **options: Any,
  ) -> task_data.TaskData:
    """Examples to padded arrays. `train`: a training split (over-long
    examples may be dropped); otherwise every gold label must be scored."""
    raise NotImplementedError

  def check_options(self, options: Mapping[str, Any]) -> None:
    extra = sorted(set(options) - set(self.options))
    if extra:
      raise BistilError(f"task {self.name} takes no options {extra}")

  # --------------------------------------------------------------- model
  def model_inputs(self, batch: Mapping[str, jax.Array]) -> dict[str, Any]:
    """Extra keyword arguments of the model call in training."""
    return {}

  def loss_rows(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    """What the logit losses average over: the real examples, [b]."""
    return batch["example_mask"] > 0

  def gold_loss(self, logits, batch, rows) -> losses.LossTerm:
    """Cross-entropy against the gold labels over `rows`."""
    labels = jnp.where(rows, batch["labels"], IGNORE_LABEL)
    return losses.token_cross_entropy(logits, labels)

  def soft_loss(
    self, logits, teacher_logits, batch, rows, temperature: float
  ) -> losses.LossTerm:
    """Soft cross-entropy on the teacher's logits over `rows`
    (docs/method.md 4.3)."""
    return losses.soft_cross_entropy(
      logits, teacher_logits, temperature, mask=rows
    )

  def predict(self, logits) -> jax.Array:
    """Device predictions of one batch from the head's logits."""
    return jnp.argmax(logits, -1)

  # ---------------------------------------------------------- evaluation
  def evaluate(
    self,
    predict: Predict,
    data: task_data.TaskData,
    batch_size: int,
    hosts: tuple[int, int] = (0, 1),
  ) -> dict[str, Any]:
    """The metrics of one encoded split: every row once.

    Args:
      predict: one batch's input arrays -> host predictions.
      data: the encoded split.
      batch_size: global rows per batch.
      hosts: (process index, process count): each host feeds its slice.
    """
    pred, rows = collect(predict, data, batch_size, hosts)
    return self.score(pred, data.labels[rows], data.label_names)

  # ------------------------------------------ raw text (bistil predict)
  def check_predict(self) -> None:
    """Raises BistilError for a kind `bistil predict` does not handle."""
    if self.line_format is None:
      raise BistilError(
        f"bistil predict does not handle {self.name} ({self.kind}) tasks"
      )

  def from_line(self, line: str, label: str, where: str) -> Any:
    """The kind's example of one raw input line (`label` a placeholder the
    encoder needs); `where` names the line in messages."""
    self.check_predict()
    raise NotImplementedError

  def blank_record(self) -> dict[str, Any]:
    """The record of a blank input line."""
    return {}

  def records(
    self, examples: Sequence[Any], data, logits, label_names: Sequence[str]
  ) -> list[dict[str, Any]]:
    """One JSON-ready record per example from the host logits of `data`'s
    rows: here {"label": name}."""
    pred = np.asarray(self.predict(logits))  # [n]
    return [{"label": label_names[int(j)]} for j in pred]

  def score(
    self, pred: np.ndarray, gold: np.ndarray, label_names: Sequence[str]
  ) -> dict[str, Any]:
    """Metrics of predictions against gold labels (ids, one per row)."""
    metrics.check_shapes(np.asarray(pred), np.asarray(gold))
    return {
      "accuracy": metrics.accuracy(pred, gold),
      "num_examples": int(np.asarray(gold).size),
    }


def split_fields(line: str, fields: Sequence[str], where: str) -> list[str]:
  """A raw input line's tab-separated fields, exactly `len(fields)`.

  Raises:
    BistilError: another number of fields (naming the expected layout).
  """
  parts = line.split("\t")
  if len(parts) != len(fields):
    raise BistilError(
      f"{where}: a {'<TAB>'.join(fields)} line is {len(fields)} tab-separated "
      f"fields, got {len(parts)}"
    )
  return parts


def collect(
  predict: Predict,
  data: task_data.TaskData,
  batch_size: int,
  hosts: tuple[int, int] = (0, 1),
) -> tuple[np.ndarray, np.ndarray]:
  """Predictions of every row, and the rows, in order (filler rows of the
  last batch dropped; per-position predictions padded back from their
  bucket length to the split's)."""
  preds, rows = [], []
  for global_rows, p in predictions(predict, data, batch_size, hosts):
    if p.ndim >= 2:  # bucketed length -> the split's length
      pad = [(0, 0), (0, data.max_seq_len - p.shape[1])]
      p = np.pad(p, pad + [(0, 0)] * (p.ndim - 2))
    keep = global_rows >= 0  # the last batch's filler rows are -1
    preds.append(p[keep])
    rows.append(global_rows[keep])
  if not rows:
    return np.zeros((0,), np.int64), np.zeros(0, np.int64)
  return np.concatenate(preds), np.concatenate(rows)


def predictions(
  predict: Predict,
  data: task_data.TaskData,
  batch_size: int,
  hosts: tuple[int, int] = (0, 1),
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(global rows, host predictions) of each evaluation batch."""
  for global_rows, b in task_data.eval_batches(data, batch_size, *hosts):
    yield global_rows, np.asarray(predict({k: b[k] for k in INPUT_KEYS}))
