"""Vocabulary trimming: corpora, counting, selection, tokenizers, models."""

import contextlib
import gzip
import io
import json
import os
import random
import shutil
import tempfile

import numpy as np
from absl.testing import absltest, parameterized
from tokenizers import (
  AddedToken,
  Tokenizer,
  models,
  normalizers,
  pre_tokenizers,
  processors,
  trainers,
)

from bistil_jax.data import corpus, vocab
from bistil_jax.errors import BistilError

# Fake languages with distinct syllable inventories: (consonants, vowels).
LANGS = {
  "aa": ("ptkbdg", "aiu"),
  "bb": ("mnlrsvz", "eoy"),
  "cc": ("бвгджзкл", "аоуыэ"),
  "gr": ("βγδζθκλ", "αεηιο"),  # never seen by the tokenizers
}
WP_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SPM_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]


def make_lines(lang: str, n: int, seed: int = 0) -> list[str]:
  """n sentences of a fake language with a Zipfian 300-word lexicon."""
  cons, vows = LANGS[lang]
  lex_rng = random.Random(f"lexicon-{lang}")
  lexicon = sorted(
    {
      "".join(
        lex_rng.choice(cons) + lex_rng.choice(vows)
        for _ in range(lex_rng.randint(1, 3))
      )
      for _ in range(300)
    }
  )
  lex_rng.shuffle(lexicon)
  weights = [1.0 / (r + 1) for r in range(len(lexicon))]
  rng = random.Random(f"{lang}-{seed}")
  lines = []
  for _ in range(n):
    words = rng.choices(lexicon, weights, k=rng.randint(3, 12))
    line = " ".join(words)
    if rng.random() < 0.3:
      line = line.capitalize() + "."
    if rng.random() < 0.1:
      line += f" {rng.randint(0, 99)}"
    lines.append(line)
  return lines


def train_lines() -> list[str]:
  return [l for lang in ("aa", "bb", "cc") for l in make_lines(lang, 1500, 1)]


def write_json(path, obj):
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, ensure_ascii=False, indent=2)


def added_decoder(tok: Tokenizer) -> dict:
  d = json.loads(tok.to_str())
  return {
    str(t["id"]): {k: t[k] for k in t if k != "id"} for t in d["added_tokens"]
  }


def make_wordpiece_dir(path: str) -> Tokenizer:
  """An mBERT-like tokenizer dir (tokenizer.json, vocab.txt, configs).

  As in mBERT, never-seen `[unusedN]` pieces sit between [PAD] and the other
  specials, so trimming moves the ids of [UNK], [CLS], [SEP] and [MASK].
  """
  trained = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  trained.normalizer = normalizers.BertNormalizer(lowercase=True)
  trained.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  trained.train_from_iterator(
    train_lines(),
    trainers.WordPieceTrainer(vocab_size=500, special_tokens=WP_SPECIALS),
  )
  pieces = [
    t for t, _ in sorted(trained.get_vocab().items(), key=lambda kv: kv[1])
  ]
  pieces = pieces[:1] + [f"[unused{i}]" for i in range(10)] + pieces[1:]
  tok = Tokenizer(
    models.WordPiece({t: i for i, t in enumerate(pieces)}, unk_token="[UNK]")
  )
  tok.normalizer = trained.normalizer
  tok.pre_tokenizer = trained.pre_tokenizer
  tok.add_special_tokens(WP_SPECIALS)
  cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
  tok.post_processor = processors.TemplateProcessing(
    single="[CLS] $A [SEP]",
    pair="[CLS] $A [SEP] $B:1 [SEP]:1",
    special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
  )
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, "tokenizer.json"))
  items = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
  with open(os.path.join(path, "vocab.txt"), "w", encoding="utf-8") as f:
    f.writelines(t + "\n" for t, _ in items)
  specials = dict(
    unk_token="[UNK]",
    sep_token="[SEP]",
    pad_token="[PAD]",
    cls_token="[CLS]",
    mask_token="[MASK]",
  )
  write_json(os.path.join(path, "special_tokens_map.json"), specials)
  write_json(
    os.path.join(path, "tokenizer_config.json"),
    dict(
      specials,
      tokenizer_class="BertTokenizer",
      do_lower_case=True,
      tokenize_chinese_chars=True,
      strip_accents=None,
      model_max_length=60,
      added_tokens_decoder=added_decoder(tok),
    ),
  )
  return tok


