"""LT-SFT: eligible entries, top-K selection and masked updates.

docs/method.md §4.4-4.6. Phase 2 trains densely, selects the K body entries
that moved most (globally across all eligible tensors), resets, and trains again
with every other body entry frozen; the result is stored as a sparse diff of
the body plus the dense head (an "SFT", written and read by
`bistil_jax.checkpoint.sft`).

Masks are pytrees with the params' structure and bool leaves; they gate the
final update after the optimizer and its decoupled weight decay (STYLE.md
point 9), so frozen entries stay bit-identical.

The tree-path helpers here (`flatten`, `is_head`, `is_word_embeddings`,
`row_validity`, ...) are public because the SFT format names tensors by the
same "/"-joined paths.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from bistil_jax import partitioning
from bistil_jax.errors import BistilError

HEAD_KEYS = ("lm_head", "classifier")
WORD_EMBEDDINGS = "embeddings/word_embeddings/embedding"
# Non-negative float32s order like their int32 bit patterns; +inf is
# 0x7F800000, so any pattern at or above this one is a NaN.
_NAN_BITS = 0x7F800001
_MAX_LEAF = 2**31 - 1  # int32 flat indices inside the selection kernels


# ---------------------------------------------------------------- tree paths
def _key_str(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def flatten(tree: Any) -> tuple[list[str], list[Any], Any]:
  """("/"-joined paths, leaves, treedef) in jax.tree leaf order."""
  pairs, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = ["/".join(_key_str(k) for k in path) for path, _ in pairs]
  return paths, [x for _, x in pairs], treedef


def is_head(path: str) -> bool:
  """True for a "/"-joined path inside a task or MLM head subtree."""
  return path.split("/", 1)[0] in HEAD_KEYS


def is_word_embeddings(path: str) -> bool:
  """True for the word-embedding table (the rows vocab padding adds to)."""
  return path == WORD_EMBEDDINGS or path.endswith("/" + WORD_EMBEDDINGS)


def _is_layer_norm(path: str) -> bool:
  return any("LayerNorm" in k or "layer_norm" in k for k in path.split("/"))


def to_host(x: Any) -> np.ndarray:
  """A numpy copy of a (fully addressable) jax or numpy array."""
  return np.asarray(jax.device_get(x))


def leaf_shape(x: Any) -> tuple[int, ...]:
  """The shape of an array, ShapeDtypeStruct or Python scalar."""
  return tuple(getattr(x, "shape", np.shape(x)))


# ------------------------------------------------------------- eligibility
def eligible_mask(
  params: Any,
  *,
  embeddings: bool = True,
  layer_norm: bool = True,
  position_embeddings: bool = True,
  vocab_size: int | None = None,
) -> Any:
  """Which body entries LT-SFT may select (docs/method.md §4.4, group G1).

  Head leaves (top-level keys in `HEAD_KEYS`) are never eligible: the head is
  trained densely and stored whole. Leaves are zero-copy numpy broadcast views
  with the param's shape, so the tree costs next to nothing even for 100M+
  parameters and still carries the shapes `k_from_density` counts.

  Args:
    params: the params (or a tree of ShapeDtypeStructs).
    embeddings: include the word, position and token-type tables.
    layer_norm: include LayerNorm scales and biases (leaves under a key
      containing "LayerNorm"/"layer_norm"); False = `--freeze_layer_norm`.
    position_embeddings: include the position table (when `embeddings`).
    vocab_size: real vocabulary size; word-embedding rows at or above it
      (padding to `padded_vocab_size`) are marked ineligible. Without it,
      pass `vocab_size` to `select_top_k` instead.

  Returns:
    A pytree like `params` of read-only bool arrays.
  """
  paths, leaves, treedef = flatten(params)
  out = []
  for path, x in zip(paths, leaves, strict=True):
    shape = leaf_shape(x)
    ok = not is_head(path)
    if _is_layer_norm(path):
      ok = ok and layer_norm
    elif path.startswith("embeddings/") and path.split("/")[1].endswith(
      "_embeddings"
    ):
      ok = ok and embeddings
      if "position_embeddings" in path:
        ok = ok and position_embeddings
    if ok and vocab_size is not None and is_word_embeddings(path):
      rows = row_validity(path, shape, vocab_size)
      out.append(np.broadcast_to(rows, shape))
    else:
      out.append(np.broadcast_to(np.bool_(ok), shape))
  return jax.tree.unflatten(treedef, out)


def row_validity(path: str, shape, vocab_size: int) -> np.ndarray:
  """[rows, 1, ...] bool: True for real vocabulary rows.

  Raises:
    BistilError: `vocab_size` does not fit the table `path` of `shape`.
  """
  if not shape or vocab_size > shape[0] or vocab_size <= 0:
    raise BistilError(
      f"vocab_size={vocab_size} does not fit {path} with shape {shape}"
    )
  rows = np.arange(shape[0]) < vocab_size
  return rows.reshape((-1,) + (1,) * (len(shape) - 1))


def compact(e: Any) -> Any:
  """Shrinks a numpy broadcast view to its broadcastable core.

  Python bools become 0-d arrays; jax arrays pass through unchanged.
  """
  if isinstance(e, (bool, np.bool_)):
    return np.asarray(e, bool)
  if isinstance(e, np.ndarray):
    index = tuple(
      slice(0, 1) if (st == 0 and n > 1) else slice(None)
      for st, n in zip(e.strides, e.shape, strict=True)
    )
    return np.ascontiguousarray(e[index], dtype=bool)
  return e


def _count(e: Any, shape: tuple[int, ...]) -> int:
  """Number of True entries of mask leaf `e` broadcast to `shape`."""
  c = compact(e)
  if isinstance(c, np.ndarray):
    c = np.broadcast_to(c, np.broadcast_shapes(c.shape, shape))
    c = compact(c)  # broadcasting may add size-1 axes
    return int(np.count_nonzero(c)) * (math.prod(shape) // max(c.size, 1))
  return int(jnp.sum(jnp.broadcast_to(c, shape), dtype=jnp.int32))


def k_from_density(eligible: Any, density: float) -> int:
  """K = int(density * number of eligible entries) (docs/method.md §4.4)."""
  if not 0.0 < density <= 1.0:
    raise BistilError(f"SFT density must be in (0, 1], got {density}")
  paths, leaves, _ = flatten(eligible)
  n = sum(_count(e, leaf_shape(e)) for e in leaves)
  return int(density * n)


def density(mask: Any, eligible: Any) -> float:
  """Fraction of eligible entries that `mask` selects (for logging)."""
  _, m_leaves, m_def = flatten(mask)
  _, e_leaves, e_def = flatten(eligible)
  if m_def != e_def:
    raise BistilError("mask and eligible trees have different structures")
  hit = total = 0
  for m, e in zip(m_leaves, e_leaves, strict=True):
    shape = leaf_shape(e)
    total += _count(e, shape)
    both = jnp.logical_and(jnp.asarray(compact(m)), jnp.asarray(compact(e)))
    both = jnp.broadcast_to(both, jnp.broadcast_shapes(both.shape, shape))
    hit += int(jnp.sum(both, dtype=jnp.int32))
  return hit / max(total, 1)


# --------------------------------------------------------------- selection
def _keys(d: jax.Array, e: jax.Array | None, row_limit: int | None):
  """int32 ranking keys: bits of |d| where eligible, -1 elsewhere."""
  bits = jax.lax.bitcast_convert_type(jnp.abs(d.astype(jnp.float32)), jnp.int32)
  ok = jnp.ones(d.shape, bool) if e is None else jnp.broadcast_to(e, d.shape)
  if row_limit is not None:
    ok = ok & (jax.lax.broadcasted_iota(jnp.int32, d.shape, 0) < row_limit)
  return jnp.where(ok, bits, -1)


def _flat_iota(shape: tuple[int, ...]) -> jax.Array:
  """Row-major flat index of every entry, int32, built from per-axis iotas.

  No reshape, so it keeps the sharding of whatever it is combined with.
  """
  flat = jnp.zeros(shape, jnp.int32)
  stride = 1
  for axis in reversed(range(len(shape))):
    flat = flat + jax.lax.broadcasted_iota(jnp.int32, shape, axis) * stride
    stride *= shape[axis]
  return flat


# Per-leaf kernels: compiled once per (shape, eligibility shape, row limit),
# so the layers of a model share them and nothing big is ever traced whole.
@functools.partial(jax.jit, static_argnames=("row_limit",))
def _count_at_least(d, e, t, row_limit):
  return jnp.sum(_keys(d, e, row_limit) >= t, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=("row_limit",))
def _count_equal(d, e, t, row_limit):
  return jnp.sum(_keys(d, e, row_limit) == t, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=("row_limit",))
def _count_ties_before(d, e, t, cut, row_limit):
  ties = (_keys(d, e, row_limit) == t) & (_flat_iota(d.shape) < cut)
  return jnp.sum(ties, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=("row_limit", "sharding"))
def _select(d, e, t, cut, row_limit, sharding):
  keys = _keys(d, e, row_limit)
  m = (keys > t) | ((keys == t) & (_flat_iota(d.shape) < cut))
  if sharding is not None:
    m = jax.lax.with_sharding_constraint(m, sharding)
  return m


def _per_leaf(fn, ds, es, limits, *args) -> np.ndarray:
  """fn over all leaves, dispatched and fetched as `partitioning.fetch_all`
  finds safe (together on TPU/GPU, one at a time on CPU meshes and across
  processes, where concurrent collectives can deadlock): [leaves]."""
  calls = [
    functools.partial(fn, d, e, *args, r)
    for d, e, r in zip(ds, es, limits, strict=True)
  ]
  out = partitioning.fetch_all(calls)
  return np.asarray(out, dtype=np.int64).reshape(-1)


def _zeros_like_mask(x: Any) -> jax.Array:
  sharding = getattr(x, "sharding", None)
  if isinstance(x, jax.Array) and sharding is not None:
    return jnp.zeros(x.shape, bool, device=sharding)
  return jnp.zeros(leaf_shape(x), bool)


@dataclasses.dataclass
class _Active:
  """The leaves that can hold selected entries, as device arrays.

  Attributes:
    where: index of each in the flattened tree.
    deltas: |Δ| leaves (jax arrays, shardings kept).
    eligible: compact eligibility per leaf (None: all of it).
    limits: word-embedding row limit per leaf (None: no limit).
    shardings: NamedSharding of each leaf, or None.
    sizes: number of entries of each leaf.
  """

  where: list[int] = dataclasses.field(default_factory=list)
  deltas: list[jax.Array] = dataclasses.field(default_factory=list)
  eligible: list[Any] = dataclasses.field(default_factory=list)
  limits: list[int | None] = dataclasses.field(default_factory=list)
  shardings: list[NamedSharding | None] = dataclasses.field(
    default_factory=list
  )
  sizes: list[int] = dataclasses.field(default_factory=list)

  def per_leaf(self, fn, *args) -> np.ndarray:
    """`_per_leaf(fn, ...)` over these leaves: [leaves] int64."""
    return _per_leaf(fn, self.deltas, self.eligible, self.limits, *args)


def _active_leaves(
  paths: list[str], deltas: list[Any], elig: list[Any], vocab_size: int | None
) -> _Active:
  """Skips leaves with nothing eligible; checks sizes and vocab limits."""
  out = _Active()
  for i, (path, d, e) in enumerate(zip(paths, deltas, elig, strict=True)):
    shape = leaf_shape(d)
    c = compact(e)
    if isinstance(c, np.ndarray):
      if not c.any():
        continue
      # numpy, not a device array: a host constant is replicated on every
      # process, where a committed single-device array would not be.
      c = None if c.all() else np.asarray(c)
    if math.prod(shape) > _MAX_LEAF:
      raise BistilError(f"{path} has more than 2**31-1 entries")
    limit = None
    if vocab_size is not None and is_word_embeddings(path):
      row_validity(path, shape, vocab_size)  # validates
      limit = int(vocab_size) if vocab_size < shape[0] else None
    out.where.append(i)
    out.deltas.append(d if isinstance(d, jax.Array) else jnp.asarray(d))
    out.eligible.append(c)
    out.limits.append(limit)
    sh = getattr(d, "sharding", None) if isinstance(d, jax.Array) else None
    out.shardings.append(sh if isinstance(sh, NamedSharding) else None)
    out.sizes.append(math.prod(shape))
  return out


def _threshold(count: Callable[[int], int], k: int) -> tuple[int, int]:
  """(T, count(> T)): T the largest key with count(>= T) >= k.

  Bisection on the int32 bit pattern, invariant count(lo) >= k > count(hi).
  """
  lo, hi, above = 0, _NAN_BITS, 0
  while hi - lo > 1:
    mid = (lo + hi) // 2
    n = count(mid)
    if n >= k:
      lo = mid
    else:
      hi, above = mid, n
  return lo, above  # count(> T) == count(>= hi) == above


def _tie_cuts(leaves: _Active, t: np.int32, need: int) -> list[int]:
  """Per leaf, the flat index below which its ties (keys == t) are taken.

  The `need` ties go to the leaves in order; the one leaf cut partway gets
  the smallest cut with that many ties before it (a bisection on the flat
  index).
  """
  ties = leaves.per_leaf(_count_equal, t)
  cuts = []
  for j, n_ties in enumerate(ties):
    take = int(min(max(need, 0), n_ties))
    need -= take
    if take == n_ties:
      cuts.append(leaves.sizes[j])  # all ties of this leaf (or none exist)
    elif take == 0:
      cuts.append(0)
    else:
      d, e, r = leaves.deltas[j], leaves.eligible[j], leaves.limits[j]
      c_lo, c_hi = 0, leaves.sizes[j]
      while c_hi - c_lo > 1:
        mid = (c_lo + c_hi) // 2
        got = int(_count_ties_before(d, e, t, np.int32(mid), r))
        if got >= take:
          c_hi = mid
        else:
          c_lo = mid
      cuts.append(c_hi)
  return cuts


def select_top_k(
  delta_abs_tree: Any,
  eligible: Any,
  k: int,
  *,
  vocab_size: int | None = None,
) -> Any:
  """Exactly the k eligible entries with the largest |Δ|, globally.

  docs/method.md §4.4 step 2: one threshold over all eligible tensors jointly,
  not per matrix. Nothing is sorted or concatenated: the k-th largest value is
  found by bisection on the float32 bit pattern (non-negative floats order
  like their int32 bits) using only per-leaf counts `sum(bits >= t)`, each a
  small jitted reduction that runs where the leaf lives (sharded leaves are
  never gathered; kernels compile once per distinct leaf shape). 31 count
  passes over the eligible params find the threshold T, one more counts
  ties; only [leaves] int32 counts reach the host. Call it outside jit.

  Tie rule: every entry with |Δ| > T is selected; entries with |Δ| == T fill
  the remaining slots in a deterministic order: leaf order of `jax.tree`
  flattening (dict keys sorted), then row-major flat index within a leaf. At
  most one leaf is cut partway; its cut is found by a second bisection on the
  flat index (≤31 more counts of that leaf). The original (bistil) selects
  `|Δ| >= T`, i.e. every tie, so it can select slightly more than K; we
  select exactly K.

  Args:
    delta_abs_tree: |θ − θ₀| per leaf (numpy or jax arrays, possibly sharded;
      any float dtype; the sign is ignored). NaNs are an error.
    eligible: bool tree like `eligible_mask` returns (numpy views, jax arrays
      or Python bools; leaves broadcastable to the params' shapes).
    k: how many entries to select.
    vocab_size: if given, word-embedding rows at or above it (vocabulary
      padding) are never selected, whatever `eligible` says.

  Returns:
    A bool jax-array tree like `delta_abs_tree`; leaves keep the input
    NamedShardings.

  Raises:
    BistilError: k <= 0, k > number of eligible entries, NaN in |Δ|,
      mismatched trees.
  """
  paths, deltas, treedef = flatten(delta_abs_tree)
  _, elig, e_def = flatten(eligible)
  if e_def != treedef:
    raise BistilError("eligible mask does not match the parameter tree")
  if not isinstance(k, (int, np.integer)) or k <= 0:
    raise BistilError(f"top-K selection needs k >= 1, got k={k}")
  leaves = _active_leaves(paths, deltas, elig, vocab_size)

  def count(t: int) -> int:  # eligible entries with key >= t
    return int(leaves.per_leaf(_count_at_least, np.int32(t)).sum())

  total = count(0) if leaves.deltas else 0
  if k > total:
    raise BistilError(f"k={k} exceeds the {total} eligible entries")
  if count(_NAN_BITS):
    raise BistilError("|Δ| has NaN entries; cannot select the top K")
  lo, above = _threshold(count, k)
  t = np.int32(lo)
  cuts = _tie_cuts(leaves, t, k - above)  # k - above: ties to take
  selected = [
    _select(d, e, t, np.int32(c), r, sh)
    for d, e, c, r, sh in zip(
      leaves.deltas,
      leaves.eligible,
      cuts,
      leaves.limits,
      leaves.shardings,
      strict=True,
    )
  ]
  out = [_zeros_like_mask(d) for d in deltas]
  for i, m in zip(leaves.where, selected, strict=True):
    out[i] = m
  return jax.tree.unflatten(treedef, out)


# ------------------------------------------------------------- optimizing
def _gate(u: jax.Array, m: Any) -> jax.Array:
  # NOTE: frozen entries get -0.0, not 0.0: x + (-0.0) == x bit for bit for
  # every x (x + 0.0 turns a -0.0 parameter into +0.0).
  frozen = jnp.array(-0.0, u.dtype)
  if isinstance(m, (bool, np.bool_)):
    return u if m else jnp.full_like(u, frozen)
  return jnp.where(compact(m), u, frozen)


def gate(tree: Any, mask: Any) -> Any:
  """`tree` where `mask` is True, -0.0 elsewhere.

  train/steps.apply_gradients gates both the gradients (so clipping and the
  Adam moments see trainable entries only) and the final update (so
  decoupled weight decay cannot move frozen entries either).
  """
  return jax.tree.map(_gate, tree, mask)


def l1_to_origin(
  params: Any, origin: Any, mask_or_eligible: Any, strength: float
) -> jax.Array:
  """strength · Σ|θ − θ₀| over selected entries / number selected.

  bistil's per-group L1 (docs/method.md §4.5): R = λ_g Σ|θ−θ₀| / N_reg with
  N_reg the number of regularised elements (composable-sft divides by all model
  parameters instead). Passing the eligible mask in both phases reproduces
  bistil exactly (frozen entries contribute 0 to the sum); passing the
  sparse training mask normalises by K instead. Call once per group with its
  own strength and add the results.

  Returns:
    A float32 scalar (0 when nothing is selected).
  """
  _, p_leaves, p_def = flatten(params)
  _, o_leaves, o_def = flatten(origin)
  _, m_leaves, m_def = flatten(mask_or_eligible)
  if not p_def == o_def == m_def:
    raise BistilError("params, origin and mask trees differ in structure")
  total = jnp.zeros((), jnp.float32)
  count = jnp.zeros((), jnp.float32)
  for p, o, m in zip(p_leaves, o_leaves, m_leaves, strict=True):
    c = compact(m)
    if isinstance(c, np.ndarray) and not c.any():
      continue
    dist = jnp.abs(p.astype(jnp.float32) - o.astype(jnp.float32))
    total = total + jnp.sum(jnp.where(c, dist, 0.0))
    if isinstance(c, np.ndarray):
      count = count + _count(c, p.shape)
    else:
      count = count + jnp.sum(jnp.broadcast_to(c, p.shape), dtype=jnp.float32)
  return strength * total / jnp.maximum(count, 1.0)
