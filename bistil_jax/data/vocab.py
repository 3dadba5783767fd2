"""Vocabulary trimming: counts -> keep ids -> old->new map -> trimmed model.

docs/method.md section 1. The steps, each importable on its own:

1. `count_tokens`: per-id token counts of a corpus under the original
   tokenizer, without special tokens (`save_counts`/`load_counts` cache them,
   tied to the tokenizer by a fingerprint).
2. `select_keep_ids`: the ids to keep, from the counts of the two corpora
   (max of per-corpus unigram probabilities >= threshold, specials forced),
   in original id order.
3. `trim_tokenizer_json` / `write_trimmed_tokenizer`: a tokenizer whose ids
   are the compact ranks of the kept ids (WordPiece and Unigram models).
4. `slice_vocab_params`: the matching rows of every vocabulary-indexed
   parameter, re-padded to the new `padded_vocab_size`.
5. `bistil_jax.checkpoint.trim.trim_model_dir`: all of the above for an HF
   model dir, written as a new HF model dir with `vocab_map.json` and
   `trim_report.json` (model dirs are read and written there, not here).

New id of a kept token = its rank among the kept ids (order-preserving
compaction), so `vocab_map.json` ({"old id": new id}) and `keep_ids` (old id
of each new id) describe the same map.
"""

from __future__ import annotations

import collections
import hashlib
import io
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from bistil_jax import paths
from bistil_jax.data import spm, tokenize
from bistil_jax.errors import BistilError
from bistil_jax.model.config import ModelConfig

log = logging.getLogger(__name__)

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
ADDED_TOKENS = "added_tokens.json"
VOCAB_TXT = "vocab.txt"
VOCAB_MAP = "vocab_map.json"
SUPPORTED_MODELS = ("WordPiece", "Unigram")
# Slow-tokenizer files that would still hold the untrimmed vocabulary. We do
# not rewrite SentencePiece protobufs: they are left out of the output.
SLOW_TOKENIZER_FILES = (
  "sentencepiece.bpe.model",
  "spm.model",
  "sentencepiece.model",
  "spiece.model",
  "tokenizer.model",
  "sentencepiece.bpe.vocab",
)
# Vocabulary-indexed leaves of our parameter tree and their vocabulary axis.
VOCAB_LEAVES = (
  (("embeddings", "word_embeddings", "embedding"), 0),  # [V, d]
  (("lm_head", "bias"), 0),  # [V]
  (("lm_head", "decoder", "kernel"), 1),  # [d, V]
)
_COUNTS_FORMAT = 1


# ------------------------------------------------------------------ tokenizer
def no_tokenizer_json(model_dir: str) -> BistilError:
  """The error for a dir without tokenizer.json, saying how to make one.

  bistil reads tokenizers with the `tokenizers` library, from the one file
  a transformers "fast" tokenizer saves; a dir with only vocab.txt or a
  sentencepiece model has none.
  """
  return BistilError(
    f"{model_dir} has no {TOKENIZER_JSON} (the fast-tokenizer file bistil "
    "reads); write it with transformers: AutoTokenizer.from_pretrained("
    f"'{model_dir}').save_pretrained('{model_dir}')"
  )


def load_tokenizer_dir(model_dir: str) -> tuple[Tokenizer, dict[str, Any]]:
  """Loads `tokenizer.json` from a model dir.

  A dir without one but with XLM-R's `sentencepiece.bpe.model` gets the
  tokenizer built from that file (`spm.xlmr_tokenizer`), with the ids
  transformers' conversion gives.

  Args:
    model_dir: an HF model or tokenizer dir.

  Returns:
    (the tokenizer, its parsed JSON).

  Raises:
    BistilError: if the dir or its tokenizer.json is missing or unreadable
      (and no SentencePiece model stands in for it).
  """
  if not paths.path(model_dir).is_dir():
    raise BistilError(f"model dir {model_dir} does not exist")
  path = paths.path(model_dir) / TOKENIZER_JSON
  if not path.is_file():
    tokenizer = _sentencepiece_tokenizer(model_dir)
    return tokenizer, json.loads(tokenizer.to_str())
  try:
    text = paths.read_text(path)
    tok_json = json.loads(text)
    tokenizer = Tokenizer.from_str(text)
  except Exception as e:  # noqa: BLE001 - OSError, JSON and Rust errors
    raise BistilError(f"cannot load {path}: {e}") from None
  return tokenizer, tok_json


def named_tokenizer_class(model_dir: str) -> str | None:
  """The tokenizer class a dir names: tokenizer_config.json's, else
  config.json's `tokenizer_class`, else XLM-R's for an xlm-roberta
  config.json; None when nothing names one."""
  d = paths.path(model_dir)
  conf: Any = {}
  for name in (TOKENIZER_CONFIG, "config.json"):
    if (d / name).is_file():
      conf = _read_json_file(d / name)
      if isinstance(conf, dict) and conf.get("tokenizer_class"):
        return str(conf["tokenizer_class"])
  # `conf` is config.json's here when the dir has one.
  if isinstance(conf, dict) and conf.get("model_type") == "xlm-roberta":
    return spm.XLMR_CLASSES[0]
  return None


