"""A family of artificial languages over one latent grammar.

`make_family(seed, num_languages)` builds languages in groups. Each group has
a proto-language: a syllable inventory, a word order, morphology (plural,
object case, tense affixes) and a proto-lexicon over the shared concepts. Its
daughter languages apply a few regular sound changes to every proto stem and
affix (and replace a few words), and keep the word order: they are close to
one another, share cognates and hence character n-grams and word pieces.
Languages of different groups are distant: independent lexicons drawn from
different syllable inventories, a different word order, and no ordinary
surface word in common (`make_family` enforces it). All languages share the
anchors real languages share: numbers written with digits and proper names.

Everything is deterministic in the seed, and `Family.to_dict()` holds every
parameter (written as `family.json` beside the data).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Iterator, Sequence
from typing import Any

from bistil_jax import paths
from bistil_jax.errors import BistilError
from bistil_jax.synthetic import latent as lt

FORMAT = "bistil_jax.synthetic.family/1"
CLAUSE_ORDERS = ("SVO", "SOV", "VSO", "VOS", "OVS", "OSV")
MAX_LANGUAGES = 26
# Lexical categories, in the order used to break ties between collisions.
CATEGORIES = (
  "nouns",
  "verbs",
  "adjectives",
  "determiners",
  "adpositions",
  "pronouns",
  "conjunctions",
  "negation",
)
_CONTENT = ("nouns", "verbs", "adjectives")
_VOWEL_CLASS = "[aeiouy]"
_CONSONANT_POOL = (
  "p", "t", "k", "b", "d", "g", "m", "n", "s", "l", "r", "v", "z", "f",
  "h", "j", "w", "c", "x", "sh", "ch", "th", "kh", "ng", "ts",
)  # fmt: skip
_VOWEL_POOL = ("a", "e", "i", "o", "u", "y")
# Groups also draw long vowels and diphthongs, so that their inventories (and
# hence their character n-grams) overlap less.
_NUCLEUS_POOL = (
  *_VOWEL_POOL, "aa", "ee", "oo", "uu", "ai", "au", "ei", "ou", "ia", "ue",
)  # fmt: skip
_EXTRA_SHAPES = ("CVK", "V", "VK", "CVKC")
# Share of daughter words replaced by a fresh (non-cognate) word.
_REPLACEMENT_RATE = 0.08
_MAX_ROUNDS = 500


# ----------------------------------------------------------------- phonology


@dataclasses.dataclass(frozen=True)
class Phonology:
  """A syllable inventory: shapes over onsets (C), vowels (V), codas (K)."""

  onsets: tuple[str, ...]
  vowels: tuple[str, ...]
  codas: tuple[str, ...]
  shapes: tuple[str, ...]
  weights: tuple[float, ...]

  @functools.cached_property
  def _shape_table(self) -> lt.Weighted:
    return lt.weighted(self.shapes, self.weights)

  def syllable(self, rng: lt.Rng) -> str:
    parts = {"C": self.onsets, "V": self.vowels, "K": self.codas}
    return "".join(rng.choice(parts[c]) for c in rng.pick(self._shape_table))

  def word(self, rng: lt.Rng, syllables: int) -> str:
    parts = [self.syllable(rng) for _ in range(syllables)]
    for i in range(1, syllables):
      # No vowel hiatus across syllables: "ua" + "ot" becomes "ua" + "rot".
      if parts[i][0] in "aeiouy" and parts[i - 1][-1] in "aeiouy":
        parts[i] = rng.choice(self.onsets) + parts[i]
    return "".join(parts)


def _fresh_sample(
  rng: lt.Rng, pool: Sequence[str], k: int, used: dict[str, int]
) -> tuple[str, ...]:
  """k distinct items, preferring those earlier groups used least."""
  left, out = list(pool), []
  for _ in range(k):
    item = rng.pick(
      lt.weighted(left, [1.0 / (1 + 4 * used.get(x, 0)) for x in left])
    )
    left.remove(item)
    out.append(item)
  for x in out:
    used[x] = used.get(x, 0) + 1
  return tuple(out)


def _make_phonology(rng: lt.Rng, used: dict[str, int]) -> Phonology:
  onsets = _fresh_sample(rng, _CONSONANT_POOL, 8 + rng.below(4), used)
  vowels = _fresh_sample(rng, _NUCLEUS_POOL, 3 + rng.below(3), used)
  coda_pool = sorted({c for c in onsets if len(c) == 1} | {"n", "r", "s"})
  codas = tuple(rng.sample(coda_pool, 2 + rng.below(3)))
  extra = rng.sample(_EXTRA_SHAPES, 1 + rng.below(3))
  shapes = ("CV", *extra)
  weights = (1.0, *(round(0.2 + 0.4 * rng.random(), 3) for _ in extra))
  return Phonology(onsets, vowels, codas, shapes, weights)


@dataclasses.dataclass(frozen=True)
class SoundChange:
  """A regular sound change: a regex substitution applied to every morpheme."""

  kind: str
  pattern: str
  replacement: str
  note: str

  def apply(self, form: str) -> str:
    return _compiled(self.pattern).sub(self.replacement, form)


@functools.cache
def _compiled(pattern: str) -> re.Pattern[str]:
  return re.compile(pattern)


def _sound_change(kind: str, rng: lt.Rng, ph: Phonology) -> SoundChange | None:
  """One sound change of a kind that applies to `ph`, or None."""
  singles = [c for c in ph.onsets if len(c) == 1]
  if kind == "shift":
    if not singles:
      return None
    src = rng.choice(singles)
    dst = rng.choice(
      [c for c in _CONSONANT_POOL if c != src and c not in singles]
    )
    return SoundChange(kind, src, dst, f"{src} > {dst}")
  if kind == "lenition":
    voiced = {"p": "b", "t": "d", "k": "g", "s": "z", "f": "v"}
    stops = [c for c in singles if c in voiced]
    if not stops:
      return None
    src = rng.choice(stops)
    pattern = f"(?<={_VOWEL_CLASS}){src}(?={_VOWEL_CLASS})"
    return SoundChange(
      kind, pattern, voiced[src], f"{src} > {voiced[src]} between vowels"
    )
  if kind == "vowel":
    src = rng.choice(ph.vowels)[0]  # A diphthong changes its first vowel.
    dst = rng.choice([v for v in _VOWEL_POOL if v != src])
    return SoundChange(kind, src, dst, f"{src} > {dst}")
  if kind == "final_vowel_loss":
    pattern = f"(?<=[^aeiouy]{_VOWEL_CLASS}[^aeiouy]){_VOWEL_CLASS}$"
    return SoundChange(kind, pattern, "", "final vowel lost after VC")
  if kind == "palatalisation":
    if "k" not in singles and "t" not in singles:
      return None
    src = "k" if "k" in singles else "t"
    return SoundChange(kind, f"{src}(?=[ie])", "ch", f"{src} > ch before i, e")
  if kind == "epenthesis":
    if not any("K" in shape for shape in ph.shapes):
      return None
    vowel = rng.choice(ph.vowels)
    pattern = "(?<=[^aeiouy])$"
    return SoundChange(kind, pattern, vowel, f"final consonant + {vowel}")
  if kind == "h_loss":
    if not any("h" in c for c in ph.onsets):
      return None
    return SoundChange(kind, "h", "", "h lost")
  raise ValueError(f"unknown sound change kind {kind!r}")


_SOUND_CHANGE_KINDS = (
  "shift",
  "lenition",
  "vowel",
  "final_vowel_loss",
  "palatalisation",
  "epenthesis",
  "h_loss",
)


def apply_changes(changes: Sequence[SoundChange], form: str) -> str:
  """Applies sound changes in order; a change that would empty it is skipped."""
  for change in changes:
    new = change.apply(form)
    if new:
      form = new
  return form


# -------------------------------------------------------- grammar parameters


@dataclasses.dataclass(frozen=True)
class WordOrder:
  """Constituent orders.

  Attributes:
    clause: order of subject, verb and object, e.g. "SOV".
    adjective: "before" or "after" the noun.
    determiner: "before" or "after" the noun phrase.
    adposition: "pre" (prepositions) or "post" (postpositions).
    negation: negation particle "before" or "after" the verb.
  """

  clause: str
  adjective: str
  determiner: str
  adposition: str
  negation: str

  def summary(self) -> str:
    return (
      f"{self.clause}, adjective {self.adjective} noun, determiner "
      f"{self.determiner} noun, {self.adposition}positions, negation "
      f"{self.negation} verb"
    )


@dataclasses.dataclass(frozen=True)
class Morphology:
  """Affixes. Empty `accusative` means no object case marking.

  Attributes:
    plural: plural affix of nouns (and adjectives with agreement).
    plural_position: "prefix" or "suffix".
    accusative: object case affix of nouns and pronouns, "" if none.
    accusative_position: "prefix" or "suffix".
    past: past tense affix of verbs.
    future: future tense affix of verbs (present is unmarked).
    tense_position: "prefix" or "suffix".
    adjective_agreement: whether adjectives take the plural affix.
  """

  plural: str
  plural_position: str
  accusative: str
  accusative_position: str
  past: str
  future: str
  tense_position: str
  adjective_agreement: bool

  def summary(self) -> str:
    def affix(a, pos):
      return f"{a}-" if pos == "prefix" else f"-{a}"

    case = (
      f"object case {affix(self.accusative, self.accusative_position)}"
      if self.accusative
      else "no case"
    )
    agree = ", adjectives agree" if self.adjective_agreement else ""
    return (
      f"plural {affix(self.plural, self.plural_position)}, {case}, past "
      f"{affix(self.past, self.tense_position)}, future "
      f"{affix(self.future, self.tense_position)}{agree}"
    )


def _attach(stem: str, affix: str, position: str) -> str:
  if not affix:
    return stem
  return affix + stem if position == "prefix" else stem + affix


@dataclasses.dataclass(frozen=True)
class Group:
  """A proto-language and the codes of its daughters."""

  name: str
  phonology: Phonology
  order: WordOrder
  morphology: Morphology
  languages: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Language:
  """One synthetic language.

  Attributes:
    code: short name, e.g. "a1" (group letter, member number).
    group: name of its group.
    order: word order (shared by the group).
    morphology: affixes (the group's, after this language's sound changes).
    sound_changes: changes from the proto-language, applied in order.
    lexicon: category (see CATEGORIES) -> word per concept id.
  """

  code: str
  group: str
  order: WordOrder
  morphology: Morphology
  sound_changes: tuple[SoundChange, ...]
  lexicon: dict[str, tuple[str, ...]]

  def __hash__(self) -> int:
    return hash(self.code)

  @functools.cached_property
  def forms(self) -> Forms:
    return Forms(self)

  @functools.cached_property
  def trigrams(self) -> frozenset[str]:
    """Character trigrams of every word form (with "<", ">" at the edges)."""
    out = set()
    for form, _, _ in self.forms.all_forms():
      padded = f"<{form}>"
      out.update(padded[i : i + 3] for i in range(len(padded) - 2))
    return frozenset(out)


class Forms:
  """Every inflected form of a language, precomputed for fast realisation."""

  def __init__(self, lang: Language):
    m, lex = lang.morphology, lang.lexicon
    case = m.accusative
    self.has_case = bool(case)

    def acc(form):
      return _attach(form, case, m.accusative_position)

    def pl(form):
      return _attach(form, m.plural, m.plural_position)

    # [concept][plural][accusative]
    self.noun = tuple(((n, acc(n)), (pl(n), acc(pl(n)))) for n in lex["nouns"])
    # [concept][tense]
    self.verb = tuple(
      (
        v,
        _attach(v, m.past, m.tense_position),
        _attach(v, m.future, m.tense_position),
      )
      for v in lex["verbs"]
    )
    # [concept][plural]
    self.adjective = tuple(
      (a, pl(a) if m.adjective_agreement else a) for a in lex["adjectives"]
    )
    # [concept][accusative]
    self.pronoun = tuple((p, acc(p)) for p in lex["pronouns"])
    self.determiner = lex["determiners"]
    self.adposition = lex["adpositions"]
    self.conjunction = lex["conjunctions"]
    self.negation = lex["negation"][0]

  def all_forms(self) -> Iterator[tuple[str, str, int]]:
    """(surface form, category, concept) for every ordinary word form."""
    for c, table in enumerate(self.noun):
      for pair in table:
        for form in pair:
          yield form, "nouns", c
    for cat, tables in (
      ("verbs", self.verb),
      ("adjectives", self.adjective),
      ("pronouns", self.pronoun),
    ):
      for c, table in enumerate(tables):
        for form in table:
          yield form, cat, c
    for cat, words in (
      ("determiners", self.determiner),
      ("adpositions", self.adposition),
      ("conjunctions", self.conjunction),
      ("negation", (self.negation,)),
    ):
      for c, form in enumerate(words):
        yield form, cat, c


# --------------------------------------------------------------- realisation


class Token:
  """One realised token with its annotations (UD and NER)."""

  __slots__ = ("form", "lemma", "upos", "feats", "head", "deprel", "ner")

  def __init__(
    self,
    form: str,
    lemma: str,
    upos: str,
    feats: str = "_",
    head: Token | None = None,
    deprel: str = "root",
    ner: str = "O",
  ):
    self.form = form
    self.lemma = lemma
    self.upos = upos
    self.feats = feats
    self.head = head
    self.deprel = deprel
    self.ner = ner

  def __repr__(self) -> str:
    return f"Token({self.form!r}, {self.upos}, {self.deprel}, {self.ner})"


_DET_FEATS = (
  "Definite=Def|PronType=Art",
  "Definite=Ind|PronType=Art",
  "PronType=Dem",
  "PronType=Tot",
  "PronType=Ind",
)
_TENSE_FEATS = tuple(f"Tense={t}" for t in lt.TENSES)


def _pronoun_feats(p: int, case: str) -> str:
  person, number = lt.PRONOUNS[p][0], lt.PRONOUNS[p][1:]
  number = "Sing" if number == "sg" else "Plur"
  prefix = f"Case={case}|" if case else ""
  return f"{prefix}Number={number}|Person={person}|PronType=Prs"


class Realizer:
  """Turns latent sentences into annotated tokens of one language."""

  def __init__(self, lang: Language, ontology: lt.Ontology):
    self.lang = lang
    self.forms = f = lang.forms
    o = lang.order
    self._entities = ontology.entities
    self._clause = o.clause
    self._verb_final = o.clause[-1] == "V"
    self._adj_first = o.adjective == "before"
    self._det_first = o.determiner == "before"
    self._prepositions = o.adposition == "pre"
    self._neg_first = o.negation == "before"
    cases = ("Nom", "Acc") if f.has_case else ("", "")
    self._noun_feats = tuple(
      tuple((f"Case={c}|" if c else "") + f"Number={n}" for c in cases)
      for n in ("Sing", "Plur")
    )
    self._pron_feats = tuple(
      tuple(_pronoun_feats(p, c) for c in cases)
      for p in range(len(lt.PRONOUNS))
    )
    self._adj_feats = (
      ("Number=Sing", "Number=Plur")
      if lang.morphology.adjective_agreement
      else ("_", "_")
    )
    self._noun_lemma = tuple(t[0][0] for t in f.noun)

  def sentence(self, s: lt.Sentence) -> list[Token]:
    """Tokens in surface order; heads point at tokens, the root has None."""
    toks, root = self._realize_clause(s.clauses[0])
    for clause in s.clauses[1:]:
      more, verb = self._realize_clause(clause)
      verb.head, verb.deprel = root, "conj"
      if s.conj == lt.BUT:
        toks.append(Token(",", ",", "PUNCT", "_", verb, "punct"))
      word = self.forms.conjunction[s.conj]
      toks.append(Token(word, word, "CCONJ", "_", verb, "cc"))
      toks.extend(more)
    toks.append(Token(".", ".", "PUNCT", "_", root, "punct"))
    return toks

  def _realize_clause(self, c: lt.Clause) -> tuple[list[Token], Token]:
    f = self.forms
    lemma = f.verb[c.verb][0]
    verb = Token(f.verb[c.verb][c.tense], lemma, "VERB", _TENSE_FEATS[c.tense])
    group = [verb]
    if c.negated:
      neg = Token(
        f.negation, f.negation, "PART", "Polarity=Neg", verb, "advmod"
      )
      group = [neg, verb] if self._neg_first else [verb, neg]
    parts = {"V": group, "S": self._np(c.subject, 0, verb, "nsubj")}
    parts["O"] = self._np(c.obj, 1, verb, "obj") if c.obj is not None else []
    pps: list[Token] = []
    for pp in c.pps:
      pps.extend(self._pp(pp, verb))
    out: list[Token] = []
    for slot in self._clause:
      if slot == "V" and self._verb_final:
        out.extend(pps)
      out.extend(parts[slot])
    if not self._verb_final:
      out.extend(pps)
    return out, verb

  def _pp(self, pp: lt.PP, verb: Token) -> list[Token]:
    toks = self._np(pp.np, 0, verb, "obl")
    head = next(t for t in toks if t.head is verb)
    word = self.forms.adposition[pp.adposition]
    adp = Token(word, word, "ADP", "_", head, "case")
    return [adp, *toks] if self._prepositions else [*toks, adp]

  def _np(self, np: Any, acc: int, head: Token, rel: str) -> list[Token]:
    """An NP's tokens in surface order, its head attached to `head`."""
    kind = np.kind
    if kind == "noun":
      return self._noun_np(np, acc, head, rel)
    if kind == "pron":
      return self._pronoun_np(np, acc, head, rel)
    if kind == "name":
      return self._name_np(np, head, rel)
    if kind == "coord":
      return self._coord_np(np, acc, head, rel)
    if kind == "year":
      digits = str(np.year)
      return [Token(digits, digits, "NUM", "NumType=Card", head, rel)]
    raise ValueError(f"unknown NP kind {kind!r}")

  def _noun_np(self, np: Any, acc: int, head: Token, rel: str) -> list[Token]:
    """Noun, adjectives, number and determiner, in the language's order."""
    f = self.forms
    pl = 1 if np.plural else 0
    noun = Token(
      f.noun[np.noun][pl][acc],
      self._noun_lemma[np.noun],
      "NOUN",
      self._noun_feats[pl][acc],
      head,
      rel,
    )
    core = [
      Token(
        f.adjective[a][pl],
        f.adjective[a][0],
        "ADJ",
        self._adj_feats[pl],
        noun,
        "amod",
      )
      for a in np.adjectives
    ]
    if self._adj_first:
      core.append(noun)
    else:
      core.insert(0, noun)
    outer = []
    if np.number:
      digits = str(np.number)
      outer.append(Token(digits, digits, "NUM", "NumType=Card", noun, "nummod"))
    if np.det >= 0:
      word = f.determiner[np.det]
      outer.append(Token(word, word, "DET", _DET_FEATS[np.det], noun, "det"))
    if self._det_first:
      outer.reverse()
      return outer + core
    return core + outer

  def _pronoun_np(
    self, np: Any, acc: int, head: Token, rel: str
  ) -> list[Token]:
    f = self.forms
    word = f.pronoun[np.pronoun][acc]
    return [
      Token(
        word,
        f.pronoun[np.pronoun][0],
        "PRON",
        self._pron_feats[np.pronoun][acc],
        head,
        rel,
      )
    ]

  def _name_np(self, np: Any, head: Token, rel: str) -> list[Token]:
    """A named entity: its first token heads the rest (`flat`)."""
    entity = self._entities[np.entity]
    first = Token(
      entity.tokens[0],
      entity.tokens[0],
      "PROPN",
      "_",
      head,
      rel,
      "B-" + entity.type,
    )
    inside = "I-" + entity.type
    return [first] + [
      Token(w, w, "PROPN", "_", first, "flat", inside)
      for w in entity.tokens[1:]
    ]

  def _coord_np(self, np: Any, acc: int, head: Token, rel: str) -> list[Token]:
    """`left CONJ right`; the right conjunct hangs off the left's head."""
    left = self._np(np.left, acc, head, rel)
    left_head = next(t for t in left if t.head is head)
    right = self._np(np.right, acc, left_head, "conj")
    right_head = next(t for t in right if t.head is left_head)
    word = self.forms.conjunction[np.conj]
    cc = Token(word, word, "CCONJ", "_", right_head, "cc")
    return [*left, cc, *right]


