"""Biaffine dependency parser: its gold and distillation losses and
predictions (docs/method.md 4.2, 4.3, 5.1).

`config.head = "biaffine_parser"`: the head module is
`model/heads.py`'s `BiaffineParser` (its scorers and logits are described
there); its export layout is checkpoint/parser_head.py's.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from bistil_jax import losses

HEAD = "biaffine_parser"


# ------------------------------------------------------------------ losses
def gold_heads(batch) -> jax.Array:
  """[b, l] gold head positions (0 off the words) for `Model(heads=...)`."""
  return jnp.maximum(batch["heads"], 0)


def gold_loss(logits, batch, words) -> Any:
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
  ignore = jnp.int32(-100)
  arc_t = losses.token_cross_entropy(
    arc, jnp.where(words, batch["heads"], ignore)
  )
  rel_t = losses.token_cross_entropy(
    rel, jnp.where(words, batch["labels"], ignore)
  )
  return losses.LossTerm(arc_t.total + rel_t.total, arc_t.count)


def soft_loss(student, teacher, temperature, words, key_mask) -> Any:
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
