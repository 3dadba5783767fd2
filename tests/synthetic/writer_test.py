"""write_dataset: layout, well-formed files, determinism, bad input."""

import collections
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

from absl.testing import absltest, parameterized

from bistil_jax.errors import BistilError
from bistil_jax.synthetic import tasks, writer
from bistil_jax.synthetic.languages import load_family, make_family

LANGS = ["a1", "a2", "b1", "c1"]
SIZES = writer.Sizes(
  corpus_train=300, corpus_dev=40, task_train=120, task_dev=30, task_test=45
)
_FEATS = re.compile(
  r"^(_|[A-Z][A-Za-z]*=[A-Za-z0-9]+(\|[A-Z][A-Za-z]*=[A-Za-z0-9]+)*)$"
)


def read_conllu(path):
  """Sentences as (comments, rows); checks the blank-line separation."""
  text = pathlib.Path(path).read_text(encoding="utf-8")
  assert text.endswith("\n\n"), path
  sentences = []
  for block in text.rstrip("\n").split("\n\n"):
    lines = block.split("\n")
    comments = [line for line in lines if line.startswith("#")]
    rows = [line.split("\t") for line in lines if not line.startswith("#")]
    sentences.append((comments, rows))
  return sentences


def read_iob2(path):
  text = pathlib.Path(path).read_text(encoding="utf-8")
  assert text.endswith("\n\n"), path
  return [
    [line.split("\t") for line in block.split("\n")]
    for block in text.rstrip("\n").split("\n\n")
  ]


def read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def all_bytes(root):
  root = pathlib.Path(root)
  return {
    str(p.relative_to(root)): p.read_bytes()
    for p in sorted(root.rglob("*"))
    if p.is_file()
  }


