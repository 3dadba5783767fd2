"""Phase-1 pipeline: packing, host shards, bilingual batches, resume, devices."""

import itertools
import json
import os
import random
import tempfile
import threading

import jax
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

from bistil_jax import partitioning
from bistil_jax.data import mlm, pipeline
from bistil_jax.errors import BistilError

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
L = 32  # row length
B = 4  # per-host batch


def make_lines(cons: str, vows: str, n: int, seed: int) -> list[str]:
  """n sentences over a 200-word lexicon of a fake syllable inventory."""
  lex_rng = random.Random(f"lex-{cons}")
  lexicon = sorted(
    {
      "".join(
        lex_rng.choice(cons) + lex_rng.choice(vows)
        for _ in range(lex_rng.randint(1, 3))
      )
      for _ in range(200)
    }
  )
  rng = random.Random(f"{cons}-{seed}")
  return [
    " ".join(rng.choices(lexicon, k=rng.randint(3, 12))) + "." for _ in range(n)
  ]


SOURCE_LINES = make_lines("ptkbdg", "aiu", 400, 0)
TARGET_LINES = make_lines("mnlrsvz", "eoy", 120, 1)


def make_tokenizer() -> Tokenizer:
  tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.train_from_iterator(
    SOURCE_LINES + TARGET_LINES,
    trainers.WordPieceTrainer(vocab_size=300, special_tokens=SPECIALS),
  )
  cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
  tok.post_processor = processors.TemplateProcessing(
    single="[CLS] $A [SEP]",
    special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
  )
  return tok


TOK = make_tokenizer()
VOCAB, MASK_ID = pipeline.mlm_token_ids(TOK)


def stream(lines, host=0, hosts=1, batch_lines=1000):
  return pipeline.LanguageStream.from_lines(
    TOK,
    lines,
    L,
    process_index=host,
    num_processes=hosts,
    batch_lines=batch_lines,
  )


def batches(host=0, hosts=1, seed=42, per_host_batch=B, **kwargs):
  kwargs.setdefault("vocab_size", VOCAB)
  kwargs.setdefault("mask_id", MASK_ID)
  return pipeline.BilingualBatches(
    stream(SOURCE_LINES, host, hosts),
    stream(TARGET_LINES, host, hosts),
    per_host_batch,
    seed,
    **kwargs,
  )


def original_rows(batch):
  """The unmasked rows of a batch."""
  return np.where(
    batch["labels"] != mlm.IGNORE_LABEL, batch["labels"], batch["input_ids"]
  )


def row_set(ids):
  return {r.tobytes() for r in np.asarray(ids, np.int32)}


def assert_batches_equal(test, a, b):
  test.assertEqual(sorted(a), sorted(b))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    test.assertEqual(a[key].dtype, b[key].dtype, key)


class PackingTest(parameterized.TestCase):
  def test_rows_are_a_prefix_of_the_token_stream(self):
    lines = SOURCE_LINES[:200]
    rows = list(pipeline.encode_and_pack(TOK, lines, L, batch_lines=7))
    encs = TOK.encode_batch(lines, add_special_tokens=True)
    flat = np.concatenate([e.ids for e in encs])
    flat_special = np.concatenate([e.special_tokens_mask for e in encs])
    self.assertLen(rows, len(flat) // L)
    for ids, special in rows:
      self.assertEqual(ids.shape, (L,))
      self.assertEqual(special.shape, (L,))
      self.assertEqual(ids.dtype, np.int32)
      self.assertEqual(special.dtype, bool)
    cat = np.concatenate([ids for ids, _ in rows])
    cat_special = np.concatenate([s for _, s in rows])
    np.testing.assert_array_equal(cat, flat[: len(cat)])
    np.testing.assert_array_equal(cat_special, flat_special[: len(cat)])
    # Specials are exactly the [CLS]/[SEP] the template added, one pair a line.
    cls, sep = TOK.token_to_id("[CLS]"), TOK.token_to_id("[SEP]")
    np.testing.assert_array_equal(cat_special, np.isin(cat, [cls, sep]))
    self.assertGreater(cat_special.sum(), len(rows))

  @parameterized.parameters(1, 3, 1000)
  def test_independent_of_encode_batch_size(self, batch_lines):
    want = np.stack(
      [r for r, _ in pipeline.encode_and_pack(TOK, TARGET_LINES, L)]
    )
    got = np.stack(
      [
        r
        for r, _ in pipeline.encode_and_pack(
          TOK, TARGET_LINES, L, batch_lines=batch_lines
        )
      ]
    )
    np.testing.assert_array_equal(got, want)

  def test_tokenizer_truncation_and_padding_ignored(self):
    tok = Tokenizer.from_str(TOK.to_str())
    tok.enable_truncation(5)
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=64)
    want = [r for r, _ in pipeline.encode_and_pack(TOK, TARGET_LINES, L)]
    got = [r for r, _ in pipeline.encode_and_pack(tok, TARGET_LINES, L)]
    np.testing.assert_array_equal(np.stack(got), np.stack(want))
    # The caller's tokenizer is left as it was.
    self.assertEqual(tok.truncation["max_length"], 5)
    self.assertIsNotNone(tok.padding)

  def test_bad_length(self):
    with self.assertRaisesRegex(BistilError, "max_seq_len"):
      list(pipeline.encode_and_pack(TOK, TARGET_LINES, 0))

  def test_from_corpus_file(self):
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, "tgt.txt")
      with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join(TARGET_LINES) + "\n")  # blank lines skipped
      s = pipeline.LanguageStream.from_corpus(
        TOK, path, L, process_index=0, num_processes=1
      )
      self.assertEqual(s.name, path)
      np.testing.assert_array_equal(s.ids, stream(TARGET_LINES).ids)
      short = pipeline.LanguageStream.from_corpus(
        TOK, path, L, max_lines=10, process_index=0, num_processes=1
      )
      self.assertLess(short.total_rows, s.total_rows)

  def test_mlm_token_ids(self):
    self.assertEqual(VOCAB, TOK.get_vocab_size(with_added_tokens=True))
    self.assertEqual(MASK_ID, TOK.token_to_id("[MASK]"))
    tok = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    with self.assertRaisesRegex(BistilError, "no mask token"):
      pipeline.mlm_token_ids(tok)


