"""SQuAD v1.1 F1 and exact match against hand-computed values."""

from absl.testing import absltest, parameterized

from bistil_jax import metrics
from bistil_jax import tasks as tasks_lib


class NormalizeTest(parameterized.TestCase):
  @parameterized.parameters(
    ("The Eiffel Tower!", "eiffel tower"),
    ("  a   cat, an owl and the dog. ", "cat owl and dog"),
    ("Theatre", "theatre"),  # an article only as a whole word
    ("U.S.-based", "usbased"),
    ("", ""),
  )
  def test_official_normalisation(self, text, want):
    self.assertEqual(metrics.normalize_answer(text), want)


class ScoreTest(absltest.TestCase):
  def test_exact_match_ignores_case_articles_punctuation(self):
    self.assertEqual(
      metrics.squad_exact_match("the Denver Broncos", "Denver Broncos!"), 1.0
    )
    self.assertEqual(metrics.squad_exact_match("Denver", "Denver Broncos"), 0.0)

  def test_f1_by_hand(self):
    # pred {denver, broncos, team}, gold {denver, broncos}: P=2/3, R=1.
    self.assertAlmostEqual(
      metrics.squad_f1("The Denver Broncos team", "Denver Broncos"), 0.8
    )
    # Tokens are a bag: pred "x x", gold "x y":
    # common 1, P=1/2, R=1/2.
    self.assertAlmostEqual(metrics.squad_f1("x x", "x y"), 0.5)
    self.assertEqual(metrics.squad_f1("cat", "dog"), 0.0)
    # Only articles/punctuation left on one side: no common token, 0.
    self.assertEqual(metrics.squad_f1("the", "The!"), 0.0)

  def test_max_over_gold_answers_then_mean(self):
    preds = ["Denver Broncos", "in 1999", "nothing"]
    golds = [
      ["Broncos", "the Denver Broncos"],  # EM 1 via the 2nd, F1 1
      ["1998", "1999 season"],  # F1 max(0, 2*(1/2*1/2)/1) = 0.5, EM 0
      ["x"],  # 0, 0
    ]
    out = metrics.squad_scores(preds, golds)
    self.assertAlmostEqual(out["exact_match"], 1 / 3)
    self.assertAlmostEqual(out["f1"], (1.0 + 0.5 + 0.0) / 3)
    self.assertEqual(out["num_examples"], 3)

  def test_questions_without_gold_are_skipped(self):
    out = metrics.squad_scores(["x b", "z"], [["b"], []])
    self.assertAlmostEqual(out["f1"], 2 * 1 * 0.5 / 1.5)
    self.assertEqual((out["num_examples"], out["num_unanswerable"]), (1, 1))
    with self.assertRaises(ValueError):
      metrics.squad_scores(["a"], [])

  def test_headline(self):
    self.assertEqual(tasks_lib.get("qa").headline, "f1")
    with self.assertRaisesRegex(ValueError, "squad_scores"):
      tasks_lib.score("qa", [0], [0], ())


if __name__ == "__main__":
  absltest.main()