def detokenize(forms: Sequence[str]) -> str:
  """Joins tokens with spaces, punctuation attached to the word before it."""
  return " ".join(forms).replace(" ,", ",").replace(" .", ".")


# ------------------------------------------------------------------- family


@dataclasses.dataclass(frozen=True)
class Family:
  """A family of synthetic languages over one ontology.

  Attributes:
    seed: the seed everything (lexicons, data) derives from.
    ontology: the shared concepts and selectional preferences.
    groups: proto-languages with their daughters.
    languages: all languages, grouped, in code order.
  """

  seed: int
  ontology: lt.Ontology
  groups: tuple[Group, ...]
  languages: tuple[Language, ...]

  @property
  def codes(self) -> tuple[str, ...]:
    return tuple(lang.code for lang in self.languages)

  def language(self, code: str) -> Language:
    """The language with this code.

    Raises:
      BistilError: no language has that code.
    """
    for lang in self.languages:
      if lang.code == code:
        return lang
    raise BistilError(
      f"unknown synthetic language {code!r}; known: {', '.join(self.codes)}"
    )

  def related(self, a: str, b: str) -> bool:
    """Whether two languages descend from one proto-language."""
    return self.language(a).group == self.language(b).group

  def close_pairs(self) -> list[tuple[str, str]]:
    """Pairs of related languages (same group, same word order)."""
    codes = self.codes
    return [
      (a, b)
      for i, a in enumerate(codes)
      for b in codes[i + 1 :]
      if self.related(a, b)
    ]

  def distant_pairs(self) -> list[tuple[str, str]]:
    """Pairs from different groups (independent lexicon and word order)."""
    codes = self.codes
    return [
      (a, b)
      for i, a in enumerate(codes)
      for b in codes[i + 1 :]
      if not self.related(a, b)
    ]

  def transfer_languages(
    self, languages: Sequence[str] | None = None
  ) -> tuple[str, str | None, str | None]:
    """A (source, close target, distant target) triple for transfer demos.

    Args:
      languages: codes to choose from (default: all); the first is the source.

    Returns:
      The source, a related target and an unrelated one (None where the
      choice has none).
    """
    codes = list(languages) if languages else list(self.codes)
    source = codes[0]
    close = next((c for c in codes[1:] if self.related(source, c)), None)
    distant = next((c for c in codes[1:] if not self.related(source, c)), None)
    return source, close, distant

  @functools.cached_property
  def sampler(self) -> lt.Sampler:
    return lt.Sampler(self.ontology)

  @functools.cached_property
  def _realizers(self) -> dict[str, Realizer]:
    return {lang.code: Realizer(lang, self.ontology) for lang in self.languages}

  def realize(self, sentence: lt.Sentence, code: str) -> list[Token]:
    """Annotated tokens of a latent sentence in one language."""
    if code not in self._realizers:
      self.language(code)  # Raises the unknown-code error.
    return self._realizers[code].sentence(sentence)

  def text(self, sentence: lt.Sentence, code: str) -> str:
    """A latent sentence as one line of text in one language."""
    return detokenize([t.form for t in self.realize(sentence, code)])

  def trigram_overlap(self, a: str, b: str) -> float:
    """Jaccard overlap of the character trigrams of two lexicons' forms."""
    ta, tb = self.language(a).trigrams, self.language(b).trigrams
    return len(ta & tb) / max(1, len(ta | tb))

  def describe(self) -> str:
    """A human-readable summary: groups, parameters, close/distant pairs."""
    n = len(self.languages)
    lines = [
      f"Synthetic language family (seed {self.seed}): {n} languages in "
      f"{len(self.groups)} groups.",
      "Languages of one group descend from one proto-language by regular "
      "sound changes and share its word order and morphology (close); "
      "languages of different groups have independent lexicons and word "
      "orders (distant). Digits and proper names are written identically "
      "in all of them.",
      "",
    ]
    for g in self.groups:
      lines.append(f"Group {g.name}: {' '.join(g.languages)}")
      lines.append(f"  word order: {g.order.summary()}")
      lines.append(f"  proto morphology: {g.morphology.summary()}")
      ph = g.phonology
      lines.append(
        f"  syllables: {'/'.join(ph.shapes)} over consonants "
        f"{' '.join(ph.onsets)}; vowels {' '.join(ph.vowels)}"
      )
      for code in g.languages:
        lang = self.language(code)
        changes = "; ".join(c.note for c in lang.sound_changes) or "none"
        lines.append(f"  {code}: sound changes: {changes}")
        lines.append(f"      morphology: {lang.morphology.summary()}")
    lines.append("")
    lines.append(
      "Close pairs: "
      + (" ".join(f"{a}-{b}" for a, b in self.close_pairs()) or "none")
    )
    lines.append(
      "Distant pairs: "
      + (" ".join(f"{a}-{b}" for a, b in self.distant_pairs()) or "none")
    )
    source, close, distant = self.transfer_languages()
    lines.append(
      f"Suggested transfer: source {source}, close target {close}, "
      f"distant target {distant}."
    )
    lines.append("")
    lines.append("Character-trigram overlap of the lexicons (Jaccard, %):")
    lines.append("      " + "".join(f"{c:>5}" for c in self.codes))
    for a in self.codes:
      row = "".join(
        f"{round(100 * self.trigram_overlap(a, b)):>5}" for b in self.codes
      )
      lines.append(f"  {a:<4}{row}")
    lines.append("")
    lines.append("One latent sentence in every language:")
    sentence = self.sampler.sentence(lt.Rng(self.seed, "describe"))
    for code in self.codes:
      lines.append(f"  {code}: {self.text(sentence, code)}")
    return "\n".join(lines)

  # Serialisation -------------------------------------------------------

  def to_dict(self) -> dict[str, Any]:
    """Every generator parameter, as JSON-compatible data."""
    return {
      "format": FORMAT,
      "seed": self.seed,
      "ontology": self.ontology.to_dict(),
      "groups": [
        {
          "name": g.name,
          "languages": list(g.languages),
          "phonology": dataclasses.asdict(g.phonology),
          "word_order": dataclasses.asdict(g.order),
          "morphology": dataclasses.asdict(g.morphology),
        }
        for g in self.groups
      ],
      "languages": [
        {
          "code": lang.code,
          "group": lang.group,
          "word_order": dataclasses.asdict(lang.order),
          "morphology": dataclasses.asdict(lang.morphology),
          "sound_changes": [dataclasses.asdict(c) for c in lang.sound_changes],
          "lexicon": {k: list(v) for k, v in lang.lexicon.items()},
        }
        for lang in self.languages
      ],
    }

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> Family:
    """Rebuilds a family from `to_dict()` output.

    Raises:
      BistilError: the data is not a family description of this format.
    """
    if not isinstance(d, dict) or d.get("format") != FORMAT:
      raise BistilError(f"not a synthetic family description (format {FORMAT})")
    try:
      groups = tuple(
        Group(
          name=g["name"],
          phonology=Phonology(
            **{k: tuple(v) for k, v in g["phonology"].items()}
          ),
          order=WordOrder(**g["word_order"]),
          morphology=Morphology(**g["morphology"]),
          languages=tuple(g["languages"]),
        )
        for g in d["groups"]
      )
      languages = tuple(
        Language(
          code=x["code"],
          group=x["group"],
          order=WordOrder(**x["word_order"]),
          morphology=Morphology(**x["morphology"]),
          sound_changes=tuple(SoundChange(**c) for c in x["sound_changes"]),
          lexicon={k: tuple(v) for k, v in x["lexicon"].items()},
        )
        for x in d["languages"]
      )
      family = cls(
        seed=int(d["seed"]),
        ontology=lt.Ontology.from_dict(d["ontology"]),
        groups=groups,
        languages=languages,
      )
    except (KeyError, TypeError, ValueError) as e:
      raise BistilError(f"malformed synthetic family description: {e!r}") from e
    sizes = family.ontology.sizes
    for lang in languages:
      for cat, n in sizes.items():
        if len(lang.lexicon.get(cat, ())) != n:
          raise BistilError(
            f"malformed synthetic family description: {lang.code} has "
            f"{len(lang.lexicon.get(cat, ()))} {cat}, expected {n}"
          )
    return family

  def save(self, path: paths.PathLike) -> None:
    """Writes `to_dict()` as JSON."""
    paths.write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")


