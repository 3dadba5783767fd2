"""Dependency-parsing data: CoNLL-U heads, encoding, UAS/LAS by hand."""

import json
import os
import re
import tempfile

import numpy as np
from absl.testing import absltest, parameterized

from bistil_jax import tasks as tasks_lib
from bistil_jax.data import dp, task_files, tasks
from bistil_jax.errors import BistilError
from tests.data.tasks_test import CLS, SEP, hand_tokenizer

HAND = hand_tokenizer()


def row(i, form, head, deprel, upos="X"):
  return f"{i}\t{form}\t_\t{upos}\t_\t_\t{head}\t{deprel}\t_\t_"


# A non-projective tree: the arc cats <- unbelievable (2 -> 7) crosses
# scheduled -> today (4 -> 8). Sub-words with the hand tokenizer:
# [CLS] a cat ##s is scheduled on the un ##believ ##able today . [SEP]
#   0   1  2   3   4     5      6   7  8     9      10    11  12  13
NON_PROJECTIVE = [
  "# sent_id = np",
  row(1, "a", 2, "det"),
  row(2, "cats", 4, "nsubj:pass"),
  row(3, "is", 4, "aux:pass"),
  row(4, "scheduled", 0, "root"),
  row(5, "on", 7, "case"),
  row(6, "the", 7, "det"),
  row(7, "unbelievable", 2, "nmod"),
  row(8, "today", 4, "obl:tmod"),
  row(9, ".", 4, "punct", "PUNCT"),
]
# A multiword token (del = de + el) and an empty node: heads refer to the
# syntactic words 1..4. Sub-words: [CLS] de el gato . [SEP] (all [UNK]).
MULTIWORD = [
  "# sent_id = mwt",
  "1-2\tdel\t_\t_\t_\t_\t_\t_\t_\t_",
  row(1, "de", 3, "case"),
  row(2, "el", 3, "det"),
  row(3, "gato", 0, "root"),
  "3.1\tes\t_\t_\t_\t_\t_\t_\t0:root\t_",
  row(4, ".", 3, "punct", "PUNCT"),
]


class DpDataTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self._tmp = tempfile.TemporaryDirectory()
    self.addCleanup(self._tmp.cleanup)

  def write(self, name, lines):
    path = os.path.join(self._tmp.name, name)
    with open(path, "w", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n\n")
    return path

  def both(self):
    return self.write("t.conllu", NON_PROJECTIVE + [""] + MULTIWORD)

  # ------------------------------------------------------------ reader
  def test_reader_skips_ranges_and_empty_nodes_and_strips_subtypes(self):
    ex = dp.read_conllu_dp(self.both())
    self.assertLen(ex, 2)
    self.assertEqual(ex[0].heads, (2, 4, 4, 0, 7, 7, 2, 4, 4))
    self.assertEqual(
      ex[0].labels,
      ("det", "nsubj", "aux", "root", "case", "det", "nmod", "obl", "punct"),
    )
    self.assertEqual(ex[1].words, ("de", "el", "gato", "."))
    self.assertEqual(ex[1].heads, (3, 3, 0, 3))
    self.assertEqual(ex[1].labels, ("case", "det", "root", "punct"))
    self.assertEqual(ex[1].where(3), f"{self._tmp.name}/t.conllu:18")
    # The task dispatch reads the same; the POS reader is unchanged.
    self.assertEqual(tasks_lib.get("dp").read(self.both()), ex)
    pos = tasks_lib.get("pos").read(self.both())
    self.assertEqual(pos[1].labels, ("X", "X", "X", "PUNCT"))
    self.assertNotIsInstance(pos[0], dp.DepExample)

  @parameterized.named_parameters(
    ("out_of_range", [row(1, "a", 2, "det"), row(2, "b", 3, "root")], 3,
     r"HEAD 3 out of range 0\.\.2"),
    ("not_an_integer", [row(1, "a", "_", "det"), row(2, "b", 0, "root")], 2,
     r"HEAD '_' is not an integer"),
    ("cycle", [row(1, "a", 2, "det"), row(2, "b", 1, "det"),
               row(3, "c", 0, "root")], 2,
     r"not a tree: cycle 1 -> 2 -> 1"),
    ("no_root", [row(1, "a", 2, "det"), row(2, "b", 1, "det")], 2,
     r"not a tree: no word has HEAD 0"),
    ("two_roots", [row(1, "a", 0, "root"), row(2, "b", 0, "root")], 3,
     r"not a tree: a second root"),
  )  # fmt: skip
  def test_bad_trees_name_file_and_line(self, lines, line, pattern):
    path = self.write("bad.conllu", ["# sent_id = 1", *lines])
    where = re.escape(f"{path}:{line}: ")
    with self.assertRaisesRegex(
      BistilError, f"^{where}(the sentence is )?{pattern}"
    ):
      dp.read_conllu_dp(path)

  def test_an_unknown_relation_is_named_at_its_words_line(self):
    path = self.write("t.conllu", NON_PROJECTIVE)
    ex = dp.read_conllu_dp(path)
    labels = sorted(set(ex[0].labels) - {"aux"})  # "is" on line 4
    with self.assertRaisesRegex(
      BistilError, f"^unknown label 'aux' at {re.escape(path)}:4;"
    ):
      dp.encode_dp(ex, HAND, tasks.label_ids(labels), 32)

  def test_dataset_rows_with_ud_columns(self):
    path = os.path.join(self._tmp.name, "t.jsonl")
    rows = [
      {"tokens": ["a", "cat"], "head": ["2", "0"], "deprel": ["det", "root"]},
      {"tokens": ["b"], "head": [0], "deprel": ["root"]},
    ]
    with open(path, "w") as f:
      f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    ex = tasks_lib.get("dp").read(f"json:{path}")
    self.assertEqual([e.heads for e in ex], [(2, 0), (0,)])
    with open(path, "a") as f:
      f.write(json.dumps({"tokens": ["a"], "head": [1], "deprel": ["x"]}))
    with self.assertRaisesRegex(BistilError, r"row 2: the sentence is not"):
      tasks_lib.get("dp").read(f"json:{path}")

  # ------------------------------------------------------------ encoding
  def encode(self, max_len=16, drop_long=False):
    ex = tasks_lib.get("dp").read(self.both())
    labels = tasks_lib.get("dp").label_set(ex)
    self.assertEqual(labels, task_files.DP_RELATIONS)
    data = tasks_lib.get("dp").encode(
      ex, HAND, tasks.label_ids(labels), max_len, train=drop_long
    )
    return data, labels

  def test_heads_are_first_sub_word_positions(self):
    data, labels = self.encode()
    self.assertEqual(data.input_ids[0, 0], CLS)
    self.assertEqual(data.input_ids[0, 13], SEP)
    want = np.full(16, -100)
    want[[1, 2, 4, 5, 6, 7, 8, 11, 12]] = [2, 5, 5, 0, 8, 8, 2, 5, 5]
    np.testing.assert_array_equal(data.heads[0], want)
    rel = [labels[i] if i >= 0 else None for i in data.labels[0]]
    self.assertEqual(
      [r for r in rel if r],
      ["det", "nsubj", "aux", "root", "case", "det", "nmod", "obl", "punct"],
    )
    np.testing.assert_array_equal(data.heads[1, :6], [-100, 3, 3, 0, 3, -100])
    # Batches carry the heads, cut to the bucket like the labels.
    batch = tasks.host_batch(data, np.array([1]), (8, 16))
    np.testing.assert_array_equal(batch["heads"], data.heads[1:, :8])
    batch = tasks.host_batch(data, np.array([1, -1]), (8, 16))  # a filler
    np.testing.assert_array_equal(batch["heads"][1], [-100] * 16)

  def test_training_drops_long_sentences(self):
    data, _ = self.encode(max_len=12, drop_long=True)
    self.assertEqual((data.num_examples, data.num_dropped), (1, 1))
    self.assertEqual(data.num_unscored_words, 0)

  # ------------------------------------------------------------ scores
  def predictions(self, data, labels):
    """The hand predictions of the module comment: [n, 16, 2]."""
    rel = {r: i for i, r in enumerate(labels)}
    pred = np.zeros((2, 16, 2), np.int64)
    # word position: (head position, relation)
    sent0 = {
      1: (2, "det"),  # right
      2: (5, "obj"),  # right head, wrong relation
      4: (2, "aux"),  # wrong head
      5: (0, "root"),  # right
      6: (8, "case"),  # right
      7: (9, "det"),  # the head's continuation sub-word: wrong
      8: (2, "nmod"),  # right (the non-projective arc)
      11: (5, "obl"),  # right
      12: (5, "punct"),  # right (punctuation counts)
    }
    sent1 = {1: (3, "case"), 2: (1, "det"), 3: (0, "nsubj"), 4: (3, "punct")}
    for n, sent in enumerate((sent0, sent1)):
      for pos, (head, r) in sent.items():
        pred[n, pos] = (head, rel[r])
    return pred

  def test_uas_las_by_hand(self):
    data, labels = self.encode()
    pred = self.predictions(data, labels)
    rows = np.arange(2)
    out = dp.scores(pred, data, rows)
    # Non-projective: heads right 7/9, labelled 6/9; multiword 3/4, 2/4.
    self.assertAlmostEqual(out["uas"], 10 / 13)
    self.assertAlmostEqual(out["las"], 8 / 13)
    self.assertEqual((out["num_words"], out["num_sentences"]), (13, 2))
    one = dp.scores(pred[1:], data, rows[1:])
    self.assertEqual((one["uas"], one["las"]), (3 / 4, 2 / 4))
    stacked = np.stack([data.heads, data.labels], -1)
    self.assertEqual(tasks_lib.score("dp", pred, stacked, labels), {
      **{k: out[k] for k in ("uas", "las", "num_words")},
      "num_unscored_words": 0,
    })  # fmt: skip
    self.assertEqual(tasks_lib.get("dp").headline, "las")

  def test_evaluation_scores_long_sentences_as_wrong(self):
    data, labels = self.encode(max_len=12)
    self.assertEqual(data.num_examples, 1)  # only the multiword sentence
    self.assertEqual(data.num_unscored_words, 9)
    pred = self.predictions(data, labels)[1:, :12]
    out = dp.scores(pred, data, np.arange(1))
    self.assertEqual((out["uas"], out["las"]), (3 / 13, 2 / 13))
    self.assertEqual((out["num_words"], out["num_unscored_words"]), (13, 9))
    self.assertEqual(out["num_sentences"], 2)


if __name__ == "__main__":
  absltest.main()
