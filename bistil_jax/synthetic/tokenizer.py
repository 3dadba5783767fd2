"""An mBERT-style WordPiece tokenizer and a random MLM model for the demo.

The synthetic languages have no pretrained teacher, so the demo makes one:

  from bistil_jax import synthetic
  from bistil_jax.model import config as config_lib
  paths = synthetic.write_dataset("/tmp/synth", synthetic.make_family(0))
  files = [p["train"] for p in paths.corpora.values()]
  synthetic.train_wordpiece(files, "/tmp/synth/tokenizer", vocab_size=4000)
  synthetic.init_model_dir(
    "/tmp/teacher", "/tmp/synth/tokenizer", config_lib.preset("tiny"), seed=0
  )

then pre-trains the teacher with MLM. The tokenizer dir loads with
`transformers.AutoTokenizer.from_pretrained` (BertTokenizerFast) and can be
trimmed by `bistil_jax.checkpoint.trim.trim_model_dir` like mBERT's.

Determinism. The `tokenizers` WordPiece trainer is not deterministic: it
numbers the "##x" continuation pieces in hash-map order and breaks ties
between equally frequent merges by those numbers, so two runs on the same
text give a different vocabulary order (and, at ties near the size limit, a
different vocabulary). We therefore train its BPE core without a subword
prefix on words whose non-initial characters are mapped one-to-one to
private-use code points (assigned in sorted order), which makes every
initial id and so every tie-break deterministic, and map the pieces back to
"##" form afterwards. The result is the same WordPiece vocabulary scheme
(word-initial pieces, "##" continuation pieces), byte-identical across runs.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
from tokenizers import (
  AddedToken,
  Tokenizer,
  decoders,
  models,
  normalizers,
  pre_tokenizers,
  processors,
  trainers,
)

from bistil_jax import paths
from bistil_jax.checkpoint import hf
from bistil_jax.data import vocab as vocab_lib
from bistil_jax.errors import BistilError
from bistil_jax.model import encoder
from bistil_jax.model.config import ModelConfig

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4
SUBWORD_PREFIX = "##"
DEFAULT_VOCAB_SIZE = 4000  # sub-words on the synthetic family (see below)
DEFAULT_MAX_LENGTH = 512
INIT_RECORD = "bistil_init.json"  # written by `bistil init` (init_model_dir)
# First private-use code point standing for a non-initial character while
# training (supplementary private use area A, 65534 code points).
_PUA_START = 0xF0000
_PUA_SIZE = 0xFFFE
# Lines normalised and pre-tokenised per call into the Rust library.
_CHUNK_LINES = 1000
# Repetitions of one word per string fed to the trainer.
_CHUNK_REPEATS = 10_000


# ----------------------------------------------------------------- pipeline
def bert_normalizer(lowercase: bool = True) -> normalizers.Normalizer:
  """BERT's normaliser; accents are stripped iff lowercasing (as BERT)."""
  return normalizers.BertNormalizer(
    clean_text=True,
    handle_chinese_chars=True,
    strip_accents=None,
    lowercase=lowercase,
  )