class WrittenDatasetTest(parameterized.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.family = make_family(seed=0, num_languages=8)
    cls.root = os.path.join(cls.tmp.name, "data")
    cls.paths = writer.write_dataset(cls.root, cls.family, LANGS, SIZES)

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def test_layout_and_manifest(self):
    for path in self.paths.files():
      self.assertTrue(path.is_file(), path)
    self.assertEqual(
      self.paths.corpora["a1"]["train"],
      pathlib.Path(self.root, "corpora/a1.txt"),
    )
    self.assertEqual(sorted(self.paths.pos), sorted(LANGS))
    self.assertEqual(writer.read_dataset(self.root), self.paths)
    manifest = json.loads(self.paths.manifest.read_text())
    self.assertEqual(manifest["languages"], LANGS)
    self.assertEqual(
      manifest["transfer"], {"source": "a1", "close": "a2", "distant": "b1"}
    )
    self.assertEqual(manifest["sizes"]["task_test"], 45)
    self.assertEqual(load_family(self.paths.family), self.family)
    self.assertIn("Close pairs", self.paths.description.read_text())
    # Only the chosen languages are written.
    self.assertFalse(os.path.exists(os.path.join(self.root, "corpora/b2.txt")))

  def test_corpora(self):
    for code in LANGS:
      for split, n in (("train", 300), ("dev", 40)):
        lines = self.paths.corpora[code][split].read_text().split("\n")
        self.assertEqual(lines[-1], "")
        self.assertLen(lines[:-1], n)
        for line in lines[:-1]:
          self.assertRegex(line, r"^\S.*[.]$")

  @parameterized.parameters(*LANGS)
  def test_conllu_well_formed(self, code):
    for split, n in SIZES.task().items():
      sentences = read_conllu(self.paths.pos[code][split])
      self.assertLen(sentences, n)
      for i, (comments, rows) in enumerate(sentences):
        self.assertEqual(comments[0], f"# sent_id = {split}-{i}")
        self.assertTrue(comments[1].startswith("# text = "))
        n_tok = len(rows)
        text = ""
        roots = 0
        for j, row in enumerate(rows, 1):
          self.assertLen(row, 10, row)
          idx, form, lemma, upos, xpos, feats, head, deprel, deps, misc = row
          self.assertEqual(idx, str(j))
          self.assertRegex(form, r"^\S+$")
          self.assertNotEqual(lemma, "")
          self.assertIn(upos, tasks.UPOS_TAGS)
          self.assertIn(deprel, tasks.DEPRELS)
          self.assertRegex(feats, _FEATS)
          self.assertEqual((xpos, deps), ("_", "_"))
          self.assertIn(misc, ("_", "SpaceAfter=No"))
          self.assertBetween(int(head), 0, n_tok)
          self.assertNotEqual(int(head), j)
          self.assertEqual(int(head) == 0, deprel == "root")
          roots += int(head) == 0
          text += form + ("" if misc == "SpaceAfter=No" or j == n_tok else " ")
        self.assertEqual(roots, 1)
        self.assertEqual(comments[1], f"# text = {text}")
        # Heads form a tree: every chain reaches the root without a cycle.
        heads = [int(r[6]) for r in rows]
        for j in range(1, n_tok + 1):
          seen, k = set(), j
          while k:
            self.assertNotIn(k, seen)
            seen.add(k)
            k = heads[k - 1]

  @parameterized.parameters(*LANGS)
  def test_iob2_well_formed_and_aligned_with_pos(self, code):
    for split, n in SIZES.task().items():
      ner = read_iob2(self.paths.ner[code][split])
      pos = read_conllu(self.paths.pos[code][split])
      self.assertLen(ner, n)
      entities = 0
      for sentence, (_, rows) in zip(ner, pos, strict=True):
        self.assertEqual([r[1] for r in rows], [t[0] for t in sentence])
        previous = "O"
        for columns, row in zip(sentence, rows, strict=True):
          self.assertLen(columns, 2)
          token, tag = columns
          self.assertNotEqual(token, "-DOCSTART-")
          self.assertIn(tag, tasks.NER_TAGS)
          if tag.startswith("I-"):
            self.assertIn(previous, ("B-" + tag[2:], tag), sentence)
          # Entities are exactly the proper names.
          self.assertEqual(tag != "O", row[3] == "PROPN")
          entities += tag.startswith("B-")
          previous = tag
      self.assertGreater(entities, n // 4)

  @parameterized.parameters(*LANGS)
  def test_nli_well_formed_and_balanced(self, code):
    for split, n in SIZES.task().items():
      items = read_jsonl(self.paths.nli[code][split])
      self.assertLen(items, n)
      for i, item in enumerate(items):
        self.assertEqual(set(item), {"id", "premise", "hypothesis", "label"})
        self.assertEqual(item["id"], f"{split}-{i}")
        self.assertIn(item["label"], tasks.NLI_LABELS)
        self.assertNotEqual(item["premise"], item["hypothesis"])
      counts = collections.Counter(item["label"] for item in items)
      self.assertLessEqual(max(counts.values()) - min(counts.values()), 1)
      self.assertLen(counts, 3)

  def test_tasks_aligned_across_languages(self):
    for split in ("dev", "test"):
      labels = {
        code: [
          (x["id"], x["label"]) for x in read_jsonl(self.paths.nli[code][split])
        ]
        for code in LANGS
      }
      ner = {
        code: [
          sorted(tag for _, tag in s)
          for s in read_iob2(self.paths.ner[code][split])
        ]
        for code in LANGS
      }
      for code in LANGS[1:]:
        self.assertEqual(labels[code], labels["a1"])
        self.assertEqual(ner[code], ner["a1"])

  @parameterized.parameters(*LANGS)
  def test_no_test_text_in_train(self, code):
    def texts(split):
      pos = {c[1] for c, _ in read_conllu(self.paths.pos[code][split])}
      for item in read_jsonl(self.paths.nli[code][split]):
        pos.add("# text = " + item["premise"])
        pos.add("# text = " + item["hypothesis"])
      return pos

    train, dev, test = texts("train"), texts("dev"), texts("test")
    self.assertEmpty(test & train)
    self.assertEmpty(test & dev)
    self.assertEmpty(dev & train)
    corpus = {
      "# text = " + line
      for line in self.paths.corpora[code]["train"].read_text().splitlines()
    }
    self.assertEmpty(test & corpus)

  def test_same_seed_same_bytes_other_seed_differs(self):
    with tempfile.TemporaryDirectory() as tmp:
      again = os.path.join(tmp, "again")
      writer.write_dataset(
        again, make_family(seed=0, num_languages=8), LANGS, SIZES
      )
      self.assertEqual(all_bytes(again), all_bytes(self.root))
      other = os.path.join(tmp, "other")
      writer.write_dataset(
        other, make_family(seed=1, num_languages=8), LANGS, SIZES
      )
      a, b = all_bytes(other), all_bytes(self.root)
      self.assertEqual(sorted(a), sorted(b))
      for name in (
        "corpora/a1.txt",
        "pos/b1/test.conllu",
        "nli/c1/train.jsonl",
      ):
        self.assertNotEqual(a[name], b[name], name)

  def test_bytes_independent_of_python_hash_seed(self):
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "sub")
      code = (
        "from bistil_jax.synthetic import make_family, write_dataset, Sizes;"
        f"write_dataset({out!r}, make_family(0, 8), {LANGS!r}, Sizes("
        "corpus_train=300, corpus_dev=40, task_train=120, task_dev=30,"
        " task_test=45))"
      )
      env = dict(os.environ, PYTHONHASHSEED="12345")
      subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        env=env,
        cwd=pathlib.Path(__file__).resolve().parents[2],
      )
      self.assertEqual(all_bytes(out), all_bytes(self.root))


