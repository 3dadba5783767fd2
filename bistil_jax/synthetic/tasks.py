"""Labelled tasks over latent sentences: POS, NER and NLI-style pairs.

Task items are drawn once, as latent sentences, and realised in every
language, so a test item means the same in each language (as in XNLI). The
splits are drawn test first, then dev, then train, each rejecting any latent
sentence an earlier split used: the test set depends only on its own size,
and no test content occurs in dev or train.

NLI pairs are built from a latent premise by operations whose label follows
from the semantics of the grammar:

- entailment: the hypothesis is a sub-phrase of the premise (one conjunct of
  two clauses; modifiers, numbers or a coordinated subject dropped from a
  positive clause);
- contradiction: the premise clause with its polarity flipped (modifiers of a
  positive clause may be dropped first), or with its object replaced;
- neutral: a positive clause with an added modifier (adjective or
  prepositional phrase), another predicate about the same subject, or the
  premise clause joined with an unrelated fact.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from bistil_jax.synthetic import latent as lt
from bistil_jax.synthetic.languages import Family, Token, detokenize

UPOS_TAGS = (
  "ADJ",
  "ADP",
  "CCONJ",
  "DET",
  "NOUN",
  "NUM",
  "PART",
  "PRON",
  "PROPN",
  "PUNCT",
  "VERB",
)
DEPRELS = (
  "root",
  "nsubj",
  "obj",
  "obl",
  "case",
  "det",
  "amod",
  "nummod",
  "advmod",
  "conj",
  "cc",
  "flat",
  "punct",
)
NER_TAGS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG")
NLI_LABELS = ("entailment", "neutral", "contradiction")
SPLITS = ("train", "dev", "test")


@dataclasses.dataclass(frozen=True)
class NliItem:
  premise: lt.Sentence
  hypothesis: lt.Sentence
  label: str


@dataclasses.dataclass(frozen=True)
class TaskData:
  """Latent task items per split, shared by all languages.

  Attributes:
    tagging: split -> sentences annotated for POS (CoNLL-U) and NER (IOB2).
    nli: split -> premise/hypothesis pairs with labels.
  """

  tagging: dict[str, tuple[lt.Sentence, ...]]
  nli: dict[str, tuple[NliItem, ...]]

  def sentences(self, split: str) -> set[lt.Sentence]:
    """Every latent sentence a split uses (tagging, premises, hypotheses)."""
    out = set(self.tagging[split])
    for item in self.nli[split]:
      out.add(item.premise)
      out.add(item.hypothesis)
    return out


# ------------------------------------------------------------ NLI operations


def _drop_modifiers(rng: lt.Rng, np: Any) -> Any:
  """An NP that the given one entails (in a positive context)."""
  if np is None:
    return None
  if np.kind == "noun":
    adjectives = tuple(a for a in np.adjectives if rng.random() < 0.4)
    number = np.number if rng.random() < 0.5 else 0
    return np._replace(adjectives=adjectives, number=number)
  if np.kind == "coord" and np.conj == lt.AND and rng.random() < 0.5:
    return np.left if rng.random() < 0.5 else np.right
  return np


def _simplify(rng: lt.Rng, c: lt.Clause) -> lt.Clause:
  """A clause that a positive clause entails: some modifiers dropped."""
  return c._replace(
    subject=_drop_modifiers(rng, c.subject),
    obj=_drop_modifiers(rng, c.obj),
    pps=tuple(pp for pp in c.pps if rng.random() < 0.4),
  )


def _core(c: lt.Clause) -> tuple[Any, int, Any]:
  """Subject, verb and object head: what identifies the event."""
  obj = c.obj
  if obj is not None and obj.kind == "noun":
    obj = ("noun", obj.noun)
  return c.subject, c.verb, obj


def _other_object(sampler: lt.Sampler, rng: lt.Rng, obj: Any) -> Any:
  """The same kind of object with a different noun or name."""
  if obj.kind == "noun":
    cls = sampler.ontology.noun_class[obj.noun]
    for _ in range(20):
      new = sampler.noun_np(rng, (cls,), nli=True).noun
      if new != obj.noun:
        return obj._replace(noun=new)
    return None
  if obj.kind == "name":
    typ = sampler.ontology.entities[obj.entity].type
    for _ in range(20):
      new = sampler.entity(rng, typ)
      if new != obj:
        return new
  return None


def _add_modifier(
  sampler: lt.Sampler, rng: lt.Rng, c: lt.Clause
) -> lt.Clause | None:
  """A clause that adds information to a positive clause."""
  if rng.random() < 0.5:
    used = {pp.adposition for pp in c.pps}
    free = [
      a for a in range(len(sampler.ontology.adposition_kind)) if a not in used
    ]
    if free:
      return c._replace(pps=(*c.pps, sampler.pp(rng, rng.choice(free), True)))
  slots = [
    name
    for name in ("subject", "obj")
    if getattr(c, name) is not None
    and getattr(c, name).kind == "noun"
    and not getattr(c, name).adjectives
  ]
  if not slots:
    return None
  name = rng.choice(slots)
  np = getattr(c, name)
  adjective = rng.choice(sampler.ontology.noun_adjectives[np.noun])
  return c._replace(**{name: np._replace(adjectives=(adjective,))})


def _np_entails(big: Any, small: Any) -> bool:
  """Whether NP `big` entails NP `small` in a positive context."""
  if big == small:
    return True
  if big is None or small is None:
    return False
  if big.kind == "coord" and big.conj == lt.AND:
    return _np_entails(big.left, small) or _np_entails(big.right, small)
  if big.kind == "noun" and small.kind == "noun":
    return (
      (big.noun, big.plural, big.det) == (small.noun, small.plural, small.det)
      and set(small.adjectives) <= set(big.adjectives)
      and small.number in (0, big.number)
    )
  return False


def _clause_entails(c: lt.Clause, h: lt.Clause) -> bool:
  if (c.verb, c.tense, c.negated) != (h.verb, h.tense, h.negated):
    return False
  if c.negated:
    return c == h
  return (
    _np_entails(c.subject, h.subject)
    and _np_entails(c.obj, h.obj)
    and set(h.pps) <= set(c.pps)
  )


def entails(premise: lt.Sentence, hypothesis: lt.Sentence) -> bool:
  """Whether every hypothesis clause follows from one premise clause.

  Only the sub-phrase relation the generator uses; premises are conjunctions
  (NLI premises never use "or" or "every").
  """
  return all(
    any(_clause_entails(c, h) for c in premise.clauses)
    for h in hypothesis.clauses
  )


def contradicts(premise: lt.Sentence, hypothesis: lt.Sentence) -> bool:
  """Whether a one-clause hypothesis denies a premise clause.

  It does when it is a premise clause (or a clause it entails) with the
  opposite polarity, or the same positive event with a different object.
  """
  if len(hypothesis.clauses) != 1:
    return False
  h = hypothesis.clauses[0]
  for c in premise.clauses:
    if (c.verb, c.tense) != (h.verb, h.tense):
      continue
    if c.negated != h.negated:
      positive = c if h.negated else h
      negative = h if h.negated else c
      if c.negated and positive == negative._replace(negated=False):
        return True
      if not c.negated and _clause_entails(
        positive, negative._replace(negated=False)
      ):
        return True
    elif (
      not c.negated
      and c.obj is not None
      and h.obj is not None
      and c.obj.kind == h.obj.kind
      and c.obj.kind in ("noun", "name")
      and _np_entails(c.subject, h.subject)
      and (c.obj.noun if c.obj.kind == "noun" else c.obj.entity)
      != (h.obj.noun if h.obj.kind == "noun" else h.obj.entity)
    ):
      return True
  return False


def make_nli_item(
  sampler: lt.Sampler, rng: lt.Rng, label: str
) -> NliItem | None:
  """One premise/hypothesis pair with the given label, or None (retry).

  Args:
    sampler: the family's grammar.
    rng: the random stream.
    label: one of NLI_LABELS.

  Returns:
    The item, or None when the drawn premise does not support the label.
  """
  premise = sampler.sentence(rng, nli=True)
  clauses = premise.clauses
  clause = rng.choice(clauses)
  cores = {_core(c) for c in clauses}
  subjects_verbs = {(c.subject, c.verb) for c in clauses}
  if label == "entailment":
    if clause.negated:
      if len(clauses) == 1:
        return None
      hypothesis = clause
    else:
      hypothesis = _simplify(rng, clause)
    hyp = lt.Sentence((hypothesis,), -1)
  elif label == "contradiction":
    obj = clause.obj
    if not clause.negated and obj is not None and rng.random() < 0.35:
      new_obj = _other_object(sampler, rng, obj)
      if new_obj is None:
        return None
      hypothesis = _simplify(rng, clause)._replace(obj=new_obj)
      # The premise's other clause may state exactly the changed event.
      if _core(hypothesis) in cores:
        return None
    elif clause.negated:
      hypothesis = clause._replace(negated=False)
    else:
      hypothesis = _simplify(rng, clause)._replace(negated=True)
    hyp = lt.Sentence((hypothesis,), -1)
  elif label == "neutral":
    r = rng.random()
    if not clause.negated and r < 0.5:
      hypothesis = _add_modifier(sampler, rng, clause)
      if hypothesis is None:
        return None
      hyp = lt.Sentence((hypothesis,), -1)
    else:
      fact = sampler.clause(
        rng, nli=True, subject=clause.subject if r < 0.75 else None
      )
      if (fact.subject, fact.verb) in subjects_verbs:
        return None
      if r < 0.75:
        hyp = lt.Sentence((fact,), -1)
      else:
        kept = clause if clause.negated else _simplify(rng, clause)
        hyp = lt.Sentence((kept, fact), lt.AND)
  else:
    raise ValueError(f"unknown NLI label {label!r}")
  if hyp == premise:
    return None
  # A guard against accidental relations (e.g. a random "unrelated" fact
  # that one conjunct of the premise happens to state).
  if label == "neutral" and (
    entails(premise, hyp) or contradicts(premise, hyp)
  ):
    return None
  if label == "contradiction" and entails(premise, hyp):
    return None
  return NliItem(premise, hyp, label)


# -------------------------------------------------------------------- splits


def make_task_data(family: Family, sizes: dict[str, int]) -> TaskData:
  """Latent task items for each split, with no test content in dev or train.

  Args:
    family: the language family (its sampler and seed).
    sizes: split -> number of tagging sentences and of NLI pairs.

  Returns:
    The latent items per split.
  """
  sampler = family.sampler
  used: set[lt.Sentence] = set()
  tagging: dict[str, tuple[lt.Sentence, ...]] = {}
  nli: dict[str, tuple[NliItem, ...]] = {}
  for split in ("test", "dev", "train"):
    n = sizes[split]
    rng = lt.Rng(family.seed, "tagging", split)
    sentences = []
    while len(sentences) < n:
      s = sampler.sentence(rng)
      if s not in used:
        sentences.append(s)
    rng = lt.Rng(family.seed, "nli", split)
    items = []
    while len(items) < n:
      label = NLI_LABELS[len(items) % len(NLI_LABELS)]
      item = make_nli_item(sampler, rng, label)
      if item is None or item.premise in used or item.hypothesis in used:
        continue
      items.append(item)
    tagging[split] = tuple(sentences)
    nli[split] = tuple(rng.shuffled(items))
    used.update(sentences)
    for item in items:
      used.add(item.premise)
      used.add(item.hypothesis)
  return TaskData(
    tagging={s: tagging[s] for s in SPLITS}, nli={s: nli[s] for s in SPLITS}
  )


def corpus_sentences(
  family: Family,
  code: str,
  n: int,
  split: str,
  exclude: set[lt.Sentence] | frozenset[lt.Sentence] = frozenset(),
) -> list[str]:
  """Unlabelled text of one language: `n` lines from its own stream.

  Each language draws its own latent sentences (comparable, not parallel
  corpora), skipping those in `exclude` (the task dev and test content).

  Args:
    family: the language family.
    code: the language.
    n: number of lines.
    split: names the random stream ("train" or "dev").
    exclude: latent sentences that must not occur.

  Returns:
    The lines, without newlines.
  """
  rng = lt.Rng(family.seed, "corpus", code, split)
  sample = family.sampler.sentence
  text = family.text
  lines = []
  while len(lines) < n:
    s = sample(rng)
    if s not in exclude:
      lines.append(text(s, code))
  return lines


# ---------------------------------------------------------------- formatting


def conllu_block(tokens: Sequence[Token], sent_id: str) -> str:
  """One sentence in CoNLL-U (10 columns, heads 1-based, root 0)."""
  index = {id(t): i for i, t in enumerate(tokens, 1)}
  forms = [t.form for t in tokens]
  lines = [f"# sent_id = {sent_id}", f"# text = {detokenize(forms)}"]
  for i, t in enumerate(tokens, 1):
    head = 0 if t.head is None else index[id(t.head)]
    nxt = tokens[i] if i < len(tokens) else None
    misc = "SpaceAfter=No" if nxt is not None and nxt.upos == "PUNCT" else "_"
    lines.append(
      f"{i}\t{t.form}\t{t.lemma}\t{t.upos}\t_\t{t.feats}\t{head}\t"
      f"{t.deprel}\t_\t{misc}"
    )
  return "\n".join(lines) + "\n\n"


def iob2_block(tokens: Sequence[Token]) -> str:
  """One sentence in two-column IOB2 (token, tag), then a blank line."""
  return "".join(f"{t.form}\t{t.ner}\n" for t in tokens) + "\n"


def nli_line(family: Family, item: NliItem, code: str, item_id: str) -> str:
  """One NLI pair as a JSON line."""
  return json.dumps(
    {
      "id": item_id,
      "premise": family.text(item.premise, code),
      "hypothesis": family.text(item.hypothesis, code),
      "label": item.label,
    },
    ensure_ascii=False,
  )
