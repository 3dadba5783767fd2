"""WordPiece training on synthetic languages, HF loading, trimming, CLI."""

import argparse
import contextlib
import io
import json
import os
import tempfile

import numpy as np
import transformers
from absl.testing import absltest
from tokenizers import Tokenizer

from bistil_jax.checkpoint import hf, trim
from bistil_jax.data import vocab
from bistil_jax.errors import BistilError
from bistil_jax.model import config as config_lib
from bistil_jax.synthetic import cli, languages, writer
from bistil_jax.synthetic import tokenizer as tok_lib

LANGS = ("a1", "a2", "b1", "c1")
SIZES = writer.Sizes(
  corpus_train=1500, corpus_dev=200, task_train=2, task_dev=2, task_test=2
)
VOCAB = 1500
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _dev_encodings(tok: Tokenizer, path) -> list:
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  return tok.encode_batch(lines, add_special_tokens=False)


def _words(encoding) -> list[list[int]]:
  """Token ids grouped by the word they came from."""
  out = {}
  for i, w in zip(encoding.ids, encoding.word_ids, strict=True):
    out.setdefault(w, []).append(i)
  return list(out.values())


def _tokens_per_word(tok: Tokenizer, path) -> float:
  encs = _dev_encodings(tok, path)
  return sum(len(e.ids) for e in encs) / sum(len(_words(e)) for e in encs)


class TrainWordPieceTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.TemporaryDirectory()
    cls.tmp = cls._tmp.name
    family = languages.make_family(seed=0, num_languages=8)
    cls.paths = writer.write_dataset(
      os.path.join(cls.tmp, "data"), family, LANGS, SIZES
    )
    cls.files = [str(cls.paths.corpora[c]["train"]) for c in LANGS]
    cls.tok_dir = os.path.join(cls.tmp, "tokenizer")
    cls.tok = tok_lib.train_wordpiece(cls.files, cls.tok_dir, VOCAB)

  @classmethod
  def tearDownClass(cls):
    cls._tmp.cleanup()
    super().tearDownClass()

  def path(self, *parts):
    return os.path.join(self.tmp, *parts)

  def test_files_and_special_tokens(self):
    self.assertEqual(
      sorted(os.listdir(self.tok_dir)),
      [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
      ],
    )
    on_disk = Tokenizer.from_file(os.path.join(self.tok_dir, "tokenizer.json"))
    self.assertEqual(on_disk.to_str(), self.tok.to_str())
    self.assertEqual(on_disk.get_vocab_size(), VOCAB)
    for i, t in enumerate(SPECIALS):
      self.assertEqual(on_disk.token_to_id(t), i)
    with open(os.path.join(self.tok_dir, "vocab.txt"), encoding="utf-8") as f:
      lines = f.read().splitlines()
    self.assertEqual(lines, [on_disk.id_to_token(i) for i in range(VOCAB)])
    with open(os.path.join(self.tok_dir, "tokenizer_config.json")) as f:
      config = json.load(f)
    self.assertEqual(config["tokenizer_class"], "BertTokenizerFast")
    self.assertTrue(config["do_lower_case"])
    self.assertEqual(config["model_max_length"], 512)
    # Accepted by the trimming code, which keeps exactly the five specials.
    loaded, tok_json = vocab.load_tokenizer_dir(self.tok_dir)
    self.assertEqual(tok_json["model"]["type"], "WordPiece")
    specials = vocab.special_token_ids(
      tok_json, vocab.extra_special_tokens(self.tok_dir)
    )
    np.testing.assert_array_equal(specials, [0, 1, 2, 3, 4])
    self.assertEqual(vocab.unk_token_id(loaded), 1)
    # BERT templates: [CLS] a [SEP] b [SEP] with type ids 0..0 1..1.
    enc = loaded.encode("tsaa", "saa")
    self.assertEqual((enc.ids[0], enc.ids[-1], enc.ids.count(3)), (2, 3, 2))
    sep = enc.ids.index(3)
    self.assertEqual(
      enc.type_ids, [0] * (sep + 1) + [1] * (len(enc.ids) - sep - 1)
    )

  def test_covers_every_language_with_subwords(self):
    vocab_tokens = self.tok.get_vocab()
    self.assertGreater(sum(t.startswith("##") for t in vocab_tokens), 100)
    for code in LANGS:
      encs = _dev_encodings(self.tok, self.paths.corpora[code]["dev"])
      ids = [i for e in encs for i in e.ids]
      unk_rate = ids.count(1) / len(ids)
      self.assertLess(unk_rate, 0.01, code)
      words = [w for e in encs for w in _words(e)]
      split = [w for w in words if len(w) >= 2]
      # Sub-words occur but do not shred the text into characters.
      self.assertGreater(len(split) / len(words), 0.05, code)
      self.assertLess(len(ids) / len(words), 2.5, code)
      pieces = {self.tok.id_to_token(i) for w in split for i in w[1:]}
      self.assertTrue(all(p.startswith("##") for p in pieces), code)
      self.assertTrue(any(len(p) > 3 for p in pieces), code)  # not just chars

  def test_transformers_round_trip(self):
    fast = transformers.AutoTokenizer.from_pretrained(self.tok_dir)
    slow = transformers.BertTokenizer.from_pretrained(self.tok_dir)
    self.assertIsInstance(fast, transformers.BertTokenizerFast)
    self.assertEqual(
      (fast.pad_token_id, fast.unk_token_id, fast.cls_token_id),
      (0, 1, 2),
    )
    self.assertEqual((fast.sep_token_id, fast.mask_token_id), (3, 4))
    self.assertLen(fast, VOCAB)
    with open(self.paths.corpora["b1"]["dev"], encoding="utf-8") as f:
      lines = f.read().splitlines()[:30]
    lines.append("Ünseen CAPS, and 1955 digits!")
    raw = Tokenizer.from_file(os.path.join(self.tok_dir, "tokenizer.json"))
    for a, b in zip(lines, lines[1:] + lines[:1], strict=True):
      want = raw.encode(a, b)
      got = fast(a, b)
      self.assertEqual(got["input_ids"], want.ids)
      self.assertEqual(got["token_type_ids"], want.type_ids)
      # The slow tokenizer reads vocab.txt: same algorithm, same ids.
      self.assertEqual(slow(a, b)["input_ids"], want.ids)
      self.assertEqual(
        fast.decode(want.ids, skip_special_tokens=True), raw.decode(want.ids)
      )
    self.assertEqual(
      fast.decode(fast("Tsaa gaihai, lai.")["input_ids"][1:-1]),
      "tsaa gaihai, lai.",
    )

  def test_deterministic_in_any_file_order(self):
    # The plain `tokenizers` trainer numbers pieces in hash order; ours must
    # not: same bytes from a second run, with the files in another order.
    again = self.path("again")
    tok_lib.train_wordpiece(self.files[::-1], again, VOCAB)
    for name in os.listdir(self.tok_dir):
      with open(os.path.join(self.tok_dir, name), "rb") as f:
        first = f.read()
      with open(os.path.join(again, name), "rb") as f:
        self.assertEqual(f.read(), first, name)

  def test_balance_gives_a_small_language_its_pieces(self):
    small = self.path("c1_small.txt")
    with open(self.paths.corpora["c1"]["train"], encoding="utf-8") as f:
      head = f.readlines()[:100]
    with open(small, "w", encoding="utf-8") as f:
      f.writelines(head)
    files = [*self.files[:3], small]
    dev = self.paths.corpora["c1"]["dev"]
    balanced = tok_lib.train_wordpiece(files, self.path("bal"), 1000)
    plain = tok_lib.train_wordpiece(
      files, self.path("plain"), 1000, balance=False
    )
    # Unbalanced, c1 (100 of 4600 lines) is split nearly into characters.
    self.assertLess(
      _tokens_per_word(balanced, dev), 0.75 * _tokens_per_word(plain, dev)
    )
    for code in ("a1", "b1"):  # the big languages lose little
      d = self.paths.corpora[code]["dev"]
      self.assertLess(
        _tokens_per_word(balanced, d), 1.25 * _tokens_per_word(plain, d)
      )

  def test_balanced_counts(self):
    a = {"x": 3, "y": 1}  # 4 words
    b = {"x": 1, "z": 7}  # 8 words
    self.assertEqual(
      tok_lib.balanced_counts([a, b], balance=False), {"x": 4, "y": 1, "z": 7}
    )
    # a is scaled x2 to 8 words.
    self.assertEqual(tok_lib.balanced_counts([a, b]), {"x": 7, "y": 2, "z": 7})
    # Down to 2 words each: y (0.5 -> 1, half up), x of b (0.25 -> 0) goes.
    self.assertEqual(
      tok_lib.balanced_counts([a, b], words_per_corpus=2),
      {"x": 2, "y": 1, "z": 2},
    )
    with self.assertRaisesRegex(BistilError, "empty"):
      tok_lib.balanced_counts([a, {}])
    with self.assertRaisesRegex(BistilError, "no corpora"):
      tok_lib.balanced_counts([])

  def test_init_model_dir_then_trim_to_two_languages(self):
    model_dir = self.path("teacher")
    config = tok_lib.init_model_dir(
      model_dir, self.tok_dir, config_lib.preset("tiny"), seed=3
    )
    self.assertEqual((config.vocab_size, config.head), (VOCAB, "mlm"))
    model, params = hf.load_hf(model_dir)
    self.assertEqual(model.config.vocab_size, VOCAB)
    self.assertEqual(model.config.architecture, "BertForMaskedLM")
    emb = params["embeddings"]["word_embeddings"]["embedding"]
    self.assertEqual(emb.shape, (config.padded_vocab_size, 32))
    self.assertGreater(float(np.std(emb[:VOCAB])), 0.01)  # random, not zero
    with open(os.path.join(model_dir, "tokenizer_config.json")) as f:
      self.assertEqual(json.load(f)["model_max_length"], config.max_length)
    with self.assertRaisesRegex(BistilError, "not empty"):
      tok_lib.init_model_dir(
        model_dir, self.tok_dir, config_lib.preset("tiny"), seed=3
      )

    out = self.path("trimmed")
    report = trim.trim_model_dir(
      model_dir,
      str(self.paths.corpora["a1"]["train"]),
      str(self.paths.corpora["a2"]["train"]),
      out,
      num_threads=1,
    )
    self.assertEqual(report["vocab_size_before"], VOCAB)
    self.assertLess(report["vocab_size_after"], 0.8 * VOCAB)
    self.assertLess(report["parameters_after"], report["parameters_before"])
    trimmed, trimmed_params = hf.load_hf(out)
    self.assertEqual(trimmed.config.vocab_size, report["vocab_size_after"])
    new_tok, _ = vocab.load_tokenizer_dir(out)
    self.assertEqual(new_tok.get_vocab_size(), report["vocab_size_after"])
    fast = transformers.AutoTokenizer.from_pretrained(out)
    line = "tsaa gaiwai lai"
    self.assertEqual(fast(line)["input_ids"], new_tok.encode(line).ids)
    # Kept rows are the teacher's rows, in vocab_map order.
    vmap = vocab.read_vocab_map(os.path.join(out, "vocab_map.json"))
    keep = vocab.keep_ids_from_vocab_map(vmap)
    np.testing.assert_array_equal(
      trimmed_params["embeddings"]["word_embeddings"]["embedding"][: keep.size],
      emb[keep],
    )

  def test_bad_inputs(self):
    with self.assertRaisesRegex(BistilError, "not found"):
      tok_lib.train_wordpiece([self.path("nope.txt")], self.path("x"))
    empty = self.path("empty.txt")
    with open(empty, "w") as f:
      f.write("\n \n")
    with self.assertRaisesRegex(BistilError, "no words"):
      tok_lib.train_wordpiece([empty], self.path("x"))
    with self.assertRaisesRegex(BistilError, "non-empty list"):
      tok_lib.train_wordpiece(self.files[0], self.path("x"))
    with self.assertRaisesRegex(BistilError, "vocab_size must be > 5"):
      tok_lib.train_wordpiece(self.files, self.path("x"), vocab_size=5)
    with self.assertRaisesRegex(BistilError, "not empty"):
      tok_lib.train_wordpiece(self.files, self.tok_dir)
    self.assertFalse(os.path.exists(self.path("x")))
    config = config_lib.preset("tiny", type_vocab_size=1)
    with self.assertRaisesRegex(BistilError, "2 token types"):
      tok_lib.init_model_dir(self.path("y"), self.tok_dir, config)
    self.assertFalse(os.path.exists(self.path("y")))


