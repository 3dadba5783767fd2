"""Distillation and task losses: pure, jit-friendly, float32 reductions.

Every loss returns a `LossTerm(total, count)`: the float32 sum of the
per-element losses it averages and the number of elements summed. The scalar
to optimise is `term.mean` (0 when nothing is selected, never NaN); a training
step reports `total` and `count` so that host-side averaging over steps and
devices is exact (`sum(totals) / sum(counts)`).

What each loss implements (docs/method.md):
- `soft_cross_entropy`, `kl_divergence`: logit distillation, section 2.4
  ("Logit loss") and 4.3: -sum_c softmax(z_T/tau)_c log_softmax(z_S/tau)_c,
  averaged over selected rows, tau = 2, no tau^2 factor by default.
- `hidden_mse`, `hidden_mse_layers`: hidden-state MSE of section 2.4, with
  the fixed teacher projection of section 2.3.
- `attention_mse`, `attention_mse_layers`: attention-probability MSE of
  section 2.4, with an explicit key-padding mask instead of the released
  "teacher probability == 0" test (section 7, point 8).
- `token_cross_entropy`: gold-label cross-entropy for task heads and the
  student MLM term (docs/method.md "Project decisions"; alpha_task of 2.4).
- `layer_maps`: the layer alignment of section 2.4.

Conventions:
- All arithmetic after the inputs is float32, whatever the input dtype
  (bfloat16 activations are upcast before softmax, squares and sums).
- Masks are explicit booleans (True = keep). A mask over the leading
  dimensions of a tensor is broadcast over its trailing dimensions (a
  [b, l] token mask covers [b, l, d] hidden states).
- Masked-out entries are replaced with `jnp.where` in the inputs, before
  any arithmetic, and never multiplied by 0: garbage (even inf or NaN) in
  padding cannot reach the loss or its gradient (a `where` after a square
  still lets 0 * NaN into the backward pass), and their gradient is
  exactly 0.
- Teacher inputs are used as given: these functions do not call
  `stop_gradient`; the training step keeps the teacher frozen (STYLE.md 7).
- Counts are float32: exact up to 2**24 elements per call, and past that
  rounded at the same relative precision (~6e-8) as the float32 totals.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bistil_jax.errors import BistilError

# (student index, teacher index) pairs; Python ints, so they stay static
# under jit.
LayerPairs = tuple[tuple[int, int], ...]


class LossTerm(NamedTuple):
  """A loss as a float32 sum plus its denominator.

  Attributes:
    total: float32 scalar, sum of the per-element losses.
    count: float32 scalar, number of elements in `total`.

  NOTE: a NamedTuple is a tuple, so `a + b` concatenates; add the fields.
  """

  total: jax.Array
  count: jax.Array

  @property
  def mean(self) -> jax.Array:
    """total / count, and 0 (not NaN) when count is 0."""
    return self.total / jnp.maximum(self.count, 1.0)


def _expand_mask(mask: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Broadcasts a mask over the leading dims of `shape` to all of `shape`."""
  mask = jnp.asarray(mask, dtype=bool)
  if mask.ndim > len(shape):
    raise BistilError(
      f"mask of shape {mask.shape} has more dims than values {shape}"
    )
  mask = mask.reshape(mask.shape + (1,) * (len(shape) - mask.ndim))
  try:
    return jnp.broadcast_to(mask, shape)
  except ValueError as e:
    raise BistilError(
      f"mask of shape {mask.shape} does not fit values of shape {shape}"
    ) from e


def masked_sum(values: jax.Array, mask: jax.Array | None = None) -> LossTerm:
  """Float32 sum and count of the selected entries of `values`.

  Args:
    values: any shape [...]; cast to float32.
    mask: bool, None (every entry), or a mask over the leading dims of
      `values` (shape values.shape[:k], or broadcastable to it), expanded
      over the remaining trailing dims.

  Returns:
    LossTerm(sum of selected entries, number of selected entries).
  """
  values = jnp.asarray(values, jnp.float32)
  if mask is None:
    return LossTerm(jnp.sum(values), jnp.asarray(values.size, jnp.float32))
  mask = _expand_mask(mask, values.shape)
  total = jnp.sum(jnp.where(mask, values, 0.0))
  return LossTerm(total, jnp.sum(mask, dtype=jnp.float32))


