"""Phase-1 input pipeline: packed rows -> bilingual MLM batches -> devices.

docs/method.md 2.5, host side, in NumPy:

1. `encode_and_pack` tokenises lines with special tokens ([CLS] ... [SEP]
   per line), concatenates them and cuts rows of exactly `max_seq_len`
   tokens (Hugging Face run_mlm style, no padding).
2. `LanguageStream` holds this host's rows of one corpus. Rows are dealt to
   hosts round-robin: global row i belongs to host i % num_hosts, and every
   host keeps exactly total_rows // num_hosts rows (at most num_hosts - 1
   rows of a corpus are dropped), so all hosts agree on shard sizes, epochs
   and errors. Each host tokenises the whole corpus but stores only its
   shard.
3. `BilingualBatches` yields monolingual batches, source and target exactly
   50/50 within each block of `balance_block` steps in a seeded random
   order, each language's rows reshuffled every epoch, then BERT-masked.
   Batch k is a pure function of (seed, k, host): the iterator state is the
   step counter, so resume is exact and the state is the same on all hosts.
4. `prefetch` keeps batches ready in a background thread; `to_global` turns a
   host-local batch into global `jax.Array`s with the batch sharding.

Memory: each host holds its shard of both corpora as int32 ids plus a bool
special-token mask, 5 bytes per token (for a 100M-token corpus on one host,
0.5 GB), plus one int64 permutation per corpus. Packing itself streams.
TODO: corpora too big for host memory need a streaming row source (e.g.
packed rows written to disk once and memory-mapped); the pure-function
design carries over unchanged to a memory-mapped array.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tokenizers import Tokenizer

from bistil_jax import partitioning
from bistil_jax.data import corpus, mlm, tokenize
from bistil_jax.errors import BistilError

log = logging.getLogger(__name__)

SOURCE, TARGET = 0, 1
STATE_VERSION = 1
# Seed-stream domain tags (see mlm.TAG_MASK).
TAG_SHUFFLE = 0x73687566  # "shuf"
TAG_LANG = 0x6C616E67  # "lang"
MASK_TOKENS = ("[MASK]", "<mask>")

Batch = dict[str, np.ndarray]


# ------------------------------------------------------------------ packing


def pack_chunks(
  tokenizer: Tokenizer,
  lines: Iterable[str],
  max_seq_len: int,
  batch_lines: int = 1000,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Like `encode_and_pack`, but yields the rows of each encoded group.

  Args:
    tokenizer: a `tokenizers.Tokenizer` whose post-processor adds specials.
    lines: the documents, one string each.
    max_seq_len: the row length l.
    batch_lines: lines per `encode_batch` call.

  Yields:
    (ids [k, l] int32, special_tokens_mask [k, l] bool) with k >= 1.

  Raises:
    BistilError: if max_seq_len or batch_lines is not positive.
  """
  if max_seq_len < 1:
    raise BistilError(f"max_seq_len must be >= 1, got {max_seq_len}")
  if batch_lines < 1:
    raise BistilError(f"batch_lines must be >= 1, got {batch_lines}")
  tok = tokenize.without_truncation(tokenizer)
  rest_ids = np.zeros(0, np.int32)
  rest_special = np.zeros(0, bool)
  for group in tokenize.batched(lines, batch_lines):
    encs = tok.encode_batch(group, add_special_tokens=True)
    n = sum(len(e.ids) for e in encs)
    ids = np.fromiter(
      itertools.chain.from_iterable(e.ids for e in encs), np.int32, n
    )
    special = np.fromiter(
      itertools.chain.from_iterable(e.special_tokens_mask for e in encs),
      bool,
      n,
    )
    # The remainder carries over to the next group (run_mlm instead drops
    # the remainder of every 1000-line group; this keeps the whole stream).
    ids = np.concatenate([rest_ids, ids])
    special = np.concatenate([rest_special, special])
    k = len(ids) // max_seq_len
    cut = k * max_seq_len
    if k:
      yield (
        ids[:cut].reshape(k, max_seq_len),  # [k, l]
        special[:cut].reshape(k, max_seq_len),  # [k, l]
      )
    rest_ids, rest_special = ids[cut:].copy(), special[cut:].copy()


