"""Raw text in, labels out, on the Flax model or its ONNX export.

A `Backend` is what prediction needs of a model: logits of one batch of
input arrays, the label names, the tokenizer and the window length. Texts
become the task kind's own examples (with a placeholder label) and are
encoded by the kind's `encode` exactly as `bistil evaluate` encodes a test
set, so a word's label is its first sub-word's, long inputs are windowed
the same way and QA answers are decoded by the same n-best search.

Input lines are what each task kind's `line_format` says (token tasks a
sentence of whitespace-separated words; text classification the text;
pairs `premise<TAB>hypothesis`; QA `question<TAB>context`); the kind turns
a line into an example (`from_line`) and the logits into a record
(`records`), so this module knows no kind by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from tokenizers import Tokenizer

from bistil_jax.data import tasks as task_data
from bistil_jax.data import vocab
from bistil_jax.deploy import onnx
from bistil_jax.model.encoder import Model
from bistil_jax.tasks import base


@dataclasses.dataclass(frozen=True)
class Backend:
  """A model as prediction sees it.

  Attributes:
    name: "jax", "onnx-fp32" or "onnx-int8", for messages and tables.
    logits: input arrays of one batch -> host logits.
    labels: label names, in head order.
    tokenizer: the model's tokenizer.
    max_seq_len: the window length.
    options: the task's encoding and decoding options.
  """

  name: str
  logits: Callable[[Mapping[str, np.ndarray]], np.ndarray]
  labels: tuple[str, ...]
  tokenizer: Tokenizer
  max_seq_len: int
  options: Mapping[str, int]


def jax_logits(model: Model, params: Any) -> Callable[..., np.ndarray]:
  """A jitted batch -> logits function of a Flax model."""

  @jax.jit
  def apply(p, ids, mask, types):
    return model.apply(
      {"params": p}, ids, attention_mask=mask, token_type_ids=types
    ).logits

  def logits(arrays):
    ids, mask, types = (np.asarray(arrays[k], np.int32) for k in onnx.INPUTS)
    return np.asarray(apply(params, ids, mask, types))

  return logits


def jax_backend(
  model: Model,
  params: Any,
  tokenizer_dir: str,
  max_seq_len: int,
  options: Mapping[str, int] | None = None,
) -> Backend:
  onnx.check_head(model.config.head)
  tok, _ = vocab.load_tokenizer_dir(tokenizer_dir)
  return Backend(
    "jax",
    jax_logits(model, params),
    tuple(model.config.label_names),
    tok,
    int(max_seq_len),
    dict(options or {}),
  )


def onnx_backend(
  onnx_dir: str,
  precision: str = "fp32",
  max_seq_len: int | None = None,
  threads: int = 0,
) -> Backend:
  sess, meta = onnx.dir_session(onnx_dir, precision, threads)
  tok, _ = vocab.load_tokenizer_dir(onnx_dir)
  return Backend(
    f"onnx-{precision}",
    lambda arrays: onnx.run(sess, arrays),
    tuple(onnx.labels_of(meta)),
    tok,
    int(max_seq_len or meta["max_seq_len"]),
    dict(meta.get("options") or {}),
  )


def examples(task: base.Task, lines: Sequence[str], label: str) -> list[Any]:
  """The kind's examples of input lines, with `label` as a placeholder."""
  return [
    task.from_line(line, label, f"line {i}") for i, line in enumerate(lines, 1)
  ]


def _logits_of(
  backend: Backend, data: task_data.TaskData, batch_size: int
) -> np.ndarray:
  """Logits of every row of `data`, in batches of `batch_size`."""
  out = []
  for s in range(0, data.num_examples, batch_size):
    arrays = {k: getattr(data, k)[s : s + batch_size] for k in onnx.INPUTS}
    out.append(np.asarray(backend.logits(arrays), np.float32))
  return np.concatenate(out)


def encode(task: base.Task, backend: Backend, exs: Sequence[Any]):
  """The examples encoded as `bistil evaluate` encodes a test split, with
  the backend's tokenizer, labels, window and options."""
  return task.encode(
    exs,
    backend.tokenizer,
    task_data.label_ids(backend.labels),
    backend.max_seq_len,
    train=False,
    **backend.options,
  )


def predict_lines(
  task: base.Task,
  backend: Backend,
  lines: Sequence[str],
  batch_size: int = 32,
) -> list[dict[str, Any]]:
  """One JSON-ready record per input line (see the module docstring):
  token tasks {"words", "labels"}, classification {"label"}, QA
  {"answer"}."""
  task.check_predict()
  lines = [ln.rstrip("\r\n") for ln in lines]
  keep = [i for i, ln in enumerate(lines) if ln.strip()]
  records = [task.blank_record() for _ in lines]
  if not keep:
    return records
  labels = backend.labels
  exs = examples(task, [lines[i] for i in keep], labels[0])
  data = encode(task, backend, exs)
  logits = _logits_of(backend, data, batch_size)
  for i, record in zip(
    keep, task.records(exs, data, logits, labels), strict=True
  ):
    records[i] = record
  return records


def evaluate(
  task: base.Task, backend: Backend, spec: str, batch_size: int = 32
) -> dict[str, Any]:
  """The task's metrics of one labelled split on a backend, computed as
  `bistil evaluate` computes them."""
  labels = backend.labels
  exs = task.read(spec, label_names=labels)
  data = encode(task, backend, exs)
  return task.evaluate(
    lambda arrays: np.asarray(task.predict(backend.logits(arrays))),
    data,
    batch_size,
  )