class SynthTokenizerOptionTest(absltest.TestCase):
  def _run(self, argv):
    parser = argparse.ArgumentParser(prog="bistil")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      status = args.func(args)
    return status, out.getvalue()

  def test_tokenizer_vocab_option(self):
    tmp_dir = tempfile.TemporaryDirectory()
    self.addCleanup(tmp_dir.cleanup)
    tmp = tmp_dir.name
    out = os.path.join(tmp, "synth")
    small = [
      "synth", "--out", out, "--languages", "a1,b1",
      "--corpus-sentences", "300", "--corpus-dev-sentences", "5",
      "--task-sentences", "3", "--task-eval-sentences", "3",
    ]  # fmt: skip
    with self.assertRaisesRegex(BistilError, "vocab_size must be > 5"):
      self._run([*small, "--tokenizer-vocab", "3"])
    self.assertFalse(os.path.exists(out))
    status, text = self._run([*small, "--tokenizer-vocab", "200"])
    self.assertEqual(status, 0)
    tok_dir = os.path.join(out, "tokenizer")
    self.assertIn(f"tokenizer: WordPiece, 200 tokens, {tok_dir}", text)
    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    self.assertEqual(tok.get_vocab_size(), 200)
    # Without the option nothing is trained; --overwrite replaces it.
    status, text = self._run(
      [*small, "--overwrite", "--tokenizer-vocab", "150"]
    )
    self.assertEqual(status, 0)
    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    self.assertEqual(tok.get_vocab_size(), 150)
    other = os.path.join(tmp, "plain")
    self._run(["synth", "--out", other, *small[3:]])
    self.assertNotIn("tokenizer", os.listdir(other))


if __name__ == "__main__":
  absltest.main()
