"""LT-SFT: eligible entries, top-K selection, masked updates and SFT files.

docs/method.md §4.4-4.6. Phase 2 trains densely, selects the K body entries
that moved most (globally across all eligible tensors), resets, and trains again
with every other body entry frozen; the result is stored as a sparse diff of
the body plus the dense head (an "SFT").

Masks are pytrees with the params' structure and bool leaves; they gate the
final update after the optimizer and its decoupled weight decay (STYLE.md
point 9), so frozen entries stay bit-identical.

SFT dir (DESIGN.md): `sft.safetensors` holding `{path}.idx` (int64 sorted
row-major flat indices) and `{path}.val` for each sparse diff and
`{path}.dense` for dense (head) tensors, plus `sft.json` (kind, density, base
fingerprint, label names, ...). composable-sft `pytorch_diff.bin` files are
readable too (`load_sft(path, config=...)`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import pickle
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from bistil_jax import partitioning, paths
from bistil_jax.errors import BistilError

log = logging.getLogger(__name__)

HEAD_KEYS = ("lm_head", "classifier")
WORD_EMBEDDINGS = "embeddings/word_embeddings/embedding"
SFT_WEIGHTS = "sft.safetensors"
SFT_META = "sft.json"
COMPOSABLE_FILE = "pytorch_diff.bin"
FORMAT = "bistil-sft"
FORMAT_VERSION = 1
# Non-negative float32s order like their int32 bit patterns; +inf is
# 0x7F800000, so any pattern at or above this one is a NaN.
_NAN_BITS = 0x7F800001
_MAX_LEAF = 2**31 - 1  # int32 flat indices inside the selection kernels
# Names of MLM-head tensors in PyTorch checkpoints (composable-sft "abs").
_MLM_HEAD_NAMES = ("cls.predictions.", "lm_head.")


# ---------------------------------------------------------------- tree paths
def _key_str(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flatten(tree: Any) -> tuple[list[str], list[Any], Any]:
  """("/"-joined paths, leaves, treedef) in jax.tree leaf order."""
  pairs, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = ["/".join(_key_str(k) for k in path) for path, _ in pairs]
  return paths, [x for _, x in pairs], treedef


def is_head(path: str) -> bool:
  """True for a "/"-joined path inside a task or MLM head subtree."""
  return path.split("/", 1)[0] in HEAD_KEYS


def _is_word_embeddings(path: str) -> bool:
  return path == WORD_EMBEDDINGS or path.endswith("/" + WORD_EMBEDDINGS)


def _is_layer_norm(path: str) -> bool:
  return any("LayerNorm" in k or "layer_norm" in k for k in path.split("/"))


def _to_host(x: Any) -> np.ndarray:
  """A numpy copy of a (fully addressable) jax or numpy array."""
  return np.asarray(jax.device_get(x))


def _shape(x: Any) -> tuple[int, ...]:
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
  paths, leaves, treedef = _flatten(params)
  out = []
  for path, x in zip(paths, leaves, strict=True):
    shape = _shape(x)
    ok = not is_head(path)
    if _is_layer_norm(path):
      ok = ok and layer_norm
    elif path.startswith("embeddings/") and path.split("/")[1].endswith(
      "_embeddings"
    ):
      ok = ok and embeddings
      if "position_embeddings" in path:
        ok = ok and position_embeddings
    if ok and vocab_size is not None and _is_word_embeddings(path):
      rows = _row_validity(path, shape, vocab_size)
      out.append(np.broadcast_to(rows, shape))
    else:
      out.append(np.broadcast_to(np.bool_(ok), shape))
  return jax.tree.unflatten(treedef, out)


def _row_validity(path: str, shape, vocab_size: int) -> np.ndarray:
  """[rows, 1, ...] bool: True for real vocabulary rows."""
  if not shape or vocab_size > shape[0] or vocab_size <= 0:
    raise BistilError(
      f"vocab_size={vocab_size} does not fit {path} with shape {shape}"
    )
  rows = np.arange(shape[0]) < vocab_size
  return rows.reshape((-1,) + (1,) * (len(shape) - 1))


def _compact(e: Any) -> Any:
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
  c = _compact(e)
  if isinstance(c, np.ndarray):
    c = np.broadcast_to(c, np.broadcast_shapes(c.shape, shape))
    c = _compact(c)  # broadcasting may add size-1 axes
    return int(np.count_nonzero(c)) * (math.prod(shape) // max(c.size, 1))
  return int(jnp.sum(jnp.broadcast_to(c, shape), dtype=jnp.int32))


def k_from_density(eligible: Any, density: float) -> int:
  """K = int(density * number of eligible entries) (docs/method.md §4.4)."""
  if not 0.0 < density <= 1.0:
    raise BistilError(f"SFT density must be in (0, 1], got {density}")
  paths, leaves, _ = _flatten(eligible)
  n = sum(_count(e, _shape(e)) for e in leaves)
  return int(density * n)


def density(mask: Any, eligible: Any) -> float:
  """Fraction of eligible entries that `mask` selects (for logging)."""
  _, m_leaves, m_def = _flatten(mask)
  _, e_leaves, e_def = _flatten(eligible)
  if m_def != e_def:
    raise BistilError("mask and eligible trees have different structures")
  hit = total = 0
  for m, e in zip(m_leaves, e_leaves, strict=True):
    shape = _shape(e)
    total += _count(e, shape)
    both = jnp.logical_and(jnp.asarray(_compact(m)), jnp.asarray(_compact(e)))
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
  return jnp.zeros(_shape(x), bool)


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
  paths, deltas, treedef = _flatten(delta_abs_tree)
  _, elig, e_def = _flatten(eligible)
  if e_def != treedef:
    raise BistilError("eligible mask does not match the parameter tree")
  if not isinstance(k, (int, np.integer)) or k <= 0:
    raise BistilError(f"top-K selection needs k >= 1, got k={k}")

  # Leaves that can hold selected entries, as device arrays.
  active, ds, es, limits, shardings, sizes = [], [], [], [], [], []
  for i, (path, d, e) in enumerate(zip(paths, deltas, elig, strict=True)):
    shape = _shape(d)
    c = _compact(e)
    if isinstance(c, np.ndarray):
      if not c.any():
        continue
      # numpy, not a device array: a host constant is replicated on every
      # process, where a committed single-device array would not be.
      c = None if c.all() else np.asarray(c)
    if math.prod(shape) > _MAX_LEAF:
      raise BistilError(f"{path} has more than 2**31-1 entries")
    limit = None
    if vocab_size is not None and _is_word_embeddings(path):
      _row_validity(path, shape, vocab_size)  # validates
      limit = int(vocab_size) if vocab_size < shape[0] else None
    active.append(i)
    ds.append(d if isinstance(d, jax.Array) else jnp.asarray(d))
    es.append(c)
    limits.append(limit)
    sh = getattr(d, "sharding", None) if isinstance(d, jax.Array) else None
    shardings.append(sh if isinstance(sh, NamedSharding) else None)
    sizes.append(math.prod(shape))

  def count(t: int) -> np.ndarray:  # [active leaves] int64
    return _per_leaf(_count_at_least, ds, es, limits, np.int32(t))

  total = int(count(0).sum()) if ds else 0
  if k > total:
    raise BistilError(f"k={k} exceeds the {total} eligible entries")
  if count(_NAN_BITS).sum():
    raise BistilError("|Δ| has NaN entries; cannot select the top K")

  # Largest T with count(>= T) >= k: invariant count(lo) >= k > count(hi).
  lo, hi, above = 0, _NAN_BITS, 0
  while hi - lo > 1:
    mid = (lo + hi) // 2
    n = int(count(mid).sum())
    if n >= k:
      lo = mid
    else:
      hi, above = mid, n
  t = np.int32(lo)
  need = k - above  # ties to take; count(> T) == count(>= hi) == above
  ties = _per_leaf(_count_equal, ds, es, limits, t)
  cuts = []
  for j, n_ties in enumerate(ties):
    take = int(min(max(need, 0), n_ties))
    need -= take
    if take == n_ties:
      cuts.append(sizes[j])  # all ties of this leaf (or none exist)
    elif take == 0:
      cuts.append(0)
    else:  # smallest cut with `take` ties before it
      c_lo, c_hi = 0, sizes[j]
      while c_hi - c_lo > 1:
        mid = (c_lo + c_hi) // 2
        got = int(_count_ties_before(ds[j], es[j], t, np.int32(mid), limits[j]))
        if got >= take:
          c_hi = mid
        else:
          c_lo = mid
      cuts.append(c_hi)
  selected = [
    _select(d, e, t, np.int32(c), r, sh)
    for d, e, c, r, sh in zip(ds, es, cuts, limits, shardings, strict=True)
  ]
  out = [_zeros_like_mask(d) for d in deltas]
  for i, m in zip(active, selected, strict=True):
    out[i] = m
  return jax.tree.unflatten(treedef, out)


# ------------------------------------------------------------- optimizing
def _gate(u: jax.Array, m: Any) -> jax.Array:
  # NOTE: frozen entries get -0.0, not 0.0: x + (-0.0) == x bit for bit for
  # every x (x + 0.0 turns a -0.0 parameter into +0.0).
  frozen = jnp.array(-0.0, u.dtype)
  if isinstance(m, (bool, np.bool_)):
    return u if m else jnp.full_like(u, frozen)
  return jnp.where(_compact(m), u, frozen)


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
  _, p_leaves, p_def = _flatten(params)
  _, o_leaves, o_def = _flatten(origin)
  _, m_leaves, m_def = _flatten(mask_or_eligible)
  if not p_def == o_def == m_def:
    raise BistilError("params, origin and mask trees differ in structure")
  total = jnp.zeros((), jnp.float32)
  count = jnp.zeros((), jnp.float32)
  for p, o, m in zip(p_leaves, o_leaves, m_leaves, strict=True):
    c = _compact(m)
    if isinstance(c, np.ndarray) and not c.any():
      continue
    dist = jnp.abs(p.astype(jnp.float32) - o.astype(jnp.float32))
    total = total + jnp.sum(jnp.where(c, dist, 0.0))
    if isinstance(c, np.ndarray):
      count = count + _count(c, p.shape)
    else:
      count = count + jnp.sum(jnp.broadcast_to(c, p.shape), dtype=jnp.float32)
  return strength * total / jnp.maximum(count, 1.0)


# --------------------------------------------------------------------- SFT
@dataclasses.dataclass
class SFT:
  """A sparse fine-tuning: body diffs, dense (head) tensors, metadata.

  Attributes:
    diffs: "/"-joined param path -> (int64 sorted unique row-major flat
      indices, float32 values); applied as `flat[idx] += values`.
    dense: path -> whole tensor that replaces the parameter (task head).
    meta: JSON-able metadata: kind, density, base_fingerprint, vocab_size,
      head, num_labels, label_names, ...
  """

  diffs: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(
    default_factory=dict
  )
  dense: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def nnz(self) -> int:
    return sum(int(idx.size) for idx, _ in self.diffs.values())

  def __repr__(self) -> str:
    return (
      f"SFT(kind={self.meta.get('kind')!r}, diffs={len(self.diffs)} tensors "
      f"/ {self.nnz} entries, dense={sorted(self.dense)})"
    )


def _top(path: str) -> str:
  return path.split("/", 1)[0]


def params_fingerprint(
  params: Any, *, vocab_size: int | None = None, exclude: Sequence[str] = ()
) -> str:
  """sha256 identity of the BODY parameters (head leaves excluded).

  Hashes, in sorted path order, each body leaf's path, shape, dtype and raw
  bytes, so a task head does not change the identity of the base model. With
  `vocab_size`, word-embedding rows at or above it (padding, whose content
  depends on how the params were made: random at init, zeros on HF import)
  are left out. Top-level groups in `exclude` (body parts an SFT stores
  whole, e.g. a pooler created for a pair task) are left out too. Cost: one
  host copy and one sha256 pass over the body, ~1 s
  per 100M float32 parameters. Arrays must be fully addressable (single
  host).

  Returns:
    "sha256:<hex>".
  """
  paths, leaves, _ = _flatten(params)
  h = hashlib.sha256()
  for j in sorted(range(len(paths)), key=lambda j: paths[j]):
    path = paths[j]
    if is_head(path) or _top(path) in exclude:
      continue
    a = _to_host(leaves[j])
    if vocab_size is not None and _is_word_embeddings(path):
      a = a[:vocab_size]
    a = np.ascontiguousarray(a)
    h.update(f"{path}|{a.shape}|{a.dtype.name}\n".encode())
    h.update(a.reshape(-1).view(np.uint8))
  return "sha256:" + h.hexdigest()


def _check_diff(path: str, idx: np.ndarray, val: np.ndarray, size=None):
  if idx.ndim != 1 or val.ndim != 1 or idx.shape != val.shape:
    raise BistilError(
      f"SFT diff for {path}: indices {idx.shape} and values {val.shape} must "
      "be 1-d and of equal length"
    )
  if not np.issubdtype(idx.dtype, np.integer):
    raise BistilError(f"SFT diff for {path}: indices have dtype {idx.dtype}")
  if idx.size and (np.any(np.diff(idx) <= 0) or idx[0] < 0):
    raise BistilError(
      f"SFT diff for {path}: indices are not sorted, unique and >= 0"
    )
  if size is not None and idx.size and idx[-1] >= size:
    raise BistilError(
      f"SFT diff for {path}: index {int(idx[-1])} is out of range for its "
      f"{size} entries"
    )


def sft_from_params(
  trained: Any,
  base: Any,
  mask: Any = None,
  *,
  kind: str,
  meta: dict[str, Any] | None = None,
  tol: float = 1e-7,
  config: Any = None,
  vocab_size: int | None = None,
  dense_keys: Sequence[str] = (),
) -> SFT:
  """Exports trained − base as an SFT (docs/method.md §4.4 step 4).

  Body: Δ = float32(trained) − float32(base) where `mask` is True (or
  everywhere if mask is None) and |Δ| > tol; bistil zeroes |Δ| <= 1e-7.
  Entries that moved outside the mask are dropped with a warning (the mask
  gate failed). Head leaves are stored dense. `apply_sft(base, sft)` then
  reproduces `trained` bit for bit wherever float32(trained − base) is exact
  (always when |trained − base| <= |base| or base == 0, i.e. ordinary
  fine-tuning); otherwise within rounding of the larger magnitude.

  Args:
    trained: the fine-tuned params.
    base: the params it started from (same structure).
    mask: optional bool tree restricting the stored body entries.
    kind: e.g. "task" or "language".
    meta: extra JSON-able metadata (overrides the defaults below).
    tol: entries with |Δ| <= tol are not stored.
    config: the ModelConfig; fills head, num_labels, label_names,
      vocab_size and model_type.
    vocab_size: real vocabulary size (default config.vocab_size): diffs on
      padded word-embedding rows are dropped and the fingerprint ignores them.
    dense_keys: top-level body groups stored whole like the head (parts the
      base model lacked, e.g. a fresh pooler); the fingerprint leaves them
      out, so the SFT applies to the base as loaded.

  Returns:
    The SFT; meta["density"] = stored entries / body entries (padding
    excluded).
  """
  t_paths, t_leaves, t_def = _flatten(trained)
  _, b_leaves, b_def = _flatten(base)
  if t_def != b_def:
    raise BistilError("trained and base params differ in structure")
  m_leaves = [None] * len(t_leaves)
  if mask is not None:
    _, m_leaves, m_def = _flatten(mask)
    if m_def != t_def:
      raise BistilError("mask does not match the parameter tree")
  if vocab_size is None and config is not None:
    vocab_size = config.vocab_size
  diffs, dense = {}, {}
  body_entries = 0
  for path, t, b, m in zip(t_paths, t_leaves, b_leaves, m_leaves, strict=True):
    t = _to_host(t)
    if is_head(path) or _top(path) in dense_keys:
      dense[path] = t.copy()
      continue
    b = _to_host(b)
    if t.shape != b.shape:
      raise BistilError(f"{path}: trained {t.shape} vs base {b.shape}")
    delta = (t.astype(np.float32) - b.astype(np.float32)).reshape(-1)
    keep = np.abs(delta) > tol
    n = delta.size
    if vocab_size is not None and _is_word_embeddings(path):
      rows = np.broadcast_to(_row_validity(path, t.shape, vocab_size), t.shape)
      rows = rows.reshape(-1)
      if np.any(keep & ~rows):
        log.info("%s: dropping diffs on padded vocabulary rows", path)
      keep &= rows
      n = int(vocab_size * math.prod(t.shape[1:]))
    body_entries += n
    if m is not None:
      sel = np.broadcast_to(_to_host(_compact(m)), t.shape).reshape(-1)
      leaked = int(np.count_nonzero(keep & ~sel))
      if leaked:
        log.warning(
          "%s: %d entries moved outside the mask; dropped", path, leaked
        )
      keep &= sel
    idx = np.flatnonzero(keep).astype(np.int64)
    if idx.size:
      diffs[path] = (idx, delta[idx])
  nnz = sum(int(i.size) for i, _ in diffs.values())
  out_meta: dict[str, Any] = {
    "format": FORMAT,
    "version": FORMAT_VERSION,
    "kind": kind,
    "base_fingerprint": params_fingerprint(
      base, vocab_size=vocab_size, exclude=dense_keys
    ),
    "vocab_size": vocab_size,
    "nnz": nnz,
    "density": nnz / max(body_entries, 1),
    "head": None,
    "num_labels": None,
    "label_names": None,
  }
  if config is not None:
    out_meta["model_type"] = config.model_type
    out_meta["head"] = config.head
    if config.head.endswith("classification"):
      out_meta["num_labels"] = config.num_labels
      out_meta["label_names"] = list(config.label_names)
  out_meta.update(meta or {})
  return SFT(diffs=diffs, dense=dense, meta=out_meta)


# ------------------------------------------------------------- SFT files
def save_sft(path: str, sft: SFT, overwrite: bool = False) -> None:
  """Writes an SFT dir: sft.safetensors + sft.json, atomically.

  The dir is written as a temp sibling and renamed into place; a non-empty
  existing dir is refused unless `overwrite`.
  """
  from safetensors.numpy import save

  from bistil_jax.checkpoint.hf import check_out_dir

  check_out_dir(path, overwrite)
  tensors = {}
  for key, (idx, val) in sft.diffs.items():
    idx, val = np.asarray(idx), np.asarray(val)
    _check_diff(key, idx, val)
    tensors[f"{key}.idx"] = np.ascontiguousarray(idx, dtype=np.int64)
    tensors[f"{key}.val"] = np.ascontiguousarray(val)
  for key, x in sft.dense.items():
    tensors[f"{key}.dense"] = np.ascontiguousarray(x)
  meta = {"format": FORMAT, "version": FORMAT_VERSION, **sft.meta}
  try:
    text = json.dumps(meta, indent=2, sort_keys=True)
  except (TypeError, ValueError) as e:
    raise BistilError(f"SFT metadata is not JSON-serialisable: {e}") from None
  with paths.atomic_dir(path) as tmp:
    paths.write_bytes(
      tmp / SFT_WEIGHTS, save(tensors, metadata={"format": FORMAT})
    )
    paths.write_text(tmp / SFT_META, text)
  log.info("wrote SFT (%d diff entries) to %s", sft.nnz, path)


def load_sft(
  path: str, config: Any = None, keep_ids: np.ndarray | None = None
) -> SFT:
  """Reads an SFT dir of ours, or a composable-sft `pytorch_diff.bin`.

  Args:
    path: our SFT dir; or a dir holding `pytorch_diff.bin`, or that file.
    config: ModelConfig of the model the SFT will be applied to; required
      for composable-sft files (maps PyTorch names to our paths).
    keep_ids: composable-sft only: [new_vocab] old id of each new id, for a
      language SFT made on the untrimmed model; vocabulary rows outside it
      are dropped and the rest renumbered.

  Raises:
    BistilError: missing or corrupt files, unknown names, bad indices.
  """
  p = paths.path(path)
  if p.is_file():
    if p.name == COMPOSABLE_FILE:
      return _load_composable(path, config, keep_ids)
    if p.name in (SFT_WEIGHTS, SFT_META):
      p = p.parent
      path = os.fspath(p)
    else:
      raise BistilError(
        f"{path} is not an SFT: expected a dir with {SFT_WEIGHTS} or a "
        f"{COMPOSABLE_FILE} file"
      )
  if not p.is_dir():
    raise BistilError(f"SFT path {path} does not exist")
  if (p / SFT_WEIGHTS).is_file():
    if keep_ids is not None:
      raise BistilError("keep_ids applies to composable-sft files only")
    return _load_ours(path)
  if (p / COMPOSABLE_FILE).is_file():
    return _load_composable(os.fspath(p / COMPOSABLE_FILE), config, keep_ids)
  raise BistilError(
    f"no SFT in {path}: expected {SFT_WEIGHTS} or {COMPOSABLE_FILE}"
  )


def _load_ours(path: str) -> SFT:
  from bistil_jax.checkpoint.hf import _read_json, _read_safetensors

  meta = _read_json(paths.path(path) / SFT_META)
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise BistilError(f"{path}/{SFT_META} is not a {FORMAT} sidecar")
  if meta.get("version", 0) > FORMAT_VERSION:
    raise BistilError(
      f"{path} has SFT format version {meta['version']}; this code reads "
      f"<= {FORMAT_VERSION}"
    )
  tensors = _read_safetensors(paths.path(path) / SFT_WEIGHTS)
  parts: dict[str, dict[str, np.ndarray]] = {}
  for key, x in tensors.items():
    stem, _, suffix = key.rpartition(".")
    if not stem or suffix not in ("idx", "val", "dense"):
      raise BistilError(f"{path}: unexpected tensor {key!r} in {SFT_WEIGHTS}")
    parts.setdefault(stem, {})[suffix] = x
  diffs, dense = {}, {}
  for stem, p in sorted(parts.items()):
    if "dense" in p:
      if len(p) > 1:
        raise BistilError(f"{path}: {stem} is both dense and sparse")
      dense[stem] = p["dense"]
      continue
    if set(p) != {"idx", "val"}:
      raise BistilError(f"{path}: {stem} lacks its .idx or .val tensor")
    if p["idx"].dtype != np.int64:
      raise BistilError(f"{path}: {stem}.idx has dtype {p['idx'].dtype}")
    _check_diff(stem, p["idx"], p["val"])
    diffs[stem] = (p["idx"], p["val"])
  return SFT(diffs=diffs, dense=dense, meta=meta)


# ---------------------------------------------------------- composable-sft
def _torch_load(file: str) -> Any:
  """torch.load with weights_only and the numpy types composable-sft uses.

  Its encoder stores the first index step as a numpy int64 scalar, which a
  plain weights_only load refuses; nothing else is allowed.
  """
  try:
    import torch
  except ImportError:
    raise BistilError(
      f"reading {file} needs torch: pip install 'bistil_jax[torch]'"
    ) from None
  try:
    from numpy._core import multiarray
  except ImportError:  # numpy < 2
    from numpy.core import multiarray
  allowed = [
    (multiarray.scalar, "numpy.core.multiarray.scalar"),
    (multiarray.scalar, "numpy._core.multiarray.scalar"),
    np.dtype,
  ] + [type(np.dtype(t)) for t in (np.int64, np.int32, np.float32)]
  try:
    with torch.serialization.safe_globals(allowed):
      return torch.load(file, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    if "unsupported global" in str(e).lower():
      # torch's text advises weights_only=False, which would run the
      # file's code: never pass that on.
      raise BistilError(
        f"{file} holds Python objects other than tensors and numbers; it is "
        "refused for safety (loading it could run code). Ask its author for "
        "a plain composable-sft diff"
      ) from None
    raise BistilError(
      f"corrupt or unreadable {file} (not a torch file)"
    ) from None
  except Exception as e:  # torch raises many types for bad files
    first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    raise BistilError(f"corrupt or unreadable {file}: {first}") from None


def _np(x: Any) -> np.ndarray:
  """numpy view of a torch tensor / list / array (bf16 -> float32)."""
  if hasattr(x, "detach"):
    x = x.detach().cpu()
    if not x.dtype.is_floating_point or x.dtype.itemsize >= 4:
      return x.numpy()
    return x.float().numpy()
  return np.asarray(x)


def _decode(name: str, enc: Any) -> tuple[np.ndarray, np.ndarray, tuple]:
  """composable-sft sparse encoding -> (flat idx, values, torch shape).

  NOTE: composable-sft / bistil flatten COLUMN-major (first axis fastest):
  flat = Σ_d coord_d · Π_{e<d} size_e (its `encode_tensor`). Returned flat
  indices are in that order, sorted. Dense tensors give their nonzeros.
  """
  if not isinstance(enc, dict):
    x = _np(enc)
    flat = np.flatnonzero(x.reshape(-1, order="F"))
    return flat, x.reshape(-1, order="F")[flat], x.shape
  try:
    size = tuple(int(s) for s in enc["size"])
    values = _np(enc["values"]).astype(np.float32).reshape(-1)
    if "index_steps" in enc:
      steps = np.asarray([int(s) for s in enc["index_steps"]], np.int64)
      flat = np.cumsum(steps)
    else:  # oldest format: COO coordinates, [ndim, nnz]
      coords = np.asarray(_np(enc["indices"]), np.int64).reshape(len(size), -1)
      flat = np.ravel_multi_index(tuple(coords), size, order="F")
      order = np.argsort(flat, kind="stable")
      flat, values = flat[order], values[order]
  except (KeyError, TypeError, ValueError) as e:
    raise BistilError(f"composable-sft diff {name}: malformed ({e})") from None
  if flat.shape != values.shape:
    raise BistilError(
      f"composable-sft diff {name}: {flat.size} indices for {values.size} "
      "values"
    )
  if flat.size and (
    flat[0] < 0 or flat[-1] >= math.prod(size) or np.any(np.diff(flat) <= 0)
  ):
    raise BistilError(
      f"composable-sft diff {name}: indices out of range for size {size} or "
      "not strictly increasing"
    )
  return flat, values, size


def _torch_shape(our_shape, transpose: bool, vocab_axis, vocab_rows):
  """Expected PyTorch shape, vocab axis (torch coords) sized `vocab_rows`."""
  shape = list(reversed(our_shape) if transpose else our_shape)
  t_axis = None
  if vocab_axis is not None:
    t_axis = len(shape) - 1 - vocab_axis if transpose else vocab_axis
    shape[t_axis] = vocab_rows
  return tuple(shape), t_axis


def _load_composable(file: str, config: Any, keep_ids: Any) -> SFT:
  import flax.linen as nn

  from bistil_jax.checkpoint.hf import torch_name_to_ours
  from bistil_jax.model.encoder import abstract_params

  if config is None:
    raise BistilError(
      f"reading composable-sft file {file} needs the model config (to map "
      "PyTorch names)"
    )
  inverse = None
  if keep_ids is not None:
    keep_ids = np.asarray(keep_ids)
    if (
      keep_ids.ndim != 1
      or not np.issubdtype(keep_ids.dtype, np.integer)
      or (keep_ids.size and keep_ids.min() < 0)
      or np.unique(keep_ids).size != keep_ids.size
    ):
      raise BistilError("keep_ids must be a 1-d array of distinct ids >= 0")
    if keep_ids.size != config.vocab_size:
      raise BistilError(
        f"keep_ids has {keep_ids.size} ids but the model vocab_size is "
        f"{config.vocab_size}"
      )
    inverse = np.full(int(keep_ids.max()) + 1, -1, np.int64)
    inverse[keep_ids] = np.arange(keep_ids.size)

  with paths.local_copy(file) as local:  # torch wants a local file
    raw = _torch_load(local)
  if not isinstance(raw, dict):
    raise BistilError(f"{file}: expected a dict, got {type(raw).__name__}")
  if "diffs" in raw or "abs" in raw:
    diffs_raw, abs_raw = raw.get("diffs") or {}, raw.get("abs") or {}
    if raw.get("block_sparses"):
      raise BistilError(f"{file}: block-sparse SFTs are not supported")
  elif "body" in raw:  # older composable-sft: body diffs + dense head
    diffs_raw, abs_raw = raw["body"] or {}, raw.get("head") or {}
  else:  # oldest: name -> COO diff
    diffs_raw, abs_raw = raw, {}

  shapes = {
    "/".join(k): tuple(v.shape)
    for k, v in _flat_dict(nn.unbox(abstract_params(config))).items()
  }

  def target(name):
    hit = torch_name_to_ours(name, config)
    return hit if hit is not None and hit[0] in shapes else None

  diffs = {}
  for name, enc in diffs_raw.items():
    hit = target(name)
    if hit is None:
      raise BistilError(
        f"{file}: diff {name!r} names no parameter of {config.architecture}"
      )
    ours, transpose, vocab_axis = hit
    if ours in diffs:
      raise BistilError(f"{file}: two diffs map to {ours} ({name!r})")
    our_shape = shapes[ours]
    flat_f, values, size = _decode(name, enc)
    rows = config.vocab_size
    if vocab_axis is not None and inverse is not None:
      _, t_axis = _torch_shape(our_shape, transpose, vocab_axis, 0)
      rows = size[t_axis] if len(size) == len(our_shape) else -1
      if rows < inverse.size:
        raise BistilError(
          f"{file}: diff {name!r} has {rows} vocabulary rows but keep_ids "
          f"refers to id {inverse.size - 1}"
        )
    want, _ = _torch_shape(our_shape, transpose, vocab_axis, rows)
    if size != want:
      raise BistilError(
        f"{file}: diff {name!r} has shape {size}, {ours} needs {want}"
      )
    coords = list(np.unravel_index(flat_f, size, order="F"))
    if transpose:
      coords = coords[::-1]
    if vocab_axis is not None and inverse is not None:
      old_to_new = np.full(rows, -1, np.int64)
      old_to_new[: inverse.size] = inverse
      new = old_to_new[coords[vocab_axis]]
      keep = new >= 0
      coords = [c[keep] for c in coords]
      coords[vocab_axis] = new[keep]
      values = values[keep]
    idx = np.ravel_multi_index(tuple(coords), our_shape).astype(np.int64)
    order = np.argsort(idx, kind="stable")
    diffs[ours] = (idx[order], values[order].astype(np.float32))

  dense = {}
  for name, value in abs_raw.items():
    hit = target(name)
    if hit is None:
      if name.split(".", 1)[-1].startswith(_MLM_HEAD_NAMES) or name.startswith(
        _MLM_HEAD_NAMES
      ):
        log.info(
          "skipping MLM-head abs %s: not a parameter of %s",
          name,
          config.architecture,
        )
        continue
      raise BistilError(
        f"{file}: abs {name!r} names no parameter of {config.architecture}"
      )
    ours, transpose, vocab_axis = hit
    if isinstance(value, dict):  # a sparse-encoded abs: densify
      flat_f, vals, size = _decode(name, value)
      x = np.zeros(math.prod(size), np.float32)
      x[flat_f] = vals
      x = x.reshape(size, order="F")
    else:
      x = _np(value).astype(np.float32)
    if transpose:
      x = x.T
    if vocab_axis is not None:
      if inverse is not None:
        if x.ndim <= vocab_axis or x.shape[vocab_axis] < inverse.size:
          raise BistilError(
            f"{file}: abs {name!r} has shape {x.shape}, too few vocabulary "
            "rows for keep_ids"
          )
        x = np.take(x, keep_ids, axis=vocab_axis)
      if x.ndim > vocab_axis and x.shape[vocab_axis] == config.vocab_size:
        pad = [(0, 0)] * x.ndim
        pad[vocab_axis] = (0, config.padded_vocab_size - config.vocab_size)
        x = np.pad(x, pad)
    if x.shape != shapes[ours]:
      raise BistilError(
        f"{file}: abs {name!r} has shape {x.shape} (ours), {ours} needs "
        f"{shapes[ours]}"
      )
    dense[ours] = x
  meta = {
    "format": FORMAT,
    "version": FORMAT_VERSION,
    "kind": "composable-sft",
    "source": os.fspath(paths.path(file).resolve()),
    "base_fingerprint": None,
    "vocab_size": config.vocab_size,
    "nnz": sum(int(i.size) for i, _ in diffs.values()),
    "head": config.head if dense else None,
    "trimmed_vocab": keep_ids is not None,
  }
  log.info(
    "read composable-sft %s: %d diffs (%d entries), %d dense",
    file,
    len(diffs),
    meta["nnz"],
    len(dense),
  )
  return SFT(diffs=diffs, dense=dense, meta=meta)


def _flat_dict(tree) -> dict[tuple[str, ...], Any]:
  from flax.traverse_util import flatten_dict

  return flatten_dict(tree)


# --------------------------------------------------------- apply / compose
def _like(new: np.ndarray, old: Any) -> Any:
  """`new` placed like `old` (same sharding if `old` is a jax array)."""
  if isinstance(old, jax.Array):
    return jax.device_put(new, old.sharding)
  return new


def apply_sft(
  params: Any,
  sft: SFT,
  *,
  check_fingerprint: bool = True,
  with_dense: bool = True,
) -> Any:
  """θ + Δ for every diff; dense tensors replace their parameters.

  Works on the host: each touched leaf is fetched (must be fully
  addressable), updated as `flat[idx] += values` in float32 and put back
  with its sharding. Untouched leaves are shared with `params`.

  Args:
    params: the base params.
    sft: the SFT.
    check_fingerprint: compare the body with `sft.meta["base_fingerprint"]`
      (skipped when the SFT has none, e.g. composable-sft files).
    with_dense: also set the dense (head) tensors. Language SFTs are applied
      with_dense=False (their dense tensors are the MLM head, §4.6).

  Returns:
    A new params tree.

  Raises:
    BistilError: base-model mismatch, unknown paths, bad indices or shapes.
  """
  if check_fingerprint:
    want = sft.meta.get("base_fingerprint")
    if want:
      dense_body = {_top(p) for p in sft.dense if not is_head(p)}
      got = params_fingerprint(
        params, vocab_size=sft.meta.get("vocab_size"), exclude=dense_body
      )
      if got != want:
        raise BistilError(
          f"SFT was made for base model {want[:23]}, this model is {got[:23]}"
        )
    else:
      log.info("SFT has no base fingerprint; base model not checked")
  paths, leaves, treedef = _flatten(params)
  where = {p: i for i, p in enumerate(paths)}
  names = set(sft.diffs) | (set(sft.dense) if with_dense else set())
  unknown = sorted(names - set(where))
  if unknown:
    raise BistilError(f"SFT has tensors this model lacks: {unknown[:10]}")
  out = list(leaves)
  for path, (idx, val) in sft.diffs.items():
    i = where[path]
    host = _to_host(leaves[i])
    idx, val = np.asarray(idx), np.asarray(val)
    _check_diff(path, idx, val, size=host.size)
    work = np.float64 if host.dtype == np.float64 else np.float32
    flat = host.reshape(-1).astype(work)
    flat[idx] += val.astype(work)  # indices are unique: no lost updates
    out[i] = _like(flat.reshape(host.shape).astype(host.dtype), leaves[i])
  if with_dense:
    for path, x in sft.dense.items():
      i = where[path]
      want = _shape(leaves[i])
      if tuple(x.shape) != want:
        raise BistilError(
          f"SFT dense tensor {path} has shape {tuple(x.shape)}, the model "
          f"has {want}"
        )
      dtype = np.dtype(leaves[i].dtype)
      out[i] = _like(np.asarray(x).astype(dtype), leaves[i])
  return jax.tree.unflatten(treedef, out)


def compose(*sfts: SFT) -> SFT:
  """One SFT equivalent to applying `sfts` one after the other.

  Diffs are summed (union of indices); dense tensors come from the last SFT
  that has them. Applying the result equals applying the parts in order up
  to float rounding at indices several parts touch ((θ+a)+b vs θ+(a+b)).
  meta is merged (later wins); base_fingerprint is the first SFT's, since
  the composition is applied to the first one's base; meta["components"]
  lists each part's kind and fingerprint.
  """
  if not sfts:
    raise BistilError("compose needs at least one SFT")
  parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
  for s in sfts:
    for path, (idx, val) in s.diffs.items():
      parts.setdefault(path, []).append((np.asarray(idx), np.asarray(val)))
  diffs = {}
  for path, pieces in parts.items():
    if len(pieces) == 1:
      idx, val = pieces[0]
      diffs[path] = (idx.copy(), val.astype(np.float32))
      continue
    idx = np.concatenate([p[0] for p in pieces]).astype(np.int64)
    val = np.concatenate([p[1] for p in pieces]).astype(np.float32)
    uniq, inv = np.unique(idx, return_inverse=True)
    summed = np.zeros(uniq.size, np.float32)
    np.add.at(summed, inv, val)  # in part order
    diffs[path] = (uniq, summed)
  dense: dict[str, np.ndarray] = {}
  meta: dict[str, Any] = {}
  for s in sfts:
    dense.update(s.dense)
    meta.update(s.meta)
  meta["kind"] = "composed"
  meta["base_fingerprint"] = sfts[0].meta.get("base_fingerprint")
  meta["vocab_size"] = sfts[0].meta.get("vocab_size")
  meta["components"] = [
    {
      "kind": s.meta.get("kind"),
      "base_fingerprint": s.meta.get("base_fingerprint"),
    }
    for s in sfts
  ]
  meta["nnz"] = sum(int(i.size) for i, _ in diffs.values())
  return SFT(diffs=diffs, dense=dense, meta=meta)


def densify(sft: SFT, params_like: Any) -> Any:
  """The body diffs as a dense tree like `params_like` (zeros elsewhere).

  Dense (head) tensors are not included: they replace rather than add. Use
  it to build a teacher θ_base + Δ_lang on device (docs/method.md §4.6).

  Args:
    sft: the SFT.
    params_like: params or ShapeDtypeStructs (shapes and dtypes).

  Returns:
    A tree of numpy arrays in the params' dtypes.
  """
  paths, leaves, treedef = _flatten(params_like)
  unknown = sorted(set(sft.diffs) - set(paths))
  if unknown:
    raise BistilError(f"SFT has tensors this model lacks: {unknown[:10]}")
  out = []
  for path, x in zip(paths, leaves, strict=True):
    shape, dtype = _shape(x), np.dtype(x.dtype)
    z = np.zeros(math.prod(shape), dtype)
    if path in sft.diffs:
      idx, val = (np.asarray(a) for a in sft.diffs[path])
      _check_diff(path, idx, val, size=z.size)
      z[idx] = val.astype(dtype)
    out.append(z.reshape(shape))
  return jax.tree.unflatten(treedef, out)