def load_family(path: paths.PathLike) -> Family:
  """Reads a family written by `Family.save` (e.g. `DIR/family.json`).

  Raises:
    BistilError: the file is missing or is not a family description.
  """
  path = paths.path(path)
  if not path.is_file():
    raise BistilError(f"no synthetic family description at {path}")
  try:
    data = json.loads(paths.read_text(path))
  except json.JSONDecodeError as e:
    raise BistilError(f"{path} is not valid JSON: {e}") from e
  return Family.from_dict(data)


# -------------------------------------------------------------- construction


def _group_sizes(num_languages: int, num_groups: int) -> list[int]:
  base, extra = divmod(num_languages, num_groups)
  return [base + (1 if i < extra else 0) for i in range(num_groups)]


def _make_orders(seed: int, num_groups: int) -> list[WordOrder]:
  """Distinct word orders; the first three groups get SVO, SOV, VSO."""
  rng = lt.Rng(seed, "word-order")
  main = rng.shuffled(CLAUSE_ORDERS[:3]) + rng.shuffled(CLAUSE_ORDERS[3:])
  orders: list[WordOrder] = []
  for i in range(num_groups):
    clause = main[i % len(main)]
    verb_final = clause[-1] == "V"
    while True:
      adp = "post" if verb_final else "pre"
      if rng.chance(0.15):
        adp = "pre" if adp == "post" else "post"
      order = WordOrder(
        clause=clause,
        adjective="before" if rng.chance(0.5) else "after",
        determiner="before" if rng.chance(0.7) else "after",
        adposition=adp,
        negation="before" if rng.chance(0.7) else "after",
      )
      if order not in orders:
        break
    orders.append(order)
  return orders


