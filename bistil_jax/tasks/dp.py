"""Dependency parsing: a head and a relation per word (docs/method.md 4.2-4.4,
5.1).

Reading, encoding and scoring the words of over-long sentences live in
data/dp.py; the head is the biaffine parser of model/heads. The model
computes relation scores at one head per dependent: the gold heads in
training (passed as `heads`), the argmax heads in prediction.

Losses: CE(arc over candidate heads) + CE(relation at the gold head) on
gold labels; in phase 2, soft CE on the arc distribution (over the real
tokens) + soft CE on the relation distribution at the gold head, summed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from bistil_jax import losses, metrics
from bistil_jax.data import dp as dp_data
from bistil_jax.tasks import base, token


@dataclasses.dataclass(frozen=True)
class DependencyTask(token.TokenTask):
  """Dependency parsing scored by UAS/LAS: word-level like token
  labelling (a relation per word, on its first sub-word), plus a head."""

  kind: ClassVar[str] = "dp"
  head: ClassVar[str] = "biaffine_parser"
  headline: ClassVar[str] = "las"
  # No `bistil predict`: the parser head has no export to predict with.
  line_format: ClassVar[str | None] = None
  scores: ClassVar[tuple[str, ...]] = ("uas",)
  counts: ClassVar[tuple[tuple[str, str], ...]] = (
    ("num_sentences", "sentences"),
    ("num_words", "words"),
  )

  def read_file(self, path, label_names, columns):
    return dp_data.read_conllu_dp(path)

  def dataset_examples(self, ds, spec, label_names, columns):
    return dp_data.dataset_rows(ds, spec, columns)

  def encode(
    self, examples, tokenizer, label_to_id, max_seq_len, *, train, **options
  ):
    self.check_options(options)
    return dp_data.encode_dp(
      examples,
      tokenizer,
      label_to_id,
      max_seq_len,
      drop_long=train,
      task=self.name,
    )

  def model_inputs(self, batch):
    """Relation scores at the gold heads (both models)."""
    return {"heads": gold_heads(batch)}

  def gold_loss(self, logits, batch, rows):
    return gold_loss(logits, batch, rows)

  def soft_loss(self, logits, teacher_logits, batch, rows, temperature):
    key_mask = batch["attention_mask"] > 0
    return soft_loss(logits, teacher_logits, temperature, rows, key_mask)

  def predict(self, logits):
    return predict(logits)

  def evaluate(self, predict, data, batch_size, hosts=(0, 1)):
    """Every word, the unencodable ones as wrong."""
    pred, rows = base.collect(predict, data, batch_size, hosts)
    if not rows.size:
      pred = np.zeros((0, data.max_seq_len, 2), np.int64)
    return dp_data.scores(pred, data, rows)

  def score(self, pred, gold, label_names) -> dict[str, Any]:
    """UAS/LAS of [n, L, 2] (head position, relation id) against gold."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    metrics.check_shapes(pred, gold)
    if gold.ndim != 3 or gold.shape[-1] != 2:
      raise ValueError(f"dp labels must be [n, L, 2], got shape {gold.shape}")
    return metrics.attachment_scores(
      pred[..., 0], pred[..., 1], gold[..., 0], gold[..., 1]
    )


def gold_heads(batch) -> jax.Array:
  """[b, l] gold head positions (0 off the words) for `Model(heads=...)`."""
  return jnp.maximum(batch["heads"], 0)


def gold_loss(logits, batch, words) -> losses.LossTerm:
  """CE(arc over candidate heads) + CE(rel at the gold head), over words.

  Args:
    logits: the model's (arc [b, l, l], rel [b, l, R]) with rel at the gold
      heads.
    batch: with "heads" [b, l] (-100 off the words) and "labels" [b, l]
      relation ids.
    words: [b, l] bool, the first sub-words to score.

  Returns:
    LossTerm(sum of both per-word CEs, number of words): its mean is
    mean arc CE + mean rel CE (docs/method.md 5.1).
  """
  arc, rel = logits
  ignore = jnp.int32(base.IGNORE_LABEL)
  arc_t = losses.token_cross_entropy(
    arc, jnp.where(words, batch["heads"], ignore)
  )
  rel_t = losses.token_cross_entropy(
    rel, jnp.where(words, batch["labels"], ignore)
  )
  return losses.LossTerm(arc_t.total + rel_t.total, arc_t.count)


def soft_loss(
  student, teacher, temperature, words, key_mask
) -> losses.LossTerm:
  """Phase 2: soft CE on the arc distribution + on the rel distribution at
  the gold head, summed (docs/method.md 4.3), over words.

  Args:
    student, teacher: (arc [b, l, l], rel [b, l, R]) logits, rel at the gold
      heads.
    temperature: T of the soft cross-entropy.
    words: [b, l] bool, the rows (dependents) to score.
    key_mask: [b, l] bool, the candidate heads (real tokens).

  Returns:
    LossTerm(sum of both soft CEs over words, number of words).
  """
  arc = losses.soft_cross_entropy(
    student[0],
    teacher[0],
    temperature,
    mask=words,
    logits_mask=key_mask[:, None, :],
  )
  rel = losses.soft_cross_entropy(
    student[1], teacher[1], temperature, mask=words
  )
  return losses.LossTerm(arc.total + rel.total, arc.count)


def predict(logits) -> jax.Array:
  """[b, l, 2]: greedy argmax head position (no MST, as released) and the
  argmax relation at it (the model computed rel at the argmax heads)."""
  arc, rel = logits
  return jnp.stack([jnp.argmax(arc, -1), jnp.argmax(rel, -1)], -1)
