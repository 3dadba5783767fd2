"""Phase-2 task data: readers, label sets, alignment, encoding, batches."""

import json
import os
import re
import tempfile

import numpy as np
from absl.testing import absltest, parameterized
from tokenizers import (
  Tokenizer,
  models,
  normalizers,
  pre_tokenizers,
  processors,
  trainers,
)

from bistil_jax import synthetic
from bistil_jax import tasks as tasks_lib
from bistil_jax.data import task_files, tasks
from bistil_jax.errors import BistilError
from bistil_jax.tasks import token as token_kind

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LANG = "a1"
SIZES = {
  "corpus_train": 300,
  "corpus_dev": 10,
  "task_train": 40,
  "task_dev": 12,
  "task_test": 10,
}


def _post_process(tok: Tokenizer) -> Tokenizer:
  cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
  tok.post_processor = processors.TemplateProcessing(
    single="[CLS] $A [SEP]",
    pair="[CLS] $A [SEP] $B:1 [SEP]:1",
    special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
  )
  return tok


def hand_tokenizer() -> Tokenizer:
  """A WordPiece tokenizer with a known vocabulary."""
  pieces = ["the", "cat", "sat", "un", "##believ", "##able", "##s", "a", "b"]
  vocab = {t: i for i, t in enumerate(SPECIALS + pieces)}
  tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.add_special_tokens(SPECIALS)
  return _post_process(tok)