def _make_morphology(
  rng: lt.Rng, ph: Phonology, order: WordOrder
) -> Morphology:
  affixes = set()

  def affix():
    while True:
      a = ph.syllable(rng)
      if a not in affixes:
        affixes.add(a)
        return a

  verb_final = order.clause[-1] == "V"
  has_case = order.clause in ("SOV", "OSV", "OVS") or rng.chance(0.3)
  return Morphology(
    plural=affix(),
    plural_position="suffix" if rng.chance(0.7) else "prefix",
    accusative=affix() if has_case else "",
    accusative_position="suffix" if verb_final or rng.chance(0.8) else "prefix",
    past=affix(),
    future=affix(),
    tense_position="suffix" if rng.chance(0.6) else "prefix",
    adjective_agreement=rng.chance(0.4),
  )


def _daughter_morphology(m: Morphology, changes: Sequence[SoundChange]):
  fields = {}
  for name in ("plural", "accusative", "past", "future"):
    proto = getattr(m, name)
    fields[name] = apply_changes(changes, proto) if proto else ""
  values = [v for v in fields.values() if v]
  if len(set(values)) != len(values):
    # Two affixes merged: the daughter keeps the proto affixes (levelling).
    return m
  return dataclasses.replace(m, **fields)


def _syllables(rng: lt.Rng, category: str) -> int:
  if category in _CONTENT:
    return 2 if rng.random() < 0.55 else 3
  return 1 if rng.random() < 0.7 else 2


