"""The LT-SFT schedule, written once for task and language SFTs
(docs/method.md 4.4-4.5).

  dense stage -> mask = global top-K |theta - theta0| over the eligible
  body -> reset to theta0 -> sparse stage (a fresh optimiser whose update
  the mask gates).

The sparse stage saves its mask in its checkpoints, so a resumed sparse
stage restores it from there and the dense stage is never re-run. The
phases (train/task.py, train/lang_sft.py) declare their Stages through one
factory and say how the selected mask is completed (which head or fresh
groups train whole); this module owns the order of the stages, their
names, seeds and step offsets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bistil_jax import sparse
from bistil_jax.errors import BistilError
from bistil_jax.train import driver
from bistil_jax.train import state as state_lib

log = logging.getLogger(__name__)

STAGES = ("dense", "sparse")  # the stage names, each with its checkpoints

# (name, mask or None, num_steps, step_offset, seed) -> the Stage to run.
StageFactory = Callable[[str, Any, int, int, int], driver.Stage]


def eligible_entries(config, cfg, params0, fresh: Sequence[str]) -> Any:
  """The body entries LT-SFT may select (bool tree, compact leaves);
  groups the base lacked (a fresh pooler) have no base values to select
  against and are trained densely instead."""
  s = config.sparse
  eligible = sparse.eligible_mask(
    params0,
    embeddings=s.embeddings,
    layer_norm=s.layer_norm,
    vocab_size=cfg.vocab_size,
  )
  for key in fresh:
    eligible[key] = jax.tree.map(
      lambda x: np.zeros(np.shape(x), bool), eligible[key]
    )
  return eligible


def trainable_count(config, eligible) -> tuple[int, int]:
  """(K, eligible entries): `sparse.num_entries`, or density x eligible.

  Raises:
    BistilError: a count larger than the eligible entries.
  """
  s = config.sparse
  n_eligible = sum(int(np.sum(x)) for x in jax.tree.leaves(eligible))
  k = s.num_entries or sparse.k_from_density(eligible, s.density)
  if k > n_eligible:
    raise BistilError(
      f"sparse.num_entries={k} exceeds the {n_eligible} eligible body entries"
    )
  return k, n_eligible


def select_mask(
  config, cfg, params0, trained, eligible, fresh: Sequence[str]
) -> Any:
  """The LT-SFT mask (host bools): global top-K |theta - theta0| over the
  eligible body; the head and the fresh groups are trainable whole."""
  k, n_eligible = trainable_count(config, eligible)
  delta = jax.tree.map(  # theta0 placed like the trained params
    lambda a, b: jnp.abs(a - jax.device_put(b, a.sharding)), trained, params0
  )
  body = driver.host_params(
    sparse.select_top_k(delta, eligible, k, vocab_size=cfg.vocab_size)
  )
  log.info(
    "LT-SFT: %d of %d eligible body entries trainable (density %.4f)",
    k,
    n_eligible,
    k / max(n_eligible, 1),
  )
  return {
    key: jax.tree.map(lambda x: np.ones(np.shape(x), bool), sub)
    if key in sparse.HEAD_KEYS or key in fresh
    else body[key]
    for key, sub in params0.items()
  }


def run(
  ctx: driver.Context,
  make_stage: StageFactory,
  params0: Any,
  *,
  dense_mask: Any,
  dense_steps: int,
  sparse_steps: int,
  select: Callable[[Any], Any],
  seed: int,
  label: str = "LT-SFT",
) -> state_lib.TrainState:
  """Runs the schedule (or resumes it) and returns the sparse stage's final
  device state (its `mask` is the selected one).

  Args:
    ctx: the run's driver Context.
    make_stage: builds a Stage from (name, mask, steps, offset, seed).
    params0: theta0 (host), the start of both stages.
    dense_mask: the dense stage's update mask (None: everything trains).
    dense_steps: steps of the dense stage.
    sparse_steps: steps of the sparse stage.
    select: the dense stage's trained (device) params -> host mask.
    seed: the dense stage's data seed; the sparse stage's is seed + 1.
    label: how the log names the phase.
  """
  dense = make_stage("dense", dense_mask, dense_steps, 0, seed)
  if driver.has_checkpoint(ctx, "sparse"):
    log.info(
      "%s: the sparse stage resumes; its mask is restored from its "
      "checkpoint (the dense stage is not re-run)",
      label,
    )
    # A placeholder of the right shapes: the restore replaces it.
    mask = jax.tree.map(lambda x: np.zeros(np.shape(x), bool), params0)
  else:
    trained = driver.run_stage(ctx, dense).params
    mask = select(trained)
    del trained
  return driver.run_stage(
    ctx, make_stage("sparse", mask, sparse_steps, dense.num_steps, seed + 1)
  )