def make_unigram_dir(path: str) -> Tokenizer:
  """An XLM-R-like tokenizer dir, with a stale slow-tokenizer file."""
  tok = Tokenizer(models.Unigram())
  tok.normalizer = normalizers.NFKC()
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.train_from_iterator(
    train_lines(),
    trainers.UnigramTrainer(
      vocab_size=500, special_tokens=SPM_SPECIALS, unk_token="<unk>"
    ),
  )
  # As in XLM-R, <mask> comes after the pieces; here as an added token.
  tok.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
  tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "sentencepiece.bpe.model"), "wb") as f:
    f.write(b"\x0a\x05stale")  # stands for the untrimmed protobuf
  specials = dict(
    bos_token="<s>",
    eos_token="</s>",
    sep_token="</s>",
    cls_token="<s>",
    unk_token="<unk>",
    pad_token="<pad>",
    mask_token="<mask>",
  )
  write_json(os.path.join(path, "special_tokens_map.json"), specials)
  write_json(
    os.path.join(path, "tokenizer_config.json"),
    dict(
      specials,
      tokenizer_class="XLMRobertaTokenizer",
      vocab_file="sentencepiece.bpe.model",
      model_max_length=60,
      added_tokens_decoder=added_decoder(tok),
    ),
  )
  return tok


MAKERS = {"wordpiece": make_wordpiece_dir, "unigram": make_unigram_dir}


def write_lines(path: str, lines, gz: bool = False) -> str:
  opener = gzip.open if gz else open
  with opener(path, "wt", encoding="utf-8") as f:
    f.writelines(l + "\n" for l in lines)
  return path


def naive_counts(tok: Tokenizer, lines) -> np.ndarray:
  counts = np.zeros(tok.get_vocab_size(), np.int64)
  for line in lines:
    for i in tok.encode(line, add_special_tokens=False).ids:
      counts[i] += 1
  return counts


class TmpDirTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.tmp, True)

  def path(self, *names):
    return os.path.join(self.tmp, *names)


