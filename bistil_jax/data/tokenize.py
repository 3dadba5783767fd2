"""Tokenizer helpers shared by counting (vocab.py) and packing (pipeline.py)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer


def without_truncation(tokenizer: Tokenizer) -> Tokenizer:
  """The tokenizer, copied without truncation or padding if it has them.

  A tokenizer.json saved by transformers often enables truncation to the
  model length, which would silently cut long lines when counting or
  packing. The caller's tokenizer is never modified.
  """
  if tokenizer.truncation is None and tokenizer.padding is None:
    return tokenizer
  tokenizer = Tokenizer.from_str(tokenizer.to_str())
  tokenizer.no_truncation()
  tokenizer.no_padding()
  return tokenizer


def batched(lines: Iterable[str], size: int) -> Iterator[list[str]]:
  """Consecutive lists of up to `size` lines."""
  it = iter(lines)
  while batch := list(itertools.islice(it, size)):
    yield batch
