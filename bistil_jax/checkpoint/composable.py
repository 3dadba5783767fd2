"""composable-sft `pytorch_diff.bin` files, read into our SFT layout.

composable-sft (and the original bistil) save an SFT as a torch pickle of
sparse-encoded diffs and whole ("abs") tensors under PyTorch names. This
reads them with torch's weights-only loader, maps the names to our param
paths (`checkpoint.hf.torch_name_to_ours`), turns its column-major flat
indices into our row-major ones and, for a model with a trimmed vocabulary,
renumbers the vocabulary rows. `bistil_jax.checkpoint.sft.load_sft` calls it
for such files.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import numpy as np
from flax.traverse_util import flatten_dict

from bistil_jax import paths
from bistil_jax.checkpoint import hf
from bistil_jax.errors import BistilError
from bistil_jax.model.encoder import abstract_params

log = logging.getLogger(__name__)

COMPOSABLE_FILE = "pytorch_diff.bin"
# Names of MLM-head tensors in PyTorch checkpoints (composable-sft "abs").
_MLM_HEAD_NAMES = ("cls.predictions.", "lm_head.")
# param path -> (sorted row-major flat indices, float32 values), as an SFT.
Diffs = dict[str, tuple[np.ndarray, np.ndarray]]


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


def _inverse(keep_ids: Any, config: Any) -> tuple[np.ndarray, np.ndarray]:
  """(keep_ids, inverse): inverse[old id] = new id, -1 for dropped ids."""
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
  return keep_ids, inverse


def _read_parts(file: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(diffs, abs) of a composable-sft file, in any of its layouts."""
  with paths.local_copy(file) as local:  # torch wants a local file
    raw = _torch_load(local)
  if not isinstance(raw, dict):
    raise BistilError(f"{file}: expected a dict, got {type(raw).__name__}")
  if "diffs" in raw or "abs" in raw:
    if raw.get("block_sparses"):
      raise BistilError(f"{file}: block-sparse SFTs are not supported")
    return raw.get("diffs") or {}, raw.get("abs") or {}
  if "body" in raw:  # older composable-sft: body diffs + dense head
    return raw["body"] or {}, raw.get("head") or {}
  return raw, {}  # oldest: name -> COO diff


def _map_diff(
  file: str,
  name: str,
  enc: Any,
  hit: tuple[str, bool, int | None],
  our_shape: tuple[int, ...],
  config: Any,
  inverse: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
  """One encoded diff as (sorted row-major flat indices, float32 values)."""
  ours, transpose, vocab_axis = hit
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
  return idx[order], values[order].astype(np.float32)


def _map_abs(
  file: str,
  name: str,
  value: Any,
  hit: tuple[str, bool, int | None],
  our_shape: tuple[int, ...],
  config: Any,
  keep_ids: np.ndarray | None,
) -> np.ndarray:
  """One whole ("abs") tensor in our layout, vocab rows kept and padded."""
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
    if keep_ids is not None:
      if x.ndim <= vocab_axis or x.shape[vocab_axis] < keep_ids.max() + 1:
        raise BistilError(
          f"{file}: abs {name!r} has shape {x.shape}, too few vocabulary "
          "rows for keep_ids"
        )
      x = np.take(x, keep_ids, axis=vocab_axis)
    if x.ndim > vocab_axis and x.shape[vocab_axis] == config.vocab_size:
      pad = [(0, 0)] * x.ndim
      pad[vocab_axis] = (0, config.padded_vocab_size - config.vocab_size)
      x = np.pad(x, pad)
  if x.shape != our_shape:
    raise BistilError(
      f"{file}: abs {name!r} has shape {x.shape} (ours), {ours} needs "
      f"{our_shape}"
    )
  return x


def _is_mlm_head(name: str) -> bool:
  return name.split(".", 1)[-1].startswith(_MLM_HEAD_NAMES) or name.startswith(
    _MLM_HEAD_NAMES
  )


def _dense_tensors(
  file: str,
  abs_raw: dict[str, Any],
  target: Callable[[str], tuple[str, bool, int | None] | None],
  shapes: dict[str, tuple[int, ...]],
  config: Any,
  keep_ids: np.ndarray | None,
) -> dict[str, np.ndarray]:
  """The whole ("abs") tensors by our path; MLM-head ones are skipped."""
  dense = {}
  for name, value in abs_raw.items():
    hit = target(name)
    if hit is None:
      if _is_mlm_head(name):
        log.info(
          "skipping MLM-head abs %s: not a parameter of %s",
          name,
          config.architecture,
        )
        continue
      raise BistilError(
        f"{file}: abs {name!r} names no parameter of {config.architecture}"
      )
    dense[hit[0]] = _map_abs(
      file, name, value, hit, shapes[hit[0]], config, keep_ids
    )
  return dense


def read_composable(
  file: str, config: Any, keep_ids: Any
) -> tuple[Diffs, dict[str, np.ndarray], dict[str, Any]]:
  """Reads a composable-sft file as the parts of one of our SFTs.

  Args:
    file: the `pytorch_diff.bin` (local or remote).
    config: ModelConfig of the model it will be applied to (maps PyTorch
      names to our paths and gives the shapes).
    keep_ids: None, or [new_vocab] old id of each new id, for an SFT made on
      the untrimmed model: vocabulary rows outside it are dropped and the
      rest renumbered.

  Returns:
    (diffs, dense, meta) as `checkpoint.sft.SFT` holds them; meta says
    where it came from (kind "composable-sft", no base fingerprint).

  Raises:
    BistilError: no config, unsafe, corrupt or malformed files, names of no
      parameter, shapes that do not fit.
  """
  if config is None:
    raise BistilError(
      f"reading composable-sft file {file} needs the model config (to map "
      "PyTorch names)"
    )
  inverse = None
  if keep_ids is not None:
    keep_ids, inverse = _inverse(keep_ids, config)
  diffs_raw, abs_raw = _read_parts(file)
  shapes = {
    "/".join(k): tuple(v.shape)
    for k, v in flatten_dict(nn.unbox(abstract_params(config))).items()
  }

  def target(name):
    hit = hf.torch_name_to_ours(name, config)
    return hit if hit is not None and hit[0] in shapes else None

  diffs = {}
  for name, enc in diffs_raw.items():
    hit = target(name)
    if hit is None:
      raise BistilError(
        f"{file}: diff {name!r} names no parameter of {config.architecture}"
      )
    if hit[0] in diffs:
      raise BistilError(f"{file}: two diffs map to {hit[0]} ({name!r})")
    diffs[hit[0]] = _map_diff(
      file, name, enc, hit, shapes[hit[0]], config, inverse
    )
  dense = _dense_tensors(file, abs_raw, target, shapes, config, keep_ids)
  meta = {
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
  return diffs, dense, meta