# ---------------------------------------------------------------- corpora
class CorpusTest(TmpDirTest):
  def test_plain_file_skips_blank_lines(self):
    p = self.path("c.txt")
    with open(p, "w", encoding="utf-8") as f:
      f.write("a b\n\n   \nc\r\nlast line no newline")
    self.assertEqual(
      list(corpus.iter_lines(p)), ["a b", "c", "last line no newline"]
    )
    self.assertEqual(list(corpus.iter_lines(p, max_lines=2)), ["a b", "c"])

  def test_gzip_file(self):
    lines = make_lines("aa", 20)
    p = write_lines(self.path("c.txt.gz"), lines, gz=True)
    self.assertEqual(list(corpus.iter_lines(p)), lines)

  def test_missing_file_names_path(self):
    p = self.path("nope.txt")
    with self.assertRaisesRegex(BistilError, "corpus file not found: .*nope"):
      corpus.iter_lines(p)
    with self.assertRaisesRegex(BistilError, "not found: .*nope.jsonl"):
      corpus.iter_lines(f"json:{self.path('nope.jsonl')}:text")

  def test_directory_refused(self):
    with self.assertRaisesRegex(BistilError, "is a directory"):
      corpus.iter_lines(self.tmp)

  def test_empty_corpus(self):
    p = self.path("e.txt")
    with open(p, "w") as f:
      f.write("\n  \n\n")
    with self.assertRaisesRegex(BistilError, "empty"):
      list(corpus.iter_lines(p))

  def test_bad_gzip_and_encoding(self):
    p = self.path("x.gz")
    with open(p, "w") as f:
      f.write("plain\n")
    with self.assertRaisesRegex(BistilError, "not gzipped"):
      corpus.iter_lines(p)
    p = self.path("latin1.txt")
    with open(p, "wb") as f:
      f.write(b"ok\ncaf\xe9\n")
    with self.assertRaisesRegex(BistilError, "not valid UTF-8"):
      list(corpus.iter_lines(p))

  def test_json_and_text_datasets(self):
    p = self.path("d.jsonl")
    rows = [{"id": i, "body": l} for i, l in enumerate(make_lines("bb", 30))]
    rows[3]["body"] = ""
    with open(p, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    got = list(corpus.iter_lines(f"json:{p}:body"))
    self.assertEqual(got, [r["body"] for r in rows if r["body"]])
    self.assertLen(list(corpus.iter_lines(f"json:{p}:body", max_lines=5)), 5)
    with self.assertRaisesRegex(BistilError, "no column 'text'"):
      list(corpus.iter_lines(f"json:{p}"))
    t = write_lines(self.path("t.txt"), ["x y", "", "z"])
    self.assertEqual(list(corpus.iter_lines(f"text:{t}")), ["x y", "z"])

  def test_hf_spec_with_local_dataset_dir(self):
    d = self.path("ds")
    os.makedirs(d)
    write_lines(os.path.join(d, "train.txt"), ["one", "two"])
    self.assertEqual(list(corpus.iter_lines(f"hf:{d}:train")), ["one", "two"])

  @parameterized.parameters("hf:", "hf:name", "hf:a:b:c:d:e", "hf:n::split:")
  def test_bad_hf_spec(self, spec):
    with self.assertRaisesRegex(BistilError, "bad corpus spec"):
      corpus.iter_lines(spec)

  def test_parse_spec(self):
    s = corpus.parse_spec("hf:org/name:cfg:validation:content")
    self.assertEqual(
      (s.kind, s.path, s.config, s.split, s.column),
      ("hf", "org/name", "cfg", "validation", "content"),
    )
    s = corpus.parse_spec("hf:name::test:c")
    self.assertEqual((s.config, s.split, s.column), (None, "test", "c"))
    s = corpus.parse_spec("json:/d/x-*.jsonl")
    self.assertEqual(
      (s.builder, s.path, s.column), ("json", "/d/x-*.jsonl", "text")
    )


# --------------------------------------------------------------- counting
class CountTest(TmpDirTest):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._dir = tempfile.mkdtemp()
    cls.toks = {k: f(os.path.join(cls._dir, k)) for k, f in MAKERS.items()}
    cls.lines = make_lines("aa", 150, 7) + make_lines("gr", 20, 7)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls._dir)
    super().tearDownClass()

  @parameterized.product(kind=("wordpiece", "unigram"), threads=(1, 3))
  def test_matches_line_by_line(self, kind, threads):
    tok = self.toks[kind]
    got = vocab.count_tokens(
      tok, iter(self.lines), batch_size=7, num_threads=threads
    )
    self.assertEqual(got.dtype, np.int64)
    self.assertEqual(got.shape, (tok.get_vocab_size(),))
    np.testing.assert_array_equal(got, naive_counts(tok, self.lines))

  def test_ignores_truncation_and_specials(self):
    tok = Tokenizer.from_str(self.toks["wordpiece"].to_str())
    tok.enable_truncation(4)
    got = vocab.count_tokens(tok, self.lines)
    np.testing.assert_array_equal(
      got, naive_counts(self.toks["wordpiece"], self.lines)
    )
    self.assertEqual(got[tok.token_to_id("[CLS]")], 0)
    self.assertIsNotNone(tok.truncation)  # the caller's tokenizer is intact

  def test_progress_line(self):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
      vocab.count_tokens(
        self.toks["unigram"], self.lines, progress=True, desc="src"
      )
    self.assertRegex(err.getvalue(), r"src: 170 lines, [\d,]+ tokens")

  def test_bad_arguments(self):
    with self.assertRaisesRegex(BistilError, "batch_size"):
      vocab.count_tokens(self.toks["unigram"], self.lines, batch_size=0)
    with self.assertRaisesRegex(BistilError, "num_threads"):
      vocab.count_tokens(self.toks["unigram"], self.lines, num_threads=0)

  def test_save_load_round_trip(self):
    tok = self.toks["wordpiece"]
    c = vocab.count_tokens(tok, self.lines)
    p = self.path("counts.npz.part")  # any name: no extension is added
    vocab.save_counts(p, tok, {"source": c, "target": 2 * c}, {"x": 1})
    counts, meta = vocab.load_counts(p, tok)
    np.testing.assert_array_equal(counts["source"], c)
    np.testing.assert_array_equal(counts["target"], 2 * c)
    self.assertEqual(meta, {"x": 1})
    # A tokenizer with a different post-processor counts the same way.
    tok2 = Tokenizer.from_str(tok.to_str())
    tok2.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    vocab.load_counts(p, tok2)

  def test_counts_of_another_tokenizer_refused(self):
    c = vocab.count_tokens(self.toks["wordpiece"], self.lines)
    p = self.path("c.npz")
    vocab.save_counts(p, self.toks["wordpiece"], {"source": c})
    with self.assertRaisesRegex(BistilError, "different tokenizer"):
      vocab.load_counts(p, self.toks["unigram"])
    other = Tokenizer.from_str(self.toks["wordpiece"].to_str())
    other.normalizer = normalizers.BertNormalizer(lowercase=False)
    with self.assertRaisesRegex(BistilError, "different tokenizer"):
      vocab.load_counts(p, other)

  def test_bad_counts_files(self):
    tok = self.toks["unigram"]
    with self.assertRaisesRegex(BistilError, "counts file not found"):
      vocab.load_counts(self.path("none.npz"), tok)
    p = self.path("junk.npz")
    with open(p, "w") as f:
      f.write("junk")
    with self.assertRaisesRegex(BistilError, "not a counts file"):
      vocab.load_counts(p, tok)
    with self.assertRaisesRegex(BistilError, "shape"):
      vocab.save_counts(p, tok, {"source": np.zeros(3, np.int64)})


