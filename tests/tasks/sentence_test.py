"""Single-text classification (tasks/sentence.py), the kind added by
following docs/adding-a-task.md: reading, labels, encoding, metrics, and
the whole path from the CLI (finetune, sft against the finetuned teacher,
evaluate, export-hf) into transformers' AutoModelForSequenceClassification.
"""

import json
import os
import random
import tempfile

import numpy as np
import torch
import transformers
from absl.testing import absltest

from bistil_jax import tasks
from bistil_jax.checkpoint import hf
from bistil_jax.data import vocab
from bistil_jax.errors import BistilError
from bistil_jax.tasks import sentence
from tests import fixtures
from tests.data.vocab_test import make_lines, make_wordpiece_dir
from tests.train.task_test import FINETUNE_CONFIG, SFT_CONFIG, must_run

POSITIVE, NEGATIVE = "gapu", "kugu"  # words of make_lines("aa") lexicon


def sentiment_rows(n: int, seed: int) -> list[dict]:
  """Texts of the fixture language whose label is which marker word they
  hold (learnable by a bag of words)."""
  rng = random.Random(seed)
  rows = []
  for line in make_lines("aa", n, seed):
    words = [w for w in line.split() if w not in (POSITIVE, NEGATIVE)]
    label = rng.choice(("negative", "positive"))
    marker = POSITIVE if label == "positive" else NEGATIVE
    words.insert(rng.randint(0, len(words)), marker)
    rows.append({"text": " ".join(words), "label": label})
  return rows


def write_jsonl(path: str, rows) -> str:
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return path


class ReadTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.dir = tmp.name
    self.task = tasks.get("sentiment")

  def write(self, name: str, text: str) -> str:
    path = os.path.join(self.dir, name)
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)
    return path

  def test_registry_maps_the_names_to_the_kind(self):
    for name in ("sentiment", "topic"):
      task = tasks.get(name)
      self.assertIsInstance(task, sentence.TextClassificationTask)
      self.assertEqual(task.head, "sequence_classification")

  def test_jsonl_tsv_and_csv(self):
    want = [
      sentence.TextExample("so good", "positive"),
      sentence.TextExample("bad, really", "negative"),
    ]
    jsonl = self.write(
      "a.jsonl",
      '{"text": "so good", "label": "positive", "id": 1}\n\n'
      '{"text": "bad, really", "label": 0}\n',
    )
    self.assertEqual(self.task.read(jsonl), want)
    tsv = self.write(
      "a.tsv", "id\tsentence\tlabel\n1\tso good\t1\n2\tbad, really\tnegative\n"
    )
    self.assertEqual(self.task.read(tsv), want)
    csv_ = self.write(
      "a.csv", 'text,label\nso good,positive\n"bad, really",negative\n'
    )
    self.assertEqual(self.task.read(csv_), want)
    (ex,) = self.task.read(
      self.write("b.jsonl", '{"review": "meh", "stars": "mixed"}\n'),
      columns={"text": "review", "label": "stars"},
    )
    self.assertEqual((ex.text, ex.label), ("meh", "mixed"))

  def test_datasets_columns_and_class_names(self):
    path = write_jsonl(
      os.path.join(self.dir, "d.jsonl"),
      [{"text": "a b", "label": 1}, {"text": "c", "label": 0}],
    )
    examples = tasks.get("topic").read(
      f"json:{path}", label_names=("sports", "world")
    )
    self.assertEqual(
      [(e.text, e.label) for e in examples], [("a b", "world"), ("c", "sports")]
    )

  def test_bad_input_names_the_problem(self):
    cases = [
      ("a.jsonl", '{"body": "x", "label": "positive"}\n', "no text column"),
      ("b.jsonl", '{"text": 3, "label": "positive"}\n', r"b.jsonl:1: text is"),
      ("c.jsonl", '{"text": "x", "label": 5}\n', "label index 5 out of range"),
      ("d.txt", "x\n", "unknown extension '.txt'"),
      ("e.tsv", "text\tlabel\n", "holds no"),
    ]
    for name, text, error in cases:
      with self.subTest(name), self.assertRaisesRegex(BistilError, error):
        self.task.read(self.write(name, text))

  def test_labels_default_order_or_sorted(self):
    ex = [sentence.TextExample("x", "positive")]
    self.assertEqual(self.task.label_set(ex), ("negative", "positive"))
    # Outside the default set: the data's own labels, sorted.
    ex.append(sentence.TextExample("y", "neutral"))
    self.assertEqual(self.task.label_set(ex), ("neutral", "positive"))
    with self.assertRaisesRegex(
      BistilError, "unknown sentiment label 'neutral'"
    ):
      self.task.label_set(ex, given=["negative", "positive"])