def masked_mean(values: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Float32 mean of the selected entries (0 if none); see `masked_sum`."""
  return masked_sum(values, mask).mean


# ----------------------------------------------------------------------------
# Layer alignment (docs/method.md 2.4).
# ----------------------------------------------------------------------------


def layer_maps(
  num_teacher_layers: int, num_student_layers: int
) -> tuple[LayerPairs, LayerPairs]:
  """Student/teacher layer alignment of docs/method.md 2.4.

  With r = L_T / L_S:
  - hidden states (L+1 per model, index 0 = embedding output): student
    index i (0..L_S) <- teacher index i*r;
  - attentions (L per model): student layer i (0..L_S-1) <- teacher layer
    (i+1)*r - 1, the last teacher layer of each block of r.

  Args:
    num_teacher_layers: L_T, number of teacher transformer layers.
    num_student_layers: L_S, number of student transformer layers.

  Returns:
    (hidden_pairs, attention_pairs), each a tuple of (student, teacher)
    index pairs.

  Raises:
    BistilError: if a count is not positive or L_S does not divide L_T.
  """
  lt, ls = int(num_teacher_layers), int(num_student_layers)
  if lt <= 0 or ls <= 0:
    raise BistilError(
      f"layer counts must be positive, got teacher={lt} student={ls}"
    )
  if lt % ls:
    raise BistilError(
      f"student layers ({ls}) must divide teacher layers ({lt})"
    )
  r = lt // ls
  hidden = tuple((i, i * r) for i in range(ls + 1))
  attention = tuple((i, (i + 1) * r - 1) for i in range(ls))
  return hidden, attention


def _check_pairs(pairs, num_student, num_teacher, what):
  if not pairs:
    raise BistilError(f"no {what} layer pairs given")
  for s, t in pairs:
    if not (0 <= s < num_student and 0 <= t < num_teacher):
      raise BistilError(
        f"{what} pair (student {s}, teacher {t}) out of range for "
        f"{num_student} student and {num_teacher} teacher entries"
      )


def _sum_terms(terms: Sequence[LossTerm]) -> LossTerm:
  return LossTerm(sum(t.total for t in terms), sum(t.count for t in terms))


# ----------------------------------------------------------------------------
# Logit losses (docs/method.md 2.4 "Logit loss", 4.3).
# ----------------------------------------------------------------------------


def _log_softmax(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Float32 log_softmax over the last axis, restricted to `mask` columns.

  Masked columns get log-probability 0 (and so probability 0 once the
  caller masks exp() too), never -inf: products with them stay finite and
  their gradient is exactly 0 whatever the input held there.
  """
  x = x.astype(jnp.float32)
  if mask is None:
    return jax.nn.log_softmax(x, axis=-1)
  mask = jnp.broadcast_to(jnp.asarray(mask, bool), x.shape)
  floor = jnp.finfo(jnp.float32).min
  x_max = jax.lax.stop_gradient(
    jnp.max(jnp.where(mask, x, floor), axis=-1, keepdims=True)
  )
  shifted = jnp.where(mask, x - x_max, 0.0)
  norm = jnp.sum(jnp.where(mask, jnp.exp(shifted), 0.0), axis=-1, keepdims=True)
  # A row with no real column has norm 0; keep its log finite.
  norm = jnp.where(norm > 0, norm, 1.0)
  return jnp.where(mask, shifted - jnp.log(norm), 0.0)


def _logit_loss(
  student_logits,
  teacher_logits,
  temperature,
  mask,
  logits_mask,
  scale_by_t2,
  with_teacher_entropy,
) -> LossTerm:
  if student_logits.shape != teacher_logits.shape:
    raise BistilError(
      f"student logits {student_logits.shape} and teacher logits "
      f"{teacher_logits.shape} differ in shape"
    )
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise BistilError(f"temperature must be positive, got {temperature}")
  t = jnp.asarray(temperature, jnp.float32)
  s = student_logits.astype(jnp.float32)  # [..., c]
  z = teacher_logits.astype(jnp.float32)  # [..., c]
  if mask is not None:
    rows = _expand_mask(mask, s.shape)
    s, z = jnp.where(rows, s, 0.0), jnp.where(rows, z, 0.0)
  s, z = s / t, z / t
  if logits_mask is not None:
    logits_mask = jnp.broadcast_to(jnp.asarray(logits_mask, bool), s.shape)
  log_p_s = _log_softmax(s, logits_mask)  # [..., c]
  log_p_t = _log_softmax(z, logits_mask)  # [..., c]
  p_t = jnp.exp(log_p_t)
  if logits_mask is not None:
    p_t = jnp.where(logits_mask, p_t, 0.0)
  if with_teacher_entropy:
    per_row = jnp.sum(p_t * (log_p_t - log_p_s), axis=-1)  # [...]
  else:
    per_row = -jnp.sum(p_t * log_p_s, axis=-1)  # [...]
  if scale_by_t2:
    per_row = per_row * t * t
  return masked_sum(per_row, mask)


def soft_cross_entropy(
  student_logits: jax.Array,
  teacher_logits: jax.Array,
  temperature: float | jax.Array = 2.0,
  mask: jax.Array | None = None,
  logits_mask: jax.Array | None = None,
  scale_by_t2: bool = False,
) -> LossTerm:
  """Soft cross-entropy of student against teacher (docs/method.md 2.4, 4.3).

  Per row: -sum_c softmax(z_T / T)_c * log_softmax(z_S / T)_c, in float32.
  Reduction: mean over the selected rows (`count` = number of rows).

  Args:
    student_logits: [..., c], any float dtype.
    teacher_logits: [..., c], same shape.
    temperature: T > 0; the released code uses 2.0.
    mask: bool over the leading dims [...] (e.g. [b, l] first sub-words of
      a token task); None selects every row.
    logits_mask: bool broadcastable to [..., c] (e.g. [c] for padded
      vocabulary columns, [n, c] for per-row candidates); False columns get
      probability 0 in both distributions, with no NaN and zero gradient.
      Without it, padded columns filled with a large finite negative value
      (the encoder's MASK_VALUE) are also safe.
    scale_by_t2: multiply by T**2 (Hinton et al.); off in the released code.

  Returns:
    LossTerm(sum over selected rows, number of selected rows).
  """
  return _logit_loss(
    student_logits,
    teacher_logits,
    temperature,
    mask,
    logits_mask,
    scale_by_t2,
    with_teacher_entropy=False,
  )


def kl_divergence(
  student_logits: jax.Array,
  teacher_logits: jax.Array,
  temperature: float | jax.Array = 2.0,
  mask: jax.Array | None = None,
  logits_mask: jax.Array | None = None,
  scale_by_t2: bool = False,
) -> LossTerm:
  """KL(p_T || p_S) at temperature T (docs/method.md 2.4, project option).

  Per row: sum_c p_T,c (log p_T,c - log p_S,c) with p = softmax(z / T):
  the soft cross-entropy minus the teacher entropy, so it has the same
  student gradient and is 0 when the distributions match. Arguments,
  reduction and masking as in `soft_cross_entropy`.

  Returns:
    LossTerm(sum over selected rows, number of selected rows).
  """
  return _logit_loss(
    student_logits,
    teacher_logits,
    temperature,
    mask,
    logits_mask,
    scale_by_t2,
    with_teacher_entropy=True,
  )


def token_cross_entropy(
  logits: jax.Array,
  labels: jax.Array,
  ignore_index: int = -100,
  logits_mask: jax.Array | None = None,
) -> LossTerm:
  """Gold-label cross-entropy (task losses, student MLM; docs/method.md 2.4).

  Per position: -log_softmax(logits)[label], in float32, over positions
  whose label != ignore_index.

  Args:
    logits: [..., c], any float dtype.
    labels: int [...]; ignore_index marks positions without a label.
    ignore_index: the label value to skip (-100, as in HF).
    logits_mask: optional bool broadcastable to [..., c] for padded
      vocabulary columns (see `soft_cross_entropy`).

  Returns:
    LossTerm(sum over labelled positions, number of labelled positions);
    (0, 0) with mean 0 and zero gradient when no position is labelled.
  """
  if logits.shape[:-1] != labels.shape:
    raise BistilError(
      f"logits {logits.shape} and labels {labels.shape} do not match"
    )
  valid = labels != ignore_index  # [...]
  logits = jnp.where(valid[..., None], logits.astype(jnp.float32), 0.0)
  log_p = _log_softmax(logits, logits_mask)  # [..., c]
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  picked = jnp.take_along_axis(log_p, safe[..., None], axis=-1)[..., 0]
  return masked_sum(-picked, valid)


# ----------------------------------------------------------------------------
# Hidden-state MSE (docs/method.md 2.3, 2.4).
# ----------------------------------------------------------------------------


def hidden_mse(
  student_hidden: jax.Array,
  teacher_hidden: jax.Array,
  mask: jax.Array | None = None,
  projection: jax.Array | None = None,
) -> LossTerm:
  """Mean squared error between hidden states (docs/method.md 2.4).

  Reduction: mean over the real tokens and all d_S features, i.e.
  `count` = (number of True in mask) * d_S. mask=None averages over every
  position including padding, which is the released behaviour (2.4, 4.3).

  Args:
    student_hidden: [b, l, d_S], any float dtype.
    teacher_hidden: [b, l, d_T].
    mask: bool [b, l], True at real tokens; None = all positions.
    projection: fixed [d_T, d_S] matrix applied to the teacher states
      first (docs/method.md 2.3); required when d_T != d_S.

  Returns:
    LossTerm(sum of squared errors, number of elements summed).
  """
  h_s = student_hidden.astype(jnp.float32)  # [b, l, d_S]
  h_t = teacher_hidden.astype(jnp.float32)  # [b, l, d_T]
  if mask is not None:
    h_s = jnp.where(_expand_mask(mask, h_s.shape), h_s, 0.0)
    h_t = jnp.where(_expand_mask(mask, h_t.shape), h_t, 0.0)
  if projection is not None:
    h_t = jnp.einsum(
      "...t,ts->...s",
      h_t,
      projection.astype(jnp.float32),
      precision=jax.lax.Precision.HIGHEST,
    )  # [b, l, d_S]
  if h_s.shape != h_t.shape:
    raise BistilError(
      f"student hidden {h_s.shape} and (projected) teacher hidden "
      f"{h_t.shape} differ; widths need a projection"
    )
  return masked_sum(jnp.square(h_s - h_t), mask)


def hidden_mse_layers(
  student_states: Sequence[jax.Array],
  teacher_states: Sequence[jax.Array],
  pairs: LayerPairs,
  mask: jax.Array | None = None,
  projections: Sequence[jax.Array] | jax.Array | None = None,
) -> LossTerm:
  """L_hid = 1/|pairs| sum_(i,j) MSE(h_S^i, h_T^j P_j) (docs/method.md 2.4).

  With pairs = layer_maps(...)[0] this is 1/(L_S+1) sum_{i=0..L_S}.
  Every layer has the same count, so `mean` of the summed term equals the
  mean of the per-layer means.

  Args:
    student_states: L_S+1 arrays [b, l, d_S] (index 0 = embeddings).
    teacher_states: L_T+1 arrays [b, l, d_T].
    pairs: (student index, teacher index) pairs.
    mask: bool [b, l] real tokens; None = released averaging with padding.
    projections: None, or indexable by teacher index (a sequence of L_T+1
      arrays or one [L_T+1, d_T, d_S] array) of fixed projections.

  Returns:
    LossTerm summed over the pairs.

  Raises:
    BistilError: for an empty or out-of-range pair.
  """
  _check_pairs(pairs, len(student_states), len(teacher_states), "hidden")
  return _sum_terms(
    [
      hidden_mse(
        student_states[s],
        teacher_states[t],
        mask,
        None if projections is None else projections[t],
      )
      for s, t in pairs
    ]
  )


# ----------------------------------------------------------------------------
# Attention-probability MSE (docs/method.md 2.4).
# ----------------------------------------------------------------------------


def attention_mse(
  student_probs: jax.Array,
  teacher_probs: jax.Array,
  key_mask: jax.Array | None,
  query_mask: jax.Array | None = None,
) -> LossTerm:
  """MSE between post-softmax attention probabilities (docs/method.md 2.4).

  Entries at padded keys are excluded (the released code drops entries
  whose teacher probability is exactly 0; this uses the padding mask
  instead). Padded query rows are kept unless `query_mask` is given, as in
  the released code. Reduction: mean over included entries, i.e. `count` =
  heads * sum_b (#queries kept in b) * (#keys kept in b).

  Args:
    student_probs: [b, h, q, k], any float dtype.
    teacher_probs: [b, h, q, k].
    key_mask: bool [b, k], True at real keys (broadcast over heads and
      queries); None keeps every key.
    query_mask: bool [b, q], True at query rows to keep; None keeps all.

  Returns:
    LossTerm(sum of squared errors, number of entries summed).
  """
  if student_probs.shape != teacher_probs.shape:
    raise BistilError(
      f"student attentions {student_probs.shape} and teacher attentions "
      f"{teacher_probs.shape} differ in shape"
    )
  b, _, q, k = student_probs.shape
  keep = jnp.ones((b, 1, q, k), bool)  # [b, 1, q, k]
  if key_mask is not None:
    keep = keep & jnp.asarray(key_mask, bool).reshape(b, 1, 1, k)
  if query_mask is not None:
    keep = keep & jnp.asarray(query_mask, bool).reshape(b, 1, q, 1)
  keep = jnp.broadcast_to(keep, student_probs.shape)  # [b, h, q, k]
  a_s = jnp.where(keep, student_probs.astype(jnp.float32), 0.0)
  a_t = jnp.where(keep, teacher_probs.astype(jnp.float32), 0.0)
  return masked_sum(jnp.square(a_s - a_t), keep)


def attention_mse_layers(
  student_attentions: Sequence[jax.Array],
  teacher_attentions: Sequence[jax.Array],
  pairs: LayerPairs,
  key_mask: jax.Array | None,
  query_mask: jax.Array | None = None,
) -> LossTerm:
  """L_att = 1/|pairs| sum_(i,j) MSE(A_S^i, A_T^j) (docs/method.md 2.4).

  With pairs = layer_maps(...)[1] this is 1/L_S sum_{i=0..L_S-1}, student
  layer i against teacher layer (i+1)*r-1. Every layer has the same count
  (same heads and masks), so `mean` equals the mean of per-layer means.

  Args:
    student_attentions: L_S arrays [b, h, q, k].
    teacher_attentions: L_T arrays [b, h, q, k].
    pairs: (student layer, teacher layer) pairs.
    key_mask: bool [b, k]; see `attention_mse`.
    query_mask: bool [b, q] or None; see `attention_mse`.

  Returns:
    LossTerm summed over the pairs.

  Raises:
    BistilError: for an empty or out-of-range pair.
  """
  _check_pairs(
    pairs, len(student_attentions), len(teacher_attentions), "attention"
  )
  return _sum_terms(
    [
      attention_mse(
        student_attentions[s], teacher_attentions[t], key_mask, query_mask
      )
      for s, t in pairs
    ]
  )
