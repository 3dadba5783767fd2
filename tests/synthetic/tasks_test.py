"""Task items: NLI semantics and balance, split disjointness, formats."""

import collections
import functools

from absl.testing import absltest, parameterized

from bistil_jax.synthetic import latent, tasks
from bistil_jax.synthetic.languages import make_family

SIZES = {"train": 300, "dev": 60, "test": 90}


@functools.cache
def _data(seed, train=SIZES["train"]):
  family = make_family(seed=seed, num_languages=4)
  return family, tasks.make_task_data(family, {**SIZES, "train": train})


class NliTest(parameterized.TestCase):
  @parameterized.parameters(0, 1)
  def test_labels_balanced(self, seed):
    _, data = _data(seed)
    for split, n in SIZES.items():
      counts = collections.Counter(item.label for item in data.nli[split])
      self.assertEqual(set(counts), set(tasks.NLI_LABELS))
      self.assertLessEqual(max(counts.values()) - min(counts.values()), 1)
      self.assertEqual(sum(counts.values()), n)

  @parameterized.parameters(0, 1)
  def test_labels_follow_from_latent_structure(self, seed):
    _, data = _data(seed)
    for split in SIZES:
      for item in data.nli[split]:
        p, h = item.premise, item.hypothesis
        self.assertNotEqual(p, h)
        entailed = tasks.entails(p, h)
        contradicted = tasks.contradicts(p, h)
        if item.label == "entailment":
          self.assertTrue(entailed, item)
        elif item.label == "contradiction":
          self.assertTrue(contradicted and not entailed, item)
        else:
          self.assertFalse(entailed or contradicted, item)

  def test_relations_on_hand_built_examples(self):
    dog = latent.NounNP(5, False, latent.DEF, (), 0)
    red_dog = dog._replace(adjectives=(3,))
    cat = dog._replace(noun=6)
    john = latent.NameNP(0)

    def sent(*clauses):
      return latent.Sentence(
        tuple(clauses), latent.AND if len(clauses) > 1 else -1
      )

    def cl(obj, negated=False, pps=()):
      return latent.Clause(john, 7, 1, negated, obj, pps)

    park = latent.PP(0, latent.NameNP(90))
    self.assertTrue(
      tasks.entails(sent(cl(red_dog, pps=(park,))), sent(cl(dog)))
    )
    self.assertFalse(tasks.entails(sent(cl(dog)), sent(cl(red_dog))))
    self.assertFalse(tasks.entails(sent(cl(dog)), sent(cl(dog, pps=(park,)))))
    # Under negation, dropping a modifier is not entailed.
    self.assertFalse(
      tasks.entails(sent(cl(red_dog, True)), sent(cl(dog, True)))
    )
    self.assertTrue(tasks.contradicts(sent(cl(red_dog)), sent(cl(dog, True))))
    self.assertTrue(tasks.contradicts(sent(cl(dog, True)), sent(cl(dog))))
    self.assertFalse(tasks.contradicts(sent(cl(dog, True)), sent(cl(red_dog))))
    self.assertTrue(tasks.contradicts(sent(cl(dog)), sent(cl(cat))))
    self.assertFalse(
      tasks.contradicts(sent(cl(dog, True)), sent(cl(cat, True)))
    )

  def test_every_operation_occurs(self):
    _, data = _data(0)
    kinds = collections.Counter()
    for item in data.nli["train"]:
      p, h = item.premise, item.hypothesis
      flipped = any(
        c.negated != d.negated and c.verb == d.verb
        for c in p.clauses
        for d in h.clauses
      )
      same_verb = {c.verb for c in h.clauses} <= {c.verb for c in p.clauses}
      if item.label == "contradiction":
        kinds["contradiction/" + ("polarity" if flipped else "object")] += 1
      elif item.label == "neutral":
        if len(h.clauses) == 2:
          kinds["neutral/added fact"] += 1
        elif same_verb:
          kinds["neutral/added modifier"] += 1
        else:
          kinds["neutral/other predicate"] += 1
      else:
        kinds[
          "entailment/"
          + ("conjunct" if h.clauses[0] in p.clauses else "reduced")
        ] += 1
    self.assertLen(kinds, 7, kinds)
    self.assertGreater(min(kinds.values()), 5, kinds)

  def test_entailed_hypothesis_words_come_from_premise(self):
    family, data = _data(0)
    checked = 0
    for item in data.nli["train"]:
      if item.label != "entailment":
        continue
      for code in family.codes:
        premise = collections.Counter(
          t.form for t in family.realize(item.premise, code)
        )
        hypothesis = collections.Counter(
          t.form for t in family.realize(item.hypothesis, code)
        )
        self.assertEqual(hypothesis - premise, collections.Counter(), code)
        checked += 1
    self.assertGreater(checked, 100)


