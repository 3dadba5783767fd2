"""Token-counting throughput: `vocab.count_tokens` vs a line-by-line loop.

Generates a synthetic multilingual corpus (fake languages with their own
syllable inventories and Zipfian lexicons), trains a WordPiece tokenizer on
part of it (or loads --tokenizer DIR/tokenizer.json), then counts the same
lines twice in the same run:

- reference: `tokenizer.encode(line)` per line in one thread, ids buffered
  and folded in with `np.bincount` every 10k lines;
- `count_tokens`: batched `encode_batch` on `--threads` threads.

Both must give identical counts. The two run alternately for --repeats
rounds (shared machines are noisy); the script prints median tokens/s of
each and their ratio.

  python benchmarks/count_tokens.py               # 1M lines
  python benchmarks/count_tokens.py --lines 200000
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

# Before tokenizers is imported: the Rust pool must be allowed to run.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import numpy as np  # noqa: E402
from tokenizers import (  # noqa: E402
  Tokenizer,
  models,
  normalizers,
  pre_tokenizers,
  trainers,
)

from bistil_jax.data import vocab  # noqa: E402

LANGS = (
  ("ptkbdg", "aiu"),
  ("mnlrsvz", "eoy"),
  ("бвгджзкл", "аоуыэ"),
  ("βγδζθκλμν", "αεηιο"),
  ("ptkhmnw", "aeiou"),
)


def make_corpus(n: int, seed: int = 0) -> list[str]:
  """n lines, round-robin over the fake languages."""
  lexicons = []
  for i, (cons, vows) in enumerate(LANGS):
    r = random.Random(f"lex-{i}")
    words = {
      "".join(r.choice(cons) + r.choice(vows) for _ in range(r.randint(1, 4)))
      for _ in range(5000)
    }
    words = sorted(words)
    r.shuffle(words)
    lexicons.append(
      (words, list(np.cumsum(1.0 / np.arange(1, len(words) + 1))))
    )
  rng = random.Random(seed)
  lines = []
  for j in range(n):
    words, cum = lexicons[j % len(lexicons)]
    k = rng.randint(5, 30)
    lines.append(" ".join(rng.choices(words, cum_weights=cum, k=k)) + ".")
  return lines


def reference_counts(tok: Tokenizer, lines: list[str]) -> np.ndarray:
  counts = np.zeros(tok.get_vocab_size(with_added_tokens=True), np.int64)
  buf: list[int] = []
  for i, line in enumerate(lines, start=1):
    buf.extend(tok.encode(line, add_special_tokens=False).ids)
    if i % 10_000 == 0:
      bc = np.bincount(np.asarray(buf, np.int64))
      counts[: bc.size] += bc
      buf.clear()
  if buf:
    bc = np.bincount(np.asarray(buf, np.int64))
    counts[: bc.size] += bc
  return counts


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--lines", type=int, default=1_000_000)
  p.add_argument("--tokenizer", help="dir with tokenizer.json (default: train)")
  p.add_argument("--vocab-size", type=int, default=30_000)
  p.add_argument("--threads", type=int, default=None)
  p.add_argument("--batch-size", type=int, default=1000)
  p.add_argument("--repeats", type=int, default=3, help="rounds (median)")
  args = p.parse_args(argv)

  t0 = time.perf_counter()
  lines = make_corpus(args.lines)
  print(f"corpus: {len(lines):,} lines in {time.perf_counter() - t0:.1f}s")
  if args.tokenizer:
    tok, _ = vocab.load_tokenizer_dir(args.tokenizer)
  else:
    t0 = time.perf_counter()
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
      lines[:100_000],
      trainers.WordPieceTrainer(
        vocab_size=args.vocab_size,
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        show_progress=False,
      ),
    )
    print(f"tokenizer: trained WordPiece in {time.perf_counter() - t0:.1f}s")
  print(
    f"tokenizer vocab {tok.get_vocab_size():,}, cpus {os.cpu_count()}, "
    f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM')}"
  )

  # Alternate the two methods so background load hits both alike.
  t_ref, t_new = [], []
  for r in range(args.repeats):
    t0 = time.perf_counter()
    ref = reference_counts(tok, lines)
    t_ref.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    got = vocab.count_tokens(
      tok, iter(lines), batch_size=args.batch_size, num_threads=args.threads
    )
    t_new.append(time.perf_counter() - t0)
    if not np.array_equal(ref, got):
      print("ERROR: counts differ", file=sys.stderr)
      return 1
    print(
      f"round {r + 1}: reference {t_ref[-1]:.2f}s, count_tokens "
      f"{t_new[-1]:.2f}s"
    )
  n = int(ref.sum())
  a, b = float(np.median(t_ref)), float(np.median(t_new))
  print(f"tokens: {n:,} (median of {args.repeats} rounds)")
  print(f"reference (encode per line): {a:7.2f}s {n / a:12,.0f} tok/s")
  print(f"count_tokens (batched):      {b:7.2f}s {n / b:12,.0f} tok/s")
  print(f"speed-up: {a / b:.2f}x")
  return 0


if __name__ == "__main__":
  sys.exit(main())