def _sentencepiece_tokenizer(model_dir: str) -> Tokenizer:
  """The tokenizer of a dir holding XLM-R's SentencePiece model and no
  tokenizer.json; `no_tokenizer_json` for any other dir."""
  path = paths.path(model_dir) / spm.XLMR_MODEL_FILE
  if not path.is_file():
    raise no_tokenizer_json(model_dir)
  cls = named_tokenizer_class(model_dir)
  if cls not in spm.XLMR_CLASSES:
    raise BistilError(
      f"{model_dir} has {spm.XLMR_MODEL_FILE} but no {TOKENIZER_JSON}, and "
      f"its tokenizer class {cls!r} is not XLM-R's (the one layout bistil "
      f"converts); {no_tokenizer_json(model_dir)}"
    )
  tokenizer = spm.xlmr_tokenizer(spm.read_model_file(path), str(path))
  log.info("built the XLM-R tokenizer of %s from %s", model_dir, path.name)
  # Once through JSON, as transformers' copy and any tokenizer.json written
  # from it are: the JSON float parser may move a score by one ulp.
  return Tokenizer.from_str(tokenizer.to_str())


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
  """A hash of everything that decides which ids a text encodes to.

  The post-processor, padding and truncation are left out: counting encodes
  without special tokens, padding or truncation.

  Args:
    tokenizer: the tokenizer.

  Returns:
    16 hex digits.
  """
  d = json.loads(tokenizer.to_str())
  key = {k: d.get(k) for k in ("normalizer", "pre_tokenizer", "model")}
  key["added_tokens"] = [
    (t["id"], t["content"], t.get("special")) for t in d["added_tokens"]
  ]
  blob = json.dumps(key, sort_keys=True, ensure_ascii=False).encode("utf-8")
  return hashlib.sha256(blob).hexdigest()[:16]


def _json_vocab(tok_json: dict[str, Any]) -> dict[str, int]:
  """Token -> id over the model vocab and the added tokens."""
  model = tok_json["model"]
  mtype = model.get("type")
  if mtype == "Unigram":
    vocab = {piece: i for i, (piece, _) in enumerate(model["vocab"])}
  elif isinstance(model.get("vocab"), dict):
    vocab = dict(model["vocab"])
  else:
    raise BistilError(_unsupported(mtype))
  for t in tok_json.get("added_tokens") or ():
    vocab[t["content"]] = t["id"]
  return vocab


def _unsupported(mtype: Any) -> str:
  return (
    f"unsupported tokenizer model {mtype!r}: only "
    f"{' and '.join(SUPPORTED_MODELS)} tokenizers can be trimmed"
  )


def check_supported(tok_json: dict[str, Any]) -> str:
  mtype = (tok_json.get("model") or {}).get("type")
  if mtype not in SUPPORTED_MODELS:
    raise BistilError(_unsupported(mtype))
  return mtype


def _post_processor_ids(pp: dict[str, Any] | None) -> list[int]:
  """Every token id a post-processor inserts."""
  if not pp:
    return []
  kind = pp.get("type")
  if kind in ("BertProcessing", "RobertaProcessing"):
    return [int(pp["sep"][1]), int(pp["cls"][1])]
  if kind == "TemplateProcessing":
    return [
      int(i)
      for tok in pp.get("special_tokens", {}).values()
      for i in tok["ids"]
    ]
  if kind == "Sequence":
    return [i for p in pp.get("processors", ()) for i in _post_processor_ids(p)]
  return []


def _remap_post_processor(
  pp: dict[str, Any] | None, old2new: np.ndarray
) -> dict[str, Any] | None:
  """The post-processor with its token ids mapped to the new vocab."""
  if not pp:
    return pp

  def new_id(i: int) -> int:
    j = int(old2new[i]) if 0 <= i < len(old2new) else -1
    if j < 0:
      raise BistilError(f"post-processor token id {i} is not kept")
    return j

  kind = pp.get("type")
  pp = dict(pp)
  if kind in ("BertProcessing", "RobertaProcessing"):
    for key in ("sep", "cls"):
      tok, i = pp[key]
      pp[key] = [tok, new_id(int(i))]
  elif kind == "TemplateProcessing":
    pp["special_tokens"] = {
      name: dict(tok, ids=[new_id(int(i)) for i in tok["ids"]])
      for name, tok in pp.get("special_tokens", {}).items()
    }
  elif kind == "Sequence":
    pp["processors"] = [
      _remap_post_processor(p, old2new) for p in pp.get("processors", ())
    ]
  return pp


