"""QA readers, windowed features and span decoding (data/qa.py)."""

import json
import os
import tempfile

import numpy as np
from absl.testing import absltest, parameterized

from bistil_jax import tasks as tasks_lib
from bistil_jax.data import qa
from bistil_jax.errors import BistilError
from tests.data.vocab_test import make_unigram_dir, make_wordpiece_dir

_TMP = None
TOKENIZERS = {}


def setUpModule():
  global _TMP
  _TMP = tempfile.TemporaryDirectory()
  TOKENIZERS["bert"] = make_wordpiece_dir(os.path.join(_TMP.name, "wp"))
  TOKENIZERS["xlmr"] = make_unigram_dir(os.path.join(_TMP.name, "spm"))


def tearDownModule():
  _TMP.cleanup()


CONTEXT = (
  "Pata bi du ka pa. Tiku gu da ba ki pu. Kadu ba pita ga bu ka di. "
  "Bagi tu pa ku. Dipa ka gu bi tu da."
)


def squad(paragraphs):
  """A SQuAD v1.1 document of [(context, [(id, question, [(text, start)])])]."""
  return {
    "version": "1.1",
    "data": [
      {
        "title": "t",
        "paragraphs": [
          {
            "context": c,
            "qas": [
              {
                "id": i,
                "question": q,
                "answers": [{"text": t, "answer_start": s} for t, s in a],
              }
              for i, q, a in qas
            ],
          }
          for c, qas in paragraphs
        ],
      }
    ],
  }


def write(path, obj):
  with open(path, "w", encoding="utf-8") as f:
    f.write(obj if isinstance(obj, str) else json.dumps(obj))
  return path


def example(question, context, answer, qid="q"):
  start = context.index(answer)
  return qa.QAExample(qid, question, context, ((answer, start),), source=qid)


class ReaderTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.dir = tmp.name

  def test_reads_squad_json(self):
    doc = squad(
      [
        (CONTEXT, [("a", "ku pa?", [("Tiku", 18), ("Tiku gu", 18)])]),
        ("Gu da.", [("b", " da?", [("da", 3)])]),
      ]
    )
    path = write(os.path.join(self.dir, "train.json"), doc)
    examples = tasks_lib.get("qa").read(path)
    self.assertLen(examples, 2)
    self.assertEqual(examples[0].id, "a")
    self.assertEqual(examples[0].answer_texts, ("Tiku", "Tiku gu"))
    self.assertEqual(examples[1].answers, (("da", 3),))
    self.assertEqual(examples[1].context, "Gu da.")

  def test_offset_mismatch_names_the_question(self):
    doc = squad([(CONTEXT, [("q7", "ku?", [("Tiku", 17)])])])
    path = write(os.path.join(self.dir, "bad.json"), doc)
    with self.assertRaisesRegex(
      BistilError, r"bad.json: question 'q7'.*'Tiku' does not match.*17"
    ):
      tasks_lib.get("qa").read(path)

  @parameterized.parameters(
    ("", "is empty"),
    ("  \n", "is empty"),
    ("{", "invalid JSON"),
    ('{"version": "1.1"}', "no 'data' key"),
    ('{"data": []}', "holds no questions"),
    ('{"data": [{"paragraphs": [{"qas": []}]}]}', "no 'context' key"),
    (
      json.dumps(squad([("Gu da.", [("x", "q", [])])])).replace(
        '"question": "q", ', ""
      ),
      "question 'x'.*no 'question' key",
    ),
    (
      json.dumps(squad([("Gu da.", [("x", "q", [("da", 3)])])])).replace(
        '"answer_start": 3', '"answer_start": "3"'
      ),
      "'answer_start' is str",
    ),
  )
  def test_bad_files_fail_with_one_line(self, text, message):
    path = write(os.path.join(self.dir, "f.json"), text)
    with self.assertRaisesRegex(BistilError, message) as cm:
      tasks_lib.get("qa").read(path)
    self.assertNotIn("\n", str(cm.exception))

  def test_missing_file(self):
    with self.assertRaisesRegex(BistilError, "not found"):
      tasks_lib.get("qa").read(os.path.join(self.dir, "nope.json"))

  def test_datasets_rows_with_squad_columns(self):
    rows = [
      {
        "id": "r1",
        "title": "t",
        "context": "Gu da ba.",
        "question": "gu?",
        "answers": {"text": ["da", "da ba"], "answer_start": [3, 3]},
      },
      {
        "id": "r2",
        "title": "t",
        "context": "Ki pu.",
        "question": "ki?",
        "answers": {"text": ["pu"], "answer_start": [0]},
      },
    ]
    path = os.path.join(self.dir, "rows.jsonl")
    write(path, "\n".join(json.dumps(r) for r in rows))
    with self.assertRaisesRegex(
      BistilError, r"row 1 \(question 'r2'\): answer 0 'pu'"
    ):
      tasks_lib.get("qa").read(f"json:{path}")
    rows[1]["answers"]["answer_start"] = [3]
    write(path, "\n".join(json.dumps(r) for r in rows))
    examples = tasks_lib.get("qa").read(f"json:{path}")
    self.assertEqual([e.id for e in examples], ["r1", "r2"])
    self.assertEqual(examples[0].answer_texts, ("da", "da ba"))
    del rows[0]["context"]
    write(path, "\n".join(json.dumps(r) for r in rows[:1]))
    with self.assertRaisesRegex(BistilError, "no column 'context'"):
      tasks_lib.get("qa").read(f"json:{path}")