def _build_lexicons(
  seed: int,
  group_of: dict[str, int],
  phonologies: Sequence[Phonology],
  changes: dict[str, tuple[SoundChange, ...]],
  morphologies: dict[str, Morphology],
  orders: dict[str, WordOrder],
  sizes: dict[str, int],
) -> dict[str, dict[str, tuple[str, ...]]]:
  """Lexicons with no ordinary word shared across groups.

  Stems are drawn per (group, category, concept, attempt); whenever a surface
  form is ambiguous within a language, or occurs in two groups, the later
  concept is redrawn with the next attempt, until no collision is left.
  """
  attempts: dict[tuple[int, str, int], int] = {}
  codes = list(group_of)

  @functools.cache
  def proto(g: int, cat: str, c: int, attempt: int) -> str:
    rng = lt.Rng(seed, "stem", g, cat, c, attempt)
    return phonologies[g].word(rng, _syllables(rng, cat))

  @functools.cache
  def daughter(code: str, cat: str, c: int, attempt: int) -> str:
    g = group_of[code]
    if cat in _CONTENT and lt.Rng(seed, "replace?", code, cat, c).chance(
      _REPLACEMENT_RATE
    ):
      rng = lt.Rng(seed, "replace", code, cat, c, attempt)
      return phonologies[g].word(rng, _syllables(rng, cat))
    return apply_changes(changes[code], proto(g, cat, c, attempt))

  rank = {cat: i for i, cat in enumerate(CATEGORIES)}
  for _ in range(_MAX_ROUNDS):
    lexicons = {
      code: {
        cat: tuple(
          daughter(code, cat, c, attempts.get((group_of[code], cat, c), 0))
          for c in range(n)
        )
        for cat, n in sizes.items()
      }
      for code in codes
    }
    bump: set[tuple[int, str, int]] = set()
    owner: dict[str, int] = {}  # form -> group
    for code in codes:
      g = group_of[code]
      lang = Language(
        code, "", orders[code], morphologies[code], (), lexicons[code]
      )
      local: dict[str, tuple[str, int]] = {}
      for form, cat, c in lang.forms.all_forms():
        prev = local.setdefault(form, (cat, c))
        if prev != (cat, c):
          later = max(prev, (cat, c), key=lambda k: (rank[k[0]], k[1]))
          bump.add((g, *later))
      for form, (cat, c) in local.items():
        if owner.setdefault(form, g) != g:
          bump.add((g, cat, c))
    if not bump:
      return lexicons
    for key in bump:
      attempts[key] = attempts.get(key, 0) + 1
  raise RuntimeError("synthetic lexicons did not converge; this is a bug")


