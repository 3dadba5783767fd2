"""Biaffine dependency parser head (docs/method.md 4.2, 4.3, 5.1).

`config.head = "biaffine_parser"`; its params live under the top-level key
`classifier`, so LT-SFT (sparse.HEAD_KEYS) trains and stores it densely, like
every task head. For BERT and XLM-R alike (it reads only the last hidden
state).

Scorers, on the first sub-word vector of each word (x) and every candidate
head position (y; [CLS]/<s> at position 0 stands for the root):

- arc(x, y) = [x; 1]^T W_arc y: biaffine with the bias on the dependent side
  only (a per-head prior), W_arc = [kernel [d, d]; bias [d]].
- rel(x, y)_r = [x; 1]^T W_r [y; 1]: biaffine with both biases,
  W_r = [[kernel[:, r, :], dep[:, r]], [head[:, r], bias[r]]].

All weights start at zero, as released: an untrained parser gives every
candidate the same score. Dropout (the classifier dropout, by default
`hidden_dropout_prob`) is applied to the encoder output, as released.

Output (EncoderOutput.logits) is the pair (arc [b, l, l], rel [b, l, R]):

- arc[b, i, j]: score of position j as the head of position i, over every
  position; padded keys hold MASK_VALUE (probability 0).
- rel[b, i, r]: relation scores of position i *at one head*: the `heads`
  given to the model (gold heads in training, docs/method.md 4.3), else the
  argmax head of arc (prediction). Computing rel at one head per dependent
  keeps memory at O(b l R d) instead of the O(b l^2 R) of all head
  candidates (at l = 256, R = 38 that is 2.5M floats per sentence).

NOTE (deviation, documented): the released parser represents a word by the
mean of its sub-word vectors and lists only words as candidates; here a word
is its first sub-word (the same positions the token tasks use) and every
non-padding position is a candidate head, so no word-pooling input is needed
and distillation compares distributions over the same positions for both
models.

Export: no transformers class holds this head, so an exported dir is the
encoder (BertModel / XLMRobertaModel) plus `parser_head.safetensors` beside
it, in the released Biaffine layout (PyTorch names, `n_out` first):

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

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bistil_jax.errors import BistilError
from bistil_jax.model import encoder
from bistil_jax.model.config import ModelConfig

HEAD = "biaffine_parser"
HEAD_FILE = "parser_head.safetensors"
ARC_KEY = "biaffine_arcs.weight"
REL_KEY = "biaffine_rels.weight"


def _zeros(config: ModelConfig, axes):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


class BiaffineParser(nn.Module):
  """Arc and relation scorers; see the module docstring."""

  config: ModelConfig

  @nn.compact
  def __call__(self, hidden, attention_mask, heads, deterministic):
    """hidden [b, l, d], attention_mask [b, l], heads [b, l] or None.

    Returns (arc [b, l, l] float32, rel [b, l, R] float32).
    """
    cfg = self.config
    d, r = cfg.hidden_size, cfg.num_labels
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

    def param(name, shape, axes):
      return self.param(name, _zeros(cfg, axes), shape, pdt).astype(dt)

    x = nn.Dropout(encoder._classifier_dropout(cfg))(
      hidden, deterministic=deterministic
    ).astype(dt)  # [b, l, d]
    arc_k = param("arc_kernel", (d, d), ("embed", "embed_out"))
    arc_b = param("arc_bias", (d,), ("embed_out",))
    rel_k = param("rel_kernel", (d, r, d), ("embed", "classes", "embed_out"))
    rel_dep = param("rel_dep", (d, r), ("embed", "classes"))
    rel_head = param("rel_head", (d, r), ("embed_out", "classes"))
    rel_b = param("rel_bias", (r,), ("classes",))

    # arc[b, i, j] = x_i W x_j + bias . x_j
    dep = jnp.einsum("bid,de->bie", x, arc_k) + arc_b  # [b, l, d]
    arc = jnp.einsum("bie,bje->bij", dep, x).astype(jnp.float32)  # [b, l, l]
    keys = attention_mask[:, None, :] > 0  # [b, 1, l]
    arc = jnp.where(keys, arc, encoder.MASK_VALUE)
    if heads is None:
      heads = jnp.argmax(arc, axis=-1)  # [b, l]
    heads = jnp.clip(heads, 0, x.shape[1] - 1).astype(jnp.int32)
    y = jnp.take_along_axis(x, heads[..., None], axis=1)  # [b, l, d]
    rel = (
      jnp.einsum("bid,dre,bie->bir", x, rel_k, y)
      + jnp.einsum("bid,dr->bir", x, rel_dep)
      + jnp.einsum("bie,er->bir", y, rel_head)
      + rel_b
    ).astype(jnp.float32)  # [b, l, R]
    return arc, rel


# ------------------------------------------------------------------ losses
def gold_heads(batch) -> jax.Array:
  """[b, l] gold head positions (0 off the words) for `Model(heads=...)`."""
  return jnp.maximum(batch["heads"], 0)


def gold_loss(logits, batch, words) -> Any:
  """CE(arc over candidate heads) + CE(rel at the gold head), over words.

  Args:
    logits: the model's (arc [b, l, l], rel [b, l, R]) with rel at the gold
      heads.
    batch: with "heads" [b, l] (-100 off the words) and "labels" [b, l]
      relation ids.
    words: [b, l] bool, the first sub-words to score.

  Returns:
    LossTerm(sum of both per-word CEs, number of words): its mean is
    mean arc CE + mean rel CE (docs/method.md 5.1).
  """
  from bistil_jax import losses  # noqa: PLC0415

  arc, rel = logits
  ignore = jnp.int32(-100)
  arc_t = losses.token_cross_entropy(
    arc, jnp.where(words, batch["heads"], ignore)
  )
  rel_t = losses.token_cross_entropy(
    rel, jnp.where(words, batch["labels"], ignore)
  )
  return losses.LossTerm(arc_t.total + rel_t.total, arc_t.count)


def soft_loss(student, teacher, temperature, words, key_mask) -> Any:
  """Phase 2: soft CE on the arc distribution + on the rel distribution at
  the gold head, summed (docs/method.md 4.3), over words.

  Args:
    student, teacher: (arc [b, l, l], rel [b, l, R]) logits, rel at the gold
      heads.
    temperature: T of the soft cross-entropy.
    words: [b, l] bool, the rows (dependents) to score.
    key_mask: [b, l] bool, the candidate heads (real tokens).

  Returns:
    LossTerm(sum of both soft CEs over words, number of words).
  """
  from bistil_jax import losses  # noqa: PLC0415

  arc = losses.soft_cross_entropy(
    student[0],
    teacher[0],
    temperature,
    mask=words,
    logits_mask=key_mask[:, None, :],
  )
  rel = losses.soft_cross_entropy(
    student[1], teacher[1], temperature, mask=words
  )
  return losses.LossTerm(arc.total + rel.total, arc.count)


def predict(logits) -> jax.Array:
  """[b, l, 2]: greedy argmax head position (no MST, as released) and the
  argmax relation at it (the model computed rel at the argmax heads)."""
  arc, rel = logits
  return jnp.stack([jnp.argmax(arc, -1), jnp.argmax(rel, -1)], -1)


# ------------------------------------------------------------------ export
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

  from bistil_jax import paths

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
