"""BERT masked-language-model masking on the host (NumPy), seeded by step.

docs/method.md 2.5: each non-special token is selected with probability
`mlm_probability` (0.15); of the selected tokens 80% become the mask token,
10% a uniformly random id in [0, vocab_size) and 10% stay unchanged. Labels
hold the original id at selected positions and -100 elsewhere, as in Hugging
Face's `DataCollatorForLanguageModeling`.

Randomness is a pure function of (base seed, step, process index, language)
through `numpy.random.SeedSequence`, so a resumed run masks batch k exactly as
an uninterrupted run does, and different hosts mask differently.
"""

from __future__ import annotations

import numpy as np

from bistil_jax.errors import BistilError

IGNORE_LABEL = -100

# Domain tags keep the seed streams of different consumers apart: the same
# (seed, step) never feeds two of them the same bits.
TAG_MASK = 0x6D61736B  # "mask"

RngLike = np.random.Generator | np.random.SeedSequence | int


def mask_rng(
  seed: int, step: int, process_index: int = 0, lang: int = 0
) -> np.random.Generator:
  """The generator that masks batch `step` of one host.

  Args:
    seed: the run's base seed (a non-negative int).
    step: the batch index (0-based).
    process_index: the host (JAX process) index.
    lang: the batch's language (0 source, 1 target).

  Returns:
    A fresh generator; equal arguments give bit-identical streams.
  """
  ss = np.random.SeedSequence([seed, TAG_MASK, step, process_index, lang])
  return np.random.default_rng(ss)


def _as_rng(rng_or_seed: RngLike) -> np.random.Generator:
  if isinstance(rng_or_seed, np.random.Generator):
    return rng_or_seed
  return np.random.default_rng(rng_or_seed)


def mask_tokens(
  ids: np.ndarray,
  special_mask: np.ndarray,
  rng_or_seed: RngLike,
  vocab_size: int,
  mask_id: int,
  mlm_probability: float = 0.15,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """BERT 80/10/10 masking of a batch of token ids.

  The random draws have the shape of `ids` whatever its content, so the
  result depends only on the inputs and the generator state. As in Hugging
  Face, a random replacement may be any id in [0, vocab_size), specials
  included. Pass the tokenizer's vocabulary size, not a padded embedding
  size, or padding rows of the embedding could appear in the input.

  Args:
    ids: token ids, any shape, e.g. [b, l].
    special_mask: same shape; nonzero marks special tokens (never selected).
    rng_or_seed: a numpy Generator (advanced in place), a SeedSequence or an
      int seed; see `mask_rng` for the per-step generator.
    vocab_size: the number of token ids; random replacements are drawn from
      [0, vocab_size).
    mask_id: the id of the mask token.
    mlm_probability: the selection probability of a non-special token.

  Returns:
    (masked_ids int32, labels int32 with -100 at unselected positions,
    selected bool), each of the shape of `ids`.

  Raises:
    BistilError: for a probability outside [0, 1], a non-positive vocabulary
      size, a mask id outside the vocabulary or mismatched shapes.
  """
  ids = np.asarray(ids)
  special = np.asarray(special_mask).astype(bool)
  if ids.shape != special.shape:
    raise BistilError(
      f"ids {ids.shape} and special-token mask {special.shape} differ in shape"
    )
  if not 0.0 <= mlm_probability <= 1.0:
    raise BistilError(
      f"mlm_probability must be in [0, 1], got {mlm_probability}"
    )
  if vocab_size < 1:
    raise BistilError(f"vocab_size must be positive, got {vocab_size}")
  if not 0 <= mask_id < vocab_size:
    raise BistilError(f"mask id {mask_id} is outside [0, {vocab_size})")
  rng = _as_rng(rng_or_seed)
  # Four full-shape draws in a fixed order: selection, 80% split, 50/50
  # split of the rest, the random ids.
  selected = (rng.random(ids.shape) < mlm_probability) & ~special
  to_mask = selected & (rng.random(ids.shape) < 0.8)
  to_random = selected & ~to_mask & (rng.random(ids.shape) < 0.5)
  random_ids = rng.integers(0, vocab_size, size=ids.shape, dtype=np.int32)
  masked = ids.astype(np.int32, copy=True)
  masked[to_mask] = mask_id
  masked[to_random] = random_ids[to_random]
  labels = np.where(selected, ids, IGNORE_LABEL).astype(np.int32)
  return masked, labels, selected


def default_max_predictions(max_seq_len: int, mlm_probability: float) -> int:
  """Room for the masked positions of almost every row.

  The number of selected tokens of a row is at most Binomial(l, p); mean
  plus four standard deviations (rounded up, at least 1, at most l) leaves
  about one row in 30,000 with positions beyond the budget.

  Args:
    max_seq_len: the row length l.
    mlm_probability: the selection probability p.

  Returns:
    The number of prediction slots per row.
  """
  mean = max_seq_len * mlm_probability
  std = np.sqrt(max_seq_len * mlm_probability * (1.0 - mlm_probability))
  return int(min(max_seq_len, max(1, np.ceil(mean + 4.0 * std))))


def masked_positions(
  labels: np.ndarray, max_predictions: int
) -> tuple[np.ndarray, np.ndarray]:
  """Fixed-size gather indices of the masked positions of each row.

  Lets the teacher's MLM head run on [b, P] gathered states instead of the
  full [b, l] sequence. Rows with fewer than P masked positions are padded
  with position 0 and weight 0. If a row has more than P masked positions,
  only its first P (leftmost) are kept: the others stay masked in the input
  but fall out of the loss.

  Args:
    labels: [b, l] labels, -100 at unmasked positions.
    max_predictions: P, the number of slots per row.

  Returns:
    (positions [b, P] int32, weights [b, P] float32, 1.0 at real slots).

  Raises:
    BistilError: if labels are not 2-D or P < 1.
  """
  labels = np.asarray(labels)
  if labels.ndim != 2:
    raise BistilError(f"labels must be [batch, length], got {labels.shape}")
  if max_predictions < 1:
    raise BistilError(f"max_predictions must be >= 1, got {max_predictions}")
  b, l = labels.shape
  selected = labels != IGNORE_LABEL  # [b, l]
  # A stable sort of "not selected" lists the selected columns first, in
  # order; the slots past each row's count are padding.
  order = np.argsort(~selected, axis=1, kind="stable")  # [b, l]
  p = min(max_predictions, l)
  positions = np.zeros((b, max_predictions), np.int32)  # [b, P]
  positions[:, :p] = order[:, :p]
  counts = selected.sum(axis=1, keepdims=True)  # [b, 1]
  weights = np.arange(max_predictions)[None, :] < counts  # [b, P]
  positions[~weights] = 0
  return positions, weights.astype(np.float32)


def gather_labels(
  labels: np.ndarray, positions: np.ndarray, weights: np.ndarray
) -> np.ndarray:
  """The labels at gathered positions, 0 in padding slots.

  Args:
    labels: [b, l] labels, -100 at unmasked positions.
    positions: [b, P] from `masked_positions`.
    weights: [b, P] from `masked_positions`.

  Returns:
    [b, P] int32 target ids.
  """
  out = np.take_along_axis(np.asarray(labels), positions, axis=1)  # [b, P]
  return np.where(np.asarray(weights) > 0, out, 0).astype(np.int32)