# -------------------------------------------------------------- selection
class SelectTest(parameterized.TestCase):
  def test_threshold_is_max_of_per_corpus_probabilities(self):
    src = np.array([0, 0, 50, 30, 20, 0, 0], np.int64)  # 100 tokens
    tgt = np.array([0, 0, 0, 1, 0, 6, 993], np.int64)  # 1000 tokens
    # p_src: .5 .3 .2 at 2,3,4; p_tgt: .001 .006 .993 at 3,5,6.
    keep = vocab.select_keep_ids(src, tgt, [0], threshold=0.005)
    np.testing.assert_array_equal(keep, [0, 2, 3, 4, 5, 6])
    keep = vocab.select_keep_ids(src, tgt, [0], threshold=0.25)
    np.testing.assert_array_equal(keep, [0, 2, 3, 6])
    # Pooled counts would give id 4 p=20/1100 < .02; max keeps it.
    keep = vocab.select_keep_ids(src, tgt, [], threshold=0.02)
    np.testing.assert_array_equal(keep, [2, 3, 4, 6])

  def test_specials_forced_and_order_preserved(self):
    src = np.array([0, 9, 0, 5, 0, 7], np.int64)
    tgt = np.array([0, 0, 0, 0, 0, 3], np.int64)
    # p_src = 9/21, 5/21, 7/21 at 1, 3, 5; p_tgt = 1 at 5.
    keep = vocab.select_keep_ids(src, tgt, [4, 0], threshold=0.2)
    np.testing.assert_array_equal(keep, [0, 1, 3, 4, 5])
    self.assertEqual(keep.dtype, np.int64)

  def test_min_count(self):
    src = np.array([1, 2, 3, 100], np.int64)
    tgt = np.array([0, 5, 0, 0], np.int64)
    keep = vocab.select_keep_ids(src, tgt, [], threshold=0.0, min_count=3)
    np.testing.assert_array_equal(keep, [1, 2, 3])
    # min_count filters the threshold set, it does not extend it.
    keep = vocab.select_keep_ids(src, tgt, [], threshold=0.5, min_count=3)
    np.testing.assert_array_equal(keep, [1, 3])
    # min_count alone.
    keep = vocab.select_keep_ids(src, tgt, [], threshold=None, min_count=5)
    np.testing.assert_array_equal(keep, [1, 3])

  def test_coverage_is_union_of_per_corpus_smallest_sets(self):
    src = np.array([0, 60, 25, 10, 5, 0, 0], np.int64)
    tgt = np.array([0, 0, 0, 0, 1, 90, 9], np.int64)
    keep = vocab.select_keep_ids(src, tgt, [0], threshold=None, coverage=0.85)
    # src needs {1, 2} (85%), tgt needs {5} (90%).
    np.testing.assert_array_equal(keep, [0, 1, 2, 5])
    keep = vocab.select_keep_ids(src, tgt, [], threshold=None, coverage=0.86)
    np.testing.assert_array_equal(keep, [1, 2, 3, 5])
    keep = vocab.select_keep_ids(src, tgt, [], threshold=None, coverage=1.0)
    np.testing.assert_array_equal(keep, [1, 2, 3, 4, 5, 6])
    # Union with the threshold rule; min_count applies to both.
    keep = vocab.select_keep_ids(src, tgt, [], threshold=0.09, coverage=0.85)
    np.testing.assert_array_equal(keep, [1, 2, 3, 5, 6])
    keep = vocab.select_keep_ids(
      src, tgt, [], threshold=0.09, coverage=0.85, min_count=10
    )
    np.testing.assert_array_equal(keep, [1, 2, 3, 5])

  def test_coverage_guarantee_on_random_counts(self):
    rng = np.random.default_rng(0)
    src = rng.zipf(1.3, 5000) % 800
    tgt = rng.zipf(1.5, 5000) % 800 + 200
    src_c = np.bincount(src, minlength=1000)
    tgt_c = np.bincount(tgt, minlength=1000)
    cov = 0.95
    keep = vocab.select_keep_ids(src_c, tgt_c, [], threshold=None, coverage=cov)
    for c in (src_c, tgt_c):
      self.assertGreaterEqual(c[keep].sum(), cov * c.sum())
      # Minimal: its own top set minus its least frequent member falls short.
      own = vocab.select_keep_ids(c, c, [], threshold=None, coverage=cov)
      smallest = own[np.argmin(c[own])]
      self.assertLess(c[own].sum() - c[smallest], cov * c.sum())

  def test_errors(self):
    c = np.array([5, 5, 0], np.int64)
    with self.assertRaisesRegex(BistilError, "keeps no token but the special"):
      vocab.select_keep_ids(c, c, [0, 1], threshold=0.1)
    with self.assertRaisesRegex(BistilError, "threshold must be in"):
      vocab.select_keep_ids(c, c, [], threshold=2.0)
    with self.assertRaisesRegex(BistilError, "coverage must be in"):
      vocab.select_keep_ids(c, c, [], coverage=0.0)
    with self.assertRaisesRegex(BistilError, "min_count must be"):
      vocab.select_keep_ids(c, c, [], min_count=0)
    with self.assertRaisesRegex(BistilError, "at least one of"):
      vocab.select_keep_ids(c, c, [], threshold=None)
    with self.assertRaisesRegex(BistilError, "one size"):
      vocab.select_keep_ids(c, c[:2], [])
    with self.assertRaisesRegex(BistilError, "target counts are all zero"):
      vocab.select_keep_ids(c, 0 * c, [])
    with self.assertRaisesRegex(BistilError, "non-negative integers"):
      vocab.select_keep_ids(c, c.astype(float), [])
    with self.assertRaisesRegex(BistilError, "special ids out of range"):
      vocab.select_keep_ids(c, c, [3])