def trained_tokenizer(corpus_path: str) -> Tokenizer:
  tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  with open(corpus_path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  tok.train_from_iterator(
    lines, trainers.WordPieceTrainer(vocab_size=200, special_tokens=SPECIALS)
  )
  return _post_process(tok)


HAND = hand_tokenizer()
PAD, UNK, CLS, SEP = 0, 1, 2, 3


def setUpModule():
  global TMP, PATHS, TOK
  TMP = tempfile.TemporaryDirectory()
  family = synthetic.make_family(0)
  PATHS = synthetic.write_dataset(TMP.name, family, [LANG], sizes=SIZES)
  TOK = trained_tokenizer(str(PATHS.corpora[LANG]["train"]))


def tearDownModule():
  TMP.cleanup()


def path(task, split):
  return str(getattr(PATHS, task)[LANG][split])


class TmpDirTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.tmp = tmp.name

  def write(self, name, text):
    p = os.path.join(self.tmp, name)
    with open(p, "w", encoding="utf-8") as f:
      f.write(text)
    return p


# ------------------------------------------------------------------ readers
class SyntheticRoundTripTest(parameterized.TestCase):
  @parameterized.parameters("train", "dev", "test")
  def test_pos_and_ner_read_the_same_sentences(self, split):
    pos = task_files.read_conllu(path("pos", split))
    ner = task_files.read_conll_ner(path("ner", split))
    self.assertLen(pos, SIZES[f"task_{split}"])
    self.assertEqual([e.words for e in pos], [e.words for e in ner])
    for e in pos + ner:
      self.assertLen(e.labels, len(e.words))
    self.assertLessEqual(
      {t for e in pos for t in e.labels}, set(synthetic.UPOS_TAGS)
    )
    self.assertLessEqual(
      {t for e in ner for t in e.labels}, set(synthetic.NER_TAGS)
    )

  def test_conllu_matches_the_file(self):
    with open(path("pos", "train"), encoding="utf-8") as f:
      block = f.read().split("\n\n")[0].splitlines()
    rows = [line.split("\t") for line in block if not line.startswith("#")]
    first = task_files.read_conllu(path("pos", "train"))[0]
    self.assertEqual(first.words, tuple(r[1] for r in rows))
    self.assertEqual(first.labels, tuple(r[3] for r in rows))
    self.assertEqual(first.source, path("pos", "train") + ":1")

  def test_nli_matches_the_file(self):
    examples = task_files.read_nli(path("nli", "dev"))
    with open(path("nli", "dev"), encoding="utf-8") as f:
      rows = [json.loads(line) for line in f]
    self.assertEqual(
      [(e.premise, e.hypothesis, e.label) for e in examples],
      [(r["premise"], r["hypothesis"], r["label"]) for r in rows],
    )
    self.assertEqual(examples[2].source, path("nli", "dev") + ":3")

  @parameterized.parameters("pos", "ner", "nli")
  def test_read_task_dispatches_on_local_files(self, task):
    examples = tasks_lib.get(task).read(path(task, "test"))
    self.assertLen(examples, SIZES["task_test"])
    kind = task_files.TokenExample if task != "nli" else task_files.PairExample
    self.assertIsInstance(examples[0], kind)


class ReadersTest(TmpDirTest):
  def test_conllu_skips_comments_ranges_and_empty_nodes(self):
    p = self.write(
      "x.conllu",
      "# sent_id = 1\n"
      "1-2\tdon't\t_\t_\t_\t_\t_\t_\t_\t_\n"
      "1\tdo\tdo\tAUX\t_\t_\t0\troot\t_\t_\n"
      "2\tn't\tnot\tPART\t_\t_\t1\tadvmod\t_\t_\n"
      "2.1\tgo\tgo\tVERB\t_\t_\t_\t_\t1:x\t_\n"
      "3\tgo\tgo\tVERB\t_\t_\t1\txcomp\t_\t_\n"
      "\n\n"
      "1\tHi\thi\tINTJ\t_\t_\t0\troot\t_\t_\n",
    )
    examples = task_files.read_conllu(p)
    self.assertEqual(
      examples,
      [
        task_files.TokenExample(("do", "n't", "go"), ("AUX", "PART", "VERB")),
        task_files.TokenExample(("Hi",), ("INTJ",)),
      ],
    )
    self.assertEqual(examples[1].source, f"{p}:9")  # After 2 blanks.

  def test_ner_reads_conll03_columns_and_skips_docstart(self):
    p = self.write(
      "x.txt",
      "-DOCSTART- -X- -X- O\n\n"
      "EU NNP B-NP I-ORG\nrejects VBZ B-VP O\n\n\n"
      "Peter NNP B-NP B-PER\r\nBlackburn NNP I-NP I-PER\n",
    )
    examples = task_files.read_conll_ner(p)
    self.assertEqual(
      examples,
      [
        task_files.TokenExample(("EU", "rejects"), ("I-ORG", "O")),
        task_files.TokenExample(("Peter", "Blackburn"), ("B-PER", "I-PER")),
      ],
    )
    self.assertEqual(examples[1].source, f"{p}:7")

  def test_nli_tsv_with_header_names_and_indices(self):
    p = self.write(
      "test.tsv",
      "premise\thypothesis\tlabel\tlanguage\n"
      'A "quoted" man.\tA man.\tentailment\taym\n'
      "\n"
      "P2\tH2\t2\taym\n",
    )
    examples = task_files.read_nli(p)
    self.assertEqual(
      examples,
      [
        task_files.PairExample('A "quoted" man.', "A man.", "entailment"),
        task_files.PairExample("P2", "H2", "contradiction"),
      ],
    )
    self.assertEqual(examples[1].source, f"{p}:4")

  def test_nli_csv_and_xnli_aliases(self):
    p = self.write(
      "x.csv",
      'sentence1,sentence2,gold_label\n"A, b",c,neutral\nd,e,1\n',
    )
    examples = task_files.read_nli(p)
    self.assertEqual(
      [(e.premise, e.hypothesis, e.label) for e in examples],
      [("A, b", "c", "neutral"), ("d", "e", "neutral")],
    )

  def test_nli_jsonl_int_labels_map_through_label_names(self):
    p = self.write(
      "x.jsonl",
      '{"premise": "p", "hypothesis": "h", "label": 1}\n\n'
      '{"premise": "p", "hypothesis": "h", "label": 0}\n',
    )
    self.assertEqual(
      [e.label for e in task_files.read_nli(p, label_names=("yes", "no"))],
      ["no", "yes"],
    )

  @parameterized.named_parameters(
    (
      "conllu_columns",
      "x.conllu",
      "1\ta\ta\tDET\t_\t_\t0\troot\t_\t_\n2\tb\tNOUN\n",
      r":2: expected 10 tab-separated",
    ),
    (
      "conllu_word_id",
      "x.conllu",
      "1\ta\ta\tDET\t_\t_\t0\troot\t_\t_\n"
      "# c\n"
      "3\tb\tb\tNOUN\t_\t_\t1\tx\t_\t_\n",
      r":3: word id '3' where 2",
    ),
    (
      "conllu_empty_upos",
      "x.conllu",
      "\n1\ta\ta\t\t_\t_\t0\troot\t_\t_\n",
      r":2: empty FORM or UPOS",
    ),
    ("ner_one_column", "x.txt", "a O\n\nb O\nc\n", r":4: expected a token"),
    ("ner_bad_tag", "x.txt", "a O\nb B_PER\n", r":2: malformed NER tag"),
    ("ner_bare_prefix", "x.txt", "a B-\n", r":1: malformed NER tag 'B-'"),
    (
      "nli_json",
      "x.jsonl",
      '{"premise": "p", "hypothesis": "h", "label": 0}\n{oops\n',
      r":2: invalid JSON",
    ),
    (
      "nli_key",
      "x.jsonl",
      '{"premise": "p", "label": 0}\n',
      r":1: no hypothesis column",
    ),
    (
      "nli_index",
      "x.jsonl",
      '{"premise": "p", "hypothesis": "h", "label": 3}\n',
      r":1: label index 3 out of range",
    ),
    (
      "nli_unlabelled",
      "x.jsonl",
      '{"premise": "p", "hypothesis": "h", "label": -1}\n',
      r":1: label -1 \(unlabelled",
    ),
    (
      "nli_text",
      "x.jsonl",
      '{"premise": 3, "hypothesis": "h", "label": 0}\n',
      r":1: premise is int",
    ),
    (
      "tsv_row",
      "x.tsv",
      "premise\thypothesis\tlabel\np\th\tneutral\np\tneutral\n",
      r":3: 2 columns where the header has 3",
    ),
    ("tsv_header", "x.tsv", "a\tb\tlabel\n", r":1: no premise column"),
  )
  def test_malformed_lines_name_file_and_line(self, name, text, pattern):
    p = self.write(name, text)
    reader = {
      ".conllu": task_files.read_conllu,
      ".txt": task_files.read_conll_ner,
    }.get(os.path.splitext(p)[1], task_files.read_nli)
    with self.assertRaisesRegex(BistilError, "^" + re.escape(p) + pattern):
      reader(p)

  @parameterized.parameters(
    ("x.conllu", "# only a comment\n\n", task_files.read_conllu),
    ("x.txt", "-DOCSTART- O\n\n\n", task_files.read_conll_ner),
    ("x.jsonl", "\n", task_files.read_nli),
    ("x.tsv", "", task_files.read_nli),
    ("x.tsv", "premise\thypothesis\tlabel\n", task_files.read_nli),
  )
  def test_empty_split_names_the_file(self, name, text, reader):
    p = self.write(name, text)
    with self.assertRaisesRegex(BistilError, f"file {re.escape(p)} holds no"):
      reader(p)

  def test_missing_file_bad_extension_and_undecodable(self):
    with self.assertRaisesRegex(BistilError, "file not found: /nope.conllu"):
      task_files.read_conllu("/nope.conllu")
    p = self.write("x.xml", "<a/>")
    with self.assertRaisesRegex(BistilError, "unknown extension '.xml'"):
      task_files.read_nli(p)
    p = self.write("y.txt", "")
    with open(p, "wb") as f:
      f.write(b"a O\n\xff\xfe O\n")
    with self.assertRaisesRegex(BistilError, f"{p}:2: not valid UTF-8"):
      task_files.read_conll_ner(p)

  def test_read_task_rejects_unknown_task_and_bad_specs(self):
    with self.assertRaisesRegex(BistilError, "unknown task 'srl'"):
      tasks_lib.get("srl").read(path("pos", "dev"))
    with self.assertRaisesRegex(BistilError, "not found: /no/such"):
      tasks_lib.get("ner").read("/no/such")
    with self.assertRaisesRegex(BistilError, "not found: /no/such.json"):
      tasks_lib.get("ner").read("json:/no/such.json")
    with self.assertRaisesRegex(BistilError, "expected hf:NAME"):
      tasks_lib.get("ner").read("hf:conll2003")
    with self.assertRaisesRegex(BistilError, "empty task data spec"):
      tasks_lib.get("ner").read(" ")


class DatasetsSpecTest(TmpDirTest):
  def test_json_token_task_with_string_tags(self):
    p = self.write(
      "x.jsonl",
      '{"tokens": ["Ann", "ran"], "ner_tags": ["B-PER", "O"]}\n'
      '{"tokens": [], "ner_tags": []}\n'
      '{"tokens": ["Bo"], "ner_tags": ["B-LOC"]}\n',
    )
    spec = f"json:{p}"
    self.assertEqual(
      tasks_lib.get("ner").read(spec),
      [
        task_files.TokenExample(("Ann", "ran"), ("B-PER", "O")),
        task_files.TokenExample(("Bo",), ("B-LOC",)),
      ],
    )

  def test_parquet_class_label_ints_use_feature_names(self):
    import datasets  # noqa: PLC0415

    names = ["O", "B-PER", "I-PER"]  # Not the task's default order.
    features = datasets.Features(
      {
        "tokens": datasets.List(datasets.Value("string")),
        "ner_tags": datasets.List(datasets.ClassLabel(names=names)),
      }
    )
    ds = datasets.Dataset.from_dict(
      {"tokens": [["Ann", "Lee", "ran"]], "ner_tags": [[1, 2, 0]]},
      features=features,
    )
    p = os.path.join(self.tmp, "x.parquet")
    ds.to_parquet(p)
    (ex,) = tasks_lib.get("ner").read(f"parquet:{p}")
    self.assertEqual(ex.labels, ("B-PER", "I-PER", "O"))
    self.assertEqual(ex.source, f"parquet:{p} row 0")

  def test_json_int_tags_without_names_use_label_names(self):
    p = self.write("x.jsonl", '{"words": ["a", "b"], "upos": [1, 0]}\n')
    (ex,) = tasks_lib.get("pos").read(
      f"json:{p}", columns={"tokens": "words"}, label_names=("X", "Y")
    )
    self.assertEqual(ex.labels, ("Y", "X"))

  def test_json_nli(self):
    p = self.write(
      "x.jsonl",
      '{"premise": "p", "hypothesis": "h", "label": 2, "idx": 0}\n',
    )
    (ex,) = tasks_lib.get("nli").read(f"json:{p}")
    self.assertEqual(ex, task_files.PairExample("p", "h", "contradiction"))

  def test_dataset_errors(self):
    p = self.write("x.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n')
    with self.assertRaisesRegex(BistilError, "no column 'ner_tags'"):
      tasks_lib.get("ner").read(f"json:{p}")
    p = self.write("y.jsonl", '{"tokens": ["a", "b"], "ner_tags": ["O"]}\n')
    with self.assertRaisesRegex(BistilError, "row 0: 2 tokens but 1 tags"):
      tasks_lib.get("ner").read(f"json:{p}")
    p = self.write("z.jsonl", '{"tokens": ["a"], "ner_tags": ["PER"]}\n')
    with self.assertRaisesRegex(BistilError, "row 0: malformed NER tag"):
      tasks_lib.get("ner").read(f"json:{p}")
    p = self.write("e.jsonl", '{"tokens": [], "ner_tags": []}\n')
    with self.assertRaisesRegex(BistilError, f"json:{p} holds no examples"):
      tasks_lib.get("ner").read(f"json:{p}")


# ------------------------------------------------------------------ labels
def tok_ex(labels, source="f.txt:1"):
  return task_files.TokenExample(
    tuple("w" * len(labels)), tuple(labels), source
  )


class LabelSetTest(parameterized.TestCase):
  def test_subset_of_default_gives_the_whole_default(self):
    pos = task_files.read_conllu(path("pos", "train"))
    self.assertEqual(
      tasks_lib.get("pos").label_set(pos), task_files.UPOS_LABELS
    )
    ner = task_files.read_conll_ner(path("ner", "train"))
    self.assertEqual(tasks_lib.get("ner").label_set(ner), task_files.NER_LABELS)
    nli = task_files.read_nli(path("nli", "train"))
    self.assertEqual(
      tasks_lib.get("nli").label_set(nli),
      ("entailment", "neutral", "contradiction"),
    )

  def test_other_labels_are_sorted_and_ner_types_completed(self):
    examples = [tok_ex(["O", "B-DATE", "B-PER"]), tok_ex(["I-PER"])]
    self.assertEqual(
      tasks_lib.get("ner").label_set(examples),
      ("B-DATE", "B-PER", "I-DATE", "I-PER", "O"),
    )
    self.assertEqual(
      tasks_lib.get("pos").label_set([tok_ex(["NOUN", "_", "ADJ"])]),
      ("ADJ", "NOUN", "_"),
    )

  def test_given_labels_win_and_unknown_labels_fail(self):
    examples = [tok_ex(["B", "A"]), tok_ex(["C"], "data/test.txt:7")]
    self.assertEqual(
      tasks_lib.get("pos").label_set(examples[:1], given=["B", "A"]), ("B", "A")
    )
    with self.assertRaisesRegex(
      BistilError, r"unknown pos label 'C' at data/test.txt:7"
    ):
      tasks_lib.get("pos").label_set(examples, given=["A", "B"])
    with self.assertRaisesRegex(BistilError, "given twice: A"):
      tasks_lib.get("pos").label_set(examples, given=["A", "A", "B", "C"])
    with self.assertRaisesRegex(BistilError, "no pos examples"):
      tasks_lib.get("pos").label_set([])

  def test_relabel(self):
    examples = task_files.relabel(
      [tok_ex(["B-DATE", "I-DATE", "B-PER"])],
      {"B-DATE": "O", "I-DATE": "O"},
    )
    self.assertEqual(examples[0].labels, ("O", "O", "B-PER"))


# ------------------------------------------------------------------ encoding
class EncodeTokenTest(parameterized.TestCase):
  def test_labels_on_first_sub_words_only(self):
    ex = task_files.TokenExample(
      ("The", "unbelievable", "cats"), ("D", "A", "N")
    )
    data = tasks.encode_token_task([ex], HAND, {"A": 0, "D": 1, "N": 2}, 12)
    # [CLS] the un ##believ ##able cat ##s [SEP] [PAD]*4
    np.testing.assert_array_equal(
      data.input_ids[0], [CLS, 5, 8, 9, 10, 6, 11, SEP, PAD, PAD, PAD, PAD]
    )
    np.testing.assert_array_equal(
      data.labels[0],
      [-100, 1, 0, -100, -100, 2, -100, -100, -100, -100, -100, -100],
    )
    np.testing.assert_array_equal(data.attention_mask[0], [1] * 8 + [0] * 4)
    np.testing.assert_array_equal(data.token_type_ids[0], [0] * 12)
    self.assertEqual(data.label_names, ("A", "D", "N"))
    for a in (data.input_ids, data.attention_mask, data.labels):
      self.assertEqual(a.dtype, np.int32)

  def test_word_without_sub_words_becomes_unk(self):
    ex = task_files.TokenExample(("a", "\u200b", "b"), ("X", "Y", "X"))
    data = tasks.encode_token_task([ex], HAND, {"X": 0, "Y": 1}, 8)
    np.testing.assert_array_equal(
      data.input_ids[0], [CLS, 12, UNK, 13, SEP, PAD, PAD, PAD]
    )
    np.testing.assert_array_equal(data.labels[0, :5], [-100, 0, 1, 0, -100])
    self.assertEqual(data.num_unk_words, 1)

  def test_synthetic_alignment_invariants(self):
    examples = task_files.read_conll_ner(path("ner", "train"))
    labels = tasks_lib.get("ner").label_set(examples)
    ids = tasks.label_ids(labels)
    data = tasks.encode_token_task(examples, TOK, ids, 128, task="ner")
    self.assertEqual(data.num_examples + data.num_dropped, len(examples))
    self.assertEqual(data.num_dropped, 0)
    for row, i in enumerate(data.example_index):
      ex = examples[i]
      enc = TOK.encode(list(ex.words), is_pretokenized=True)
      word_ids = enc.word_ids
      first = [
        p
        for p, w in enumerate(word_ids)
        if w is not None and (p == 0 or word_ids[p - 1] != w)
      ]
      labelled = np.flatnonzero(data.labels[row] != -100)
      np.testing.assert_array_equal(labelled, first)
      self.assertEqual(
        tuple(labels[j] for j in data.labels[row, labelled]), ex.labels
      )
      np.testing.assert_array_equal(
        data.input_ids[row, : len(enc.ids)], enc.ids
      )
    # Some word is split, else the test would not test alignment.
    self.assertGreater(
      int(data.attention_mask.sum()) - 2 * data.num_examples,
      int((data.labels != -100).sum()),
    )

  def test_long_examples_are_dropped_or_truncated(self):
    examples = [
      task_files.TokenExample(("a",), ("X",)),
      task_files.TokenExample(("the", "unbelievable", "a"), ("X", "X", "X")),
      task_files.TokenExample(("b", "b"), ("X", "X")),
    ]
    # Lengths with specials: 3, 7, 4.
    data = tasks.encode_token_task(examples, HAND, {"X": 0}, 5)
    self.assertEqual(data.num_dropped, 1)
    np.testing.assert_array_equal(data.example_index, [0, 2])
    data = tasks.encode_token_task(examples, HAND, {"X": 0}, 5, drop_long=False)
    self.assertEqual((data.num_dropped, data.num_truncated), (0, 1))
    # [CLS] the un ##believ [SEP]: the cut word "a" loses its label.
    np.testing.assert_array_equal(data.input_ids[1], [CLS, 5, 8, 9, SEP])
    np.testing.assert_array_equal(data.labels[1], [-100, 0, 0, -100, -100])
    with self.assertRaisesRegex(BistilError, "all 1 pos examples are longer"):
      tasks.encode_token_task(examples[1:2], HAND, {"X": 0}, 5, task="pos")

  def test_bad_inputs(self):
    ex = task_files.TokenExample(("a",), ("X",), "f.txt:3")
    with self.assertRaisesRegex(BistilError, "unknown label 'X' at f.txt:3"):
      tasks.encode_token_task([ex], HAND, {"Y": 0}, 8)
    with self.assertRaisesRegex(BistilError, "label ids must be 0..k-1"):
      tasks.encode_token_task([ex], HAND, {"X": 1}, 8)
    with self.assertRaisesRegex(BistilError, "max_seq_len must be >= 2"):
      tasks.encode_token_task([ex], HAND, {"X": 0}, 1)
    with self.assertRaisesRegex(BistilError, "no task examples"):
      tasks.encode_token_task([], HAND, {"X": 0}, 8)

  def test_tokenizer_settings_are_ignored_and_kept(self):
    tok = Tokenizer.from_str(HAND.to_str())
    tok.enable_truncation(3)
    tok.enable_padding(pad_id=PAD, length=20)
    ex = task_files.TokenExample(("the", "cat", "sat"), ("X", "X", "X"))
    data = tasks.encode_token_task([ex], tok, {"X": 0}, 6)
    np.testing.assert_array_equal(data.input_ids[0], [CLS, 5, 6, 7, SEP, PAD])
    self.assertEqual(tok.truncation["max_length"], 3)


class EncodePairTest(parameterized.TestCase):
  def test_segments_labels_and_truncation(self):
    examples = [
      task_files.PairExample("the cat", "a", "neutral"),
      task_files.PairExample("the cat sat a b", "a b", "entailment"),
    ]
    ids = tasks.label_ids(task_files.NLI_LABELS)
    data = tasks.encode_sequences(examples, HAND, ids, 8)
    np.testing.assert_array_equal(
      data.input_ids[0], [CLS, 5, 6, SEP, 12, SEP, PAD, PAD]
    )
    np.testing.assert_array_equal(
      data.token_type_ids[0], [0] * 4 + [1, 1, 0, 0]
    )
    np.testing.assert_array_equal(data.attention_mask[0], [1] * 6 + [0, 0])
    # Longest first: 5 + 2 pieces -> 3 + 2 within 8 - 3 specials.
    np.testing.assert_array_equal(
      data.input_ids[1], [CLS, 5, 6, 7, SEP, 12, 13, SEP]
    )
    np.testing.assert_array_equal(data.labels, [1, 0])
    self.assertEqual(data.labels.shape, (2,))
    self.assertEqual(data.num_truncated, 1)

  def test_synthetic_nli(self):
    examples = tasks_lib.get("nli").read(path("nli", "dev"))
    labels = tasks_lib.get("nli").label_set(examples)
    data = tasks_lib.get("nli").encode(
      examples, TOK, tasks.label_ids(labels), 16, train=True
    )
    self.assertEqual(data.input_ids.shape, (len(examples), 16))
    self.assertEqual(
      [labels[i] for i in data.labels], [e.label for e in examples]
    )
    self.assertGreater(data.num_truncated, 0)
    self.assertTrue(np.all(data.token_type_ids.max(axis=1) == 1))

  def test_an_unknown_token_label_is_named_at_its_words_line(self):
    with tempfile.TemporaryDirectory() as tmp:
      p = os.path.join(tmp, "x.conllu")
      with open(p, "w", encoding="utf-8") as f:
        f.write(
          "# sent_id = 1\n"
          "1\ta\ta\tNOUN\t_\t_\t0\troot\t_\t_\n"
          "2\ta\ta\tNOUN\t_\t_\t1\tdep\t_\t_\n"
          "3\ta\ta\tXYZ\t_\t_\t1\tdep\t_\t_\n\n"
        )
      examples = task_files.read_conllu(p)
      with self.assertRaisesRegex(
        BistilError, f"^unknown label 'XYZ' at {re.escape(p)}:4;"
      ):
        tasks.encode_token_task(
          examples,
          HAND,
          tasks.label_ids(task_files.UPOS_LABELS),
          16,
          task="pos",
        )

  def test_unknown_label(self):
    ex = task_files.PairExample("a", "b", "maybe", "x.tsv:4")
    with self.assertRaisesRegex(
      BistilError, "unknown label 'maybe' at x.tsv:4"
    ):
      tasks.encode_sequences(
        [ex], HAND, tasks.label_ids(task_files.NLI_LABELS), 8
      )


# ------------------------------------------------------------------ batches
def small_data(n=10, length=6):
  examples = [
    task_files.TokenExample(("a",) * (1 + i % 3), ("X",) * (1 + i % 3))
    for i in range(n)
  ]
  data = tasks.encode_token_task(examples, HAND, {"X": 0}, length, task="pos")
  # Tag each row by its index so tests can tell rows apart.
  data.input_ids[:, 0] = np.arange(n)
  return data


class BatchesTest(parameterized.TestCase):
  @parameterized.parameters(1, 3, 4, 10, 16)
  def test_eval_covers_every_example_once_in_order(self, batch_size):
    data = small_data()
    batches = list(tasks.eval_batches(data, batch_size))
    self.assertLen(batches, data.num_batches(batch_size, drop_remainder=False))
    seen = []
    for rows, b in batches:
      self.assertEqual(b["input_ids"].shape[0], batch_size)
      self.assertEqual(b["labels"].shape, b["input_ids"].shape)
      real = b["example_mask"].astype(bool)
      np.testing.assert_array_equal(real, rows >= 0)
      seen += list(b["input_ids"][real, 0])
      self.assertTrue(np.all(b["labels"][~real] == -100))
    self.assertEqual(seen, list(range(10)))

  def test_eval_padding_rows_of_pair_task(self):
    examples = [task_files.PairExample("a", "b", "neutral")] * 3
    data = tasks.encode_sequences(
      examples, HAND, tasks.label_ids(task_files.NLI_LABELS), 8
    )
    ((rows, b),) = tasks.eval_batches(data, 4)
    np.testing.assert_array_equal(rows, [0, 1, 2, -1])
    np.testing.assert_array_equal(b["labels"], [1, 1, 1, -100])
    np.testing.assert_array_equal(b["example_mask"], [1, 1, 1, 0])

  def test_train_is_deterministic_per_seed_and_epoch(self):
    data = small_data()

    def rows(seed, epoch):
      tb = tasks.TaskBatches(data, 3, seed)
      per = tb.per_epoch
      return [
        list(tb.batch(epoch * per + i)["input_ids"][:, 0]) for i in range(per)
      ]

    self.assertEqual(rows(0, 1), rows(0, 1))
    self.assertNotEqual(rows(0, 1), rows(0, 2))
    self.assertNotEqual(rows(0, 1), rows(1, 1))
    epoch = rows(5, 0)
    self.assertLen(epoch, data.num_batches(3))
    flat = sum(epoch, [])
    self.assertLen(flat, 9)
    self.assertLen(set(flat), 9)  # No row twice, one left out.

  def test_batches_are_padded_to_a_bucket_and_split_over_hosts(self):
    examples = [
      task_files.TokenExample(("a",) * n, ("X",) * n)
      for n in (3, 40, 5, 90, 7, 8)
    ]
    data = tasks.encode_token_task(examples, HAND, {"X": 0}, 128)
    self.assertEqual(tasks.bucket_lengths(128), (16, 32, 64, 128))
    shapes = set()
    for rows, b in tasks.eval_batches(data, 2):
      longest = int(data.attention_mask[rows].sum(-1).max())
      width = b["input_ids"].shape[1]
      self.assertIn(width, tasks.bucket_lengths(128))
      self.assertGreaterEqual(width, longest)
      self.assertLess(width // 2, max(longest, 16))
      shapes.add(width)
    self.assertEqual(shapes, {16, 64, 128})
    # Two hosts: each gets its half of the same global batch, same width.
    one = tasks.TaskBatches(data, 4, 0).batch(0)
    halves = [
      tasks.TaskBatches(data, 4, 0, process_index=i, num_processes=2).batch(0)
      for i in range(2)
    ]
    for k, v in one.items():
      np.testing.assert_array_equal(v, np.concatenate([h[k] for h in halves]))

  def test_bad_batch_arguments(self):
    data = small_data()
    with self.assertRaisesRegex(BistilError, "fewer than one batch of 11"):
      tasks.TaskBatches(data, 11, 0)
    with self.assertRaisesRegex(BistilError, "batch size must be >= 1"):
      list(tasks.eval_batches(data, 0))
    with self.assertRaisesRegex(BistilError, "must be non-negative"):
      tasks.TaskBatches(data, 2, -1).batch(0)


class WindowTest(parameterized.TestCase):
  @parameterized.parameters(5, 6, 9, 12)
  def test_every_labelled_sub_word_is_scored_once_with_context(self, length):
    words = ("the", "unbelievable", "cats", "a", "b") * 3
    labels = tuple(f"L{i % 4}" for i in range(len(words)))
    ex = task_files.TokenExample(words, labels)
    ids = tasks.label_ids(sorted(set(labels)))
    full = tasks.encode_token_task([ex], HAND, ids, 64)
    win = tasks.encode_token_task(
      [ex], HAND, ids, length, drop_long=False, window=True
    )
    self.assertGreater(win.num_examples, 1)
    np.testing.assert_array_equal(win.example_index, [0] * win.num_examples)
    self.assertEqual(win.num_truncated, 1)
    scored = win.labels[win.labels != -100]
    np.testing.assert_array_equal(scored, full.labels[full.labels != -100])
    for row, mask in zip(win.input_ids, win.attention_mask, strict=True):
      real = row[mask > 0]
      self.assertEqual((real[0], real[-1]), (CLS, SEP))
      self.assertLessEqual(len(real), length)

  def test_windows_join_back_per_example(self):

    words = ("a", "b") * 10
    ex = [task_files.TokenExample(words, ("X", "Y") * 10), tok_ex(["X"])]
    win = tasks.encode_token_task(
      ex, HAND, {"X": 0, "Y": 1}, 6, drop_long=False, window=True
    )
    pred, gold = token_kind.per_example(
      win.labels.copy(), win.labels, win.example_index
    )
    self.assertEqual(gold.shape, (2, 20))
    np.testing.assert_array_equal(gold[0], [0, 1] * 10)
    np.testing.assert_array_equal(gold[1], [0] + [-100] * 19)
    np.testing.assert_array_equal(pred, gold)


if __name__ == "__main__":
  absltest.main()
