"""Extractive QA on the synthetic languages, written as SQuAD v1.1 JSON.

A context is a short story of single-clause sentences in which entities
stand in relations (transitive verbs); a question asks which thing or
person fills one argument of one relation, naming its noun:

  ask the subject: "WH dog saw Lena Moro?"    answer: "the old dog"
  ask the object:  "WH dogs Lena Moro saw?"   answer: "the two black dogs"

The question word and the bare noun come first in every language (a
fronted "which" phrase); the rest of the question is the story sentence
without its PPs, in the language's own word order, case marking and
lexicon. The asked noun occurs once in the story, so the answer is found
in one step: the phrase around the question's noun, with its determiner,
adjectives and number in the language's phrase order (the answer text
never occurs in the question). The story also holds the known argument
in another relation and the relation with another argument. Items are
latent (concepts, not words), drawn from the family's shared grammar and
realised per language, so every language has the same questions about
the same stories (ids agree); related languages share the question word's
stem (a cognate, like the rest of their lexicon).

An earlier design asked for the argument without naming its noun ("who
saw Lena Moro?"), which takes two steps (find the sentence by the
question's words, then take the neighbouring phrase); the demo's 4-layer,
width-64 teacher did not learn that step (source dev F1 0.18, an
untrained head 0.13), and learns this one (docs/synthetic.md).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from typing import Any

from bistil_jax.synthetic import latent as lt
from bistil_jax.synthetic.languages import (
  Family,
  Token,
  apply_changes,
)

SPLITS = ("train", "dev", "test")
SLOTS = ("subject", "object")
_ARG_KINDS = ("noun", "name")  # pronouns and coordinations left out
_FILLERS = (0, 2)  # extra sentences per story, inclusive range
_ATTACHED = {",", ".", "?"}


@dataclasses.dataclass(frozen=True)
class QaItem:
  """One latent story and question.

  Attributes:
    clauses: the story's sentences, in order.
    target: index of the clause the question is about.
    slot: "subject" or "object": the argument asked for.
  """

  clauses: tuple[lt.Clause, ...]
  target: int
  slot: str

  @property
  def answer_np(self) -> Any:
    c = self.clauses[self.target]
    return c.subject if self.slot == "subject" else c.obj

  @property
  def question(self) -> lt.Clause:
    """The target clause without PPs, the asked argument cut to its noun
    (number and plural kept, so the noun's form is the story's) with a
    placeholder determiner, realised as the question word."""
    c = self.clauses[self.target]
    wh = self.answer_np._replace(det=lt.DEF, adjectives=(), number=0)
    if self.slot == "subject":
      return c._replace(subject=wh, pps=())
    return c._replace(obj=wh, pps=())


# ------------------------------------------------------------------ latent
def _ok_arg(np: Any) -> bool:
  return np is not None and np.kind in _ARG_KINDS


def _clause(sampler: lt.Sampler, rng: lt.Rng, **fixed) -> lt.Clause:
  """A transitive, affirmative clause with noun/name arguments, with the
  given fields (verb, subject, obj) fixed; their fit is checked by the
  caller's candidates."""
  while True:
    c = sampler.clause(rng)
    if c.obj is None or not (_ok_arg(c.subject) and _ok_arg(c.obj)):
      continue
    c = c._replace(negated=False, **fixed)
    if c.subject != c.obj:
      return c


def _verbs_for(sampler: lt.Sampler, obj_class: str, subj_class: str):
  o = sampler.ontology
  return [
    v
    for v in range(len(o.verb_subject))
    if obj_class in o.verb_object[v] and subj_class in o.verb_subject[v]
  ]


def make_item(sampler: lt.Sampler, rng: lt.Rng) -> QaItem | None:
  """A story with its question (see the module docstring), or None (the
  drawn clauses do not fit; draw again)."""
  o = sampler.ontology
  target = _clause(sampler, rng)
  slot = SLOTS[rng.below(2)]
  asked = target.subject if slot == "subject" else target.obj
  # "Which NOUN ...?": the asked argument is a common noun with a
  # determiner (the question's determiner is replaced by the WH word).
  if asked.kind != "noun" or asked.det < 0:
    return None
  known = target.obj if slot == "subject" else target.subject
  # Distractor 1: the known argument in another relation.
  cls_s = sampler.subject_class(target.subject)
  cls_o = sampler.subject_class(target.obj)
  others = [
    v
    for v in (
      _verbs_for(sampler, cls_o, "person")
      if slot == "subject"
      else _verbs_for(sampler, "person", cls_s)
    )
    if v != target.verb
  ]
  if not others:
    others = [v for v in range(len(o.verb_subject)) if v != target.verb]
  verb = rng.choice(others)
  if slot == "subject":
    d1 = _clause(sampler, rng, verb=verb, obj=known)
  else:
    d1 = _clause(sampler, rng, verb=verb, subject=known)
  # Distractor 2: the relation with another known argument.
  d2 = _clause(sampler, rng, verb=target.verb)
  fillers = [
    _clause(sampler, rng)
    for _ in range(_FILLERS[0] + rng.below(_FILLERS[1] - _FILLERS[0] + 1))
  ]
  story = rng.shuffled([target, d1, d2, *fillers])
  return QaItem(tuple(story), story.index(target), slot)