def _special_strings(d: Mapping[str, Any]) -> list[str]:
  """Token strings named in special_tokens_map / tokenizer_config dicts."""
  out = []

  def add(v):
    if isinstance(v, str):
      out.append(v)
    elif isinstance(v, dict) and isinstance(v.get("content"), str):
      out.append(v["content"])
    elif isinstance(v, list):
      for x in v:
        add(x)

  for k, v in d.items():
    if k.endswith("_token") or k == "additional_special_tokens":
      add(v)
  for entry in (d.get("added_tokens_decoder") or {}).values():
    if isinstance(entry, dict) and entry.get("special"):
      add(entry)
  return out


def special_token_ids(
  tok_json: dict[str, Any], extra_tokens: Iterable[str] = ()
) -> np.ndarray:
  """Ids that trimming must keep whatever their counts.

  These are: added tokens marked special, the model's unknown token, every
  id the post-processor inserts, the padding id, and `extra_tokens` (e.g.
  from special_tokens_map.json) where they are in the vocabulary.

  Args:
    tok_json: a parsed tokenizer.json.
    extra_tokens: more token strings to keep.

  Returns:
    Sorted unique int64 ids.
  """
  vocab = _json_vocab(tok_json)
  model = tok_json["model"]
  ids = [
    t["id"] for t in tok_json.get("added_tokens") or () if t.get("special")
  ]
  if model.get("type") == "Unigram":
    if model.get("unk_id") is not None:
      ids.append(int(model["unk_id"]))
  elif model.get("unk_token") in vocab:
    ids.append(vocab[model["unk_token"]])
  ids += _post_processor_ids(tok_json.get("post_processor"))
  padding = tok_json.get("padding")
  if padding and padding.get("pad_id") is not None:
    ids.append(int(padding["pad_id"]))
  ids += [vocab[t] for t in extra_tokens if t in vocab]
  return np.unique(np.asarray(ids, dtype=np.int64))


def unk_token_id(tokenizer: Tokenizer) -> int | None:
  """The id of the model's unknown token, or None if it has none."""
  model = json.loads(tokenizer.to_str())["model"]
  if model.get("type") == "Unigram":
    return model.get("unk_id")
  unk = model.get("unk_token")
  return tokenizer.token_to_id(unk) if unk is not None else None


# ------------------------------------------------------------------- counting


class _Progress:
  """A progress report on stderr while counting.

  On a terminal one line refreshed in place about once a second; otherwise
  (logs, pipes) a whole line about every 10 seconds, since carriage
  returns would run the lines together in a file.
  """

  def __init__(self, desc: str, enabled: bool):
    self.desc, self.enabled = desc, enabled
    self.start = self.last = time.monotonic()
    self.tty = bool(getattr(sys.stderr, "isatty", lambda: False)())
    self.every = 1.0 if self.tty else 10.0

  def update(self, lines: int, tokens: int, final: bool = False) -> None:
    now = time.monotonic()
    if not self.enabled or (not final and now - self.last < self.every):
      return
    self.last = now
    rate = tokens / max(now - self.start, 1e-9)
    text = (
      f"{self.desc}: {lines:,} lines, {tokens:,} tokens, {rate:,.0f} tokens/s"
    )
    if self.tty:
      sys.stderr.write("\r" + text + ("\n" if final else ""))
    else:
      sys.stderr.write(text + "\n")
    sys.stderr.flush()


def count_tokens(
  tokenizer: Tokenizer,
  lines: Iterable[str],
  batch_size: int = 1000,
  num_threads: int | None = None,
  progress: bool = False,
  desc: str = "counting",
) -> np.ndarray:
  """Counts how often each id occurs when the lines are encoded.

  Lines are encoded without special tokens, padding or truncation, in
  batches with `encode_batch_fast` (`encode_batch` without offsets). HF
  tokenizers releases the GIL while encoding, so `num_threads` Python threads
  encode batches concurrently (each call may additionally use the tokenizers
  Rust thread pool unless TOKENIZERS_PARALLELISM=false). Memory is flat: at
  most `2 * num_threads` batches are in flight and the result is one
  vocabulary-sized array.

  Args:
    tokenizer: the (original) tokenizer.
    lines: the documents, e.g. `corpus.iter_lines(spec)`.
    batch_size: lines per `encode_batch` call.
    num_threads: concurrent encoding threads; None = `os.cpu_count()`.
    progress: print a progress line to stderr.
    desc: label of the progress line.

  Returns:
    int64 counts of shape [tokenizer.get_vocab_size(with_added_tokens=True)].

  Raises:
    BistilError: for a batch_size or num_threads below 1 (and whatever the
      line iterator raises, e.g. for an empty corpus).
  """
  if batch_size < 1:
    raise BistilError(f"batch_size must be >= 1, got {batch_size}")
  if num_threads is not None and num_threads < 1:
    raise BistilError(f"num_threads must be >= 1, got {num_threads}")
  tok = tokenize.without_truncation(tokenizer)
  counts = np.zeros(tok.get_vocab_size(with_added_tokens=True), np.int64)
  encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
  workers = num_threads or os.cpu_count() or 1
  meter = _Progress(desc, progress)
  n_lines = n_tokens = 0

  def work(batch: list[str]) -> tuple[np.ndarray, int, int]:
    encodings = encode(batch, add_special_tokens=False)
    ids = np.fromiter(
      itertools.chain.from_iterable(e.ids for e in encodings), np.int64
    )
    return np.bincount(ids), len(batch), ids.size

  def absorb(result: tuple[np.ndarray, int, int]) -> None:
    nonlocal n_lines, n_tokens
    bc, nl, nt = result
    counts[: bc.size] += bc
    n_lines += nl
    n_tokens += nt
    meter.update(n_lines, n_tokens)

  if workers == 1:
    for batch in tokenize.batched(lines, batch_size):
      absorb(work(batch))
  else:
    with ThreadPoolExecutor(workers, thread_name_prefix="count") as pool:
      pending = collections.deque()
      for batch in tokenize.batched(lines, batch_size):
        pending.append(pool.submit(work, batch))
        while len(pending) >= 2 * workers:
          absorb(pending.popleft().result())
      while pending:
        absorb(pending.popleft().result())
  meter.update(n_lines, n_tokens, final=True)
  return counts


