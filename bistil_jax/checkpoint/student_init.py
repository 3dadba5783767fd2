"""Phase-1 student construction from a (trimmed) teacher (docs/method.md 2.2,
2.3).

- `student_config`: teacher config with L/r layers, optionally width/h,
  dropout 0, same number of heads; the teacher's dropout is kept for the
  exported config.json (`ModelConfig.export_dropout`).
- `layer_map`: student layer i <- teacher layer (i+1)*r - 1 (0-based), the
  last teacher layer of each block of r; the same pairing the attention loss
  uses.
- `init_student` with strategy
  * "teacher_layers": embeddings, mapped layers (and DeBERTa's relative
    table), pooler and MLM head copied from the teacher (DistilBERT
    practice; needs the same width);
  * "svd_embeddings": the released code: random layers, word embeddings :=
    first d left-singular vectors of the teacher's word embeddings;
  * "random": HF-style random init everywhere.
- `hidden_projections`: fixed per-layer projections of teacher states onto
  the student width (first d right-singular vectors of sampled states).
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np

from bistil_jax.errors import BistilError
from bistil_jax.model.config import ModelConfig
from bistil_jax.model.encoder import init_params

log = logging.getLogger(__name__)

STRATEGIES = ("teacher_layers", "svd_embeddings", "random")


def student_config(
  teacher: ModelConfig,
  layer_reduction: int = 2,
  hidden_reduction: int = 1,
  **overrides: Any,
) -> ModelConfig:
  """The student architecture derived from the teacher's.

  Args:
    teacher: teacher config.
    layer_reduction: r; the student has L_T / r layers (r must divide L_T).
    hidden_reduction: h; hidden and intermediate sizes are divided by h.
    **overrides: further ModelConfig fields (e.g. head, dtype).

  Raises:
    BistilError: r or h does not divide the sizes, or heads do not fit.
  """
  layers, hidden = teacher.num_hidden_layers, teacher.hidden_size
  if layer_reduction < 1 or layers % layer_reduction:
    raise BistilError(
      f"layer reduction {layer_reduction} does not divide the teacher's "
      f"{layers} layers"
    )
  if hidden_reduction < 1 or hidden % hidden_reduction:
    raise BistilError(
      f"hidden reduction {hidden_reduction} does not divide hidden size {hidden}"
    )
  width = hidden // hidden_reduction
  if width % teacher.num_attention_heads:
    raise BistilError(
      f"student width {width} is not a multiple of the "
      f"{teacher.num_attention_heads} attention heads"
    )
  kw = dict(
    num_hidden_layers=layers // layer_reduction,
    hidden_size=width,
    intermediate_size=teacher.intermediate_size // hidden_reduction,
    # Trained without dropout, as released (docs/method.md 2.2); exported
    # with the teacher's rates, for whoever fine-tunes the student later.
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    export_dropout=teacher.stated_dropout,
  )
  kw.update(overrides)
  return teacher.replace(**kw)


def layer_map(num_teacher_layers: int, num_student_layers: int) -> list[int]:
  """Teacher layer (0-based) that initialises each student layer."""
  if num_student_layers < 1 or num_teacher_layers % num_student_layers:
    raise BistilError(
      f"{num_student_layers} student layers do not divide "
      f"{num_teacher_layers} teacher layers"
    )
  r = num_teacher_layers // num_student_layers
  return [(i + 1) * r - 1 for i in range(num_student_layers)]


def svd_embeddings(word_embeddings: np.ndarray, width: int) -> np.ndarray:
  """First `width` left-singular vectors of E [V, D] (thin SVD), [V, width].

  The released code uses a full SVD (U is V x V: tens of GB for mBERT); the
  thin SVD gives the same leading columns.
  """
  e = np.asarray(word_embeddings, np.float64)
  if width > min(e.shape):
    raise BistilError(
      f"cannot take {width} singular vectors of a {e.shape} matrix"
    )
  u, _, _ = np.linalg.svd(e, full_matrices=False)
  return u[:, :width].astype(np.float32)


def _copy(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def init_student(
  teacher_params: dict[str, Any],
  teacher: ModelConfig,
  student: ModelConfig,
  strategy: str,
  rng: jax.Array,
) -> dict[str, Any]:
  """Student parameters for one of STRATEGIES (see module docstring).

  Args:
    teacher_params: the teacher's params (our tree).
    teacher: teacher config.
    student: student config (from `student_config`).
    strategy: "teacher_layers", "svd_embeddings" or "random".
    rng: key for the random parts.

  Returns:
    Nested dict of numpy arrays in the student's param dtype.

  Raises:
    BistilError: unknown strategy, vocab mismatch, or teacher_layers with a
      different width.
  """
  if strategy not in STRATEGIES:
    raise BistilError(f"unknown student init {strategy!r}; use {STRATEGIES}")
  if student.vocab_size != teacher.vocab_size:
    raise BistilError(
      f"student vocab {student.vocab_size} != teacher vocab "
      f"{teacher.vocab_size}; trim the teacher first"
    )
  params = jax.tree.map(np.asarray, init_params(student, rng))
  if strategy == "random":
    log.info("student init: random (%d layers)", student.num_hidden_layers)
    return params
  emb = np.asarray(teacher_params["embeddings"]["word_embeddings"]["embedding"])
  if strategy == "svd_embeddings":
    table = np.zeros_like(params["embeddings"]["word_embeddings"]["embedding"])
    v = student.vocab_size
    table[:v] = svd_embeddings(emb[:v], student.hidden_size)
    params["embeddings"]["word_embeddings"]["embedding"] = table
    log.info("student init: SVD word embeddings, random layers")
    return params
  if student.hidden_size != teacher.hidden_size:
    raise BistilError(
      "teacher_layers init needs the teacher's width "
      f"({teacher.hidden_size}), student has {student.hidden_size}; use "
      "svd_embeddings"
    )
  mapping = layer_map(teacher.num_hidden_layers, student.num_hidden_layers)
  params["embeddings"] = _copy(teacher_params["embeddings"])
  layers = teacher_params["encoder"]["layer"]
  # What the encoder holds beside its layers (DeBERTa's relative table and
  # its LayerNorm, which every layer reads) comes from the teacher too.
  params["encoder"] = {
    k: _copy(v) for k, v in teacher_params["encoder"].items() if k != "layer"
  }
  params["encoder"]["layer"] = {
    str(i): _copy(layers[str(t)]) for i, t in enumerate(mapping)
  }
  for group in ("pooler", "lm_head"):
    if group in params and group in teacher_params:
      params[group] = _copy(teacher_params[group])
  log.info(
    "student init: teacher layers, student<-teacher %s",
    ", ".join(f"{i}<-{t}" for i, t in enumerate(mapping)),
  )
  return params


def hidden_projections(
  teacher_states: list[np.ndarray], width: int
) -> list[np.ndarray]:
  """Fixed projections P_l [D_T, width] of teacher states (docs/method.md 2.3).

  Args:
    teacher_states: per hidden-state index l, a matrix [N, D_T] of sampled
      teacher vectors (one random real position per sequence).
    width: the student width d.

  Returns:
    Per l, the first `width` right-singular vectors of the (uncentred)
    sample matrix, as columns; project with h_T @ P_l.
  """
  out = []
  for h in teacher_states:
    h = np.asarray(h, np.float64)
    if h.shape[0] < width:
      raise BistilError(
        f"{h.shape[0]} sampled states cannot span a {width}-dim projection; "
        "sample more sequences"
      )
    _, _, vt = np.linalg.svd(h, full_matrices=False)
    out.append(vt[:width].T.astype(np.float32))
  return out