def _build_tokenizer(vocab: Mapping[str, int], lowercase: bool) -> Tokenizer:
  """A BERT WordPiece tokenizer over `vocab` with the usual components."""
  tok = Tokenizer(
    models.WordPiece(
      dict(vocab),
      unk_token="[UNK]",
      continuing_subword_prefix=SUBWORD_PREFIX,
    )
  )
  tok.normalizer = bert_normalizer(lowercase)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece(prefix=SUBWORD_PREFIX)
  tok.add_special_tokens(
    [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
  )
  cls, sep = vocab["[CLS]"], vocab["[SEP]"]
  tok.post_processor = processors.TemplateProcessing(
    single="[CLS] $A [SEP]",
    pair="[CLS] $A [SEP] $B:1 [SEP]:1",
    special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
  )
  return tok


# ----------------------------------------------------------------- counting
def _word_counts(path: str, lowercase: bool) -> collections.Counter:
  """Word counts of a text file after BERT normalisation and splitting."""
  if not paths.path(path).is_file():
    raise BistilError(f"corpus file not found: {path}")
  norm = bert_normalizer(lowercase)
  pre = pre_tokenizers.BertPreTokenizer()
  counts: collections.Counter = collections.Counter()

  def add(lines: list[str]) -> None:
    # The normaliser turns the newlines into spaces: one call per chunk.
    text = norm.normalize_str("\n".join(lines))
    counts.update(w for w, _ in pre.pre_tokenize_str(text))

  try:
    with paths.open_text(path) as f:
      chunk = []
      for line in f:
        chunk.append(line)
        if len(chunk) == _CHUNK_LINES:
          add(chunk)
          chunk = []
      if chunk:
        add(chunk)
  except UnicodeDecodeError as e:
    raise BistilError(f"{path} is not UTF-8 text: {e}") from None
  if not counts:
    raise BistilError(f"corpus {path} has no words")
  return counts


def balanced_counts(
  per_corpus: Sequence[Mapping[str, int]],
  balance: bool = True,
  words_per_corpus: int | None = None,
) -> dict[str, int]:
  """Sums word counts of several corpora, optionally on an equal footing.

  With `balance`, corpus f's counts are scaled by T / W_f (W_f its number of
  words, T = `words_per_corpus` or the largest W_f) and rounded to the
  nearest integer, so each corpus contributes about T words. That is what
  repeating a smaller corpus T / W_f times gives (and, for T < W_f, what a
  uniform subsample gives in expectation: rare words may round to zero),
  without materialising the copies.

  Args:
    per_corpus: word -> count, one mapping per corpus.
    balance: scale the corpora to equal size; False just adds the counts.
    words_per_corpus: T; None = the largest corpus' word count.

  Returns:
    word -> count over all corpora, words with a zero count left out.

  Raises:
    BistilError: for no corpora, an empty one, or T < 1.
  """
  if not per_corpus:
    raise BistilError("no corpora to train a tokenizer on")
  sizes = [sum(c.values()) for c in per_corpus]
  if min(sizes) < 1:
    raise BistilError("a corpus to train the tokenizer on is empty")
  target = max(sizes) if words_per_corpus is None else int(words_per_corpus)
  if target < 1:
    raise BistilError(f"words_per_corpus must be >= 1, got {target}")
  total: collections.Counter = collections.Counter()
  for counts, size in zip(per_corpus, sizes, strict=True):
    for word, c in counts.items():
      # Integer round-half-up of c * target / size: exact and portable.
      scaled = (2 * c * target + size) // (2 * size) if balance else c
      if scaled:
        total[word] += scaled
  return dict(total)


def _internal_char_map(words: Sequence[str]) -> dict[str, str]:
  """Non-initial character -> private-use stand-in, in sorted order."""
  chars = sorted({c for w in words for c in w[1:]})
  if len(chars) > _PUA_SIZE:
    raise BistilError(f"too many distinct characters ({len(chars)})")
  for w in words:
    for c in w:
      if _PUA_START <= ord(c) < _PUA_START + _PUA_SIZE:
        raise BistilError(
          f"training text contains private-use character U+{ord(c):X}, "
          "which tokenizer training reserves"
        )
  return {c: chr(_PUA_START + i) for i, c in enumerate(chars)}


def _feed(
  counts: Mapping[str, int], internal: Mapping[str, str]
) -> Iterator[str]:
  """Strings whose whitespace-split words have exactly `counts` (mapped)."""
  for word in sorted(counts):
    mapped = word[0] + "".join(internal[c] for c in word[1:])
    left = counts[word]
    while left:
      n = min(left, _CHUNK_REPEATS)
      yield (mapped + " ") * n
      left -= n


def _train_vocab(
  counts: Mapping[str, int], vocab_size: int, min_frequency: int
) -> dict[str, int]:
  """WordPiece vocabulary (token -> id) from word counts, deterministically.

  See the module docstring: BPE without prefix on words whose non-initial
  characters are private-use stand-ins, then mapped back to "##" pieces.
  """
  internal = _internal_char_map(list(counts))
  back = {v: k for k, v in internal.items()}
  bare = Tokenizer(models.BPE(unk_token="[UNK]"))
  bare.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    min_frequency=min_frequency,
    show_progress=False,
    special_tokens=list(SPECIAL_TOKENS),
  )
  bare.train_from_iterator(_feed(counts, internal), trainer)
  vocab = {}
  for piece, i in bare.get_vocab(with_added_tokens=True).items():
    if piece in SPECIAL_TOKENS:
      token = piece
    elif piece[0] in back:  # starts inside a word
      token = SUBWORD_PREFIX + "".join(back[c] for c in piece)
    else:
      token = piece[0] + "".join(back[c] for c in piece[1:])
    vocab[token] = i
  if len(vocab) != len(set(vocab.values())):
    raise AssertionError("mapped WordPiece vocabulary has duplicate tokens")
  for i, t in enumerate(SPECIAL_TOKENS):
    if vocab.get(t) != i:
      raise AssertionError(f"special token {t} did not get id {i}")
  return vocab


# ------------------------------------------------------------------- files
def _write_json(path: paths.PathLike, obj: Any) -> None:
  text = json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True)
  paths.write_text(path, text + "\n")


def tokenizer_config(
  tok: Tokenizer, lowercase: bool, model_max_length: int
) -> dict[str, Any]:
  """tokenizer_config.json for a BertTokenizerFast over `tok`."""
  added = json.loads(tok.to_str())["added_tokens"]
  return {
    "tokenizer_class": "BertTokenizerFast",
    "do_lower_case": lowercase,
    "tokenize_chinese_chars": True,
    "strip_accents": None,
    "clean_up_tokenization_spaces": True,
    "model_max_length": model_max_length,
    **_special_tokens_map(),
    "added_tokens_decoder": {
      str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added
    },
  }


