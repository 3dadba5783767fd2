"""Synthetic extractive QA: valid SQuAD v1.1, exact offsets, answers that
need the context, one latent structure across languages, determinism."""

import argparse
import contextlib
import io
import json
import os
import pathlib
import tempfile

from absl.testing import absltest

from bistil_jax.synthetic import cli, qa, read_dataset, writer
from bistil_jax.synthetic.languages import make_family

LANGS = ["a1", "a2", "b1"]
SIZES = writer.Sizes(
  corpus_train=30, corpus_dev=5, task_train=60, task_dev=20, task_test=20
)


def load(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def questions(doc):
  """[(context, qa)] of a SQuAD document."""
  return [
    (p["context"], q)
    for article in doc["data"]
    for p in article["paragraphs"]
    for q in p["qas"]
  ]


def all_bytes(root):
  root = pathlib.Path(root)
  return {
    str(p.relative_to(root)): p.read_bytes()
    for p in sorted(root.rglob("*"))
    if p.is_file()
  }


def _words(text, offset=0):
  """(word, start, end) of each space-separated word, final punctuation
  cut off."""
  out, pos = [], offset
  for w in text.split(" "):
    core = w.rstrip(".?,")
    out.append((core, pos, pos + len(core)))
    pos += len(w) + 1
  return out


def read_answer(context, question, wh):
  """A rule reader of the generator's grammar, on the surface only: the
  question is the question word `wh`, the asked noun, then the rest of one
  story sentence. Returns [(start, end)] (character offsets in `context`)
  of each story sentence that holds the asked noun and every other word of
  the question."""
  q = [w for w, _, _ in _words(question)]
  if q[0] != wh:
    return []
  noun, rest = q[1], q[2:]
  found, pos = [], 0
  for sentence in context.split(". "):
    words = _words(sentence, pos)
    pos += len(sentence) + 2
    forms = [w for w, _, _ in words]
    if noun in forms and all(w in forms for w in rest):
      found.append((words[0][1], words[-1][2]))
  return found


class QaTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.TemporaryDirectory()
    cls.family = make_family(seed=0, num_languages=6)
    cls.out = os.path.join(cls._tmp.name, "qa_on")
    writer.write_dataset(cls.out, cls.family, LANGS, SIZES, qa=True)
    cls.data = read_dataset(cls.out)

  @classmethod
  def tearDownClass(cls):
    cls._tmp.cleanup()
    super().tearDownClass()

  def test_files_are_squad_v11_with_exact_offsets(self):
    self.assertEqual(sorted(self.data.qa), sorted(LANGS))
    for lang in LANGS:
      for split, n in SIZES.task().items():
        doc = load(self.data.qa[lang][split])
        self.assertEqual(set(doc), {"version", "data"})
        self.assertEqual(doc["version"], "1.1")
        for article in doc["data"]:
          self.assertEqual(set(article), {"title", "paragraphs"})
          self.assertIsInstance(article["title"], str)
          for p in article["paragraphs"]:
            self.assertEqual(set(p), {"context", "qas"})
            for q in p["qas"]:
              self.assertEqual(set(q), {"id", "question", "answers"})
              self.assertTrue(q["question"].endswith("?"))
              for a in q["answers"]:
                self.assertEqual(set(a), {"text", "answer_start"})
                self.assertIsInstance(a["answer_start"], int)
        pairs = questions(doc)
        self.assertLen(pairs, n)
        for context, q in pairs:
          for a in q["answers"]:
            start = a["answer_start"]
            self.assertTrue(a["text"])
            self.assertEqual(context[start : start + len(a["text"])], a["text"])
            # The question names the noun, never the whole answer.
            self.assertNotIn(a["text"], q["question"])

  def test_answers_need_the_context(self):
    items = qa.make_qa_items(self.family, SIZES.task())
    for split, n in SIZES.task().items():
      self.assertLen(items[split], n)
      for item in items[split]:
        t = item.clauses[item.target]
        self.assertTrue(qa.is_unique(item))
        known = t.obj if item.slot == "subject" else t.subject
        asked = item.answer_np
        self.assertEqual((asked.kind, asked.det >= 0), ("noun", True))
        nouns = [
          np.noun
          for c in item.clauses
          for np in (c.subject, c.obj, *(pp.np for pp in c.pps))
          if np.kind == "noun"
        ]
        self.assertEqual(nouns.count(asked.noun), 1)

        def known_of(c, slot=item.slot):
          return c.obj if slot == "subject" else c.subject

        others = [c for i, c in enumerate(item.clauses) if i != item.target]
        # Distractors: the known argument in another relation, and the
        # relation with another argument.
        self.assertTrue(
          any(known_of(c) == known and c.verb != t.verb for c in others)
        )
        self.assertTrue(
          any(c.verb == t.verb and known_of(c) != known for c in others)
        )
    both = {i.slot for s in items.values() for i in s}
    self.assertEqual(both, {"subject", "object"})

  def test_a_surface_reader_finds_every_answer(self):
    # The labels agree with the surface: exactly one story sentence holds
    # the question's noun and its other words, and the answer is the
    # phrase of that sentence around the noun, so a model can learn to
    # read it off the text (issue 24).
    for lang in LANGS:
      wh = qa.question_word(self.family, lang)
      for split in SIZES.task():
        for context, q in questions(load(self.data.qa[lang][split])):
          a = q["answers"][0]
          start, end = a["answer_start"], a["answer_start"] + len(a["text"])
          found = read_answer(context, q["question"], wh)
          self.assertLen(found, 1, msg=(lang, q["id"]))
          lo, hi = found[0]
          self.assertTrue(lo <= start < end <= hi, msg=(lang, q["id"]))
          noun = _words(q["question"])[1][0]
          self.assertIn(noun, [w for w, _, _ in _words(a["text"])])
          story = [w for w, _, _ in _words(context)]
          self.assertEqual(story.count(noun), 1, msg=(lang, q["id"]))
    # It can fail: a story holding the answer's sentence twice has two
    # hits, and a question with a word the story lacks has none.
    context, q = questions(load(self.data.qa["b1"]["dev"]))[0]
    wh = qa.question_word(self.family, "b1")
    ((lo, hi),) = read_answer(context, q["question"], wh)
    twice = read_answer(context + " " + context[lo : hi + 1], q["question"], wh)
    self.assertLen(twice, 2)
    self.assertEmpty(read_answer(context, q["question"][:-1] + " Zzz?", wh))

  def test_the_same_structure_in_every_language(self):
    for split in SIZES.task():
      docs = {
        lang: questions(load(self.data.qa[lang][split])) for lang in LANGS
      }
      ids = [[q["id"] for _, q in docs[lang]] for lang in LANGS]
      self.assertEqual(ids[0], ids[1])
      self.assertEqual(ids[0], ids[2])
      for k in range(len(ids[0])):
        shape = set()
        names = set()
        for lang in LANGS:
          context, q = docs[lang][k]
          a = q["answers"][0]
          # (sentences in the story, the sentence holding the answer)
          shape.add(
            (context.count("."), context[: a["answer_start"]].count("."))
          )
          if a["text"][0].isupper():  # a proper name: shared by all
            names.add(a["text"])
        self.assertLen(shape, 1)
        self.assertLessEqual(len(names), 1)
    # Related languages share the question word's stem; distant ones not.
    wh = {lang: qa.question_word(self.family, lang) for lang in LANGS}
    self.assertNotEqual(wh["a1"], wh["b1"])

  def test_deterministic_and_other_outputs_unchanged(self):
    with tempfile.TemporaryDirectory() as tmp:
      again = os.path.join(tmp, "again")
      writer.write_dataset(again, self.family, LANGS, SIZES, qa=True)
      self.assertEqual(all_bytes(again), all_bytes(self.out))
      off = os.path.join(tmp, "off")
      paths = writer.write_dataset(off, self.family, LANGS, SIZES)
      self.assertEqual(paths.qa, {})
      self.assertEqual(read_dataset(off).qa, {})
      self.assertFalse(os.path.exists(os.path.join(off, "qa")))
      on = {k: v for k, v in all_bytes(self.out).items() if k[:3] != "qa/"}
      on.pop("manifest.json")
      off_files = all_bytes(off)
      off_files.pop("manifest.json")
      self.assertEqual(on, off_files)
      other = os.path.join(tmp, "seed1")
      writer.write_dataset(
        other, make_family(seed=1, num_languages=6), LANGS, SIZES, qa=True
      )
      self.assertNotEqual(
        all_bytes(other)["qa/a1/test.json"],
        all_bytes(self.out)["qa/a1/test.json"],
      )

  def test_cli_flag(self):
    parser = argparse.ArgumentParser(prog="bistil")
    cli.register(parser.add_subparsers(dest="command"))
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "synth")
      argv = [
        "synth", "--out", out, "--languages", "a1,a2", "--qa",
        "--corpus-sentences", "10", "--corpus-dev-sentences", "5",
        "--task-sentences", "7", "--task-eval-sentences", "4",
      ]  # fmt: skip
      args = parser.parse_args(argv)
      text = io.StringIO()
      with contextlib.redirect_stdout(text):
        self.assertEqual(args.func(args), 0)
      self.assertIn("QA (SQuAD v1.1): 7 train, 4 dev, 4 test", text.getvalue())
      doc = load(os.path.join(out, "qa", "a2", "dev.json"))
      self.assertLen(questions(doc), 4)
      self.assertFalse(parser.parse_args(["synth", "--out", "x"]).qa)


if __name__ == "__main__":
  absltest.main()