def save_counts(
  path: str,
  tokenizer: Tokenizer,
  counts: Mapping[str, np.ndarray],
  meta: Mapping[str, Any] | None = None,
) -> None:
  """Saves named count arrays as .npz, tied to the tokenizer's fingerprint.

  Args:
    path: output file (written as given, with no extension added).
    tokenizer: the tokenizer the counts were made with.
    counts: name (e.g. "source", "target") -> int64 counts.
    meta: JSON-serialisable extras (corpus specs, line counts).

  Raises:
    BistilError: if an array does not match the tokenizer's vocab size.
  """
  size = tokenizer.get_vocab_size(with_added_tokens=True)
  arrays = {}
  for name, c in counts.items():
    c = np.asarray(c)
    if c.shape != (size,):
      raise BistilError(
        f"counts {name!r} have shape {c.shape}, tokenizer vocab is {size}"
      )
    arrays[f"counts/{name}"] = c.astype(np.int64)
  header = {
    "format": _COUNTS_FORMAT,
    "fingerprint": tokenizer_fingerprint(tokenizer),
    "vocab_size": size,
    "meta": dict(meta or {}),
  }
  arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
  buf = io.BytesIO()
  np.savez_compressed(buf, **arrays)
  try:
    paths.write_bytes(path, buf.getvalue())
  except OSError as e:
    raise BistilError(
      f"cannot write counts file {path}: {e.strerror or e}"
    ) from None