def _special_tokens_map() -> dict[str, str]:
  return {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
  }


def write_tokenizer_dir(
  out_dir: str,
  tok: Tokenizer,
  lowercase: bool,
  model_max_length: int = DEFAULT_MAX_LENGTH,
) -> None:
  """Writes tokenizer.json, vocab.txt and the transformers config files.

  Args:
    out_dir: an existing directory.
    tok: a WordPiece tokenizer from `train_wordpiece`.
    lowercase: whether its normaliser lowercases (`do_lower_case`).
    model_max_length: the longest input, for transformers' truncation.
  """
  out = paths.path(out_dir)
  paths.write_text(out / "tokenizer.json", tok.to_str(pretty=True))
  items = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
  paths.write_text(out / "vocab.txt", "".join(t + "\n" for t, _ in items))
  _write_json(
    out / "tokenizer_config.json",
    tokenizer_config(tok, lowercase, model_max_length),
  )
  _write_json(out / "special_tokens_map.json", _special_tokens_map())


def _commit(
  out_dir: str, overwrite: bool, write: Callable[[paths.Path], None]
) -> None:
  """Runs `write(tmp_dir)` in a staging sibling, then moves it to out_dir."""
  hf.check_out_dir(out_dir, overwrite)
  with paths.atomic_dir(out_dir) as staging:
    write(staging)


# ---------------------------------------------------------------- training
def check_vocab_size(vocab_size: int) -> None:
  """Raises BistilError unless vocab_size leaves room beyond the specials."""
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
    raise BistilError(f"vocab_size must be an integer, got {vocab_size!r}")
  if vocab_size <= len(SPECIAL_TOKENS):
    raise BistilError(
      f"vocab_size must be > {len(SPECIAL_TOKENS)} (the special tokens), "
      f"got {vocab_size}"
    )


def train_wordpiece(
  files: Sequence[str | os.PathLike[str]],
  out_dir: str | os.PathLike[str],
  vocab_size: int = DEFAULT_VOCAB_SIZE,
  min_frequency: int = 2,
  *,
  lowercase: bool = True,
  balance: bool = True,
  words_per_corpus: int | None = None,
  model_max_length: int = DEFAULT_MAX_LENGTH,
  overwrite: bool = False,
) -> Tokenizer:
  """Trains an mBERT-style WordPiece tokenizer and writes it as an HF dir.

  Components as BERT's: BertNormalizer (lowercasing and accent stripping
  iff `lowercase`), BertPreTokenizer, WordPiece with "##" continuation
  pieces and [UNK], "[CLS] $A [SEP]" / "[CLS] $A [SEP] $B:1 [SEP]:1"
  templates, WordPiece decoder. Specials are [PAD]=0, [UNK]=1, [CLS]=2,
  [SEP]=3, [MASK]=4; then the characters, the "##" characters and the
  learnt pieces in merge order. Every character seen in training is in the
  vocabulary in both forms where it occurred, so [UNK] only comes from
  unseen characters. The output is byte-identical for the same input, in
  any file order (see the module docstring).

  Args:
    files: UTF-8 text files, one per language (the unit `balance` evens
      out).
    out_dir: output dir: tokenizer.json, vocab.txt, tokenizer_config.json
      (BertTokenizerFast), special_tokens_map.json.
    vocab_size: target size including specials and the alphabet (smaller
      if the text runs out of merges with `min_frequency`, larger if the
      alphabet alone exceeds it). On the default synthetic family (8
      languages, 20k lines each) 4000 gives 1.1-1.4 tokens per word and
      8000 nearly whole words (1.02-1.07): its lexicons are small.
    min_frequency: the least (balanced) count of a merged pair.
    lowercase: lowercase and strip accents (BERT uncased; mBERT is cased).
    balance: give every file about the same weight, as if the smaller ones
      were repeated (see `balanced_counts`), so a small language still gets
      its pieces; False counts the files as they are.
    words_per_corpus: the common size `balance` scales to (default: the
      largest file's word count; smaller values subsample the larger ones).
    model_max_length: `model_max_length` of tokenizer_config.json.
    overwrite: replace a non-empty `out_dir`.

  Returns:
    The trained tokenizer (as written to tokenizer.json).

  Raises:
    BistilError: missing, non-UTF-8 or empty files, bad sizes, or a
      non-empty `out_dir` without `overwrite`. Nothing is written then.
  """
  if isinstance(files, (str, os.PathLike)) or not files:
    raise BistilError("give a non-empty list of corpus files to train on")
  files = [os.fspath(f) for f in files]
  out_dir = os.fspath(out_dir)
  check_vocab_size(vocab_size)
  if min_frequency < 1:
    raise BistilError(f"min_frequency must be >= 1, got {min_frequency}")
  if model_max_length < 1:
    raise BistilError(f"model_max_length must be >= 1: {model_max_length}")
  hf.check_out_dir(out_dir, overwrite)  # before the work
  per_file = [_word_counts(f, lowercase) for f in files]
  counts = balanced_counts(per_file, balance, words_per_corpus)
  vocab = _train_vocab(counts, vocab_size, min_frequency)
  tok = _build_tokenizer(vocab, lowercase)
  _commit(
    out_dir,
    overwrite,
    lambda d: write_tokenizer_dir(d, tok, lowercase, model_max_length),
  )
  log.info(
    "trained a WordPiece tokenizer of %d tokens on %d files into %s",
    tok.get_vocab_size(),
    len(files),
    out_dir,
  )
  return tok