def is_unique(item: QaItem) -> bool:
  """Whether only the target clause fits the question (the relation with
  the known argument, whatever the tense), the answer differs from the
  known argument, and the asked noun occurs nowhere else in the story."""
  t = item.clauses[item.target]

  def key(c):
    return (c.verb, c.obj if item.slot == "subject" else c.subject)

  hits = [c for c in item.clauses if key(c) == key(t)]
  noun = item.answer_np.noun
  mentions = sum(
    np.kind == "noun" and np.noun == noun
    for c in item.clauses
    for np in (c.subject, c.obj, *(pp.np for pp in c.pps))
  )
  return len(hits) == 1 and t.subject != t.obj and mentions == 1


# --------------------------------------------------------------- surface
def _wh_candidate(family: Family, code: str, attempt: int) -> str:
  """A proto stem of the language's group with the language's sound
  changes (cognates within a group)."""
  lang = family.language(code)
  group = next(g for g in family.groups if g.name == lang.group)
  rng = lt.Rng(family.seed, "qa-wh", group.name, attempt)
  return apply_changes(lang.sound_changes, group.phonology.word(rng, 2))


@functools.cache
def question_word(family: Family, code: str) -> str:
  """The language's question word ("which"), unlike any other word of
  the language."""
  taken = {form for form, _, _ in family.language(code).forms.all_forms()}
  for attempt in range(100):
    wh = _wh_candidate(family, code, attempt)
    if wh not in taken:
      return wh
  raise RuntimeError("no free question word; this is a bug")


def _join(tokens: Sequence[Token]) -> tuple[str, list[tuple[int, int]]]:
  """Text (languages.detokenize's spacing) and each token's char span."""
  text, spans = "", []
  for t in tokens:
    if text and t.form not in _ATTACHED:
      text += " "
    spans.append((len(text), len(text) + len(t.form)))
    text += t.form
  return text, spans


def _subtree(tokens: Sequence[Token], root: Token) -> list[int]:
  out = []
  for i, t in enumerate(tokens):
    node = t
    while node is not None and node is not root:
      node = node.head
    if node is root:
      out.append(i)
  return out


def _argument_span(tokens: Sequence[Token], rel: str) -> tuple[int, int]:
  """Token range [first, last] of the clause argument with relation `rel`
  (nsubj or obj) attached to the verb."""
  verb = next(t for t in tokens if t.head is None)
  head = next(t for t in tokens if t.head is verb and t.deprel == rel)
  idx = _subtree(tokens, head)
  return idx[0], idx[-1]


def realize_item(family: Family, item: QaItem, code: str):
  """(context, question, answer text, answer_start) in one language."""
  sentences = [
    family.realize(lt.Sentence((c,), -1), code) for c in item.clauses
  ]
  context, start = "", 0
  rel = "nsubj" if item.slot == "subject" else "obj"
  for i, tokens in enumerate(sentences):
    if context:
      context += " "
    text, spans = _join(tokens)
    if i == item.target:
      a, b = _argument_span(tokens, rel)
      start = len(context) + spans[a][0]
      end = len(context) + spans[b][1]
    context += text
  answer = context[start:end]
  q_tokens = family.realize(lt.Sentence((item.question,), -1), code)
  a, b = _argument_span(q_tokens, rel)
  phrase = [t.form for t in q_tokens[a : b + 1] if t.upos != "DET"]
  rest = []
  for i, t in enumerate(q_tokens):
    if a <= i <= b:
      continue
    rest.append("?" if t.deprel == "punct" and t.form == "." else t.form)
  forms = [question_word(family, code), *phrase, *rest]
  question = _join([Token(f, f, "X") for f in forms])[0]
  return context, question, answer, start


def make_qa_items(
  family: Family, sizes: dict[str, int]
) -> dict[str, tuple[QaItem, ...]]:
  """Latent QA items per split (split -> number of stories): answers
  unique in their story, and in every language of the family an answer
  that does not occur in the question. They depend on the family alone,
  not on which of its languages are written."""
  sampler = family.sampler
  codes = family.codes
  out = {}
  seen: set[QaItem] = set()
  for split in ("test", "dev", "train"):
    rng = lt.Rng(family.seed, "qa", split)
    items: list[QaItem] = []
    while len(items) < sizes[split]:
      item = make_item(sampler, rng)
      if item is None or item in seen or not is_unique(item):
        continue
      if any(
        a in q
        for q, a in (realize_item(family, item, code)[1:3] for code in codes)
      ):
        continue
      items.append(item)
      seen.add(item)
    out[split] = tuple(items)
  return {s: out[s] for s in SPLITS}


def squad_json(
  family: Family, items: Sequence[QaItem], code: str, split: str
) -> str:
  """One language's split as SQuAD v1.1 JSON: an article per story, one
  paragraph, one question; ids "{split}-{i}" in every language."""
  data = []
  for i, item in enumerate(items):
    context, question, answer, start = realize_item(family, item, code)
    qid = f"{split}-{i}"
    data.append(
      {
        "title": f"{code}-{qid}",
        "paragraphs": [
          {
            "context": context,
            "qas": [
              {
                "id": qid,
                "question": question,
                "answers": [{"text": answer, "answer_start": start}],
              }
            ],
          }
        ],
      }
    )
  return json.dumps({"version": "1.1", "data": data}, ensure_ascii=False)