def encode_and_pack(
  tokenizer: Tokenizer,
  lines: Iterable[str],
  max_seq_len: int,
  batch_lines: int = 1000,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Tokenises lines with special tokens and cuts the stream into rows.

  Hugging Face run_mlm (not line-by-line): every line becomes
  [CLS] ... [SEP], the encodings are concatenated and cut into rows of
  exactly `max_seq_len` tokens, so a row may hold several sentences and need
  not start with [CLS]. There is no padding; the final partial row of the
  whole stream is dropped. Lines are encoded `batch_lines` at a time and
  memory stays flat. Truncation and padding configured in the tokenizer are
  ignored (on a copy).

  Args:
    tokenizer: a `tokenizers.Tokenizer` (e.g. from tokenizer.json).
    lines: the documents, one string each.
    max_seq_len: the row length l.
    batch_lines: lines per `encode_batch` call.

  Yields:
    (ids [l] int32, special_tokens_mask [l] bool) per row; the mask marks
    the tokens the post-processor added ([CLS], [SEP], <s>, </s>).

  Raises:
    BistilError: if max_seq_len or batch_lines is not positive.
  """
  for ids, special in pack_chunks(tokenizer, lines, max_seq_len, batch_lines):
    yield from zip(ids, special, strict=True)


def checked_mlm_ids(
  tokenizer: Tokenizer, vocab_size: int, whose: str, hint: str
) -> tuple[int, int]:
  """`mlm_token_ids` of a tokenizer known to fit a model of `vocab_size`
  rows.

  Raises:
    BistilError: no mask token, or more tokens than rows (naming `whose`
      vocab_size and the `hint` of what to use instead).
  """
  size, mask_id = mlm_token_ids(tokenizer)
  if size > vocab_size:
    raise BistilError(
      f"the tokenizer has {size} tokens but {whose} vocab_size is "
      f"{vocab_size}: {hint}"
    )
  return size, mask_id


def mlm_token_ids(tokenizer: Tokenizer) -> tuple[int, int]:
  """(vocab_size, mask_id) for `BilingualBatches` from a tokenizer.

  Args:
    tokenizer: a WordPiece ([MASK]) or SentencePiece (<mask>) tokenizer.

  Returns:
    The vocabulary size including added tokens, and the mask token's id.

  Raises:
    BistilError: if the tokenizer has no mask token.
  """
  for token in MASK_TOKENS:
    mask_id = tokenizer.token_to_id(token)
    if mask_id is not None:
      return tokenizer.get_vocab_size(with_added_tokens=True), mask_id
  raise BistilError(f"tokenizer has no mask token (looked for {MASK_TOKENS})")


def _process(
  process_index: int | None, num_processes: int | None
) -> tuple[int, int]:
  h = jax.process_index() if process_index is None else process_index
  n = jax.process_count() if num_processes is None else num_processes
  if n < 1 or not 0 <= h < n:
    raise BistilError(f"process index {h} is not in [0, {n})")
  return h, n


# ------------------------------------------------------------------ streams
class LanguageStream:
  """One language's packed rows on this host, reshuffled every epoch.

  The stream is an endless sequence of rows: position p (0-based, counted in
  rows) is row perm_e[p % n] of epoch e = p // n, where n is this host's
  row count and perm_e a permutation seeded by (seed, lang, host, e). Rows
  are thus read in full epochs, and a smaller corpus simply repeats more
  often. `take` is a pure function of its arguments.

  Build streams with `from_corpus`, `from_lines` or `from_rows`.

  Attributes:
    name: the corpus name used in messages (its spec for `from_corpus`).
    ids: [n, l] int32, this host's rows.
    special_mask: [n, l] bool, the rows' special-token masks.
    total_rows: the corpus' row count over all hosts.
    process_index: this host's index.
    num_processes: the number of hosts.
  """

  def __init__(
    self,
    ids: np.ndarray,
    special_mask: np.ndarray,
    *,
    name: str,
    total_rows: int,
    process_index: int,
    num_processes: int,
  ):
    """Wraps rows that are already this host's shard (see `from_rows`).

    Args:
      ids: [n, l] this host's rows.
      special_mask: [n, l] their special-token masks.
      name: the corpus name for messages.
      total_rows: the corpus' row count over all hosts.
      process_index: this host's index.
      num_processes: the number of hosts.

    Raises:
      BistilError: if the arrays are not equal [rows, length] shapes.
    """
    ids = np.asarray(ids, np.int32)
    special_mask = np.asarray(special_mask, bool)
    if ids.ndim != 2 or ids.shape != special_mask.shape:
      raise BistilError(
        f"corpus {name}: rows {ids.shape} and special-token mask "
        f"{special_mask.shape} must be equal [rows, length] shapes"
      )
    self.name = name
    self.ids = ids  # [n, l]
    self.special_mask = special_mask  # [n, l]
    self.total_rows = int(total_rows)
    self.process_index = int(process_index)
    self.num_processes = int(num_processes)
    self._perms: collections.OrderedDict[tuple[int, int, int], np.ndarray]
    self._perms = collections.OrderedDict()

  # -- construction
  @classmethod
  def from_chunks(
    cls,
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    name: str,
    max_seq_len: int,
    process_index: int | None = None,
    num_processes: int | None = None,
  ) -> LanguageStream:
    """Keeps this host's rows of a stream of [k, l] row chunks.

    Global row i goes to host i % num_processes; each host keeps the first
    total_rows // num_processes of its rows.

    Args:
      chunks: (ids [k, l], special [k, l]) pairs, e.g. from `pack_chunks`.
      name: the corpus name for messages.
      max_seq_len: l (needed when the corpus yields no row).
      process_index: this host; defaults to `jax.process_index()`.
      num_processes: the host count; defaults to `jax.process_count()`.

    Returns:
      The stream of this host's rows.
    """
    h, n = _process(process_index, num_processes)
    ids_parts, special_parts = [], []
    total = 0
    for ids, special in chunks:
      first = (h - total) % n
      # Copies, so no view keeps a whole chunk alive.
      ids_parts.append(np.array(ids[first::n], np.int32))
      special_parts.append(np.array(special[first::n], bool))
      total += len(ids)
    keep = total // n
    if ids_parts:
      ids = np.concatenate(ids_parts)[:keep]
      special = np.concatenate(special_parts)[:keep]
    else:
      ids = np.zeros((0, max_seq_len), np.int32)
      special = np.zeros((0, max_seq_len), bool)
    log.info(
      "corpus %s: %d rows of %d tokens, %d on host %d of %d",
      name,
      total,
      max_seq_len,
      keep,
      h,
      n,
    )
    return cls(
      ids,
      special,
      name=name,
      total_rows=total,
      process_index=h,
      num_processes=n,
    )

  @classmethod
  def from_rows(
    cls,
    ids: np.ndarray,
    special_mask: np.ndarray,
    *,
    name: str = "rows",
    process_index: int | None = None,
    num_processes: int | None = None,
  ) -> LanguageStream:
    """This host's shard of already packed rows.

    Args:
      ids: [N, l] all rows of the corpus.
      special_mask: [N, l] their special-token masks.
      name: the corpus name for messages.
      process_index: this host; defaults to `jax.process_index()`.
      num_processes: the host count; defaults to `jax.process_count()`.

    Returns:
      The stream of this host's rows.
    """
    ids = np.asarray(ids)
    special_mask = np.asarray(special_mask)
    if ids.ndim != 2 or ids.shape != special_mask.shape:
      raise BistilError(
        f"corpus {name}: rows {ids.shape} and special-token mask "
        f"{special_mask.shape} must be equal [rows, length] shapes"
      )
    return cls.from_chunks(
      [(ids, special_mask)],
      name=name,
      max_seq_len=ids.shape[1],
      process_index=process_index,
      num_processes=num_processes,
    )

  @classmethod
  def from_lines(
    cls,
    tokenizer: Tokenizer,
    lines: Iterable[str],
    max_seq_len: int,
    *,
    name: str = "lines",
    process_index: int | None = None,
    num_processes: int | None = None,
    batch_lines: int = 1000,
  ) -> LanguageStream:
    """Packs lines (see `encode_and_pack`) and keeps this host's rows.

    Args:
      tokenizer: the tokenizer.
      lines: the documents.
      max_seq_len: the row length l.
      name: the corpus name for messages.
      process_index: this host; defaults to `jax.process_index()`.
      num_processes: the host count; defaults to `jax.process_count()`.
      batch_lines: lines per `encode_batch` call.

    Returns:
      The stream of this host's rows.
    """
    return cls.from_chunks(
      pack_chunks(tokenizer, lines, max_seq_len, batch_lines),
      name=name,
      max_seq_len=max_seq_len,
      process_index=process_index,
      num_processes=num_processes,
    )

  @classmethod
  def from_corpus(
    cls,
    tokenizer: Tokenizer,
    spec: str,
    max_seq_len: int,
    *,
    max_lines: int | None = None,
    process_index: int | None = None,
    num_processes: int | None = None,
    batch_lines: int = 1000,
  ) -> LanguageStream:
    """Reads a CORPUS spec (see `corpus.iter_lines`), packs, shards.

    Args:
      tokenizer: the tokenizer.
      spec: a local text file or a `datasets` spec.
      max_seq_len: the row length l.
      max_lines: read at most this many documents.
      process_index: this host; defaults to `jax.process_index()`.
      num_processes: the host count; defaults to `jax.process_count()`.
      batch_lines: lines per `encode_batch` call.

    Returns:
      The stream of this host's rows.

    Raises:
      BistilError: for an unreadable or empty corpus.
    """
    return cls.from_lines(
      tokenizer,
      corpus.iter_lines(spec, max_lines=max_lines),
      max_seq_len,
      name=spec,
      process_index=process_index,
      num_processes=num_processes,
      batch_lines=batch_lines,
    )

  # -- access
  @property
  def num_rows(self) -> int:
    """This host's row count n (the same on every host)."""
    return self.ids.shape[0]

  @property
  def max_seq_len(self) -> int:
    return self.ids.shape[1]

  def check_batch(self, per_host_batch: int) -> None:
    """Raises BistilError unless one epoch fills a per-host batch."""
    if self.num_rows < per_host_batch:
      raise BistilError(
        f"corpus {self.name} shorter than one batch: {self.total_rows} rows "
        f"of {self.max_seq_len} tokens over {self.num_processes} host(s) "
        f"give {self.num_rows} per host, a batch needs {per_host_batch}"
      )

  def permutation(self, seed: int, lang: int, epoch: int) -> np.ndarray:
    """The row order of one epoch: [n] int64, cached for the last two."""
    key = (seed, lang, epoch)
    perm = self._perms.get(key)
    if perm is None:
      ss = np.random.SeedSequence(
        [seed, TAG_SHUFFLE, lang, self.process_index, epoch]
      )
      perm = np.random.default_rng(ss).permutation(self.num_rows)
      self._perms[key] = perm
      while len(self._perms) > 2:
        self._perms.popitem(last=False)
    return perm

  def take(
    self, position: int, count: int, seed: int, lang: int = 0
  ) -> tuple[np.ndarray, np.ndarray]:
    """Rows at stream positions [position, position + count).

    Args:
      position: the first stream position (rows consumed so far).
      count: the number of rows.
      seed: the shuffle seed.
      lang: the language index (part of the shuffle seed).

    Returns:
      (ids [count, l] int32, special_mask [count, l] bool).
    """
    if self.num_rows == 0:
      raise BistilError(f"corpus {self.name} has no rows on this host")
    pos = np.arange(position, position + count)  # [count]
    epochs, offsets = np.divmod(pos, self.num_rows)
    rows = np.empty(count, np.int64)
    for e in np.unique(epochs):
      sel = epochs == e
      rows[sel] = self.permutation(seed, lang, int(e))[offsets[sel]]
    return self.ids[rows], self.special_mask[rows]


# ------------------------------------------------------------------ batches
def _block_languages(seed: int, block: int, block_size: int) -> np.ndarray:
  """The languages of one block of steps: half 0, half 1, seeded order."""
  ss = np.random.SeedSequence([seed, TAG_LANG, block])
  half = block_size // 2
  return np.random.default_rng(ss).permutation(
    np.repeat(np.array([SOURCE, TARGET], np.int32), half)
  )


def language_of_step(seed: int, step: int, block_size: int = 64) -> int:
  """0 (source) or 1 (target) for a step; the same on every host.

  Args:
    seed: the run's seed.
    step: the batch index.
    block_size: steps per exactly balanced block (even).

  Returns:
    The language index.
  """
  block, i = divmod(step, block_size)
  return int(_block_languages(seed, block, block_size)[i])


class BilingualBatches:
  """Endless monolingual MLM batches, 50/50 source/target, resumable.

  Steps come in blocks of `balance_block`; each block holds exactly half
  source and half target steps in an order seeded by (seed, block), the same
  on every host so that a global batch is monolingual. At step k of language
  g, this host takes the next `per_host_batch` rows of stream g (rows
  consumed so far = per_host_batch x number of earlier steps of language
  g), then masks them with the generator `mlm.mask_rng(seed, k, host, g)`.
  Every batch is thus a pure function of (seed, k, host), and `state()` is
  just the step plus a fingerprint of what decides the rows.

  This differs from the original's epoch loop (both languages contribute
  min(#src, #tgt) batches per epoch, the larger one's freshly shuffled
  first ones) only in bookkeeping: each language here walks its own epochs,
  and both get half of all steps.

  Batch leaves (b = per_host_batch, l = max_seq_len, P = max_predictions):
    input_ids [b, l] int32: masked ids.
    attention_mask [b, l] int32: all ones (packed rows have no padding).
    token_type_ids [b, l] int32: zeros.
    labels [b, l] int32: original ids at masked positions, -100 elsewhere.
    special_tokens_mask [b, l] int32: 1 at post-processor specials.
    masked_lm_positions [b, P] int32: see `mlm.masked_positions`.
    masked_lm_ids [b, P] int32: the labels at those positions, 0 at padding.
    masked_lm_weights [b, P] float32: 1 at real slots, 0 at padding.
    lang [] int32: 0 source, 1 target.
  """

  def __init__(
    self,
    source_stream: LanguageStream,
    target_stream: LanguageStream,
    per_host_batch: int,
    seed: int,
    *,
    vocab_size: int,
    mask_id: int,
    mlm_probability: float = 0.15,
    max_predictions: int | None = None,
    balance_block: int = 64,
  ):
    """Checks the streams and the batch size.

    Args:
      source_stream: source-language rows.
      target_stream: target-language rows.
      per_host_batch: rows per batch on this host.
      seed: the run's base seed (non-negative).
      vocab_size: the tokenizer's vocabulary size (see `mlm_token_ids`).
      mask_id: the mask token's id.
      mlm_probability: the MLM selection probability.
      max_predictions: P, slots per row for the masked-position gather;
        None picks `mlm.default_max_predictions(l, mlm_probability)`.
      balance_block: steps per exactly balanced block; even and >= 2.

    Raises:
      BistilError: for bad sizes, streams that disagree on row length or
        hosts, or a corpus shorter than one per-host batch.
    """
    streams = (source_stream, target_stream)
    if per_host_batch < 1:
      raise BistilError(f"per_host_batch must be >= 1, got {per_host_batch}")
    if seed < 0:
      raise BistilError(f"seed must be non-negative, got {seed}")
    if balance_block < 2 or balance_block % 2:
      raise BistilError(
        f"balance_block must be even and >= 2, got {balance_block}"
      )
    lengths = {s.max_seq_len for s in streams}
    if len(lengths) != 1:
      raise BistilError(
        f"source and target rows differ in length: {sorted(lengths)}"
      )
    hosts = {(s.process_index, s.num_processes) for s in streams}
    if len(hosts) != 1:
      raise BistilError(f"source and target streams differ in host: {hosts}")
    for s in streams:
      s.check_batch(per_host_batch)
    self.streams = streams
    self.per_host_batch = per_host_batch
    self.seed = seed
    self.vocab_size = vocab_size
    self.mask_id = mask_id
    self.mlm_probability = mlm_probability
    self.max_seq_len = lengths.pop()
    if max_predictions is None:
      max_predictions = mlm.default_max_predictions(
        self.max_seq_len, mlm_probability
      )
    if max_predictions < 1:
      raise BistilError(f"max_predictions must be >= 1, got {max_predictions}")
    self.max_predictions = max_predictions
    self.balance_block = balance_block
    self.process_index, self.num_processes = hosts.pop()
    # Checks vocab_size, mask_id and mlm_probability now, not at step 0.
    mlm.mask_tokens(
      np.zeros((1, 1), np.int32),
      np.zeros((1, 1), bool),
      0,
      vocab_size,
      mask_id,
      mlm_probability,
    )
    self._step = 0
    self._block_cache: tuple[int, np.ndarray] | None = None

  # -- pure functions of the step
  def _block(self, block: int) -> np.ndarray:
    if self._block_cache is None or self._block_cache[0] != block:
      langs = _block_languages(self.seed, block, self.balance_block)
      self._block_cache = (block, langs)
    return self._block_cache[1]

  def language(self, step: int) -> int:
    """The language of batch `step` (0 source, 1 target)."""
    block, i = divmod(step, self.balance_block)
    return int(self._block(block)[i])

  def position(self, step: int, lang: int) -> int:
    """Rows of language `lang` consumed on this host before batch `step`."""
    block, i = divmod(step, self.balance_block)
    earlier = block * (self.balance_block // 2)
    earlier += int(np.count_nonzero(self._block(block)[:i] == lang))
    return earlier * self.per_host_batch

  def batch(self, step: int) -> Batch:
    """Batch `step` of this host (pure: does not move the iterator)."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    lang = self.language(step)
    stream = self.streams[lang]
    ids, special = stream.take(
      self.position(step, lang), self.per_host_batch, self.seed, lang
    )  # [b, l], [b, l]
    return mlm_batch(
      ids,
      special,
      mlm.mask_rng(self.seed, step, self.process_index, lang),
      lang,
      vocab_size=self.vocab_size,
      mask_id=self.mask_id,
      mlm_probability=self.mlm_probability,
      max_predictions=self.max_predictions,
    )

  # -- iterator
  def __iter__(self) -> BilingualBatches:
    return self

  def __next__(self) -> Batch:
    batch = self.batch(self._step)
    self._step += 1
    return batch

  @property
  def step(self) -> int:
    """The index of the next batch."""
    return self._step

  def progress(self) -> dict[str, Any]:
    """Per-language rows consumed and epochs, for logging."""
    out = {}
    for lang, name in ((SOURCE, "source"), (TARGET, "target")):
      pos = self.position(self._step, lang)
      out[f"{name}_rows"] = pos
      out[f"{name}_epoch"] = pos / self.streams[lang].num_rows
    return out

  def _fingerprint(self) -> dict[str, Any]:
    return {
      "version": STATE_VERSION,
      "seed": self.seed,
      "per_host_batch": self.per_host_batch,
      "num_processes": self.num_processes,
      "max_seq_len": self.max_seq_len,
      "balance_block": self.balance_block,
      "total_rows": [s.total_rows for s in self.streams],
    }

  def state(self) -> dict[str, Any]:
    """A JSON-serialisable state: the next step plus a fingerprint.

    The same on every host, so one host may save it for all.
    """
    return {"step": self._step, **self._fingerprint()}

  def restore(self, state: Mapping[str, Any]) -> None:
    """Continues from a `state()`: the next batch is batch state["step"].

    Args:
      state: a dict from `state()` (possibly through JSON).

    Raises:
      BistilError: if the state is malformed or was saved by a pipeline that
        would order rows differently (other seed, batch size, host count,
        row length, balance block or corpora).
    """
    want = self._fingerprint()
    try:
      step = int(state["step"])
      got = {k: state[k] for k in want}
    except (KeyError, TypeError, ValueError) as e:
      raise BistilError(f"malformed data iterator state: {e!r}") from None
    got["total_rows"] = list(got["total_rows"])
    for key, value in want.items():
      if got[key] != value:
        raise BistilError(
          f"data iterator state has {key}={got[key]}, this run has {value}"
        )
    if step < 0:
      raise BistilError(f"data iterator state has step={step} < 0")
    self._step = step


class ShardedBatches:
  """One host's part of the global batch: the rows of the data shards it
  owns, concatenated in shard order.

  The corpus is split into S line shards (`LanguageStream.from_corpus` with
  process_index=shard, num_processes=S), each with its own
  `BilingualBatches` of B / S rows; host h of H owns shards
  [h S / H, (h + 1) S / H). Since the global batch is the hosts' parts in
  process order, it is the same for every H that divides S: a one-host and
  a many-host run with the same S train on identical batches.
  """

  def __init__(self, parts: Sequence[BilingualBatches]):
    if not parts:
      raise BistilError("a host must own at least one data shard")
    self.parts = list(parts)
    self.per_host_batch = sum(p.per_host_batch for p in parts)
    self.max_seq_len = parts[0].max_seq_len
    self.max_predictions = parts[0].max_predictions

  def __iter__(self) -> ShardedBatches:
    return self

  def __next__(self) -> Batch:
    return concat_batches([next(p) for p in self.parts])

  def state(self) -> dict[str, Any]:
    return {"shards": [p.state() for p in self.parts]}

  def restore(self, state: Mapping[str, Any]) -> None:
    shards = state.get("shards") if isinstance(state, Mapping) else None
    if not isinstance(shards, list) or len(shards) != len(self.parts):
      raise BistilError(
        f"data iterator state holds {len(shards or [])} shard(s), this host "
        f"reads {len(self.parts)}: the run used another data.shards"
      )
    for part, sub in zip(self.parts, shards, strict=True):
      part.restore(sub)


def concat_batches(parts: Sequence[Batch]) -> Batch:
  """Row-wise concatenation of batches; scalars (the language) from the
  first, which every part shares."""
  out = {}
  for key, value in parts[0].items():
    if np.ndim(value) == 0:
      out[key] = value
    else:
      out[key] = np.concatenate([p[key] for p in parts])
  return out


def owned_shards(num_shards: int, process_index: int, num_processes: int):
  """The data shards host `process_index` reads (see ShardedBatches)."""
  if num_shards < 1 or num_shards % num_processes:
    raise BistilError(
      f"data.shards={num_shards} must be a positive multiple of the "
      f"{num_processes} host(s)"
    )
  per = num_shards // num_processes
  return range(process_index * per, (process_index + 1) * per)


def mlm_batch(
  ids: np.ndarray,
  special: np.ndarray,
  rng: np.random.Generator,
  lang: int,
  *,
  vocab_size: int,
  mask_id: int,
  mlm_probability: float,
  max_predictions: int,
) -> Batch:
  """Masks packed rows into a batch dict (leaves: see `BilingualBatches`)."""
  masked, labels, _ = mlm.mask_tokens(
    ids, special, rng, vocab_size, mask_id, mlm_probability
  )
  positions, weights = mlm.masked_positions(labels, max_predictions)
  return {
    "input_ids": masked,  # [b, l]
    "attention_mask": np.ones_like(masked),  # [b, l]
    "token_type_ids": np.zeros_like(masked),  # [b, l]
    "labels": labels,  # [b, l]
    "special_tokens_mask": special.astype(np.int32),  # [b, l]
    "masked_lm_positions": positions,  # [b, P]
    "masked_lm_ids": mlm.gather_labels(labels, positions, weights),
    "masked_lm_weights": weights,  # [b, P]
    "lang": np.asarray(lang, np.int32),  # []
  }


def eval_batches(
  stream: LanguageStream,
  lang: int,
  per_host_batch: int,
  num_batches: int,
  seed: int,
  *,
  vocab_size: int,
  mask_id: int,
  mlm_probability: float = 0.15,
  max_predictions: int | None = None,
) -> list[Batch]:
  """A fixed list of masked batches from the start of a (dev) stream.

  The same rows and masks on every call, so evaluations are comparable
  across steps and runs; at most one pass over the stream.
  """
  stream.check_batch(per_host_batch)
  num_batches = max(1, min(num_batches, stream.num_rows // per_host_batch))
  if max_predictions is None:
    max_predictions = mlm.default_max_predictions(
      stream.max_seq_len, mlm_probability
    )
  out = []
  for k in range(num_batches):
    ids, special = stream.take(k * per_host_batch, per_host_batch, seed, lang)
    out.append(
      mlm_batch(
        ids,
        special,
        mlm.mask_rng(seed, k, stream.process_index, lang),
        lang,
        vocab_size=vocab_size,
        mask_id=mask_id,
        mlm_probability=mlm_probability,
        max_predictions=max_predictions,
      )
    )
  return out


# ------------------------------------------------------------------ prefetch
_END = object()
_JOIN_TIMEOUT_S = 10.0


class Prefetch:
  """Runs an iterator in a background thread, `size` items ahead.

  If the iterator has `state()`, `Prefetch.state()` returns its state as of
  the last item handed to the consumer (not as of the producer, which runs
  ahead), so checkpoints record the consumer's position. Restore the inner
  iterator before wrapping it, and do not touch it while wrapped.

  An exception in the iterator is re-raised by the consumer's `next()` (after
  the items produced before it). `close()` (or leaving a `with` block) stops
  the thread once its current `next()` returns; it never blocks on a full
  queue.
  """

  def __init__(self, iterator: Iterator[Any], size: int = 2):
    if size < 1:
      raise ValueError(f"prefetch size must be >= 1, got {size}")
    self._it = iterator
    self._has_state = callable(getattr(iterator, "state", None))
    self._state = iterator.state() if self._has_state else None
    self._queue: queue.Queue[tuple[Any, Any]] = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(
      target=self._produce, name="bistil-prefetch", daemon=True
    )
    self._thread.start()

  def _put(self, item: tuple[Any, Any]) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _produce(self) -> None:
    try:
      for item in self._it:
        state = self._it.state() if self._has_state else None
        if not self._put((item, state)):
          return
    except BaseException as e:  # noqa: BLE001 - handed to the consumer
      self._put((_END, e))
      return
    self._put((_END, None))

  def __iter__(self) -> Prefetch:
    return self

  def __next__(self) -> Any:
    if self._done:
      raise StopIteration
    item, extra = self._queue.get()
    if item is _END:
      self._done = True
      self._thread.join()
      if extra is not None:
        raise extra
      raise StopIteration
    self._state = extra
    return item

  def state(self) -> Any:
    """The inner iterator's state after the last item consumed."""
    if not self._has_state:
      raise TypeError("the prefetched iterator has no state()")
    return self._state

  def close(self) -> None:
    """Stops the producer thread and drops the items it prepared."""
    self._stop.set()
    self._done = True
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout=_JOIN_TIMEOUT_S)
    if self._thread.is_alive():
      log.warning("prefetch thread still busy after %.0f s", _JOIN_TIMEOUT_S)

  def __enter__(self) -> Prefetch:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