def _choose_changes(
  rng: lt.Rng,
  ph: Phonology,
  probe: Sequence[str],
  members_changes: Sequence[tuple[SoundChange, ...]],
) -> tuple[SoundChange, ...]:
  """One to three sound changes that alter enough of the probe words.

  A daughter must differ audibly from its proto-language and its sisters:
  changes are added until at least a quarter of the probe words change and
  the list differs from every sister's.
  """
  chosen: list[SoundChange] = []
  want = 1 + rng.below(3)
  for kind in rng.shuffled(_SOUND_CHANGE_KINDS):
    changed = sum(apply_changes(chosen, w) != w for w in probe) / len(probe)
    if len(chosen) >= want and changed >= 0.25:
      if tuple(chosen) not in members_changes:
        break
    change = _sound_change(kind, rng, ph)
    if change is not None:
      chosen.append(change)
  return tuple(chosen)


def make_family(
  seed: int = 0, num_languages: int = 8, num_groups: int | None = None
) -> Family:
  """Builds a family of related and unrelated synthetic languages.

  Args:
    seed: everything derives from it; the same seed gives the same family.
    num_languages: how many languages, 2 to 26.
    num_groups: how many groups of related languages (default: one per three
      languages, at least two). Groups get distinct word orders.

  Returns:
    The family. Codes are a group letter and a member number: "a1", "a2",
    "b1", ...; languages sharing a letter are close, others distant.

  Raises:
    BistilError: a bad seed or count.
  """
  num_groups = _check_family_args(seed, num_languages, num_groups)
  ontology = lt.make_ontology(seed)
  orders = _make_orders(seed, num_groups)
  names = [chr(ord("A") + i) for i in range(num_groups)]
  used_segments: dict[str, int] = {}
  # In group order: each group's phonology prefers the segments earlier
  # groups used least (used_segments), so the order is part of the draw.
  drafts = [
    _draft_group(seed, g, names[g], size, orders[g], used_segments)
    for g, size in enumerate(_group_sizes(num_languages, num_groups))
  ]
  daughters = [d for draft in drafts for d in draft.daughters]
  lexicons = _build_lexicons(
    seed,
    {d.code: d.group for d in daughters},
    [draft.group.phonology for draft in drafts],
    {d.code: d.changes for d in daughters},
    {d.code: d.morphology for d in daughters},
    {d.code: d.order for d in daughters},
    ontology.sizes,
  )
  languages = tuple(
    Language(
      d.code,
      names[d.group],
      d.order,
      d.morphology,
      d.changes,
      lexicons[d.code],
    )
    for d in daughters
  )
  groups = tuple(draft.group for draft in drafts)
  return Family(seed, ontology, groups, languages)


