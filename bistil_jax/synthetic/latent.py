"""Latent structure shared by every synthetic language.

A family of synthetic languages shares one concept inventory (`Ontology`) and
one probabilistic grammar over it (`Sampler`). A latent sentence names
concepts, not words: each language realises it with its own lexicon, word
order and morphology (see `languages.py`). Because every language draws its
sentences from the same grammar, a concept occurs in the same contexts (the
same verbs, adjectives and adpositions, with the same frequencies) in every
language, which is what lets a multilingual MLM align them.

Latent sentences are tuples (NamedTuples tagged by `kind`), so they are
hashable and comparable: the task splits use them as keys to keep the test
content out of training.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import random
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

NOUN_CLASSES = ("person", "animal", "object", "food", "place", "idea")
ENTITY_TYPES = ("PER", "LOC", "ORG")
TENSES = ("Pres", "Past", "Fut")
# Determiner concepts, by index: definite, indefinite (singular), demonstrative,
# universal (singular), existential (plural).
DETERMINERS = ("def", "indef", "dem", "every", "some")
DEF, INDEF, DEM, EVERY, SOME = range(5)
NO_DET = -1
PRONOUNS = ("1sg", "2sg", "3sg", "1pl", "2pl", "3pl")
CONJUNCTIONS = ("and", "but", "or")
AND, BUT, OR = range(3)
# One kind per adposition concept: locative, comitative, instrumental,
# benefactive, temporal (takes a year).
ADPOSITION_KINDS = ("loc", "loc", "loc", "loc", "com", "ins", "ben", "time")

_NOUNS_PER_CLASS = {
  "person": 36,
  "animal": 36,
  "object": 56,
  "food": 28,
  "place": 36,
  "idea": 28,
}
_NUM_VERBS = 110
_NUM_ADJECTIVES = 60
_NUM_GIVEN_NAMES = 40
_NUM_SURNAMES = 40
_NUM_PERSONS = 80
_NUM_PLACES = 50
_NUM_ORGS = 40


# ---------------------------------------------------------------- randomness


class Rng:
  """A seeded random stream that is stable across Python versions.

  Only `random.Random.random()` is used, whose sequence Python guarantees;
  `choice`, `shuffle` and friends are rebuilt on top of it. Streams are keyed
  by any tuple of printable values, so independent parts of the generator
  (one stem, one language's corpus) never depend on each other's draws.
  """

  __slots__ = ("random",)

  def __init__(self, *key: object):
    text = "\x1f".join(str(k) for k in key)
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    self.random = random.Random(int.from_bytes(digest[:16], "big")).random

  def below(self, n: int) -> int:
    """A uniform integer in [0, n)."""
    i = int(self.random() * n)
    return i if i < n else n - 1

  def choice(self, seq: Sequence[Any]) -> Any:
    return seq[self.below(len(seq))]

  def chance(self, p: float) -> bool:
    return self.random() < p

  def pick(self, table: Weighted) -> Any:
    """One item of a weighted table."""
    i = bisect.bisect_right(table.cum, self.random() * table.cum[-1])
    return table.items[min(i, len(table.items) - 1)]

  def shuffled(self, seq: Iterable[Any]) -> list[Any]:
    out = list(seq)
    for i in range(len(out) - 1, 0, -1):
      j = self.below(i + 1)
      out[i], out[j] = out[j], out[i]
    return out

  def sample(self, seq: Sequence[Any], k: int) -> list[Any]:
    return self.shuffled(seq)[:k]


class Weighted(NamedTuple):
  """Items with cumulative weights, for `Rng.pick`."""

  items: tuple[Any, ...]
  cum: tuple[float, ...]


def weighted(items: Iterable[Any], weights: Iterable[float]) -> Weighted:
  items = tuple(items)
  cum, total = [], 0.0
  for w in weights:
    total += w
    cum.append(total)
  if not items or len(cum) != len(items):
    raise ValueError("weighted() needs one weight per item, at least one")
  return Weighted(items, tuple(cum))


def zipf(items: Iterable[Any], exponent: float = 1.0) -> Weighted:
  """Zipfian weights by position: the first item is the most frequent."""
  items = tuple(items)
  return weighted(items, [1.0 / (r + 2) ** exponent for r in range(len(items))])


# ---------------------------------------------------------- latent sentences


class NounNP(NamedTuple):
  """A common-noun phrase: [det] [num] adj* noun."""

  noun: int
  plural: bool
  det: int  # index into DETERMINERS or NO_DET
  adjectives: tuple[int, ...]
  number: int  # cardinal written with digits, 0 for none
  kind: str = "noun"


class PronNP(NamedTuple):
  pronoun: int  # index into PRONOUNS
  kind: str = "pron"


class NameNP(NamedTuple):
  entity: int  # index into Ontology.entities
  kind: str = "name"


class CoordNP(NamedTuple):
  conj: int  # AND or OR
  left: Any
  right: Any
  kind: str = "coord"


class YearNP(NamedTuple):
  year: int
  kind: str = "year"


class PP(NamedTuple):
  adposition: int
  np: Any


class Clause(NamedTuple):
  subject: Any
  verb: int
  tense: int  # index into TENSES
  negated: bool
  obj: Any  # None for intransitive verbs
  pps: tuple[PP, ...]


class Sentence(NamedTuple):
  clauses: tuple[Clause, ...]  # one or two
  conj: int  # conjunction between the clauses, -1 for one clause


class Entity(NamedTuple):
  """A proper name: the same tokens in every language (an anchor)."""

  type: str  # PER, LOC or ORG
  tokens: tuple[str, ...]


# ------------------------------------------------------------------ ontology


@dataclasses.dataclass(frozen=True)
class Ontology:
  """The concept inventory and selectional preferences of a family.

  Attributes:
    noun_class: class of each noun concept (one of NOUN_CLASSES).
    verb_subject: noun classes a verb takes as subject.
    verb_object: noun classes a verb takes as object; empty if intransitive.
    verb_preferred: nouns a verb prefers as object (its topic).
    adjective_classes: noun classes an adjective modifies.
    noun_adjectives: adjectives a noun prefers.
    adposition_kind: kind of each adposition (see ADPOSITION_KINDS).
    entities: proper names, shared by all languages.
  """

  noun_class: tuple[str, ...]
  verb_subject: tuple[tuple[str, ...], ...]
  verb_object: tuple[tuple[str, ...], ...]
  verb_preferred: tuple[tuple[int, ...], ...]
  adjective_classes: tuple[tuple[str, ...], ...]
  noun_adjectives: tuple[tuple[int, ...], ...]
  adposition_kind: tuple[str, ...]
  entities: tuple[Entity, ...]

  @property
  def sizes(self) -> dict[str, int]:
    """Number of concepts per lexical category."""
    return {
      "nouns": len(self.noun_class),
      "verbs": len(self.verb_subject),
      "adjectives": len(self.adjective_classes),
      "determiners": len(DETERMINERS),
      "adpositions": len(self.adposition_kind),
      "pronouns": len(PRONOUNS),
      "conjunctions": len(CONJUNCTIONS),
      "negation": 1,
    }

  def to_dict(self) -> dict[str, Any]:
    return {
      "nouns": [{"class": c} for c in self.noun_class],
      "verbs": [
        {"subject": list(s), "object": list(o), "preferred": list(p)}
        for s, o, p in zip(
          self.verb_subject,
          self.verb_object,
          self.verb_preferred,
          strict=True,
        )
      ],
      "adjectives": [{"classes": list(c)} for c in self.adjective_classes],
      "noun_adjectives": [list(a) for a in self.noun_adjectives],
      "adpositions": [{"kind": k} for k in self.adposition_kind],
      "determiners": list(DETERMINERS),
      "pronouns": list(PRONOUNS),
      "conjunctions": list(CONJUNCTIONS),
      "entities": [
        {"type": e.type, "tokens": list(e.tokens)} for e in self.entities
      ],
    }

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> Ontology:
    return cls(
      noun_class=tuple(n["class"] for n in d["nouns"]),
      verb_subject=tuple(tuple(v["subject"]) for v in d["verbs"]),
      verb_object=tuple(tuple(v["object"]) for v in d["verbs"]),
      verb_preferred=tuple(tuple(v["preferred"]) for v in d["verbs"]),
      adjective_classes=tuple(tuple(a["classes"]) for a in d["adjectives"]),
      noun_adjectives=tuple(tuple(a) for a in d["noun_adjectives"]),
      adposition_kind=tuple(a["kind"] for a in d["adpositions"]),
      entities=tuple(
        Entity(e["type"], tuple(e["tokens"])) for e in d["entities"]
      ),
    )


# Subject and object frames of verbs, with their weights.
_SUBJECT_FRAMES = weighted(
  [("person",), ("person", "animal"), ("animal",)], [0.55, 0.3, 0.15]
)
_OBJECT_FRAMES = weighted(
  [
    ("object",),
    ("food",),
    ("place",),
    ("person",),
    ("animal",),
    ("idea",),
    ("object", "food"),
    ("person", "animal"),
  ],
  [0.22, 0.12, 0.14, 0.14, 0.1, 0.12, 0.08, 0.08],
)

# Names are built from one "international" inventory and capitalised, so
# they can never collide with an ordinary (lower-case) word.
_NAME_ONSETS = tuple("bdgklmnprstvz")
_NAME_VOWELS = tuple("aeio")
_NAME_CODAS = tuple("nrsl")


def _name_word(rng: Rng, syllables: int) -> str:
  parts = []
  for i in range(syllables):
    parts.append(rng.choice(_NAME_ONSETS) + rng.choice(_NAME_VOWELS))
    if i == syllables - 1 and rng.chance(0.5):
      parts.append(rng.choice(_NAME_CODAS))
  return "".join(parts).capitalize()


def _distinct(make, n: int) -> list[Any]:
  out, seen = [], set()
  while len(out) < n:
    x = make()
    if x not in seen:
      seen.add(x)
      out.append(x)
  return out


def _make_entities(seed: int) -> tuple[Entity, ...]:
  rng = Rng(seed, "entities")
  words = _distinct(
    lambda: _name_word(rng, 2 + rng.below(2)),
    _NUM_GIVEN_NAMES + _NUM_SURNAMES + _NUM_PLACES + 8 + 4,
  )
  given = words[:_NUM_GIVEN_NAMES]
  words = words[_NUM_GIVEN_NAMES:]
  surnames = words[:_NUM_SURNAMES]
  words = words[_NUM_SURNAMES:]
  places = words[:_NUM_PLACES]
  words = words[_NUM_PLACES:]
  org_heads, place_heads = words[:8], words[8:]

  def person():
    if rng.chance(0.6):
      return (rng.choice(given), rng.choice(surnames))
    return (rng.choice(given),)

  def place():
    if rng.chance(0.2):
      return (rng.choice(place_heads), rng.choice(places))
    return (rng.choice(places),)

  def org():
    r = rng.random()
    if r < 0.4:
      return (rng.choice(surnames), rng.choice(org_heads))
    if r < 0.7:
      return (rng.choice(places), rng.choice(org_heads))
    if r < 0.85:
      return (rng.choice(org_heads), rng.choice(places))
    letters = "BCDFGHKLMNPRSTVZ"
    return ("".join(rng.choice(letters) for _ in range(2 + rng.below(3))),)

  # A place name may not also be a one-word person name and so on: one
  # entity per token tuple keeps the gold NER labels a function of context.
  entities, seen = [], set()
  for typ, make, n in (
    ("PER", person, _NUM_PERSONS),
    ("LOC", place, _NUM_PLACES),
    ("ORG", org, _NUM_ORGS),
  ):
    got = 0
    while got < n:
      tokens = make()
      if tokens in seen:
        continue
      seen.add(tokens)
      entities.append(Entity(typ, tokens))
      got += 1
  return tuple(entities)


def make_ontology(seed: int) -> Ontology:
  """The concept inventory of a family, deterministic in `seed`."""
  rng = Rng(seed, "ontology")
  noun_class = tuple(
    c for c in NOUN_CLASSES for _ in range(_NOUNS_PER_CLASS[c])
  )
  by_class = {
    c: [i for i, k in enumerate(noun_class) if k == c] for c in NOUN_CLASSES
  }
  verb_subject, verb_object, verb_preferred = [], [], []
  for _ in range(_NUM_VERBS):
    verb_subject.append(rng.pick(_SUBJECT_FRAMES))
    if rng.chance(0.7):
      obj = rng.pick(_OBJECT_FRAMES)
      pool = [n for c in obj for n in by_class[c]]
      preferred = tuple(sorted(rng.sample(pool, 6)))
    else:
      obj, preferred = (), ()
    verb_object.append(obj)
    verb_preferred.append(preferred)
  adjective_classes = []
  for i in range(_NUM_ADJECTIVES):
    # Every class gets its own adjectives; some adjectives take two classes.
    classes = [NOUN_CLASSES[i % len(NOUN_CLASSES)]]
    if rng.chance(0.35):
      other = rng.choice(NOUN_CLASSES)
      if other not in classes:
        classes.append(other)
    adjective_classes.append(tuple(classes))
  noun_adjectives = []
  for c in noun_class:
    pool = [a for a, cl in enumerate(adjective_classes) if c in cl]
    noun_adjectives.append(tuple(sorted(rng.sample(pool, 3))))
  return Ontology(
    noun_class=noun_class,
    verb_subject=tuple(verb_subject),
    verb_object=tuple(verb_object),
    verb_preferred=tuple(verb_preferred),
    adjective_classes=tuple(adjective_classes),
    noun_adjectives=tuple(noun_adjectives),
    adposition_kind=ADPOSITION_KINDS,
    entities=_make_entities(seed),
  )


# ------------------------------------------------------------------- sampler


class Sampler:
  """The probabilistic grammar: draws latent sentences from an ontology.

  With `nli=True` the grammar avoids the constructions whose entailments the
  NLI generator does not model (universal determiners and disjunctions).
  """

  def __init__(self, ontology: Ontology):
    o = self.ontology = ontology
    self._nouns = {
      c: zipf(i for i, k in enumerate(o.noun_class) if k == c)
      for c in NOUN_CLASSES
    }
    self._adjectives = {
      c: zipf(a for a, cl in enumerate(o.adjective_classes) if c in cl)
      for c in NOUN_CLASSES
    }
    self._verbs = zipf(range(len(o.verb_subject)), 0.9)
    self._verbs_by_subject = {
      c: zipf((v for v, s in enumerate(o.verb_subject) if c in s), 0.9)
      for c in ("person", "animal")
    }
    self._entities = {
      t: zipf((i for i, e in enumerate(o.entities) if e.type == t), 0.7)
      for t in ENTITY_TYPES
    }
    self._adpositions = tuple(range(len(o.adposition_kind)))
    self._numbers = zipf(range(2, 21), 1.2)

  # NP slots ------------------------------------------------------------

  def noun_np(
    self,
    rng: Rng,
    classes: Sequence[str],
    preferred: Sequence[int] = (),
    nli: bool = False,
  ) -> NounNP:
    """A common-noun phrase headed by a noun of one of `classes`."""
    if preferred and rng.random() < 0.5:
      noun = rng.choice(preferred)
    else:
      noun = rng.pick(self._nouns[rng.choice(classes)])
    number = 0
    r = rng.random()
    if r < 0.3:
      plural = True
      if rng.random() < 0.3:
        number = (
          rng.pick(self._numbers) if rng.random() < 0.9 else 21 + rng.below(979)
        )
        det = DEF if rng.random() < 0.5 else NO_DET
      else:
        r = rng.random()
        det = (
          DEF if r < 0.45 else SOME if r < 0.7 else DEM if r < 0.8 else NO_DET
        )
    else:
      plural = False
      r = rng.random()
      det = (
        DEF if r < 0.5 else INDEF if r < 0.82 else DEM if r < 0.93 else EVERY
      )
      if det == EVERY and nli:
        det = DEF
    r = rng.random()
    count = 0 if r < 0.6 else 1 if r < 0.92 else 2
    adjectives: list[int] = []
    for _ in range(count):
      if rng.random() < 0.6:
        a = rng.choice(self.ontology.noun_adjectives[noun])
      else:
        a = rng.pick(self._adjectives[self.ontology.noun_class[noun]])
      if a not in adjectives:
        adjectives.append(a)
    return NounNP(noun, plural, det, tuple(adjectives), number)

  def entity(self, rng: Rng, typ: str) -> NameNP:
    return NameNP(rng.pick(self._entities[typ]))

  def _subject(self, rng: Rng, verb: int, nli: bool) -> Any:
    classes = self.ontology.verb_subject[verb]
    r = rng.random()
    if "person" in classes:
      if r < 0.15:
        return PronNP(rng.below(len(PRONOUNS)))
      if r < 0.4:
        return self.entity(rng, "ORG" if rng.random() < 0.25 else "PER")
      if r < 0.46:
        left = self.entity(rng, "PER")
        right = (
          self.entity(rng, "PER")
          if rng.random() < 0.5
          else self.noun_np(rng, classes, nli=nli)
        )
        if left == right:
          return left
        conj = AND if nli or rng.random() < 0.85 else OR
        return CoordNP(conj, left, right)
    elif r < 0.05:
      left = self.noun_np(rng, classes, nli=nli)
      right = self.noun_np(rng, classes, nli=nli)
      if left.noun != right.noun:
        return CoordNP(AND if nli or rng.random() < 0.85 else OR, left, right)
    return self.noun_np(rng, classes, nli=nli)

  def _object(self, rng: Rng, verb: int, nli: bool) -> Any:
    classes = self.ontology.verb_object[verb]
    r = rng.random()
    if "place" in classes and r < 0.3:
      return self.entity(rng, "LOC")
    if "person" in classes:
      if r < 0.1:
        return PronNP(rng.below(len(PRONOUNS)))
      if r < 0.3:
        return self.entity(rng, "PER")
    return self.noun_np(rng, classes, self.ontology.verb_preferred[verb], nli)

  def pp(self, rng: Rng, adposition: int, nli: bool = False) -> PP:
    """A prepositional (or postpositional) phrase for an adposition."""
    kind = self.ontology.adposition_kind[adposition]
    r = rng.random()
    if kind == "time":
      np = YearNP(1900 + rng.below(131))
    elif kind == "loc":
      np = (
        self.entity(rng, "LOC")
        if r < 0.35
        else self.noun_np(rng, ("place", "object"), nli=nli)
      )
    elif kind == "com":
      np = (
        self.entity(rng, "PER")
        if r < 0.3
        else self.noun_np(rng, ("person", "animal"), nli=nli)
      )
    elif kind == "ins":
      np = self.noun_np(rng, ("object",), nli=nli)
    else:  # ben
      if r < 0.3:
        np = self.entity(rng, "PER")
      elif r < 0.4:
        np = self.entity(rng, "ORG")
      elif r < 0.5:
        np = PronNP(rng.below(len(PRONOUNS)))
      else:
        np = self.noun_np(rng, ("person",), nli=nli)
    return PP(adposition, np)

  # Clauses and sentences ----------------------------------------------

  def subject_class(self, np: Any) -> str:
    """The noun class an NP denotes (for verb selection)."""
    if np.kind == "noun":
      return self.ontology.noun_class[np.noun]
    if np.kind == "name":
      return (
        "place"
        if self.ontology.entities[np.entity].type == "LOC"
        else ("person")
      )
    if np.kind == "coord":
      return self.subject_class(np.left)
    return "person"

  def clause(self, rng: Rng, nli: bool = False, subject: Any = None) -> Clause:
    """One clause; with `subject` given, a verb that fits it."""
    if subject is None:
      verb = rng.pick(self._verbs)
      subject = self._subject(rng, verb, nli)
    else:
      verb = rng.pick(self._verbs_by_subject[self.subject_class(subject)])
    r = rng.random()
    tense = 0 if r < 0.5 else 1 if r < 0.85 else 2
    negated = rng.random() < 0.15
    obj = (
      self._object(rng, verb, nli) if self.ontology.verb_object[verb] else None
    )
    r = rng.random()
    count = 0 if r < 0.55 else 1 if r < 0.9 else 2
    pps = tuple(
      self.pp(rng, a, nli) for a in rng.sample(self._adpositions, count)
    )
    return Clause(subject, verb, tense, negated, obj, pps)

  def sentence(self, rng: Rng, nli: bool = False) -> Sentence:
    """One latent sentence: a clause, or two joined by a conjunction."""
    first = self.clause(rng, nli)
    if rng.random() >= (0.35 if nli else 0.15):
      return Sentence((first,), -1)
    second = self.clause(rng, nli)
    # Two clauses about the same subject and verb would read as a
    # self-contradiction once one of them is negated.
    while (second.subject, second.verb) == (first.subject, first.verb):
      second = self.clause(rng, nli)
    if nli:
      conj = AND
    else:
      r = rng.random()
      conj = AND if r < 0.6 else BUT if r < 0.9 else OR
    return Sentence((first, second), conj)