class EncodeAndScoreTest(absltest.TestCase):
  def test_one_segment_truncated_to_max_len(self):
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    tok_dir = tmp.name
    make_wordpiece_dir(tok_dir)
    tok, _ = vocab.load_tokenizer_dir(tok_dir)
    long = " ".join(make_lines("aa", 40, 1))
    examples = [
      sentence.TextExample("gapu kugu", "positive"),
      sentence.TextExample(long, "negative"),
    ]
    data = tasks.get("sentiment").encode(
      examples, tok, {"negative": 0, "positive": 1}, 16, train=True
    )
    self.assertEqual(data.input_ids.shape, (2, 16))
    np.testing.assert_array_equal(data.labels, [1, 0])
    np.testing.assert_array_equal(data.token_type_ids, 0)  # one segment
    self.assertEqual(data.num_truncated, 1)
    self.assertEqual(data.attention_mask[1].sum(), 16)
    single = tok.encode("gapu kugu").ids
    np.testing.assert_array_equal(data.input_ids[0, : len(single)], single)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    self.assertEqual((data.input_ids[1, 0], data.input_ids[1, 15]), (cls, sep))

  def test_macro_f1_by_hand(self):
    gold = np.array([0, 0, 0, 1, 2])
    pred = np.array([0, 0, 1, 1, 1])
    # F1: label 0 = 2*2/(4+1) = 0.8; 1 = 2*1/(2+2) = 0.5; 2 = 0.
    out = tasks.get("topic").score(pred, gold, ("a", "b", "c"))
    self.assertAlmostEqual(out["macro_f1"], (0.8 + 0.5 + 0.0) / 3)
    self.assertAlmostEqual(out["accuracy"], 3 / 5)
    self.assertEqual(out["num_examples"], 5)
    self.assertEqual(sentence.macro_f1(np.array([1]), np.array([1])), 1.0)
    with self.assertRaisesRegex(ValueError, "differ in shape"):
      tasks.get("topic").score(pred[:2], gold, ())


class PipelineTest(absltest.TestCase):
  """finetune (the teacher) -> sft (the student against it) -> evaluate ->
  export-hf -> transformers, with no code outside the kind's module."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.TemporaryDirectory()
    root = cls.root = cls._tmp.name
    cls.model = fixtures.make_teacher_dir(root, layers=2)
    cls.train = write_jsonl(f"{root}/train.jsonl", sentiment_rows(160, 0))
    cls.dev = write_jsonl(f"{root}/dev.jsonl", sentiment_rows(64, 1))
    cls.teacher_wd = os.path.join(root, "task_teacher")
    must_run(
      [
        "finetune",
        "--config",
        f"{FINETUNE_CONFIG}:sentiment,variant=tiny",
        "--workdir",
        cls.teacher_wd,
        f"--config.student.model={cls.model}",
        f"--config.data.train={cls.train}",
        f"--config.eval.sets=dev={cls.dev}",
        "--config.train.epochs=4",
      ]
    )
    cls.teacher = os.path.join(cls.teacher_wd, "export")
    cls.sft_wd = os.path.join(root, "sft")
    must_run(
      [
        "sft",
        "--config",
        f"{SFT_CONFIG}:sentiment,variant=tiny",
        "--workdir",
        cls.sft_wd,
        f"--config.student.model={cls.model}",
        f"--config.teacher.model={cls.teacher}",
        f"--config.data.train={cls.train}",
        f"--config.eval.sets=dev={cls.dev}",
        "--config.train.epochs=4",
        "--config.sparse.epochs=6",
      ]
    )

  @classmethod
  def tearDownClass(cls):
    cls._tmp.cleanup()
    super().tearDownClass()

  def results(self, wd):
    with open(os.path.join(wd, "results.json")) as f:
      return json.load(f)

  def test_teacher_learns_and_student_follows(self):
    teacher = self.results(self.teacher_wd)
    self.assertEqual(teacher["labels"], ["negative", "positive"])
    self.assertEqual(
      set(teacher["dev"]), {"accuracy", "macro_f1", "num_examples"}
    )
    self.assertGreater(teacher["dev"]["accuracy"], 0.9)
    student = self.results(self.sft_wd)
    self.assertEqual(student["phase"], "sft")
    self.assertGreater(student["dev"]["accuracy"], 0.8)

  def test_evaluate_reproduces_results_and_export_loads_in_transformers(self):
    export = os.path.join(self.sft_wd, "export")
    ev = os.path.join(self.root, "ev.json")
    out = must_run(
      [
        "evaluate",
        "--model",
        self.model,
        "--sft",
        export,
        "--task",
        "sentiment",
        "--data",
        f"dev={self.dev}",
        "--out",
        ev,
      ]
    )
    self.assertRegex(out, r"split +accuracy +macro_f1 +texts")
    with open(ev) as f:
      self.assertEqual(json.load(f)["dev"], self.results(self.sft_wd)["dev"])
    merged = os.path.join(self.root, "merged")
    must_run(
      ["export-hf", "--model", self.model, "--sft", export, "--out", merged]
    )
    pt = transformers.AutoModelForSequenceClassification.from_pretrained(merged)
    pt.eval()
    self.assertEqual(pt.config.id2label, {0: "negative", 1: "positive"})
    model, params = hf.load_hf(merged)
    tok, _ = vocab.load_tokenizer_dir(merged)
    examples = tasks.get("sentiment").read(self.dev)[:8]
    data = tasks.get("sentiment").encode(
      examples, tok, {"negative": 0, "positive": 1}, 64, train=False
    )
    ours = model.apply(
      {"params": params},
      data.input_ids,
      attention_mask=data.attention_mask,
      token_type_ids=data.token_type_ids,
    ).logits
    with torch.no_grad():
      ref = pt(
        input_ids=torch.tensor(data.input_ids, dtype=torch.long),
        attention_mask=torch.tensor(data.attention_mask, dtype=torch.long),
        token_type_ids=torch.tensor(data.token_type_ids, dtype=torch.long),
      ).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4)


if __name__ == "__main__":
  absltest.main()