# ------------------------------------------------------------------- maps
class MapTest(TmpDirTest):
  def test_vocab_map_round_trip(self):
    keep = np.array([0, 3, 4, 9])
    np.testing.assert_array_equal(
      vocab.old2new_array(keep, 11), [0, -1, -1, 1, 2, -1, -1, -1, -1, 3, -1]
    )
    p = self.path("vocab_map.json")
    vocab.write_vocab_map(p, keep)
    with open(p) as f:
      self.assertEqual(json.load(f), {"0": 0, "3": 1, "4": 2, "9": 3})
    m = vocab.read_vocab_map(p)
    self.assertEqual(m, {0: 0, 3: 1, 4: 2, 9: 3})
    np.testing.assert_array_equal(vocab.keep_ids_from_vocab_map(m), keep)

  def test_bad_vocab_maps(self):
    with self.assertRaisesRegex(BistilError, "vocab map not found"):
      vocab.read_vocab_map(self.path("none.json"))
    for bad in ('{"0": 1}', '{"x": 0}', "[1, 2]", '{"0": 0, "1": 0}'):
      p = self.path("m.json")
      with open(p, "w") as f:
        f.write(bad)
      with self.assertRaises(BistilError, msg=bad):
        vocab.read_vocab_map(p)

  def test_keep_mask_from_vocab(self):
    old = {"[PAD]": 0, "a": 1, "b": 2, "c": 3, "d": 4}
    new = {"[PAD]": 0, "b": 1, "d": 2}
    np.testing.assert_array_equal(
      vocab.keep_mask_from_vocab(old, new), [0, 2, 4]
    )
    with self.assertRaisesRegex(BistilError, "not in the old one"):
      vocab.keep_mask_from_vocab(old, {"[PAD]": 0, "zz": 1})
    with self.assertRaisesRegex(BistilError, "0..n-1"):
      vocab.keep_mask_from_vocab(old, {"[PAD]": 0, "a": 2})

  def test_bad_keep_ids(self):
    for bad, msg in (
      ([], "non-empty"),
      ([0, 0], "duplicates"),
      ([0, 11], "out of range"),
      ([0.5], "integers"),
    ):
      with self.assertRaisesRegex(BistilError, msg):
        vocab.old2new_array(np.array(bad), 11)


