"""SFT dirs: the sparse fine-tuning format, and applying and composing SFTs.

An SFT (docs/method.md §4.4) is a sparse diff of the body plus whole (dense)
head tensors. Its dir (DESIGN.md) holds `sft.safetensors` with `{path}.idx`
(int64 sorted row-major flat indices) and `{path}.val` for each sparse diff
and `{path}.dense` for dense (head) tensors, plus `sft.json` (kind, density,
base fingerprint, label names, ...). composable-sft `pytorch_diff.bin` files
are readable too (`load_sft(path, config=...)`, through
`bistil_jax.checkpoint.composable`). Paths are the "/"-joined param paths of
`bistil_jax.sparse.flatten`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from safetensors.numpy import save

from bistil_jax import paths, sparse
from bistil_jax.checkpoint import composable, hf
from bistil_jax.errors import BistilError

log = logging.getLogger(__name__)

SFT_WEIGHTS = "sft.safetensors"
SFT_META = "sft.json"
FORMAT = "bistil-sft"
FORMAT_VERSION = 1


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
  names, leaves, _ = sparse.flatten(params)
  h = hashlib.sha256()
  for j in sorted(range(len(names)), key=lambda j: names[j]):
    path = names[j]
    if sparse.is_head(path) or _top(path) in exclude:
      continue
    a = sparse.to_host(leaves[j])
    if vocab_size is not None and sparse.is_word_embeddings(path):
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


def _body_diff(
  path: str,
  t: np.ndarray,
  b: np.ndarray,
  m: Any,
  tol: float,
  vocab_size: int | None,
) -> tuple[np.ndarray, np.ndarray, int]:
  """(flat indices, float32 Δ at them, body entries) of one body leaf.

  Keeps |Δ| > tol, on real vocabulary rows only (padding rows are not body
  entries either), inside the mask `m` when there is one.
  """
  if t.shape != b.shape:
    raise BistilError(f"{path}: trained {t.shape} vs base {b.shape}")
  delta = (t.astype(np.float32) - b.astype(np.float32)).reshape(-1)
  keep = np.abs(delta) > tol
  n = delta.size
  if vocab_size is not None and sparse.is_word_embeddings(path):
    rows = sparse.row_validity(path, t.shape, vocab_size)
    rows = np.broadcast_to(rows, t.shape).reshape(-1)
    if np.any(keep & ~rows):
      log.info("%s: dropping diffs on padded vocabulary rows", path)
    keep &= rows
    n = int(vocab_size * math.prod(t.shape[1:]))
  if m is not None:
    sel = sparse.to_host(sparse.compact(m))
    sel = np.broadcast_to(sel, t.shape).reshape(-1)
    leaked = int(np.count_nonzero(keep & ~sel))
    if leaked:
      log.warning(
        "%s: %d entries moved outside the mask; dropped", path, leaked
      )
    keep &= sel
  idx = np.flatnonzero(keep).astype(np.int64)
  return idx, delta[idx], n


def _config_meta(config: Any) -> dict[str, Any]:
  """The meta an SFT takes from its ModelConfig (head, labels, model type)."""
  out: dict[str, Any] = {"head": None, "num_labels": None, "label_names": None}
  if config is not None:
    out["model_type"] = config.model_type
    out["head"] = config.head
    if config.head.endswith("classification"):
      out["num_labels"] = config.num_labels
      out["label_names"] = list(config.label_names)
  return out


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
  t_paths, t_leaves, t_def = sparse.flatten(trained)
  _, b_leaves, b_def = sparse.flatten(base)
  if t_def != b_def:
    raise BistilError("trained and base params differ in structure")
  m_leaves = [None] * len(t_leaves)
  if mask is not None:
    _, m_leaves, m_def = sparse.flatten(mask)
    if m_def != t_def:
      raise BistilError("mask does not match the parameter tree")
  if vocab_size is None and config is not None:
    vocab_size = config.vocab_size
  diffs, dense = {}, {}
  body_entries = 0
  for path, t, b, m in zip(t_paths, t_leaves, b_leaves, m_leaves, strict=True):
    t = sparse.to_host(t)
    if sparse.is_head(path) or _top(path) in dense_keys:
      dense[path] = t.copy()
      continue
    idx, values, n = _body_diff(path, t, sparse.to_host(b), m, tol, vocab_size)
    body_entries += n
    if idx.size:
      diffs[path] = (idx, values)
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
    **_config_meta(config),
  }
  out_meta.update(meta or {})
  return SFT(diffs=diffs, dense=dense, meta=out_meta)


# ------------------------------------------------------------- SFT files
def save_sft(path: str, sft: SFT, overwrite: bool = False) -> None:
  """Writes an SFT dir: sft.safetensors + sft.json, atomically.

  The dir is written as a temp sibling and renamed into place; a non-empty
  existing dir is refused unless `overwrite`.
  """
  hf.check_out_dir(path, overwrite)
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
    if p.name == composable.COMPOSABLE_FILE:
      return _load_composable(path, config, keep_ids)
    if p.name in (SFT_WEIGHTS, SFT_META):
      p = p.parent
      path = os.fspath(p)
    else:
      raise BistilError(
        f"{path} is not an SFT: expected a dir with {SFT_WEIGHTS} or a "
        f"{composable.COMPOSABLE_FILE} file"
      )
  if not p.is_dir():
    raise BistilError(f"SFT path {path} does not exist")
  if (p / SFT_WEIGHTS).is_file():
    if keep_ids is not None:
      raise BistilError("keep_ids applies to composable-sft files only")
    return _load_ours(path)
  if (p / composable.COMPOSABLE_FILE).is_file():
    file = os.fspath(p / composable.COMPOSABLE_FILE)
    return _load_composable(file, config, keep_ids)
  raise BistilError(
    f"no SFT in {path}: expected {SFT_WEIGHTS} or {composable.COMPOSABLE_FILE}"
  )


def _load_composable(file: str, config: Any, keep_ids: Any) -> SFT:
  """A composable-sft file as an SFT of our format (meta marked so)."""
  diffs, dense, meta = composable.read_composable(file, config, keep_ids)
  meta = {"format": FORMAT, "version": FORMAT_VERSION, **meta}
  return SFT(diffs=diffs, dense=dense, meta=meta)


def _load_ours(path: str) -> SFT:
  meta = hf.read_json(paths.path(path) / SFT_META)
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise BistilError(f"{path}/{SFT_META} is not a {FORMAT} sidecar")
  if meta.get("version", 0) > FORMAT_VERSION:
    raise BistilError(
      f"{path} has SFT format version {meta['version']}; this code reads "
      f"<= {FORMAT_VERSION}"
    )
  tensors = hf.read_safetensors(paths.path(path) / SFT_WEIGHTS)
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
  base: Any = None,
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
    base: in a composition, the model before its first SFT. An SFT made
      for that model (a task SFT trained on the bare MMT, composed after a
      language SFT, as LT-SFT composes them) passes the check too.

  Returns:
    A new params tree.

  Raises:
    BistilError: base-model mismatch, unknown paths, bad indices or shapes.
  """
  if check_fingerprint:
    want = sft.meta.get("base_fingerprint")
    if want:
      dense_body = {_top(p) for p in sft.dense if not sparse.is_head(p)}

      def fingerprint(tree):
        return params_fingerprint(
          tree, vocab_size=sft.meta.get("vocab_size"), exclude=dense_body
        )

      got = fingerprint(params)
      if got != want and base is not None and fingerprint(base) == want:
        got = want
      if got != want:
        raise BistilError(
          f"SFT was made for base model {want[:23]}, this model is {got[:23]}"
        )
    else:
      log.info("SFT has no base fingerprint; base model not checked")
  names, leaves, treedef = sparse.flatten(params)
  where = {p: i for i, p in enumerate(names)}
  names = set(sft.diffs) | (set(sft.dense) if with_dense else set())
  unknown = sorted(names - set(where))
  if unknown:
    raise BistilError(f"SFT has tensors this model lacks: {unknown[:10]}")
  out = list(leaves)
  for path, (idx, val) in sft.diffs.items():
    i = where[path]
    host = sparse.to_host(leaves[i])
    idx, val = np.asarray(idx), np.asarray(val)
    _check_diff(path, idx, val, size=host.size)
    work = np.float64 if host.dtype == np.float64 else np.float32
    flat = host.reshape(-1).astype(work)
    flat[idx] += val.astype(work)  # indices are unique: no lost updates
    out[i] = _like(flat.reshape(host.shape).astype(host.dtype), leaves[i])
  if with_dense:
    for path, x in sft.dense.items():
      i = where[path]
      want = sparse.leaf_shape(leaves[i])
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
  names, leaves, treedef = sparse.flatten(params_like)
  unknown = sorted(set(sft.diffs) - set(names))
  if unknown:
    raise BistilError(f"SFT has tensors this model lacks: {unknown[:10]}")
  out = []
  for path, x in zip(names, leaves, strict=True):
    shape, dtype = sparse.leaf_shape(x), np.dtype(x.dtype)
    z = np.zeros(math.prod(shape), dtype)
    if path in sft.diffs:
      idx, val = (np.asarray(a) for a in sft.diffs[path])
      _check_diff(path, idx, val, size=z.size)
      z[idx] = val.astype(dtype)
    out.append(z.reshape(shape))
  return jax.tree.unflatten(treedef, out)