def _check_family_args(seed: Any, num_languages: Any, num_groups: Any) -> int:
  """make_family's arguments checked; the number of groups to make.

  Raises:
    BistilError: a bad seed or count.
  """
  if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
    raise BistilError(f"seed must be a non-negative integer, got {seed!r}")
  if (
    isinstance(num_languages, bool)
    or not isinstance(num_languages, int)
    or not 2 <= num_languages <= MAX_LANGUAGES
  ):
    raise BistilError(
      f"num_languages must be an integer from 2 to {MAX_LANGUAGES}, got "
      f"{num_languages!r}"
    )
  if num_groups is None:
    num_groups = max(2, -(-num_languages // 3))
  if (
    isinstance(num_groups, bool)
    or not isinstance(num_groups, int)
    or not 1 <= num_groups <= num_languages
  ):
    raise BistilError(
      f"num_groups must be an integer from 1 to num_languages "
      f"({num_languages}), got {num_groups!r}"
    )
  return num_groups


@dataclasses.dataclass(frozen=True)
class _Daughter:
  """One member language before its lexicon is drawn."""

  code: str
  group: int
  order: WordOrder
  morphology: Morphology
  changes: tuple[SoundChange, ...]


@dataclasses.dataclass(frozen=True)
class _GroupDraft:
  """A group and its members, before the family-wide lexicon draw."""

  group: Group
  daughters: tuple[_Daughter, ...]


def _draft_group(
  seed: int,
  g: int,
  name: str,
  size: int,
  order: WordOrder,
  used_segments: dict[str, int],
) -> _GroupDraft:
  """Group `g`: proto phonology and morphology, and each member's changes.

  Args:
    seed: the family's seed.
    g: the group's index.
    name: its letter ("A", ...); member codes are "a1", "a2", ...
    size: how many member languages.
    order: the group's word order (every member keeps it).
    used_segments: segment -> uses by earlier groups; updated in place.

  Returns:
    The group and its members, in code order.
  """
  # One stream per group, drawn in this order: phonology, proto
  # morphology, then the probe words the sound changes are judged on.
  rng = lt.Rng(seed, "group", g)
  ph = _make_phonology(rng, used_segments)
  proto_morph = _make_morphology(rng, ph, order)
  codes = [f"{name.lower()}{i + 1}" for i in range(size)]
  probe = [ph.word(rng, _syllables(rng, "nouns")) for _ in range(200)]
  daughters: list[_Daughter] = []
  for code in codes:
    chosen = _choose_changes(
      lt.Rng(seed, "sound-changes", code),
      ph,
      probe,
      members_changes=[d.changes for d in daughters],
    )
    daughters.append(
      _Daughter(
        code, g, order, _daughter_morphology(proto_morph, chosen), chosen
      )
    )
  group = Group(name, ph, order, proto_morph, tuple(codes))
  return _GroupDraft(group, tuple(daughters))
