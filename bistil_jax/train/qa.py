"""Extractive QA in task runs: span losses and evaluation (docs/method.md 4.3).

The span head gives logits [b, l, 2] (start at [..., 0], end at [..., 1]);
each of the two is a distribution over the window's positions. Softmaxes
run over the real (non-padding) positions only: task batches are padded to
a bucket length, and padding must not change the loss. (The released code
pads every window to 384 and keeps padding in the softmax, where the
trained logits there are very negative anyway.)
"""

from __future__ import annotations

import jax
import numpy as np

from bistil_jax import losses, metrics
from bistil_jax.data import qa as qa_data
from bistil_jax.data import tasks


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


def evaluate(
  jpredict, params, data: qa_data.QAData, batch_size: int, ctx=None
) -> dict[str, float]:
  """SQuAD F1 / exact match of one split: span logits of every window
  (`jpredict` returns [B, l, 2]), decoded per example over its windows.
  With a driver Context every host feeds its slice of each batch."""
  hosts = (jax.process_index(), jax.process_count()) if ctx else (0, 1)
  logits = np.zeros((data.num_examples, data.max_seq_len, 2), np.float32)
  for global_rows, b in tasks.eval_batches(data, batch_size, *hosts):
    arrays = {
      k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")
    }
    out = jpredict(params, ctx.to_global(arrays) if ctx else arrays)
    out = np.asarray(jax.device_get(out), np.float32)  # [B, l, 2]
    keep = global_rows >= 0  # the last batch's filler rows are -1
    logits[global_rows[keep], : out.shape[1]] = out[keep]
  predictions = qa_data.decode(data, logits)
  golds = [ex.answer_texts for ex in data.examples]
  out = metrics.squad_scores(predictions, golds)
  out["num_features"] = data.num_examples
  return out
