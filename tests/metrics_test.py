"""Task metrics against hand-computed values."""

import numpy as np
from absl.testing import absltest, parameterized

from bistil_jax import metrics
from bistil_jax import tasks as tasks_lib
from bistil_jax.errors import BistilError

N = -100  # No label.


class NerSpansTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ("empty", [], set()),
    ("all_o", ["O", "O"], set()),
    (
      "iob2",
      ["B-PER", "I-PER", "O", "B-LOC"],
      {("PER", 0, 2), ("LOC", 3, 4)},
    ),
    ("i_without_b", ["O", "I-PER", "I-PER", "O"], {("PER", 1, 3)}),
    ("i_at_start", ["I-ORG"], {("ORG", 0, 1)}),
    (
      "type_change",
      ["B-PER", "I-LOC", "I-LOC"],
      {("PER", 0, 1), ("LOC", 1, 3)},
    ),
    (
      "type_change_and_back",
      ["B-PER", "I-LOC", "I-PER"],
      {("PER", 0, 1), ("LOC", 1, 2), ("PER", 2, 3)},
    ),
    ("b_after_b", ["B-PER", "B-PER"], {("PER", 0, 1), ("PER", 1, 2)}),
    ("b_after_i", ["I-PER", "B-PER", "I-PER"], {("PER", 0, 1), ("PER", 1, 3)}),
    ("o_ends", ["B-PER", "O", "I-PER"], {("PER", 0, 1), ("PER", 2, 3)}),
    ("multi_char_type", ["B-DATE", "I-DATE"], {("DATE", 0, 2)}),
  )
  def test_conlleval_rules(self, tags, expected):
    self.assertEqual(metrics.ner_spans(tags), expected)

  @parameterized.parameters("X", "B", "B-", "E-PER", "b-PER")
  def test_malformed_tag(self, tag):
    with self.assertRaisesRegex(ValueError, "malformed IOB tag"):
      metrics.ner_spans(["O", tag])