class ShardingTest(parameterized.TestCase):
  @parameterized.parameters(2, 3)
  def test_hosts_get_disjoint_round_robin_rows(self, hosts):
    whole = stream(SOURCE_LINES)
    # Many small chunks: row indices continue across chunks.
    shards = [stream(SOURCE_LINES, h, hosts, 7) for h in range(hosts)]
    n = whole.num_rows // hosts
    for h, s in enumerate(shards):
      self.assertEqual(s.num_rows, n)
      self.assertEqual(s.total_rows, whole.num_rows)
      np.testing.assert_array_equal(s.ids, whole.ids[h::hosts][:n])
      np.testing.assert_array_equal(
        s.special_mask, whole.special_mask[h::hosts][:n]
      )
    for a, b in itertools.combinations(shards, 2):
      self.assertEmpty(row_set(a.ids) & row_set(b.ids))

  def test_two_hosts_batches(self):
    it0, it1 = batches(0, 2), batches(1, 2)
    s0 = row_set(it0.streams[0].ids) | row_set(it0.streams[1].ids)
    s1 = row_set(it1.streams[0].ids) | row_set(it1.streams[1].ids)
    seen0, seen1 = set(), set()
    for _ in range(40):
      b0, b1 = next(it0), next(it1)
      # The same language on both hosts: the global batch is monolingual.
      self.assertEqual(int(b0["lang"]), int(b1["lang"]))
      r0, r1 = row_set(original_rows(b0)), row_set(original_rows(b1))
      self.assertLessEqual(r0, s0)
      self.assertLessEqual(r1, s1)
      seen0 |= r0
      seen1 |= r1
      # Hosts mask independently.
      self.assertFalse(
        np.array_equal(b0["labels"] != -100, b1["labels"] != -100)
      )
    self.assertEmpty(seen0 & seen1)
    # The state does not depend on the host.
    self.assertEqual(it0.state(), it1.state())

  @parameterized.parameters(
    dict(lines=5, hosts=1, per_host_batch=B),
    dict(lines=1, hosts=1, per_host_batch=1),  # not even one row
    dict(lines=20, hosts=2, per_host_batch=8),
  )
  def test_corpus_shorter_than_one_batch(self, lines, hosts, per_host_batch):
    for host in range(hosts):
      with self.assertRaisesRegex(BistilError, "shorter than one batch"):
        pipeline.BilingualBatches(
          stream(SOURCE_LINES, host, hosts),
          stream(TARGET_LINES[:lines], host, hosts),
          per_host_batch,
          0,
          vocab_size=VOCAB,
          mask_id=MASK_ID,
        )


