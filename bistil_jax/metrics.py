"""Evaluation metrics of the phase-2 tasks, in NumPy (docs/method.md 5.1).

- pos: word accuracy over positions whose gold label is not -100 (the first
  sub-word of each word).
- ner: entity-level micro precision, recall and F1 with the conlleval rules
  that seqeval applies by default (not its strict mode).
- nli: accuracy.
- dp: UAS and LAS as the CoNLL 2018 evaluation defines them: over every
  word (punctuation included); UAS counts the right head, LAS the right
  head and relation (`attachment_scores`).
- qa: SQuAD v1.1 token F1 and exact match of answer texts, with the official
  answer normalisation (`squad_scores`; spans are decoded in data/qa.py).

Each task kind (bistil_jax/tasks/) picks its metric from these and names
its headline.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

import numpy as np

IGNORE_LABEL = -100

Span = tuple[str, int, int]


def check_shapes(pred: np.ndarray, gold: np.ndarray) -> None:
  if pred.shape != gold.shape:
    raise ValueError(
      f"predictions {pred.shape} and gold labels {gold.shape} differ in shape"
    )


def token_accuracy(
  pred_ids: np.ndarray | Sequence, gold_ids: np.ndarray | Sequence
) -> float:
  """Share of labelled positions whose prediction equals the gold label.

  Args:
    pred_ids: [n, L] predicted label ids (any values where gold is -100).
    gold_ids: [n, L] gold label ids, -100 where there is no label.

  Returns:
    The accuracy; 0.0 if no position is labelled.
  """
  pred = np.asarray(pred_ids)
  gold = np.asarray(gold_ids)
  check_shapes(pred, gold)
  labelled = gold != IGNORE_LABEL  # [n, L]
  total = int(labelled.sum())
  if total == 0:
    return 0.0
  return float(np.sum((pred == gold) & labelled)) / total


def accuracy(pred: np.ndarray | Sequence, gold: np.ndarray | Sequence) -> float:
  """Share of examples predicted correctly.

  Args:
    pred: [n] predicted label ids.
    gold: [n] gold label ids.

  Returns:
    The accuracy; 0.0 for no examples.
  """
  pred = np.asarray(pred)
  gold = np.asarray(gold)
  check_shapes(pred, gold)
  if gold.size == 0:
    return 0.0
  return float(np.mean(pred == gold))


def attachment_scores(
  pred_heads: np.ndarray | Sequence,
  pred_rels: np.ndarray | Sequence,
  gold_heads: np.ndarray | Sequence,
  gold_rels: np.ndarray | Sequence,
  num_unscored: int = 0,
) -> dict[str, float | int]:
  """Unlabelled and labelled attachment scores (CoNLL 2018).

  Every word counts, punctuation included; a word is attached right (UAS)
  when its predicted head is the gold head, and labelled right (LAS) when
  its relation is right too.

  Args:
    pred_heads: [n, L] predicted head positions (anything where gold is
      -100).
    pred_rels: [n, L] predicted relation ids.
    gold_heads: [n, L] gold head positions, -100 off the words.
    gold_rels: [n, L] gold relation ids, -100 off the words.
    num_unscored: words that had no prediction (e.g. sentences too long to
      encode): in the denominators, never right.

  Returns:
    {"uas", "las": float, "num_words", "num_unscored_words": int}; scores
    are 0.0 when there is no word.
  """
  ph, pr = np.asarray(pred_heads), np.asarray(pred_rels)
  gh, gr = np.asarray(gold_heads), np.asarray(gold_rels)
  for p in (ph, pr, gr):
    check_shapes(p, gh)
  words = gh != IGNORE_LABEL  # [n, L]
  if np.any((gr != IGNORE_LABEL) != words):
    raise ValueError("gold heads and relations label different positions")
  total = int(words.sum()) + int(num_unscored)
  head_ok = words & (ph == gh)
  both_ok = head_ok & (pr == gr)
  return {
    "uas": float(head_ok.sum()) / total if total else 0.0,
    "las": float(both_ok.sum()) / total if total else 0.0,
    "num_words": total,
    "num_unscored_words": int(num_unscored),
  }


def _split_tag(tag: str) -> tuple[str, str]:
  """("O", "") or (prefix, type) of an IOB tag."""
  if tag == "O":
    return "O", ""
  prefix, sep, kind = tag.partition("-")
  if not sep or prefix not in ("B", "I") or not kind:
    raise ValueError(f"malformed IOB tag {tag!r} (expected O, B-X or I-X)")
  return prefix, kind


def ner_spans(tags: Sequence[str]) -> set[Span]:
  """Entities of one tag sequence, by the conlleval rules.

  An entity starts at B-X, and at I-X unless the previous tag is B-X or I-X
  of the same type (so IOB1 and malformed IOB2 sequences are read as
  conlleval and seqeval's default mode read them). It ends before O, before
  B-anything, and before a tag of another type.

  Args:
    tags: IOB1/IOB2 tags (O, B-X, I-X).

  Returns:
    {(type, start, end)} with `end` exclusive.

  Raises:
    ValueError: a malformed tag.
  """
  spans = set()
  kind, start = None, 0
  for i, tag in enumerate(tags):
    prefix, this = _split_tag(tag)
    continues = prefix == "I" and this == kind
    if kind is not None and not continues:
      spans.add((kind, start, i))
      kind = None
    if prefix != "O" and not continues:
      kind, start = this, i
  if kind is not None:
    spans.add((kind, start, len(tags)))
  return spans


def _prf(correct: int, num_pred: int, num_gold: int) -> dict[str, float]:
  precision = correct / num_pred if num_pred else 0.0
  recall = correct / num_gold if num_gold else 0.0
  total = precision + recall
  f1 = 2 * precision * recall / total if total else 0.0
  return {"precision": precision, "recall": recall, "f1": f1}


def ner_f1(
  pred_tag_seqs: Sequence[Sequence[str]],
  gold_tag_seqs: Sequence[Sequence[str]],
) -> dict:
  """Entity-level precision, recall and F1, micro-averaged over entities.

  An entity counts as correct when type, start and end all match. Ratios
  with a zero denominator are 0 (no entities predicted: precision 0, F1 0).

  Args:
    pred_tag_seqs: predicted tags, one sequence per sentence.
    gold_tag_seqs: gold tags, same lengths.

  Returns:
    {"precision", "recall", "f1": float, "num_pred", "num_gold",
     "num_correct": int, "per_type": {type: {"precision", "recall", "f1",
     "support"}}} where support is the number of gold entities of the type.

  Raises:
    ValueError: different numbers or lengths of sequences, or a malformed
      tag.
  """
  if len(pred_tag_seqs) != len(gold_tag_seqs):
    raise ValueError(
      f"{len(pred_tag_seqs)} predicted and {len(gold_tag_seqs)} gold sentences"
    )
  pred_spans, gold_spans = set(), set()
  for s, (pred, gold) in enumerate(
    zip(pred_tag_seqs, gold_tag_seqs, strict=True)
  ):
    if len(pred) != len(gold):
      raise ValueError(
        f"sentence {s}: {len(pred)} predicted and {len(gold)} gold tags"
      )
    pred_spans |= {(s, *span) for span in ner_spans(pred)}
    gold_spans |= {(s, *span) for span in ner_spans(gold)}
  correct = pred_spans & gold_spans
  out = _prf(len(correct), len(pred_spans), len(gold_spans))
  per_type = {}
  for kind in sorted({span[1] for span in pred_spans | gold_spans}):
    n_pred = sum(1 for span in pred_spans if span[1] == kind)
    n_gold = sum(1 for span in gold_spans if span[1] == kind)
    n_correct = sum(1 for span in correct if span[1] == kind)
    per_type[kind] = {**_prf(n_correct, n_pred, n_gold), "support": n_gold}
  return {
    **out,
    "num_pred": len(pred_spans),
    "num_gold": len(gold_spans),
    "num_correct": len(correct),
    "per_type": per_type,
  }


def word_tags(
  pred_ids: np.ndarray,
  gold_ids: np.ndarray,
  label_names: Sequence[str],
) -> tuple[list[list[str]], list[list[str]]]:
  """Per-sentence predicted and gold tag names at the labelled positions.

  Args:
    pred_ids: [n, L] predicted label ids.
    gold_ids: [n, L] gold label ids, -100 off the first sub-words.
    label_names: names by id.

  Returns:
    (predicted, gold) tag lists, one per row, one tag per labelled position.

  Raises:
    ValueError: shapes differ or an id is outside the label names.
  """
  pred = np.asarray(pred_ids)
  gold = np.asarray(gold_ids)
  check_shapes(pred, gold)
  names = np.asarray(label_names, dtype=object)
  labelled = gold != IGNORE_LABEL  # [n, L]
  for what, ids in (("predicted", pred[labelled]), ("gold", gold[labelled])):
    if ids.size and (ids.min() < 0 or ids.max() >= len(names)):
      raise ValueError(f"{what} label id outside 0..{len(names) - 1}")
  preds, golds = [], []
  for p, g, m in zip(pred, gold, labelled, strict=True):
    preds.append(list(names[p[m]]))
    golds.append(list(names[g[m]]))
  return preds, golds


# ------------------------------------------------------------ SQuAD v1.1
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
  """The official SQuAD v1.1 answer normalisation: lowercase, drop ASCII
  punctuation, drop the articles a/an/the, collapse whitespace."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def squad_exact_match(prediction: str, gold: str) -> float:
  """1.0 when both normalise to the same string, else 0.0."""
  return float(normalize_answer(prediction) == normalize_answer(gold))


def squad_f1(prediction: str, gold: str) -> float:
  """Token F1 of the normalised texts (bag of whitespace tokens). As in the
  v1.1 script, no common token (also two empty answers) scores 0."""
  pred = normalize_answer(prediction).split()
  ref = normalize_answer(gold).split()
  same = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred), same / len(ref)
  return 2 * precision * recall / (precision + recall)


def squad_scores(
  predictions: Sequence[str], golds: Sequence[Sequence[str]]
) -> dict[str, float]:
  """SQuAD v1.1 F1 and exact match over examples.

  Each example scores the max over its gold answers; the result is the
  mean over examples, as a fraction (the official script prints 100x).
  Examples without gold answers are skipped (counted in num_unanswerable).

  Args:
    predictions: one predicted answer text per example.
    golds: the gold answer texts of each example.

  Returns:
    {"f1", "exact_match", "num_examples", "num_unanswerable"}.

  Raises:
    ValueError: different numbers of predictions and golds.
  """
  if len(predictions) != len(golds):
    raise ValueError(
      f"{len(predictions)} predictions for {len(golds)} gold answer lists"
    )
  f1 = em = 0.0
  n = 0
  for pred, answers in zip(predictions, golds, strict=True):
    if not answers:
      continue
    n += 1
    f1 += max(squad_f1(pred, g) for g in answers)
    em += max(squad_exact_match(pred, g) for g in answers)
  return {
    "f1": f1 / n if n else 0.0,
    "exact_match": em / n if n else 0.0,
    "num_examples": n,
    "num_unanswerable": len(golds) - n,
  }