class BadInputTest(parameterized.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.family = make_family(seed=0, num_languages=3)

  def setUp(self):
    super().setUp()
    # Not create_tempdir(): absl flags are unparsed under pytest.
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.tmp = tmp.name

  def write(self, out, **kwargs):
    kwargs.setdefault(
      "sizes",
      dict(corpus_train=5, corpus_dev=2, task_train=6, task_dev=3, task_test=3),
    )
    return writer.write_dataset(out, self.family, **kwargs)

  def test_non_empty_dir_refused_then_overwritten(self):
    out = os.path.join(self.tmp, "d")
    os.makedirs(out)
    with open(os.path.join(out, "keep.txt"), "w") as f:
      f.write("mine")
    with self.assertRaisesRegex(BistilError, "not empty.*overwrite"):
      self.write(out)
    self.assertEqual(os.listdir(out), ["keep.txt"])
    self.write(out, overwrite=True, languages=["a1", "a2", "b1"])
    before = all_bytes(out)
    with self.assertRaisesRegex(BistilError, "not empty"):
      self.write(out, languages=["a1"])
    self.assertEqual(all_bytes(out), before)
    # Overwriting replaces the dataset: b1 goes, the user's file stays.
    self.write(out, overwrite=True, languages=["a1"])
    self.assertFalse(os.path.exists(os.path.join(out, "corpora", "b1.txt")))
    self.assertTrue(os.path.exists(os.path.join(out, "corpora", "a1.txt")))
    self.assertEqual(pathlib.Path(out, "keep.txt").read_text(), "mine")

  def test_empty_existing_dir_is_fine(self):
    out = os.path.join(self.tmp, "empty")
    os.makedirs(out)
    self.assertTrue(self.write(out).manifest.is_file())

  @parameterized.parameters(
    dict(languages=["zz"], match="unknown synthetic language 'zz'"),
    dict(languages=[], match="languages is empty"),
    dict(languages="a1", match="list of codes"),
    dict(languages=["a1", "a1"], match="listed twice: a1"),
    dict(sizes=dict(task_test=0), match="task_test must be a positive"),
    dict(sizes=dict(corpus_train=-3), match="corpus_train"),
    dict(sizes=dict(corpus_train=2.5), match="corpus_train"),
    dict(sizes=dict(task_dev=True), match="task_dev"),
    dict(sizes=dict(nope=3), match="unknown size key"),
    dict(sizes=[1, 2], match="sizes must be"),
  )
  def test_rejected_before_writing(self, match, **kwargs):
    out = os.path.join(self.tmp, "out")
    with self.assertRaisesRegex(BistilError, match):
      writer.write_dataset(out, self.family, **kwargs)
    self.assertFalse(os.path.exists(out))

  def test_out_is_a_file(self):
    out = os.path.join(self.tmp, "file")
    with open(out, "w") as f:
      f.write("x")
    with self.assertRaisesRegex(BistilError, "not a directory"):
      self.write(out)

  def test_not_a_family(self):
    with self.assertRaisesRegex(BistilError, "Family"):
      writer.write_dataset(self.tmp, {"seed": 0})

  def test_read_dataset_errors(self):
    with self.assertRaisesRegex(BistilError, "missing manifest.json"):
      writer.read_dataset(self.tmp)
    pathlib.Path(self.tmp, "manifest.json").write_text("[]")
    with self.assertRaisesRegex(BistilError, "not a synthetic dataset"):
      writer.read_dataset(self.tmp)


if __name__ == "__main__":
  absltest.main()
