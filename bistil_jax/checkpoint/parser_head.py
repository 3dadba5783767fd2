"""The biaffine parser head's file: PyTorch layout in and out.

No transformers class holds the parser head (model/heads.py's
`BiaffineParser`), so an exported dir is the encoder (BertModel /
XLMRobertaModel) plus `parser_head.safetensors` beside it, in the released
Biaffine layout (PyTorch names, `n_out` first):

- `biaffine_arcs.weight` [1, d + 1, d]: rows 0..d-1 the kernel, row d the
  dependent-side bias;
- `biaffine_rels.weight` [R, d + 1, d + 1]: `[[kernel, dep], [head, bias]]`
  per relation;

with safetensors metadata `head` = "biaffine_parser" and `relations` = the
JSON list of relation names in id order (also in config.json's id2label).
`hf.load_hf` attaches it again when the file is present.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from bistil_jax import paths
from bistil_jax.errors import BistilError
from bistil_jax.model.config import ModelConfig

HEAD = "biaffine_parser"  # model/config.py HEADS: the head this file holds
HEAD_FILE = "parser_head.safetensors"
ARC_KEY = "biaffine_arcs.weight"
REL_KEY = "biaffine_rels.weight"


def _leaves(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  want = (
    "arc_kernel",
    "arc_bias",
    "rel_kernel",
    "rel_dep",
    "rel_head",
    "rel_bias",
  )
  head = params.get("classifier")
  if not isinstance(head, Mapping) or set(head) != set(want):
    got = sorted(head) if isinstance(head, Mapping) else head
    raise BistilError(f"parser head params must be {list(want)}, got {got}")
  return {k: np.asarray(jax.device_get(head[k]), np.float32) for k in want}


def head_to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Our `classifier` leaves -> the released Biaffine tensors."""
  p = _leaves(params)
  arc = np.concatenate([p["arc_kernel"], p["arc_bias"][None]], 0)[None]
  top = np.concatenate(
    [p["rel_kernel"].transpose(1, 0, 2), p["rel_dep"].T[:, :, None]], 2
  )  # [R, d, d + 1]
  bottom = np.concatenate([p["rel_head"].T, p["rel_bias"][:, None]], 1)
  rels = np.concatenate([top, bottom[:, None, :]], 1)  # [R, d + 1, d + 1]
  return {
    ARC_KEY: np.ascontiguousarray(arc),
    REL_KEY: np.ascontiguousarray(rels),
  }


def head_from_torch(
  state: Mapping[str, np.ndarray], hidden_size: int, num_labels: int, where
) -> dict[str, np.ndarray]:
  """The released Biaffine tensors -> our `classifier` leaves."""
  d, r = hidden_size, num_labels
  want = {ARC_KEY: (1, d + 1, d), REL_KEY: (r, d + 1, d + 1)}
  if set(state) != set(want):
    raise BistilError(
      f"{where}: expected tensors {sorted(want)}, got {sorted(state)}"
    )
  for k, shape in want.items():
    if tuple(state[k].shape) != shape:
      raise BistilError(
        f"{where}: {k} has shape {tuple(state[k].shape)}, the encoder "
        f"(hidden {d}) and {r} relations imply {shape}"
      )
  arc = np.asarray(state[ARC_KEY], np.float32)[0]
  rels = np.asarray(state[REL_KEY], np.float32)
  return {
    "arc_kernel": arc[:d],
    "arc_bias": arc[d],
    "rel_kernel": rels[:, :d, :d].transpose(1, 0, 2),
    "rel_dep": rels[:, :d, d].T,
    "rel_head": rels[:, d, :d].T,
    "rel_bias": rels[:, d, d],
  }


def split_for_export(
  config: ModelConfig, params: Mapping[str, Any]
) -> tuple[ModelConfig, dict[str, Any], bytes]:
  """(encoder config, encoder params, parser_head.safetensors bytes)."""
  from safetensors.numpy import save

  body = {k: v for k, v in params.items() if k != "classifier"}
  meta = {
    "format": "pt",
    "head": HEAD,
    "relations": json.dumps(list(config.label_names)),
  }
  data = save(head_to_torch(params), metadata=meta)
  return config.replace(head="none"), body, data


def attach_head(
  path, config: ModelConfig, params: dict[str, Any]
) -> tuple[ModelConfig, dict[str, Any]]:
  """Encoder config/params + the parser head file at `path`."""
  from safetensors import SafetensorError
  from safetensors.numpy import load

  try:
    raw = paths.path(path).read_bytes()
    state = load(raw)
    # The header: 8-byte little-endian length, then JSON with the metadata.
    size = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8 : 8 + size]).get("__metadata__") or {}
  except (SafetensorError, OSError, ValueError) as e:
    raise BistilError(f"corrupt or unreadable {path}: {e}") from None
  if meta.get("head") != HEAD:
    raise BistilError(f"{path}: metadata head is {meta.get('head')!r}")
  try:
    relations = tuple(json.loads(meta["relations"]))
  except (KeyError, ValueError, TypeError):
    raise BistilError(f"{path}: no relation names in its metadata") from None
  if not relations or not all(isinstance(x, str) for x in relations):
    raise BistilError(f"{path}: bad relation names {relations!r}")
  head = head_from_torch(state, config.hidden_size, len(relations), path)
  cfg = config.replace(head=HEAD, num_labels=len(relations), id2label=relations)
  dtype = np.dtype(config.param_dtype)
  out = dict(params)
  out["classifier"] = {k: v.astype(dtype) for k, v in head.items()}
  return cfg, out