class SliceTest(parameterized.TestCase):
  def params(self, config, xp=np):
    rng = np.random.default_rng(0)
    v, p, d = config.vocab_size, config.padded_vocab_size, config.hidden_size
    emb = np.zeros((p, d), np.float32)
    emb[:v] = rng.normal(size=(v, d))
    bias = np.zeros(p, np.float32)
    bias[:v] = rng.normal(size=v)
    dec = np.zeros((d, p), np.float32)
    dec[:, :v] = rng.normal(size=(d, v))
    ln = {"scale": np.ones(d, np.float32)}
    return {
      "embeddings": {"word_embeddings": {"embedding": xp.asarray(emb)},
                     "LayerNorm": ln},
      "lm_head": {"bias": xp.asarray(bias),
                  "decoder": {"kernel": xp.asarray(dec)}},
    }  # fmt: skip

  @parameterized.parameters("numpy", "jax")
  def test_rows_taken_and_repadded(self, backend):
    import jax.numpy as jnp  # noqa: PLC0415

    from bistil_jax.model.config import preset  # noqa: PLC0415

    config = preset("tiny", vocab_size=300, tie_word_embeddings=False)
    xp = np if backend == "numpy" else jnp
    params = self.params(config, xp)
    keep = np.array([0, 5, 7, 299] + list(range(10, 140)))
    new, new_config = vocab.slice_vocab_params(params, config, keep)
    self.assertEqual(new_config.vocab_size, keep.size)
    self.assertEqual(new_config.padded_vocab_size, 256)
    emb = np.asarray(new["embeddings"]["word_embeddings"]["embedding"])
    self.assertEqual(emb.shape, (256, 32))
    old_emb = np.asarray(params["embeddings"]["word_embeddings"]["embedding"])
    np.testing.assert_array_equal(emb[: keep.size], old_emb[keep])
    np.testing.assert_array_equal(emb[keep.size :], 0)
    bias = np.asarray(new["lm_head"]["bias"])
    np.testing.assert_array_equal(
      bias[: keep.size], np.asarray(params["lm_head"]["bias"])[keep]
    )
    np.testing.assert_array_equal(bias[keep.size :], 0)
    dec = np.asarray(new["lm_head"]["decoder"]["kernel"])
    self.assertEqual(dec.shape, (32, 256))
    np.testing.assert_array_equal(
      dec[:, : keep.size],
      np.asarray(params["lm_head"]["decoder"]["kernel"])[:, keep],
    )
    self.assertIs(
      new["embeddings"]["LayerNorm"], params["embeddings"]["LayerNorm"]
    )
    self.assertEqual(params["lm_head"]["bias"].shape, (384,))  # input intact
    # A partial tree (an embedding diff) works too.
    part = {"embeddings": {"word_embeddings": {"embedding": old_emb}}}
    new_part, _ = vocab.slice_vocab_params(part, config, keep)
    self.assertEqual(list(new_part), ["embeddings"])

  def test_config_ids_remapped_and_checked(self):
    from bistil_jax.model.config import preset  # noqa: PLC0415

    config = preset("tiny-xlmr", vocab_size=300)
    params = self.params(config)
    keep = np.array([0, 1, 2, 3, 50, 60])
    _, c = vocab.slice_vocab_params(params, config, keep)
    self.assertEqual(
      (c.pad_token_id, c.bos_token_id, c.eos_token_id), (1, 0, 2)
    )
    with self.assertRaisesRegex(BistilError, "pad_token_id would move"):
      vocab.slice_vocab_params(params, config, [1, 0, 2, 50])
    with self.assertRaisesRegex(BistilError, "eos_token_id=2 is not among"):
      vocab.slice_vocab_params(params, config, [0, 1, 50])
    bert = preset("tiny", vocab_size=300, pad_token_id=7)
    _, c = vocab.slice_vocab_params(self.params(bert), bert, [3, 7, 9])
    self.assertEqual(c.pad_token_id, 1)
    with self.assertRaisesRegex(BistilError, "vocab rows"):
      vocab.slice_vocab_params(params, config.replace(vocab_size=500), keep)
    with self.assertRaisesRegex(BistilError, "out of range"):
      vocab.slice_vocab_params(params, config, [0, 1, 2, 300])


