"""Train state and optimiser construction shared by every phase."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from bistil_jax.errors import BistilError


@flax.struct.dataclass
class TrainState:
  """Everything a step updates; checkpointed whole.

  The model, optimiser and schedules are bound into the step function with
  functools.partial, so the state holds arrays only.
  """

  step: jax.Array  # int32 scalar
  params: Any
  opt_state: Any
  # LT-SFT: bool tree like `params` (True = trainable), or None (dense).
  # Checkpointed with the state, so a resumed sparse stage restores it.
  mask: Any = None


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup then linear decay to 0 (HF Trainer default).

  docs/method.md 2.6: lr 1e-4, no warmup, grad-clip 1.0, weight decay 0.
  """

  learning_rate: float = 1e-4
  warmup_steps: int = 0
  total_steps: int = 1000
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_norm: float | None = 1.0
  accumulate_steps: int = 1  # gradient accumulation (optax.MultiSteps)

  def __post_init__(self):
    if self.total_steps < 1:
      raise BistilError("total_steps must be >= 1")
    if not 0 <= self.warmup_steps <= self.total_steps:
      raise BistilError("warmup_steps must be within [0, total_steps]")
    if self.learning_rate <= 0:
      raise BistilError("learning_rate must be positive")
    if self.accumulate_steps < 1:
      raise BistilError("accumulate_steps must be >= 1")


def schedule(cfg: OptimConfig) -> optax.Schedule:
  """Learning rate per optimiser update."""
  decay = optax.linear_schedule(
    cfg.learning_rate, 0.0, max(cfg.total_steps - cfg.warmup_steps, 1)
  )
  if cfg.warmup_steps == 0:
    return decay
  warm = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
  return optax.join_schedules([warm, decay], [cfg.warmup_steps])


def lr_at_step(cfg: OptimConfig) -> optax.Schedule:
  """Learning rate per training step (micro-batch), for metrics.

  With gradient accumulation the optimiser updates once every
  `accumulate_steps` steps, so its schedule advances at that pace.
  """
  per_update = schedule(cfg)
  return lambda step: per_update(step // cfg.accumulate_steps)


def _decay_mask(params):
  """Weight decay on matrices only (not biases, LayerNorm or 1-d params)."""
  return jax.tree.map(lambda x: x.ndim > 1, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  parts = []
  if cfg.clip_norm:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(
    optax.adamw(
      schedule(cfg),
      b1=cfg.b1,
      b2=cfg.b2,
      eps=cfg.eps,
      weight_decay=cfg.weight_decay,
      mask=_decay_mask,
    )
  )
  tx = optax.chain(*parts)
  if cfg.accumulate_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.accumulate_steps)
  return tx


def create_state(
  params: Any, tx: optax.GradientTransformation, mask: Any = None
) -> TrainState:
  """A fresh state; jit it with out_shardings to build it sharded."""
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    mask=mask,
  )