def prefetch(iterator: Iterator[Any], size: int = 2) -> Prefetch:
  """Keeps `size` items of `iterator` ready in a background thread.

  Args:
    iterator: any iterator, e.g. `BilingualBatches`.
    size: the number of items kept ready.

  Returns:
    A `Prefetch` iterator (with `state()` and `close()`).
  """
  return Prefetch(iterator, size)


# ------------------------------------------------------------------ devices
def to_global(
  batch: Mapping[str, np.ndarray],
  mesh: Mesh,
  sharding: NamedSharding | None = None,
) -> dict[str, jax.Array]:
  """A host-local batch -> global arrays, assembled from all hosts.

  Each host passes its own rows; the global batch dimension is the
  per-host batch times the number of hosts. Works single-process too.

  Args:
    batch: host-local NumPy leaves: [b, ...] arrays and scalars.
    mesh: the device mesh.
    sharding: the sharding of [b, ...] leaves; defaults to
      `partitioning.data_sharding(mesh, ndim=leaf.ndim)`. Scalars (e.g. the
      language tag, equal on all hosts) are replicated.

  Returns:
    A dict of global `jax.Array`s.

  Raises:
    BistilError: if the global batch does not split over the batch shards.
  """
  out = {}
  for key, value in batch.items():
    x = np.asarray(value)
    if x.ndim == 0:
      s = NamedSharding(mesh, PartitionSpec())
    else:
      s = sharding
      if s is None:
        s = partitioning.data_sharding(mesh, ndim=x.ndim)
      global_rows = x.shape[0] * jax.process_count()
      shards = _dim_shards(s, 0)
      if global_rows % shards:
        raise BistilError(
          f"global batch {global_rows} of {key!r} does not split into "
          f"{shards} batch shards of mesh {dict(mesh.shape)}"
        )
    out[key] = jax.make_array_from_process_local_data(s, x)
  return out


def _dim_shards(sharding: NamedSharding, dim: int) -> int:
  spec = tuple(sharding.spec) + (None,) * (dim + 1)
  axes = spec[dim]
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return int(np.prod([sharding.mesh.shape[a] for a in axes]))
