"""Applying language SFTs to phase-1 teachers (docs/method.md 2.1, 4.6).

A language SFT is made on the full MMT (`bistil lang-sft`); phase 1's
teacher is usually a vocabulary-trimmed copy of it. An SFT of ours records
the fingerprint of its base's body (sft.params_fingerprint), checked
whenever it is applied to a model of the same vocabulary; for a trimmed
teacher, whose word-embedding table is a row subset of the base's, it also
records the fingerprint of the base without its embeddings and the base's
vocabulary size: the layers must match bit for bit, and the word-embedding
diffs are re-indexed through trim-vocab's vocab_map.json (rows the trimmed
vocabulary dropped are dropped). composable-sft files carry no fingerprint;
they are mapped by keep_ids as before (sft.load_sft).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from bistil_jax import paths, sparse
from bistil_jax.checkpoint import sft as sft_lib
from bistil_jax.errors import BistilError
from bistil_jax.model.config import ModelConfig

log = logging.getLogger(__name__)

ENCODER_FINGERPRINT = "base_encoder_fingerprint"
BASE_VOCAB = "base_vocab_size"


def base_identity(params: Any, vocab_size: int) -> dict[str, Any]:
  """The metadata that lets an SFT made on `params` be checked against a
  vocabulary-trimmed copy of them."""
  return {
    ENCODER_FINGERPRINT: sft_lib.params_fingerprint(
      params, exclude=("embeddings",)
    ),
    BASE_VOCAB: int(vocab_size),
  }


def _is_ours(path: str) -> bool:
  p = paths.path(path)
  if p.is_file():
    return p.name in (sft_lib.SFT_WEIGHTS, sft_lib.SFT_META)
  return (p / sft_lib.SFT_WEIGHTS).is_file()


def trim_sft_vocab(
  sft: sft_lib.SFT, keep_ids: np.ndarray, hidden: int
) -> sft_lib.SFT:
  """The SFT's word-embedding diffs re-indexed to the trimmed vocabulary
  (new id i = old id keep_ids[i]); rows outside it dropped. The other
  diffs are kept as they are; the dense tensors are dropped (a language
  SFT's head is not applied to a teacher)."""
  diffs = dict(sft.diffs)
  key = sparse.WORD_EMBEDDINGS
  if key in diffs:
    idx, val = (np.asarray(a) for a in diffs[key])
    rows, cols = np.divmod(idx, hidden)
    old_to_new = np.full(
      max(int(keep_ids.max()), int(rows.max(initial=0))) + 1, -1
    )
    old_to_new[keep_ids] = np.arange(keep_ids.size)
    new_rows = old_to_new[rows]
    keep = new_rows >= 0
    new_idx = new_rows[keep] * hidden + cols[keep]
    order = np.argsort(new_idx, kind="stable")
    diffs[key] = (new_idx[order].astype(np.int64), val[keep][order])
  meta = dict(sft.meta, vocab_size=int(keep_ids.size), base_fingerprint=None)
  return sft_lib.SFT(diffs=diffs, dense={}, meta=meta)


def apply_language_sft(
  params: dict[str, Any],
  path: str,
  cfg: ModelConfig,
  keep_ids: np.ndarray | None,
) -> dict[str, Any]:
  """params + the body diffs of the language SFT at `path` (its dense head
  tensors are not applied, docs/method.md 4.6).

  Args:
    params: the teacher's host params.
    path: our SFT dir, or a composable-sft file/dir.
    cfg: the teacher's config.
    keep_ids: the teacher's vocab map (old id of each new id) when it is a
      trimmed copy of the model the SFT was made for, else None.

  Raises:
    BistilError: the SFT was made for another base model.
  """
  if not _is_ours(path):
    sft = sft_lib.load_sft(path, config=cfg, keep_ids=keep_ids)
    return sft_lib.apply_sft(params, sft, with_dense=False)
  sft = sft_lib.load_sft(path)
  made_for = sft.meta.get("vocab_size")
  if keep_ids is None or made_for == cfg.vocab_size:
    return sft_lib.apply_sft(params, sft, with_dense=False)
  # The teacher is a trimmed copy of the SFT's base: check the layers.
  want = sft.meta.get(ENCODER_FINGERPRINT)
  if not want:
    raise BistilError(
      f"SFT {path} was made for a {made_for}-token model and records no "
      f"{ENCODER_FINGERPRINT}: it cannot be checked against this trimmed "
      f"{cfg.vocab_size}-token teacher"
    )
  base_vocab = int(sft.meta.get(BASE_VOCAB) or made_for)
  if int(keep_ids.max(initial=0)) >= base_vocab:
    raise BistilError(
      f"SFT {path} was made for a {base_vocab}-token model; the teacher's "
      f"vocab map names ids up to {int(keep_ids.max())}"
    )
  got = sft_lib.params_fingerprint(params, exclude=("embeddings",))
  if got != want:
    raise BistilError(
      f"SFT {path} was made for base model layers {want[:23]}, this "
      f"teacher's are {got[:23]}"
    )
  log.info(
    "SFT %s: word-embedding diffs mapped %d -> %d rows (vocab_map.json)",
    path,
    base_vocab,
    keep_ids.size,
  )
  trimmed = trim_sft_vocab(sft, keep_ids, cfg.hidden_size)
  return sft_lib.apply_sft(
    params, trimmed, check_fingerprint=False, with_dense=False
  )