# -------------------------------------------------------------- tokenizers
class TokenizerTrimTest(TmpDirTest):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._dir = tempfile.mkdtemp()
    cls.toks = {k: f(os.path.join(cls._dir, k)) for k, f in MAKERS.items()}
    cls.src = make_lines("aa", 1000, 2)
    cls.tgt = make_lines("bb", 1000, 3)
    cls.test_lines = [l for lang in LANGS for l in make_lines(lang, 150, 4)] + [
      "",
      "aa [MASK] 12 <mask> zz",
    ]

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls._dir)
    super().tearDownClass()

  def trim(self, kind, threshold=1e-3):
    tok = self.toks[kind]
    src_dir = os.path.join(self._dir, kind)
    _, tok_json = vocab.load_tokenizer_dir(src_dir)
    specials = vocab.special_token_ids(
      tok_json, vocab.extra_special_tokens(src_dir)
    )
    keep = vocab.select_keep_ids(
      vocab.count_tokens(tok, self.src),
      vocab.count_tokens(tok, self.tgt),
      specials,
      threshold=threshold,
    )
    out = self.path("tok")
    os.makedirs(out)
    info = vocab.write_trimmed_tokenizer(src_dir, out, keep)
    return tok, keep, out, info

  @parameterized.parameters("wordpiece", "unigram")
  def test_kept_lines_encode_to_mapped_ids(self, kind):
    old, keep, out, _ = self.trim(kind)
    new = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    old2new = vocab.old2new_array(keep, old.get_vocab_size())
    self.assertEqual(new.get_vocab_size(), keep.size)
    self.assertLess(keep.size, 0.8 * old.get_vocab_size())
    covered = 0
    for line in self.test_lines:
      old_ids = old.encode(line).ids  # with special tokens
      mapped = old2new[old_ids]
      if (mapped >= 0).all():
        covered += 1
        self.assertEqual(new.encode(line).ids, mapped.tolist(), line)
      # Every id the new tokenizer emits is valid.
      self.assertLess(max(new.encode(line).ids), keep.size)
    for a, b in zip(
      self.test_lines[:50], self.test_lines[150:200], strict=True
    ):
      mapped = old2new[old.encode(a, b).ids]
      if (mapped >= 0).all():
        self.assertEqual(new.encode(a, b).ids, mapped.tolist())
        self.assertEqual(new.encode(a, b).type_ids, old.encode(a, b).type_ids)
    # aa and bb lines (and the edge cases) are covered, cc and gr are not.
    self.assertGreaterEqual(covered, 290)
    self.assertLess(covered, 450)

  def test_wordpiece_files(self):
    old, keep, out, info = self.trim("wordpiece")
    self.assertEqual(info["model"], "WordPiece")
    self.assertCountEqual(
      info["written"],
      [
        "tokenizer.json",
        "vocab.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
      ],
    )
    with open(os.path.join(out, "vocab.txt"), encoding="utf-8") as f:
      lines = f.read().splitlines()
    old_items = sorted(old.get_vocab().items(), key=lambda kv: kv[1])
    self.assertEqual(lines, [old_items[i][0] for i in keep])
    new = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    self.assertEqual(new.get_vocab(), {t: i for i, t in enumerate(lines)})
    # A WordPiece model rebuilt from vocab.txt agrees with tokenizer.json.
    wp = models.WordPiece.read_file(os.path.join(out, "vocab.txt"))
    self.assertEqual(wp, new.get_vocab())
    with open(os.path.join(out, "tokenizer_config.json")) as f:
      cfg = json.load(f)
    new_ids = {
      v["content"]: int(k) for k, v in cfg["added_tokens_decoder"].items()
    }
    self.assertEqual(new_ids, {t: new.token_to_id(t) for t in WP_SPECIALS})

  def test_unigram_drops_slow_file(self):
    old, keep, out, info = self.trim("unigram")
    self.assertEqual(info["model"], "Unigram")
    self.assertEqual(info["removed"], ["sentencepiece.bpe.model"])
    self.assertFalse(
      os.path.exists(os.path.join(out, "sentencepiece.bpe.model"))
    )
    self.assertEqual(info["removed_keys"], ["tokenizer_config.json:vocab_file"])
    with open(os.path.join(out, "tokenizer_config.json")) as f:
      cfg = json.load(f)
    self.assertNotIn("vocab_file", cfg)
    new = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    self.assertEqual(new.token_to_id("<mask>"), keep.size - 1)
    self.assertEqual(
      cfg["added_tokens_decoder"][str(keep.size - 1)]["content"], "<mask>"
    )
    self.assertIn(new.token_to_id("<unk>"), new.encode("βγδ").ids)

  def test_threshold_zero_keeps_seen_and_unseen(self):
    old, keep, out, _ = self.trim("wordpiece", threshold=0.0)
    self.assertEqual(keep.size, old.get_vocab_size())
    with open(os.path.join(out, "tokenizer.json"), encoding="utf-8") as f:
      new = json.load(f)
    self.assertEqual(new["model"]["vocab"], old.get_vocab())

  def test_unsupported_and_missing_tokenizers(self):
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.train_from_iterator(
      make_lines("aa", 50), trainers.BpeTrainer(vocab_size=60)
    )
    os.makedirs(self.path("bpe"))
    bpe.save(self.path("bpe", "tokenizer.json"))
    with self.assertRaisesRegex(
      BistilError, "unsupported tokenizer model 'BPE'"
    ):
      vocab.write_trimmed_tokenizer(self.path("bpe"), self.tmp, [0, 1])
    # Says what is missing and how to write it (every command that loads a
    # tokenizer: distil, evaluate, trim-vocab, ...).
    with self.assertRaisesRegex(
      BistilError,
      "has no tokenizer.json .*AutoTokenizer.from_pretrained.*save_pretrained",
    ):
      vocab.load_tokenizer_dir(self.tmp)
    with self.assertRaisesRegex(BistilError, "does not exist"):
      vocab.load_tokenizer_dir(self.path("none"))
    with open(self.path("tokenizer.json"), "w") as f:
      f.write("{")
    with self.assertRaisesRegex(BistilError, "cannot load"):
      vocab.load_tokenizer_dir(self.tmp)

  def test_dropping_unk_refused(self):
    _, tok_json = vocab.load_tokenizer_dir(os.path.join(self._dir, "wordpiece"))
    with self.assertRaisesRegex(BistilError, "unknown token '\\[UNK\\]'"):
      vocab.trim_tokenizer_json(tok_json, [0, 2, 3, 50])
    _, tok_json = vocab.load_tokenizer_dir(os.path.join(self._dir, "unigram"))
    with self.assertRaisesRegex(BistilError, "unknown piece"):
      vocab.trim_tokenizer_json(tok_json, [0, 1, 2, 50])
    with self.assertRaisesRegex(BistilError, "sorted"):
      vocab.trim_tokenizer_json(tok_json, [3, 0, 1, 2])

  def test_special_ids(self):
    for kind, names in (
      ("wordpiece", WP_SPECIALS),
      ("unigram", SPM_SPECIALS + ["<mask>"]),
    ):
      d = os.path.join(self._dir, kind)
      _, tok_json = vocab.load_tokenizer_dir(d)
      got = vocab.special_token_ids(tok_json, vocab.extra_special_tokens(d))
      want = sorted(self.toks[kind].token_to_id(t) for t in names)
      np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------ models
if __name__ == "__main__":
  absltest.main()