class FeatureTest(parameterized.TestCase):
  @parameterized.product(family=["bert", "xlmr"], stride=[0, 3, 7])
  def test_windows_cover_every_context_token(self, family, stride):
    tok = TOKENIZERS[family]
    exs = [
      example("ku pa?", CONTEXT, "Tiku"),
      example("di?", CONTEXT * 2, "Dipa", "q2"),
      example("bi?", "Gu da.", "da", "q3"),
    ]
    data = qa.encode_qa(exs, tok, 24, train=False, doc_stride=stride)
    n_ctx = [
      len(tok.encode(e.context, add_special_tokens=False).ids) for e in exs
    ]
    for i, ex in enumerate(exs):
      rows = np.flatnonzero(data.example_index == i)
      self.assertGreater(len(rows), 1 if i < 2 else 0)
      # Every context token's character span is in some window.
      want = {
        tuple(o)
        for o in tok.encode(ex.context, add_special_tokens=False).offsets
      }
      got = {
        tuple(o) for r in rows for o in data.offsets[r] if o[0] != qa.NO_OFFSET
      }
      self.assertEqual(got, want)
      # Consecutive windows overlap by `stride` context tokens.
      per_row = [
        int((data.offsets[r, :, 0] != qa.NO_OFFSET).sum()) for r in rows
      ]
      self.assertGreaterEqual(sum(per_row) - stride * (len(rows) - 1), n_ctx[i])
      self.assertTrue(np.all(data.attention_mask[rows].sum(1) <= 24))
    if family == "bert":  # [CLS] q [SEP] c [SEP], context in segment 1
      cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
      ids, types = data.input_ids[0], data.token_type_ids[0]
      self.assertEqual(ids[0], cls)
      self.assertEqual(list(ids).count(sep), 2)
      ctx = data.offsets[0, :, 0] != qa.NO_OFFSET
      self.assertTrue(np.all(types[ctx] == 1))
      self.assertEqual(types[1], 0)
    else:  # <s> q </s></s> c </s>
      ids = list(data.input_ids[0])
      self.assertEqual(ids[0], tok.token_to_id("<s>"))
      eos = tok.token_to_id("</s>")
      self.assertEqual(ids.count(eos), 3)
      i = ids.index(eos)
      self.assertEqual(ids[i + 1], eos)

  @parameterized.parameters("bert", "xlmr")
  def test_training_labels_point_at_the_answer_or_cls(self, family):
    tok = TOKENIZERS[family]
    ex = example("ku pa?", CONTEXT * 2, "Kadu ba pita")
    data = qa.encode_qa([ex], tok, 24, train=True, doc_stride=4)
    self.assertIsNone(data.offsets)
    self.assertEqual(data.labels.shape, (data.num_examples, 2))
    full = qa.encode_qa([ex], tok, 24, train=False, doc_stride=4)
    hits = 0
    for r in range(data.num_examples):
      s, e = data.labels[r]
      if s == 0:
        self.assertEqual(e, 0)
        continue
      hits += 1
      a, b = full.offsets[r, s, 0], full.offsets[r, e, 1]
      self.assertEqual(ex.context[a:b].strip(), "Kadu ba pita")
    self.assertGreaterEqual(hits, 1)
    self.assertLess(hits, data.num_examples)  # some windows miss it

  def test_stride_and_room_errors(self):
    tok = TOKENIZERS["bert"]
    ex = example("ku pa?", CONTEXT, "Tiku", "q9")
    room = 24 - len(tok.encode("ku pa?", add_special_tokens=False).ids) - 3
    with self.assertRaisesRegex(
      BistilError, rf"q9: doc_stride={room} must be smaller.* {room} tokens"
    ):
      qa.encode_qa([ex], tok, 24, doc_stride=room)
    # A context that fits one window does not care about the stride.
    short = example("ku?", "Gu da.", "da")
    qa.encode_qa([short], tok, 24, doc_stride=100)
    long_q = example("ku pa " * 4, CONTEXT, "Tiku", "q8")
    with self.assertRaisesRegex(BistilError, "q8: the question .* no room"):
      qa.encode_qa([long_q], tok, 8, doc_stride=1)
    with self.assertRaisesRegex(BistilError, "no answer"):
      qa.encode_qa([qa.QAExample("z", "q", "c", ())], tok, 24)
    with self.assertRaisesRegex(BistilError, "doc_stride must be >= 0"):
      qa.encode_qa([ex], tok, 24, doc_stride=-1)


