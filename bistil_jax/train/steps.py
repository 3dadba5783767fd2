"""The one training step and the phase-1 loss.

`train_step(state, frozen, batch, key, *, loss_fn, tx) -> (state, metrics)`
serves every phase; a phase supplies only its pure `loss_fn`. Metrics hold
sums plus denominators ("<term>/total", "<term>/count") so host-side
averaging is exact.

`distil_losses` is the phase-1 / MLM loss: frozen = {"params": the
batch-language's teacher in the compute dtype (None without a teacher),
"projections": per teacher hidden index [d_T, d_S] or None}; batch = the
leaves of data.pipeline.BilingualBatches: input_ids, attention_mask,
token_type_ids [b, l]; masked_lm_positions, masked_lm_ids,
masked_lm_weights [b, p] (needed by the kl/mlm terms).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from bistil_jax import losses, sparse
from bistil_jax.errors import BistilError
from bistil_jax.model.encoder import Model
from bistil_jax.model.layers import vocab_logits_mask
from bistil_jax.train.state import TrainState

DISTIL_TERMS = ("hidden", "attention", "kl", "mlm")


@dataclasses.dataclass(frozen=True)
class DistilLossConfig:
  """Weights of the phase-1 loss terms (docs/method.md 2.4, project decisions).

  Defaults follow the released code: hidden MSE + attention MSE, weight 1.
  """

  hidden: float = 1.0  # hidden-state MSE, student i <- teacher i*r
  attention: float = 1.0  # attention-prob MSE, student i <- teacher (i+1)r-1
  kl: float = 0.0  # KL on MLM logits at masked positions (teacher MLM head)
  mlm: float = 0.0  # student MLM cross-entropy on the gold tokens
  temperature: float = 2.0

  def __post_init__(self):
    for name in DISTIL_TERMS:
      if getattr(self, name) < 0:
        raise BistilError(f"loss weight {name} must be >= 0")
    if not any(getattr(self, n) > 0 for n in DISTIL_TERMS):
      raise BistilError("every distillation loss weight is 0")
    if self.temperature <= 0:
      raise BistilError("temperature must be positive")

  @property
  def needs_logits(self) -> bool:
    return self.kl > 0 or self.mlm > 0


def check_pair(student: Model, teacher: Model, cfg: DistilLossConfig) -> None:
  """Refuses teacher/student pairs the losses cannot compare."""
  s, t = student.config, teacher.config
  if s.vocab_size != t.vocab_size:
    raise BistilError(
      f"teacher vocab {t.vocab_size} != student vocab {s.vocab_size}"
    )
  losses.layer_maps(t.num_hidden_layers, s.num_hidden_layers)
  if cfg.needs_logits and (s.head != "mlm" or t.head != "mlm"):
    raise BistilError("kl/mlm loss terms need MLM heads on both models")
  if cfg.attention > 0 and s.num_attention_heads != t.num_attention_heads:
    raise BistilError("attention loss needs the same number of heads")


def distil_losses(
  params: Any,
  teacher: dict[str, Any],
  batch: dict[str, jax.Array],
  key: jax.Array,
  *,
  student_model: Model,
  teacher_model: Model | None,
  loss_cfg: DistilLossConfig,
) -> tuple[jax.Array, dict[str, losses.LossTerm]]:
  """Weighted phase-1 loss and its terms for one monolingual batch.

  With teacher_model None only the student MLM term is computed (MLM
  pre-training of a teacher or of a scratch baseline).
  """
  s_cfg = student_model.config
  if teacher_model is None:
    if loss_cfg.hidden or loss_cfg.attention or loss_cfg.kl:
      raise BistilError("without a teacher only the mlm loss term applies")
    t_layers = s_cfg.num_hidden_layers
  else:
    t_layers = teacher_model.config.num_hidden_layers
  pairs = losses.layer_maps(t_layers, s_cfg.num_hidden_layers)
  s_out, t_out = _distil_forward(
    params,
    teacher,
    batch,
    key,
    student_model=student_model,
    teacher_model=teacher_model,
    attn_pairs=pairs[1] if loss_cfg.attention > 0 else None,
    logits=loss_cfg.needs_logits,
  )
  terms = _distil_terms(s_out, t_out, teacher, batch, pairs, loss_cfg, s_cfg)
  total = sum(getattr(loss_cfg, name) * t.mean for name, t in terms.items())
  return total, terms


def apply_training(model: Model, params, input_ids, key, **kwargs):
  """The model's forward in training: dropout on, drawn from `key` (every
  phase's student runs through here)."""
  return model.apply(
    {"params": params},
    input_ids,
    deterministic=False,
    rngs={"dropout": key},
    **kwargs,
  )