class SplitTest(parameterized.TestCase):
  @parameterized.parameters(0, 1)
  def test_no_latent_overlap_between_splits(self, seed):
    _, data = _data(seed)
    train, dev, test = (data.sentences(s) for s in ("train", "dev", "test"))
    self.assertEmpty(test & train)
    self.assertEmpty(test & dev)
    self.assertEmpty(dev & train)
    # The measurement can see overlap: sentences repeat within train.
    self.assertLess(len(set(data.tagging["train"])), SIZES["train"] + 1)

  def test_exclusion_with_a_tiny_grammar(self):
    # A grammar with 40 sentences makes overlap certain without exclusion.
    family = make_family(seed=0, num_languages=2)
    sampler = family.sampler
    rng = latent.Rng(0, "pool")
    pool = [sampler.sentence(rng, nli=True) for _ in range(40)]
    real = sampler.sentence
    sampler.sentence = lambda r, nli=False: r.choice(pool)
    try:
      data = tasks.make_task_data(family, {"train": 60, "dev": 8, "test": 8})
    finally:
      sampler.sentence = real
    train, dev, test = (data.sentences(s) for s in ("train", "dev", "test"))
    self.assertEmpty(test & train)
    self.assertEmpty(test & dev)
    self.assertEmpty(dev & train)
    self.assertLen(data.tagging["train"], 60)

  def test_test_split_independent_of_train_size(self):
    _, small = _data(0)
    _, large = _data(0, train=900)
    self.assertEqual(small.tagging["test"], large.tagging["test"])
    self.assertEqual(small.nli["test"], large.nli["test"])
    # Train is one stream: a larger train set extends the smaller one.
    self.assertEqual(small.tagging["train"], large.tagging["train"][:300])

  def test_corpus_excludes_held_out_sentences(self):
    family, data = _data(0)
    held_out = data.sentences("dev") | data.sentences("test")
    texts = {family.text(s, "a1") for s in held_out}
    lines = tasks.corpus_sentences(family, "a1", 2000, "train", held_out)
    self.assertLen(lines, 2000)
    self.assertEmpty(texts & set(lines))
    # Without the exclusion short held-out sentences do occur.
    lines = tasks.corpus_sentences(family, "a1", 2000, "train")
    self.assertNotEmpty(texts & set(lines))


class FormatTest(absltest.TestCase):
  def test_conllu_and_iob2_blocks(self):
    family = make_family(seed=0, num_languages=2)
    sentence = latent.Sentence(
      (
        latent.Clause(
          latent.NameNP(0),
          0,
          0,
          True,
          None,
          (latent.PP(7, latent.YearNP(1999)),),
        ),
      ),
      -1,
    )
    tokens = family.realize(sentence, "a1")
    block = tasks.conllu_block(tokens, "x-1")
    lines = block.rstrip("\n").split("\n")
    self.assertEqual(lines[0], "# sent_id = x-1")
    self.assertTrue(lines[1].startswith("# text = "))
    rows = [line.split("\t") for line in lines[2:]]
    self.assertLen(rows, len(tokens))
    for i, row in enumerate(rows, 1):
      self.assertLen(row, 10)
      self.assertEqual(row[0], str(i))
    self.assertEqual([r[7] for r in rows].count("root"), 1)
    self.assertEqual(rows[-1][1:4], [".", ".", "PUNCT"])
    self.assertEqual(rows[-2][9], "SpaceAfter=No")
    self.assertIn("1999", [r[1] for r in rows])
    self.assertTrue(block.endswith("\n\n"))
    iob = tasks.iob2_block(tokens).rstrip("\n").split("\n")
    self.assertEqual(
      [line.split("\t")[0] for line in iob], [t.form for t in tokens]
    )
    self.assertIn(
      "B-" + family.ontology.entities[0].type, tasks.iob2_block(tokens)
    )


if __name__ == "__main__":
  absltest.main()
