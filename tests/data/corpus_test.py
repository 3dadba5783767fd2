"""Corpus files: up-front checks, exact line numbers, bounded memory."""

import gzip
import tracemalloc

import pytest

from bistil_jax.data import corpus
from bistil_jax.errors import BistilError


def write(path, data: bytes):
  path.write_bytes(data)
  return str(path)


def test_empty_and_blank_files_fail_the_check(tmp_path):
  for name, data in [("e.txt", b""), ("b.txt", b"\n  \n\t\n")]:
    p = write(tmp_path / name, data)
    with pytest.raises(BistilError, match="is empty"):
      corpus.check_corpus(p)


def test_check_names_the_first_bad_line(tmp_path):
  good = b"".join(b"line %d\n" % i for i in range(1, 2001))
  p = write(tmp_path / "bad.txt", good + b"caf\xe9\n" + b"x\n")
  with pytest.raises(BistilError, match=f"{p}:2001: not valid UTF-8"):
    corpus.check_corpus(p)


def test_reading_names_the_exact_bad_line_past_the_probe(tmp_path):
  n = corpus.PROBE_BYTES // 8 + 50  # the bad line lies past the probe
  good = b"".join(b"l %5d\n" % i for i in range(1, n + 1))
  p = write(tmp_path / "late.txt", good + b"\xff\xfe\n")
  corpus.check_corpus(p)  # the probe sees only good lines
  with pytest.raises(BistilError, match=f"{p}:{n + 1}: not valid UTF-8"):
    list(corpus.iter_lines(p))


def test_gzip_and_crlf(tmp_path):
  p = tmp_path / "c.txt.gz"
  p.write_bytes(gzip.compress(b"a b\r\n\r\nc\r\n"))
  corpus.check_corpus(str(p))
  assert list(corpus.iter_lines(str(p))) == ["a b", "c"]


def test_check_corpora_checks_all_before_reading(tmp_path):
  src = write(tmp_path / "src.txt", b"word\n" * 10)
  tgt = write(tmp_path / "tgt.txt", b"")
  with pytest.raises(BistilError, match="tgt.txt is empty"):
    corpus.check_corpora([src, "", tgt])


def test_a_long_line_streams_in_bounded_pieces(tmp_path):
  words = b"abcdefg " * (10 * (1 << 20) // 8)  # a 10 MB line
  p = write(tmp_path / "long.txt", b"first\n" + words + b"\nlast\n")
  tracemalloc.start()
  try:
    docs, n_words = [], 0
    for doc in corpus.iter_lines(p):
      assert len(doc) <= corpus.MAX_LINE_BYTES
      n_words += doc.count("abcdefg")
      docs.append(doc if doc in ("first", "last") else None)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert docs[0] == "first" and docs[-1] == "last"
  # Every word of the long line arrives whole (pieces split at spaces).
  assert n_words == len(words.split())
  assert len(docs) > 3
  assert peak < 6 * corpus.MAX_LINE_BYTES, peak  # not ~10 MB or more