class BilingualBatchesTest(parameterized.TestCase):
  def test_batch_layout(self):
    it = batches()
    b = next(it)
    p = mlm.default_max_predictions(L, 0.15)
    self.assertEqual(it.max_predictions, p)
    for key in (
      "input_ids",
      "attention_mask",
      "token_type_ids",
      "labels",
      "special_tokens_mask",
    ):
      self.assertEqual(b[key].shape, (B, L), key)
      self.assertEqual(b[key].dtype, np.int32, key)
    self.assertEqual(b["masked_lm_positions"].shape, (B, p))
    self.assertEqual(b["masked_lm_positions"].dtype, np.int32)
    self.assertEqual(b["masked_lm_ids"].shape, (B, p))
    self.assertEqual(b["masked_lm_weights"].dtype, np.float32)
    self.assertEqual(b["lang"].shape, ())
    self.assertEqual(b["lang"].dtype, np.int32)
    self.assertTrue((b["attention_mask"] == 1).all())
    self.assertTrue((b["token_type_ids"] == 0).all())
    # Specials are never masked.
    special = b["special_tokens_mask"] == 1
    self.assertTrue((b["labels"][special] == -100).all())
    self.assertTrue(special.any())
    w = b["masked_lm_weights"] > 0
    np.testing.assert_array_equal(w.sum(1), (b["labels"] != -100).sum(1))
    np.testing.assert_array_equal(
      b["masked_lm_ids"][w], b["labels"][b["labels"] != -100]
    )

  def test_every_batch_monolingual(self):
    it = batches()
    src = row_set(it.streams[0].ids)
    tgt = row_set(it.streams[1].ids)
    self.assertEmpty(src & tgt)
    langs = []
    for _ in range(128):  # two balanced blocks of 64
      b = next(it)
      rows = row_set(original_rows(b))
      langs.append(int(b["lang"]))
      self.assertLessEqual(rows, (src, tgt)[langs[-1]])
    self.assertEqual(sum(langs), 64)

  def test_interleaving_balanced_and_random(self):
    langs = np.array([pipeline.language_of_step(3, k) for k in range(4096)])
    self.assertEqual(langs.sum(), 2048)
    for block in langs.reshape(-1, 64):
      self.assertEqual(block.sum(), 32)
    runs = [len(list(g)) for _, g in itertools.groupby(langs)]
    self.assertGreater(max(runs), 3)  # not a fixed alternation
    self.assertGreater(len(runs), 1500)  # nor long single-language stretches
    other = [pipeline.language_of_step(4, k) for k in range(4096)]
    self.assertFalse(np.array_equal(langs, other))
    # An odd horizon is still within one step of 50/50.
    it = batches(balance_block=8)
    frac = np.mean([it.language(k) for k in range(1001)])
    self.assertAlmostEqual(frac, 0.5, delta=0.001)

  def test_epochs_cover_every_row_once_then_repeat(self):
    it = batches()
    tgt = it.streams[1]
    n = tgt.num_rows
    for epoch in range(3):
      ids, _ = tgt.take(epoch * n, n, it.seed, 1)
      np.testing.assert_array_equal(
        np.sort(ids.view(f"V{4 * L}").ravel()),
        np.sort(tgt.ids.view(f"V{4 * L}").ravel()),
      )
    first, _ = tgt.take(0, n, it.seed, 1)
    second, _ = tgt.take(n, n, it.seed, 1)
    self.assertFalse(np.array_equal(first, second))  # reshuffled
    # Batches walk the stream: target batches of one epoch never repeat rows.
    rows = []
    while len(rows) < (n // B) * B:
      b = next(it)
      if int(b["lang"]) == 1:
        rows.extend(row_set(original_rows(b)))
    self.assertLen(set(rows), len(rows))
    # The small target corpus wraps into further epochs.
    for _ in range(3 * n // B):
      next(it)
    self.assertGreater(it.progress()["target_epoch"], 1.0)
    self.assertLess(
      it.progress()["source_epoch"], it.progress()["target_epoch"]
    )

  def test_resume_is_bit_identical(self):
    ref = batches()
    for _ in range(7):
      next(ref)
    state = json.loads(json.dumps(ref.state()))
    self.assertEqual(state["step"], 7)
    want = [next(ref) for _ in range(5)]
    fresh = batches()
    fresh.restore(state)
    got = [next(fresh) for _ in range(5)]
    for a, b in zip(want, got, strict=True):
      assert_batches_equal(self, a, b)
    self.assertEqual(fresh.state(), ref.state())
    # Random access gives the same batches too.
    assert_batches_equal(self, batches().batch(9), want[2])

  def test_seed_changes_batches(self):
    a, b = next(batches(seed=1)), next(batches(seed=2))
    self.assertFalse(np.array_equal(a["input_ids"], b["input_ids"]))

  @parameterized.parameters(
    dict(change=dict(seed=43), needle="seed=42"),
    dict(change=dict(per_host_batch=2), needle="per_host_batch"),
    dict(change=dict(balance_block=16), needle="balance_block"),
  )
  def test_restore_refuses_other_pipelines(self, change, needle):
    state = batches().state()
    with self.assertRaisesRegex(BistilError, needle):
      batches(**change).restore(state)

  def test_restore_refuses_other_corpus_and_garbage(self):
    state = batches().state()
    other = pipeline.BilingualBatches(
      stream(SOURCE_LINES[:300]),
      stream(TARGET_LINES),
      B,
      42,
      vocab_size=VOCAB,
      mask_id=MASK_ID,
    )
    with self.assertRaisesRegex(BistilError, "total_rows"):
      other.restore(state)
    with self.assertRaisesRegex(BistilError, "malformed"):
      batches().restore({"step": 3})

  def test_bad_arguments(self):
    with self.assertRaisesRegex(BistilError, "balance_block"):
      batches(balance_block=7)
    with self.assertRaisesRegex(BistilError, "mask id"):
      batches(mask_id=VOCAB)
    long_rows = pipeline.LanguageStream.from_lines(
      TOK, TARGET_LINES, 2 * L, process_index=0, num_processes=1
    )
    with self.assertRaisesRegex(BistilError, "differ in length"):
      pipeline.BilingualBatches(
        stream(SOURCE_LINES), long_rows, B, 0, vocab_size=VOCAB, mask_id=4
      )


class PrefetchTest(absltest.TestCase):
  def test_same_batches_and_consumer_state(self):
    want = [next(it) for it in [batches()] for _ in range(6)]
    with pipeline.prefetch(batches(), size=2) as p:
      self.assertEqual(p.state()["step"], 0)
      for k in range(4):
        assert_batches_equal(self, next(p), want[k])
      # The producer ran ahead; the state is the consumer's.
      self.assertEqual(p.state()["step"], 4)
      state = p.state()
    resumed = batches()
    resumed.restore(state)
    with pipeline.prefetch(resumed) as p:
      assert_batches_equal(self, next(p), want[4])
      assert_batches_equal(self, next(p), want[5])

  def test_exception_propagates_after_earlier_items(self):
    def gen():
      yield 1
      yield 2
      raise ValueError("boom")

    p = pipeline.prefetch(gen(), size=1)
    self.assertEqual(next(p), 1)
    self.assertEqual(next(p), 2)
    with self.assertRaisesRegex(ValueError, "boom"):
      next(p)
    with self.assertRaises(StopIteration):
      next(p)

  def test_finite_iterator_ends(self):
    self.assertEqual(list(pipeline.prefetch(iter(range(5)), 3)), list(range(5)))

  def test_close_stops_a_blocked_producer(self):
    before = threading.active_count()
    p = pipeline.prefetch(itertools.count(), size=2)
    self.assertEqual(next(p), 0)
    p.close()
    self.assertFalse(p._thread.is_alive())
    self.assertEqual(threading.active_count(), before)
    with self.assertRaises(StopIteration):
      next(p)


class ToGlobalTest(absltest.TestCase):
  def test_two_by_two_by_two_mesh(self):
    mesh = partitioning.make_mesh((2, 2, 2))
    batch = next(batches(per_host_batch=8))
    g = pipeline.to_global(batch, mesh)
    self.assertEqual(sorted(g), sorted(batch))
    want = partitioning.data_sharding(mesh)
    for key, value in batch.items():
      arr = g[key]
      self.assertIsInstance(arr, jax.Array)
      self.assertEqual(arr.shape, value.shape, key)  # one process: global
      np.testing.assert_array_equal(np.asarray(arr), value, err_msg=key)
      if value.ndim == 2:
        self.assertTrue(arr.sharding.is_equivalent_to(want, 2), key)
        # 4 batch shards of 2 rows, each on the 2 tensor-axis devices.
        self.assertEqual(
          {s.data.shape for s in arr.addressable_shards}, {(2, value.shape[1])}
        )
      else:
        self.assertTrue(arr.sharding.is_fully_replicated, key)
    self.assertEqual(g["input_ids"].sharding.spec[0], ("data", "fsdp"))

  def test_indivisible_batch(self):
    mesh = partitioning.make_mesh((2, 2, 2))
    batch = next(batches(per_host_batch=6))
    with self.assertRaisesRegex(BistilError, "does not split into 4"):
      pipeline.to_global(batch, mesh)


if __name__ == "__main__":
  absltest.main()