class DecodeTest(absltest.TestCase):
  def test_best_span_rules(self):
    offsets = np.full((8, 2), qa.NO_OFFSET)
    offsets[3:7] = [[0, 2], [3, 5], [6, 8], [9, 11]]
    start = np.zeros(8)
    end = np.zeros(8)
    start[0] = end[0] = 9.0  # [CLS]: not a context token
    start[5], end[4] = 5.0, 6.0  # end before start: invalid
    start[4], end[6] = 3.0, 2.0
    self.assertEqual(qa.best_span(start, end, offsets)[1:], (4, 4))
    self.assertEqual(
      qa.best_span(start, end, offsets, max_answer_length=5)[1:], (4, 4)
    )
    end[4] = 0.0
    self.assertEqual(qa.best_span(start, end, offsets)[1:], (5, 6))
    self.assertEqual(
      qa.best_span(start, end, offsets, max_answer_length=1)[1:], (5, 5)
    )
    # Only the top-n starts and ends are candidates.
    self.assertIsNone(qa.best_span(start, end, offsets, n_best_size=1))
    self.assertEqual(
      qa.best_span(start, end, offsets, n_best_size=2)[1:], (5, 6)
    )
    self.assertIsNone(qa.best_span(start, end, np.full((8, 2), -1)))

  def test_decode_takes_the_best_window(self):
    tok = TOKENIZERS["bert"]
    ex = example("ku pa?", CONTEXT * 2, "Kadu ba pita")
    data = qa.encode_qa([ex], tok, 24, train=False, doc_stride=4)
    train = qa.encode_qa([ex], tok, 24, train=True, doc_stride=4)
    logits = np.zeros((data.num_examples, 24, 2), np.float32)
    for r, (s, e) in enumerate(train.labels):
      if s > 0:
        logits[r, s, 0] = logits[r, e, 1] = 10.0 + r
    (pred,) = qa.decode(data, logits)
    self.assertEqual(pred.strip(), "Kadu ba pita")


if __name__ == "__main__":
  absltest.main()