class NerF1Test(absltest.TestCase):
  def test_partial_span_is_wrong(self):
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    pred = [["B-PER", "O", "O", "B-LOC"]]
    r = metrics.ner_f1(pred, gold)
    self.assertAlmostEqual(r["precision"], 0.5)
    self.assertAlmostEqual(r["recall"], 0.5)
    self.assertAlmostEqual(r["f1"], 0.5)
    self.assertEqual(
      (r["num_pred"], r["num_gold"], r["num_correct"]), (2, 2, 1)
    )
    self.assertEqual(
      r["per_type"]["PER"],
      {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
    )
    self.assertEqual(
      r["per_type"]["LOC"],
      {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1},
    )

  def test_micro_average_over_sentences(self):
    gold = [["B-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "O", "O"]]
    pred = [["B-PER", "O", "O"], ["B-ORG", "O", "O", "B-LOC"]]
    r = metrics.ner_f1(pred, gold)
    # 1 correct of 3 predicted and 3 gold.
    self.assertAlmostEqual(r["precision"], 1 / 3)
    self.assertAlmostEqual(r["recall"], 1 / 3)
    self.assertAlmostEqual(r["f1"], 1 / 3)
    self.assertEqual(sorted(r["per_type"]), ["LOC", "ORG", "PER"])
    self.assertAlmostEqual(r["per_type"]["PER"]["f1"], 1.0)
    self.assertAlmostEqual(r["per_type"]["ORG"]["f1"], 0.0)

  def test_unequal_precision_and_recall(self):
    gold = [["B-PER", "O", "B-LOC", "O", "B-ORG"]]
    pred = [["B-PER", "O", "B-LOC", "O", "O"]]
    r = metrics.ner_f1(pred, gold)
    self.assertAlmostEqual(r["precision"], 1.0)
    self.assertAlmostEqual(r["recall"], 2 / 3)
    self.assertAlmostEqual(r["f1"], 0.8)

  def test_same_span_in_another_sentence_does_not_count(self):
    r = metrics.ner_f1([["B-PER"], ["O"]], [["O"], ["B-PER"]])
    self.assertEqual(r["num_correct"], 0)
    self.assertEqual(r["f1"], 0.0)

  def test_i_without_b_matches_b_in_gold(self):
    r = metrics.ner_f1([["O", "I-PER", "I-PER"]], [["O", "B-PER", "I-PER"]])
    self.assertEqual(r["f1"], 1.0)

  def test_type_change_splits_the_entity(self):
    r = metrics.ner_f1([["B-PER", "I-LOC"]], [["B-PER", "I-PER"]])
    self.assertEqual(
      (r["num_pred"], r["num_gold"], r["num_correct"]), (2, 1, 0)
    )
    self.assertEqual(r["f1"], 0.0)

  def test_empty_predictions_and_no_entities(self):
    r = metrics.ner_f1([["O", "O"]], [["B-PER", "O"]])
    self.assertEqual((r["precision"], r["recall"], r["f1"]), (0.0, 0.0, 0.0))
    r = metrics.ner_f1([["O"]], [["O"]])
    self.assertEqual((r["precision"], r["recall"], r["f1"]), (0.0, 0.0, 0.0))
    self.assertEqual(r["per_type"], {})
    r = metrics.ner_f1([], [])
    self.assertEqual(r["f1"], 0.0)

  def test_length_mismatch(self):
    with self.assertRaisesRegex(ValueError, "1 predicted and 2 gold sentences"):
      metrics.ner_f1([["O"]], [["O"], ["O"]])
    with self.assertRaisesRegex(ValueError, "sentence 0: 1 predicted and 2"):
      metrics.ner_f1([["O"]], [["O", "O"]])


class AccuracyTest(absltest.TestCase):
  def test_token_accuracy_ignores_unlabelled_positions(self):
    pred = [[1, 2, 9], [0, 7, 7]]
    gold = [[1, N, 3], [0, N, N]]
    self.assertAlmostEqual(metrics.token_accuracy(pred, gold), 2 / 3)
    self.assertEqual(metrics.token_accuracy([[1]], [[N]]), 0.0)

  def test_accuracy(self):
    self.assertAlmostEqual(metrics.accuracy([0, 1, 2, 2], [0, 1, 1, 2]), 0.75)
    self.assertEqual(metrics.accuracy([], []), 0.0)

  def test_shape_mismatch(self):
    with self.assertRaisesRegex(ValueError, "differ in shape"):
      metrics.token_accuracy([[1, 2]], [[1]])
    with self.assertRaisesRegex(ValueError, "differ in shape"):
      metrics.accuracy([1, 2], [1])


class TaskMetricsTest(parameterized.TestCase):
  def test_pos(self):
    pred = np.array([[5, 1, 2, 5], [5, 3, 3, 5], [5, 0, 0, 5]])
    gold = np.array([[N, 1, 2, N], [N, 3, 0, N], [N, 1, 1, N]])
    out = tasks_lib.score("pos", pred, gold, ["A", "B", "C", "D"])
    self.assertEqual(out["num_tokens"], 6)
    self.assertAlmostEqual(out["accuracy"], 3 / 6)
    out = tasks_lib.score(
      "pos", pred, gold, ["A", "B", "C", "D"], example_mask=[1, 1, 0]
    )
    self.assertEqual(out["num_tokens"], 4)
    self.assertAlmostEqual(out["accuracy"], 3 / 4)

  def test_ner_reads_tags_at_labelled_positions(self):
    names = ("B-PER", "I-PER", "O")
    # Word tags B-PER I-PER O; predictions off the labelled positions (even
    # out-of-range ids) must not matter.
    gold = np.array([[N, 0, N, 1, 2, N], [N, 0, N, N, N, N]])
    pred = np.array([[99, 0, 2, 1, 2, 0], [2, 2, 2, 2, 2, 2]])
    out = tasks_lib.score("ner", pred, gold, names, example_mask=[1, 0])
    self.assertEqual(out["f1"], 1.0)
    self.assertEqual(out["f1/PER"], 1.0)
    out = tasks_lib.score("ner", pred, gold, names)
    self.assertAlmostEqual(out["recall"], 0.5)
    self.assertAlmostEqual(out["precision"], 1.0)
    self.assertAlmostEqual(out["f1"], 2 / 3)
    self.assertEqual(out["num_gold"], 2)

  def test_ner_predicted_i_after_o_starts_an_entity(self):
    names = ("B-LOC", "I-LOC", "O")
    gold = np.array([[N, 2, 0, 1, N]])
    pred = np.array([[N, 2, 1, 1, N]])
    out = tasks_lib.score("ner", pred, gold, names)
    self.assertEqual(out["f1"], 1.0)

  def test_nli(self):
    out = tasks_lib.score(
      "nli",
      np.array([0, 2, 1, 1]),
      np.array([0, 2, 2, N]),
      ["e", "n", "c"],
      example_mask=np.array([1, 1, 1, 0]),
    )
    self.assertAlmostEqual(out["accuracy"], 2 / 3)
    self.assertEqual(out["num_examples"], 3)

  @parameterized.parameters("pos", "ner", "nli")
  def test_headline_key_is_present(self, task):
    shape = (2,) if task == "nli" else (2, 3)
    out = tasks_lib.score(
      task, np.zeros(shape, int), np.zeros(shape, int), ["O", "B-X"]
    )
    self.assertIn(tasks_lib.get(task).headline, out)

  def test_errors(self):
    with self.assertRaisesRegex(BistilError, "unknown task 'srl'"):
      tasks_lib.score("srl", [0], [0], ["a"])
    with self.assertRaisesRegex(ValueError, "example_mask"):
      tasks_lib.score("nli", [0, 1], [0, 1], ["a", "b"], [1])
    with self.assertRaisesRegex(ValueError, r"must be \[n, L\]"):
      tasks_lib.score("pos", [0, 1], [0, 1], ["a", "b"])
    with self.assertRaisesRegex(ValueError, "predicted label id outside"):
      tasks_lib.score("ner", [[5]], [[0]], ["O"])


if __name__ == "__main__":
  absltest.main()