def _distil_forward(
  params,
  teacher,
  batch,
  key,
  *,
  student_model: Model,
  teacher_model: Model | None,
  attn_pairs,
  logits: bool,
):
  """(student output, teacher output or None) for a distillation batch:
  logits at the masked positions only, attention probabilities only for
  the (student, teacher) layer pairs in `attn_pairs` (None: none)."""
  common = dict(
    attention_mask=batch["attention_mask"],
    token_type_ids=batch.get("token_type_ids"),
    logits_positions=batch["masked_lm_positions"] if logits else None,
  )
  # Attention probabilities only for the layers the loss compares; the
  # other teacher layers run fused attention (bert.SelfAttention).
  want_attn = attn_pairs is not None
  t_attn = tuple(t for _, t in attn_pairs) if want_attn else False
  s_attn = tuple(s for s, _ in attn_pairs) if want_attn else False
  t_out = None
  if teacher_model is not None:  # None: MLM pre-training, no teacher
    t_params = jax.lax.stop_gradient(teacher["params"])
    t_out = teacher_model.apply(
      {"params": t_params},
      batch["input_ids"],
      output_attentions=t_attn,
      **common,
    )
  s_out = apply_training(
    student_model,
    params,
    batch["input_ids"],
    key,
    output_attentions=s_attn,
    **common,
  )
  return s_out, t_out


def _distil_terms(s_out, t_out, teacher, batch, pairs, loss_cfg, s_cfg):
  """The unweighted loss terms with a positive weight in `loss_cfg`."""
  hidden_pairs, attn_pairs = pairs
  terms = {}
  real = batch["attention_mask"] > 0
  if loss_cfg.hidden > 0:
    terms["hidden"] = losses.hidden_mse_layers(
      s_out.hidden_states,
      t_out.hidden_states,
      hidden_pairs,
      mask=real,
      projections=teacher.get("projections"),
    )
  if loss_cfg.attention > 0:
    terms["attention"] = losses.attention_mse_layers(
      s_out.attentions, t_out.attentions, attn_pairs, key_mask=real
    )
  if loss_cfg.needs_logits:
    selected = batch["masked_lm_weights"] > 0  # [b, p]
    vocab_mask = vocab_logits_mask(s_cfg)
    if loss_cfg.kl > 0:
      terms["kl"] = losses.kl_divergence(
        s_out.logits,
        t_out.logits,
        loss_cfg.temperature,
        mask=selected,
        logits_mask=vocab_mask,
      )
    if loss_cfg.mlm > 0:
      gold = jnp.where(selected, batch["masked_lm_ids"], -100)  # [b, p]
      terms["mlm"] = losses.token_cross_entropy(
        s_out.logits, gold, logits_mask=vocab_mask
      )
  return terms


def train_step(
  state: TrainState,
  frozen: Any,
  batch: dict[str, jax.Array],
  key: jax.Array,
  *,
  loss_fn: Callable[..., tuple[jax.Array, dict[str, losses.LossTerm]]],
  tx: optax.GradientTransformation,
  lr_schedule: optax.Schedule | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update of every phase (STYLE.md 17): phases differ in `loss_fn`.

  Args:
    state: the student's TrainState; `state.mask` (a bool tree like the
      params, or None) restricts the update to its True entries (LT-SFT).
    frozen: arrays the loss reads but never trains (teachers, the LT-SFT
      origin, fixed projections); never differentiated, never donated.
    batch: the step's global arrays.
    key: the run's key; the step folds in `state.step` (STYLE.md 6).
    loss_fn: `(params, frozen, batch, key) -> (loss, {name: LossTerm})`,
      pure; bound with functools.partial before jit.
    tx: the optimiser.
    lr_schedule: training step -> learning rate, for the metrics
      (`state.lr_at_step(optim_cfg)` accounts for gradient accumulation).

  Returns:
    (new state, metrics as sums and denominators).
  """
  step_key = jax.random.fold_in(key, state.step)
  frozen = jax.lax.stop_gradient(frozen)
  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    state.params, frozen, batch, step_key
  )
  return apply_gradients(
    state,
    grads,
    tx=tx,
    loss=loss,
    terms=terms,
    attention_mask=batch["attention_mask"],
    lr_schedule=lr_schedule,
  )


def apply_gradients(
  state: TrainState,
  grads: Any,
  *,
  tx: optax.GradientTransformation,
  loss: jax.Array,
  terms: dict[str, losses.LossTerm],
  attention_mask: jax.Array,
  lr_schedule: optax.Schedule | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """The optimiser update and the step's metrics.

  `state.mask` (a bool tree like the params, or None) restricts training
  to its True entries (LT-SFT): gradients are zeroed outside it, so the
  clipping norm and Adam moments see trainable entries only, and the final
  update is gated after the optimiser, so decoupled weight decay cannot move
  frozen entries either (STYLE.md 9).
  """
  update_mask = state.mask
  if update_mask is not None:
    grads = sparse.gate(grads, update_mask)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  if update_mask is not None:
    updates = sparse.gate(updates, update_mask)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  metrics = {
    "loss": loss,
    "grad_norm": grad_norm,
    # 1.0 while the step's loss and gradients are finite (the NaN guard).
    "finite": (jnp.isfinite(loss) & jnp.isfinite(grad_norm)).astype(
      jnp.float32
    ),
  }
  for name, term in terms.items():
    metrics[f"{name}/total"] = term.total
    metrics[f"{name}/count"] = term.count
  metrics["tokens"] = jnp.sum(attention_mask, dtype=jnp.float32)
  if lr_schedule is not None:
    metrics["lr"] = lr_schedule(state.step)
  new_state = state.replace(
    step=state.step + 1, params=params, opt_state=opt_state
  )
  return new_state, metrics
