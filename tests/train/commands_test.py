"""`bistil evaluate`'s table and its max_seq_len default, without a model.

The CLI runs on real exports in task_test.py (results.json reproduced
without flags), dp_task_test.py and qa_task_test.py.
"""

import json
import os
import tempfile

from absl.testing import absltest

from bistil_jax import tasks
from bistil_jax.checkpoint import hf, surgery
from bistil_jax.checkpoint import sft as sft_lib
from bistil_jax.train import commands


def write_json(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


class TableTest(absltest.TestCase):
  def table(self, task, results):
    lines = commands.format_results(task, results).splitlines()
    return [line.split() for line in lines]

  def test_dp_shows_uas_beside_las(self):
    rows = self.table(
      "dp",
      {
        "mt": {
          "las": 0.5,
          "uas": 0.625,
          "num_words": 40,
          "num_unscored_words": 0,
          "num_sentences": 3,
          "num_unscored_sentences": 0,
        }
      },
    )
    self.assertEqual(rows[0], ["split", "las", "uas", "sentences", "words"])
    self.assertEqual(rows[1], ["mt", "0.5000", "0.6250", "3", "40"])

  def test_qa_counts_questions_and_windows(self):
    rows = self.table(
      "qa",
      {
        "de": {
          "f1": 0.75,
          "exact_match": 0.5,
          "num_examples": 12,
          "num_unanswerable": 0,
          "num_features": 19,
        }
      },
    )
    self.assertEqual(
      rows[0], ["split", "f1", "exact_match", "questions", "windows"]
    )
    self.assertEqual(rows[1], ["de", "0.7500", "0.5000", "12", "19"])
    self.assertNotIn("sentences", rows[0])

  def test_every_score_and_the_unit_of_each_task(self):
    ner = {
      "f1": 0.5,
      "precision": 0.25,
      "recall": 1.0,
      "f1/PER": 0.5,
      "num_pred": 8,
      "num_gold": 2,
      "num_correct": 2,
      "num_sentences": 4,
    }
    rows = self.table("ner", {"dev": ner})
    self.assertEqual(
      rows[0],
      ["split", "f1", "precision", "recall", "f1/PER", "sentences", "entities"],
    )
    self.assertEqual(
      rows[1], ["dev", "0.5000", "0.2500", "1.0000", "0.5000", "4", "2"]
    )
    rows = self.table("nli", {"dev": {"accuracy": 0.5, "num_examples": 6}})
    self.assertEqual(
      rows, [["split", "accuracy", "pairs"], ["dev", "0.5000", "6"]]
    )
    pos = {"accuracy": 0.5, "num_tokens": 30, "num_sentences": 3}
    rows = self.table("pos", {"a-long-split-name": pos})
    self.assertEqual(rows[0], ["split", "accuracy", "sentences", "tokens"])
    self.assertEqual(rows[1], ["a-long-split-name", "0.5000", "3", "30"])


class RecordedMaxSeqLenTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.root = tmp.name

  def test_the_last_sft_that_records_one_then_the_model_dir(self):
    model = os.path.join(self.root, "model")
    lang = os.path.join(self.root, "lang")
    task = os.path.join(self.root, "task")
    write_json(os.path.join(lang, sft_lib.SFT_META), {"kind": "language"})
    write_json(
      os.path.join(task, sft_lib.SFT_META),
      {"kind": "task", "max_seq_len": 64, "doc_stride": 16},
    )
    os.makedirs(model)
    self.assertEqual(surgery.recorded_run(model, [], tasks.RECORDED), ({}, ""))
    self.assertEqual(
      surgery.recorded_run(model, [task, lang], tasks.RECORDED),
      ({"max_seq_len": 64, "doc_stride": 16}, os.path.join(task, "sft.json")),
    )
    write_json(os.path.join(model, hf.RUN_RECORD), {"max_seq_len": 32})
    self.assertEqual(
      surgery.recorded_run(model, [lang], tasks.RECORDED),
      ({"max_seq_len": 32}, os.path.join(model, hf.RUN_RECORD)),
    )
    self.assertEqual(
      surgery.recorded_run(model, [task], tasks.RECORDED)[0]["max_seq_len"], 64
    )
    # A composable-sft dir (no sft.json) records nothing.
    other = tempfile.mkdtemp(dir=self.root)
    self.assertEqual(
      surgery.recorded_run(model, [other], tasks.RECORDED)[0],
      {"max_seq_len": 32},
    )

  def test_help_names_the_default(self):
    from bistil_jax import cli

    sub = cli.build_parser()._subparsers._group_actions[0]
    text = " ".join(sub.choices["evaluate"].format_help().split())
    self.assertIn("default: the data.max_seq_len of the run", text)
    self.assertIn("min(256, the model's max length)", text)
    self.assertIn("recorded, else 128", text)


if __name__ == "__main__":
  absltest.main()