def load_counts(
  path: str, tokenizer: Tokenizer
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Loads counts saved by `save_counts`, refusing another tokenizer's.

  Args:
    path: the .npz file.
    tokenizer: the tokenizer the counts must belong to.

  Returns:
    (name -> int64 counts, the saved meta dict).

  Raises:
    BistilError: for a missing or malformed file, or counts made with a
      different tokenizer.
  """
  if not paths.path(path).is_file():
    raise BistilError(f"counts file not found: {path}")
  try:
    data = io.BytesIO(paths.path(path).read_bytes())
    with np.load(data, allow_pickle=False) as z:
      header = json.loads(bytes(z["header"]).decode())
      counts = {
        k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("counts/")
      }
  except Exception as e:  # noqa: BLE001 - zip, key and JSON errors alike
    raise BistilError(f"{path} is not a counts file: {e}") from None
  if header.get("format") != _COUNTS_FORMAT:
    raise BistilError(f"{path}: unknown counts format {header.get('format')}")
  want = tokenizer_fingerprint(tokenizer)
  if header.get("fingerprint") != want:
    raise BistilError(
      f"counts in {path} were made with a different tokenizer "
      f"(fingerprint {header.get('fingerprint')}, this tokenizer {want})"
    )
  size = tokenizer.get_vocab_size(with_added_tokens=True)
  for name, c in counts.items():
    if c.shape != (size,):
      raise BistilError(f"{path}: counts {name!r} do not match vocab {size}")
  return counts, header.get("meta", {})


# ------------------------------------------------------------------ selection
def _coverage_mask(counts: np.ndarray, coverage: float) -> np.ndarray:
  """The smallest most-frequent-first id set with >= coverage of tokens.

  Ties in count are broken by lower id first, so the set is deterministic.
  """
  order = np.argsort(-counts, kind="stable")
  csum = np.cumsum(counts[order])
  k = int(np.searchsorted(csum, coverage * csum[-1], side="left")) + 1
  k = min(k, int(np.count_nonzero(counts)))
  mask = np.zeros(counts.shape, bool)
  mask[order[:k]] = True
  return mask


def check_selection_args(
  threshold: float | None, min_count: int | None, coverage: float | None
) -> None:
  """Validates the arguments of `select_keep_ids`.

  Raises:
    BistilError: for a value out of range or no criterion at all.
  """
  if threshold is None and coverage is None and min_count is None:
    raise BistilError("give at least one of threshold, min_count, coverage")
  if threshold is not None and not 0.0 <= threshold <= 1.0:
    raise BistilError(f"threshold must be in [0, 1], got {threshold}")
  if coverage is not None and not 0.0 < coverage <= 1.0:
    raise BistilError(f"coverage must be in (0, 1], got {coverage}")
  if min_count is not None and (int(min_count) != min_count or min_count < 1):
    raise BistilError(f"min_count must be an integer >= 1, got {min_count}")


def select_keep_ids(
  src_counts: np.ndarray,
  tgt_counts: np.ndarray,
  special_ids: Sequence[int] | np.ndarray,
  threshold: float | None = 1e-6,
  min_count: int | None = None,
  coverage: float | None = None,
) -> np.ndarray:
  """The ids to keep, in original order.

  With per-corpus unigram probabilities p = counts / counts.sum(), an id is
  kept iff it is special, or

      (FREQ) and (COUNT)

  where FREQ is the union of the frequency criteria that are given:
    - threshold: max(p_src, p_tgt) >= threshold (docs/method.md 1.1, default
      1e-6);
    - coverage: the id is in the smallest most-frequent-first set of the
      source covering >= `coverage` of its tokens, or in that of the target
      (so each corpus alone keeps at least that share of its tokens);
  and FREQ is true for every id when neither is given; COUNT (only if
  `min_count` is given) is counts_src >= min_count or counts_tgt >=
  min_count, a noise floor applied to both frequency criteria. Specials are
  kept even if never seen.

  Args:
    src_counts: int counts of the source corpus, [vocab].
    tgt_counts: int counts of the target corpus, [vocab].
    special_ids: ids always kept.
    threshold: probability threshold in [0, 1], or None to disable.
    min_count: minimum count in at least one corpus (>= 1), or None.
    coverage: token share in (0, 1] each corpus must keep, or None.

  Returns:
    Sorted unique int64 ids; new id = position in this array.

  Raises:
    BistilError: for bad arguments, empty counts, or a selection that keeps
      nothing but special tokens.
  """
  src = np.asarray(src_counts)
  tgt = np.asarray(tgt_counts)
  if src.ndim != 1 or src.shape != tgt.shape:
    raise BistilError(
      f"source and target counts must be 1-D of one size, got {src.shape} "
      f"and {tgt.shape}"
    )
  for name, c in (("source", src), ("target", tgt)):
    if not np.issubdtype(c.dtype, np.integer) or (c < 0).any():
      raise BistilError(f"{name} counts must be non-negative integers")
    if c.sum() == 0:
      raise BistilError(f"{name} counts are all zero (empty corpus?)")
  check_selection_args(threshold, min_count, coverage)
  specials = np.asarray(special_ids, dtype=np.int64).reshape(-1)
  if specials.size and (specials.min() < 0 or specials.max() >= src.size):
    raise BistilError(f"special ids out of range [0, {src.size})")

  if threshold is None and coverage is None:
    keep = np.ones(src.shape, bool)
  else:
    keep = np.zeros(src.shape, bool)
    if threshold is not None:
      p = np.maximum(src / src.sum(), tgt / tgt.sum())
      keep |= p >= threshold
    if coverage is not None:
      keep |= _coverage_mask(src, coverage) | _coverage_mask(tgt, coverage)
  if min_count is not None:
    keep &= (src >= min_count) | (tgt >= min_count)
  n_selected = int(np.count_nonzero(np.delete(keep, specials)))
  keep[specials] = True
  if n_selected == 0:
    raise BistilError(
      "the selection keeps no token but the special ones: lower threshold "
      "or min_count, or raise coverage"
    )
  return np.flatnonzero(keep).astype(np.int64)


# ---------------------------------------------------------------- id mapping
def _check_keep_ids(keep_ids: Any, size: int) -> np.ndarray:
  keep = np.asarray(keep_ids)
  if keep.ndim != 1 or keep.size == 0:
    raise BistilError(
      f"keep ids must be a non-empty 1-D array, got {keep.shape}"
    )
  if not np.issubdtype(keep.dtype, np.integer):
    raise BistilError(f"keep ids must be integers, got {keep.dtype}")
  keep = keep.astype(np.int64)
  if keep.min() < 0 or keep.max() >= size:
    raise BistilError(f"keep ids out of range [0, {size})")
  if np.unique(keep).size != keep.size:
    raise BistilError("keep ids contain duplicates")
  return keep


def old2new_array(
  keep_ids: Sequence[int] | np.ndarray, size: int
) -> np.ndarray:
  """Dense old->new map: new id of each old id, -1 where dropped.

  Args:
    keep_ids: old id of each new id (position = new id).
    size: the old vocabulary size.

  Returns:
    int64 [size].
  """
  keep = _check_keep_ids(keep_ids, size)
  out = np.full(size, -1, np.int64)
  out[keep] = np.arange(keep.size)
  return out


def vocab_map_from_keep_ids(
  keep_ids: Sequence[int] | np.ndarray,
) -> dict[int, int]:
  """{old id: new id} for the kept ids."""
  return {int(old): new for new, old in enumerate(np.asarray(keep_ids))}


def keep_ids_from_vocab_map(vocab_map: Mapping[int, int]) -> np.ndarray:
  """Old id of each new id from an {old: new} map with new ids 0..n-1.

  Raises:
    BistilError: if the new ids are not exactly 0..n-1.
  """
  keep = np.full(len(vocab_map), -1, np.int64)
  for old, new in vocab_map.items():
    if not 0 <= new < keep.size or keep[new] >= 0:
      raise BistilError("vocab map new ids must be 0..n-1, each once")
    keep[new] = old
  return keep


def write_vocab_map(path: str, keep_ids: Sequence[int] | np.ndarray) -> None:
  """Writes `vocab_map.json`: {"old id": new id}, in old-id order."""
  m = {str(k): v for k, v in vocab_map_from_keep_ids(keep_ids).items()}
  paths.write_text(path, json.dumps(m))


def read_vocab_map(path: str) -> dict[int, int]:
  """Reads `vocab_map.json` as {old id: new id}.

  Raises:
    BistilError: for a missing file or one that is not such a map.
  """
  if not paths.path(path).is_file():
    raise BistilError(f"vocab map not found: {path}")
  try:
    raw = json.loads(paths.read_text(path))
    m = {int(k): int(v) for k, v in raw.items()}
  except (ValueError, AttributeError, TypeError) as e:
    raise BistilError(f"{path} is not a vocab map: {e}") from None
  keep_ids_from_vocab_map(m)  # validates the new ids
  return m


def keep_mask_from_vocab(
  old_vocab: Mapping[str, int], new_vocab: Mapping[str, int]
) -> np.ndarray:
  """Old id of every token of the new vocab, by string lookup.

  The result is a `keep_ids` array (position = new id) for
  `slice_vocab_params`, e.g. to map a full-vocab teacher or a language-SFT
  embedding diff onto a trimmed vocab (docs/method.md 1.2).

  Args:
    old_vocab: token -> id of the original tokenizer (`get_vocab()`).
    new_vocab: token -> id of the trimmed tokenizer.

  Returns:
    int64 [len(new_vocab)].

  Raises:
    BistilError: if new ids are not 0..n-1 or a new token is not in the old
      vocab.
  """
  keep = np.full(len(new_vocab), -1, np.int64)
  missing = []
  for tok, new in new_vocab.items():
    if not 0 <= new < keep.size or keep[new] >= 0:
      raise BistilError("new vocab ids must be 0..n-1, each once")
    if tok not in old_vocab:
      missing.append(tok)
      continue
    keep[new] = old_vocab[tok]
  if missing:
    raise BistilError(
      f"{len(missing)} tokens of the new vocab are not in the old one, "
      f"e.g. {missing[:5]}"
    )
  return keep


# ------------------------------------------------------------ tokenizer files
def trim_tokenizer_json(
  tok_json: dict[str, Any], keep_ids: Sequence[int] | np.ndarray
) -> dict[str, Any]:
  """A tokenizer.json whose ids are the ranks of `keep_ids`.

  WordPiece: `model.vocab` holds the kept tokens with compact ids. Unigram:
  `model.vocab` is the kept pieces in order, `unk_id` remapped. Both: added
  tokens, post-processor ids and the padding id are remapped; dropped added
  tokens are removed. Normaliser, pre-tokeniser and decoder are unchanged.

  Args:
    tok_json: the parsed original tokenizer.json.
    keep_ids: sorted old ids to keep.

  Returns:
    The new tokenizer.json dict (shares unchanged sub-objects).

  Raises:
    BistilError: for an unsupported model type, unsorted keep ids, or a
      dropped unknown / post-processor token.
  """
  mtype = check_supported(tok_json)
  vocab = _json_vocab(tok_json)
  size = max(vocab.values()) + 1
  keep = _check_keep_ids(keep_ids, size)
  if (np.diff(keep) <= 0).any():
    raise BistilError("keep ids must be sorted (order-preserving trimming)")
  old2new = old2new_array(keep, size)
  model = dict(tok_json["model"])
  if mtype == "WordPiece":
    unk = model.get("unk_token")
    if unk not in model["vocab"]:
      raise BistilError(f"WordPiece unk token {unk!r} is not in the vocab")
    if old2new[model["vocab"][unk]] < 0:
      raise BistilError(f"the unknown token {unk!r} must be kept")
    items = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    model["vocab"] = {t: int(old2new[i]) for t, i in items if old2new[i] >= 0}
  else:
    pieces = model["vocab"]
    model["vocab"] = [p for i, p in enumerate(pieces) if old2new[i] >= 0]
    if model.get("unk_id") is not None:
      unk = int(model["unk_id"])
      if old2new[unk] < 0:
        raise BistilError(f"the unknown piece (id {unk}) must be kept")
      model["unk_id"] = int(old2new[unk])
  new = dict(tok_json)
  new["model"] = model
  new["added_tokens"] = [
    dict(t, id=int(old2new[t["id"]]))
    for t in tok_json.get("added_tokens") or ()
    if old2new[t["id"]] >= 0
  ]
  new["post_processor"] = _remap_post_processor(
    tok_json.get("post_processor"), old2new
  )
  padding = tok_json.get("padding")
  if padding and padding.get("pad_id") is not None:
    pad = int(padding["pad_id"])
    if old2new[pad] < 0:
      raise BistilError(f"the padding token (id {pad}) must be kept")
    new["padding"] = dict(padding, pad_id=int(old2new[pad]))
  return new


def _check_trimmed(
  old_vocab: Mapping[str, int], new_tok: Tokenizer, old2new: np.ndarray
) -> None:
  """Every kept token has its compact id in the rewritten tokenizer."""
  want = {t: int(old2new[i]) for t, i in old_vocab.items() if old2new[i] >= 0}
  got = new_tok.get_vocab(with_added_tokens=True)
  if got != want:
    bad = [t for t in want if got.get(t) != want[t]][:5]
    raise AssertionError(f"trimmed tokenizer ids disagree, e.g. for {bad}")


def _read_json_file(path: paths.PathLike) -> Any:
  try:
    return json.loads(paths.read_text(path))
  except (OSError, ValueError) as e:
    raise BistilError(f"cannot read {path}: {e}") from None


def _drop_file_refs(d: dict[str, Any], removed: Sequence[str]) -> list[str]:
  """Removes top-level keys whose value names a removed file."""
  gone = [
    k
    for k, v in d.items()
    if isinstance(v, str) and v.replace("\\", "/").rsplit("/", 1)[-1] in removed
  ]
  for k in gone:
    del d[k]
  return gone


def extra_special_tokens(src_dir: str) -> list[str]:
  """Special token strings named by the transformers tokenizer files."""
  out = []
  for name in (SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG):
    path = paths.path(src_dir) / name
    if path.is_file():
      d = _read_json_file(path)
      if isinstance(d, dict):
        out += _special_strings(d)
  return out


def _copy_tokenizer_configs(
  src: paths.Path,
  out: paths.Path,
  present: set[str],
  removed: Sequence[str],
  old2new: np.ndarray,
) -> tuple[list[str], list[str]]:
  """Copies the transformers tokenizer files with their ids remapped.

  tokenizer_config.json and special_tokens_map.json lose the keys naming
  `removed` files; `added_tokens_decoder` and added_tokens.json keep the
  kept ids only, renumbered.

  Returns:
    (files written, "file:key" of every key removed).
  """
  size = old2new.size
  written, removed_keys = [], []
  for name in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):
    if name not in present:
      continue
    d = _read_json_file(src / name)
    if not isinstance(d, dict):
      raise BistilError(f"{src / name} is not a JSON object")
    removed_keys += [f"{name}:{k}" for k in _drop_file_refs(d, removed)]
    if isinstance(d.get("added_tokens_decoder"), dict):
      entries = [
        (int(old2new[int(k)]), v)
        for k, v in d["added_tokens_decoder"].items()
        if 0 <= int(k) < size and old2new[int(k)] >= 0
      ]
      d["added_tokens_decoder"] = {str(i): v for i, v in sorted(entries)}
    paths.write_text(out / name, json.dumps(d, ensure_ascii=False, indent=2))
    written.append(name)
  if ADDED_TOKENS in present:
    d = _read_json_file(src / ADDED_TOKENS)
    d = {
      t: int(old2new[i])
      for t, i in d.items()
      if 0 <= i < size and old2new[i] >= 0
    }
    paths.write_text(
      out / ADDED_TOKENS, json.dumps(d, ensure_ascii=False, indent=2)
    )
    written.append(ADDED_TOKENS)
  return written, removed_keys


def write_trimmed_tokenizer(
  src_dir: str, out_dir: str, keep_ids: Sequence[int] | np.ndarray
) -> dict[str, Any]:
  """Writes the trimmed tokenizer files of `src_dir` into `out_dir`.

  Writes tokenizer.json (and vocab.txt for WordPiece), copies
  tokenizer_config.json (with `added_tokens_decoder` remapped),
  special_tokens_map.json and added_tokens.json (remapped). Slow
  SentencePiece files are NOT copied: they would still hold the untrimmed
  vocabulary and give wrong ids to any slow-tokenizer load; config keys that
  name them are removed.

  Args:
    src_dir: dir with the original tokenizer.json.
    out_dir: existing dir to write into.
    keep_ids: sorted old ids to keep.

  Returns:
    {"model": "WordPiece" | "Unigram", "written": [files],
     "removed": [files of src_dir left out], "removed_keys": [...]}.

  Raises:
    BistilError: as `trim_tokenizer_json`, or for unreadable files.
  """
  old_tok, tok_json = load_tokenizer_dir(src_dir)
  mtype = check_supported(tok_json)
  old_vocab = old_tok.get_vocab(with_added_tokens=True)
  size = old_tok.get_vocab_size(with_added_tokens=True)
  keep = _check_keep_ids(keep_ids, size)
  old2new = old2new_array(keep, size)
  new_json = trim_tokenizer_json(tok_json, keep)
  text = json.dumps(new_json, ensure_ascii=False, indent=2)
  new_tok = Tokenizer.from_str(text)
  _check_trimmed(old_vocab, new_tok, old2new)

  src, out = paths.path(src_dir), paths.path(out_dir)
  written = [TOKENIZER_JSON]
  paths.write_text(out / TOKENIZER_JSON, text)
  if mtype == "WordPiece":
    items = sorted(new_json["model"]["vocab"].items(), key=lambda kv: kv[1])
    paths.write_text(out / VOCAB_TXT, "".join(t + "\n" for t, _ in items))
    written.append(VOCAB_TXT)
  present = {p.name for p in src.iterdir()}
  removed = [n for n in SLOW_TOKENIZER_FILES if n in present]
  if mtype == "Unigram" and VOCAB_TXT in present:
    removed.append(VOCAB_TXT)
  more, removed_keys = _copy_tokenizer_configs(
    src, out, present, removed, old2new
  )
  return {
    "model": mtype,
    "written": written + more,
    "removed": removed,
    "removed_keys": removed_keys,
  }


# ----------------------------------------------------------------- parameters
def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  for k in path:
    if not isinstance(tree, Mapping) or k not in tree:
      return None
    tree = tree[k]
  return tree


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  """Sets a leaf, copying the dicts along the path (inputs stay intact)."""
  for k in path[:-1]:
    tree[k] = dict(tree[k])
    tree = tree[k]
  tree[path[-1]] = value


def _take_pad(x: Any, keep: np.ndarray, axis: int, new_padded: int) -> Any:
  """Takes `keep` along axis and zero-pads that axis to `new_padded`."""
  if isinstance(x, np.ndarray):
    xp = np
  else:
    import jax.numpy as xp  # noqa: PLC0415 - only for jax arrays

  y = xp.take(x, keep, axis=axis)
  pad = [(0, 0)] * y.ndim
  pad[axis] = (0, new_padded - keep.size)
  return xp.pad(y, pad)


def _remap_token_id(name: str, old: int | None, keep: np.ndarray) -> int | None:
  if old is None:
    return None
  hit = np.flatnonzero(keep == old)
  if hit.size == 0:
    raise BistilError(f"config {name}={old} is not among the kept ids")
  return int(hit[0])


def slice_vocab_params(
  params: Mapping[str, Any],
  config: ModelConfig,
  keep_ids: Sequence[int] | np.ndarray,
) -> tuple[dict[str, Any], ModelConfig]:
  """Keeps the vocabulary rows `keep_ids` of every vocab-indexed leaf.

  New row j = old row keep_ids[j] of the word embeddings, the MLM bias and an
  untied MLM decoder (where present: partial trees such as embedding diffs
  work too); padding rows up to `new_config.padded_vocab_size` are zero. The
  config gets `vocab_size=len(keep_ids)` and its pad/bos/eos ids remapped.

  Args:
    params: our nested params (numpy or jax arrays), vocab axes padded to
      `config.padded_vocab_size`.
    config: the ModelConfig of `params`.
    keep_ids: old id of each new id, all < config.vocab_size, unique (any
      order; trimming passes them sorted).

  Returns:
    (new params, new config); leaves not indexed by vocab are shared.

  Raises:
    BistilError: for bad keep ids, a vocab leaf whose size disagrees with
      the config, a dropped pad/bos/eos id, or a RoBERTa pad id that would
      move (its position ids start after the pad id).
  """
  keep = _check_keep_ids(keep_ids, config.vocab_size)
  ids = {
    name: _remap_token_id(name, getattr(config, name), keep)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id")
  }
  if config.is_roberta and ids["pad_token_id"] != config.pad_token_id:
    raise BistilError(
      f"pad_token_id would move from {config.pad_token_id} to "
      f"{ids['pad_token_id']}: RoBERTa position ids depend on it"
    )
  new_config = config.replace(vocab_size=int(keep.size), **ids)
  new_params = dict(params)
  for path, axis in VOCAB_LEAVES:
    leaf = _get(params, path)
    if leaf is None:
      continue
    if leaf.shape[axis] != config.padded_vocab_size:
      raise BistilError(
        f"params {'/'.join(path)} has {leaf.shape[axis]} vocab rows, config "
        f"expects padded_vocab_size={config.padded_vocab_size}"
      )
    sliced = _take_pad(leaf, keep, axis, new_config.padded_vocab_size)
    _set(new_params, path, sliced)
  return new_params, new_config


def count_params(params: Mapping[str, Any], config: ModelConfig) -> int:
  """Parameters as exported: vocab leaves counted without padding rows."""
  import jax  # noqa: PLC0415

  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  for path, axis in VOCAB_LEAVES:
    leaf = _get(params, path)
    if leaf is not None:
      pad = leaf.shape[axis] - config.vocab_size
      total -= pad * int(np.prod(leaf.shape)) // leaf.shape[axis]
  return total