# ------------------------------------------------------------------- model
def init_model_dir(
  out_dir: str | os.PathLike[str],
  tokenizer_dir: str | os.PathLike[str],
  config: ModelConfig,
  seed: int = 0,
  *,
  overwrite: bool = False,
  record: Mapping[str, Any] | None = None,
) -> ModelConfig:
  """Writes a randomly initialised MLM model for a tokenizer as an HF dir.

  The config gets `head="mlm"`, `vocab_size` = the tokenizer's size
  (added tokens included) and `pad_token_id` = the id of its pad token;
  the rest (sizes, model type) is kept. The tokenizer files are copied in,
  with `model_max_length` lowered to the model's `max_length` if larger,
  so transformers truncates within the position table.

  Args:
    out_dir: the output HF model dir.
    tokenizer_dir: a dir with tokenizer.json (e.g. from `train_wordpiece`).
    config: the `ModelConfig` to start from (e.g. `preset("tiny")`).
    seed: the init seed.
    overwrite: replace a non-empty `out_dir`.
    record: if given, also written (as JSON) to `INIT_RECORD` in the dir,
      in the same atomic move: how `bistil init` marks the dirs it owns.

  Returns:
    The `ModelConfig` that was saved.

  Raises:
    BistilError: no readable tokenizer, a tokenizer whose pair template
      uses more token types than the config has, or a non-empty `out_dir`
      without `overwrite`.
  """
  out_dir, tokenizer_dir = os.fspath(out_dir), os.fspath(tokenizer_dir)
  tok, _ = vocab_lib.load_tokenizer_dir(tokenizer_dir)
  size = tok.get_vocab_size(with_added_tokens=True)
  changes: dict[str, Any] = {"head": "mlm", "vocab_size": size}
  pad = _tokenizer_pad_token(tokenizer_dir)
  if pad is not None and tok.token_to_id(pad) is not None:
    changes["pad_token_id"] = tok.token_to_id(pad)
  config = config.replace(**changes)
  types = max(tok.encode("a", "b").type_ids, default=0) + 1
  if types > config.type_vocab_size:
    raise BistilError(
      f"the tokenizer's pair template uses {types} token types, the config "
      f"has type_vocab_size={config.type_vocab_size}"
    )
  params = encoder.init_params(config, jax.random.PRNGKey(seed))

  hf.check_out_dir(out_dir, overwrite)
  with paths.atomic_dir(out_dir) as tmp:
    for name in hf.TOKENIZER_FILES:
      src = paths.path(tokenizer_dir) / name
      if src.is_file():
        paths.copy_file(src, tmp / name)
    path = tmp / "tokenizer_config.json"
    if path.is_file():
      tok_config = json.loads(paths.read_text(path))
      longest = tok_config.get("model_max_length")
      if not isinstance(longest, int) or longest > config.max_length:
        tok_config["model_max_length"] = config.max_length
        _write_json(path, tok_config)
    hf.write_hf(tmp, config, params)
    if record is not None:
      _write_json(tmp / INIT_RECORD, dict(record))
  log.info(
    "initialised %s (vocab %d, seed %d) in %s",
    config.architecture,
    size,
    seed,
    out_dir,
  )
  return config


def _tokenizer_pad_token(tokenizer_dir: str) -> str | None:
  """The pad token named by special_tokens_map.json or tokenizer_config."""
  for name in ("special_tokens_map.json", "tokenizer_config.json"):
    path = paths.path(tokenizer_dir) / name
    if not path.is_file():
      continue
    try:
      d = json.loads(paths.read_text(path))
    except (OSError, ValueError) as e:
      raise BistilError(f"cannot read {path}: {e}") from None
    pad = d.get("pad_token") if isinstance(d, dict) else None
    if isinstance(pad, dict):
      pad = pad.get("content")
    if isinstance(pad, str):
      return pad
  return None
