"""Pieces every phase driver shares: mesh, sharded state, restore, jit.

A driver reads top-down (STYLE.md): mesh -> data -> models -> shard ->
step -> restore -> loop -> export. The helpers here keep each of those
sections a few lines long and identical across phases.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax

from bistil_jax import partitioning
from bistil_jax.checkpoint import manager as ckpt
from bistil_jax.errors import BistilError
from bistil_jax.model.config import ModelConfig
from bistil_jax.train import state as state_lib

log = logging.getLogger(__name__)


def build_mesh(shape: Sequence[int]) -> jax.sharding.Mesh:
  """The (data, fsdp, tensor) mesh over all devices."""
  mesh = partitioning.make_mesh(tuple(shape))
  log.info(
    "mesh %s over %d %s device(s), %d process(es)",
    dict(mesh.shape),
    mesh.size,
    jax.devices()[0].platform,
    jax.process_count(),
  )
  return mesh


def per_host_batch(global_batch: int, mesh: jax.sharding.Mesh) -> int:
  """The rows each host feeds; checks the global batch splits evenly."""
  hosts = jax.process_count()
  if global_batch < 1 or global_batch % hosts:
    raise BistilError(
      f"batch_size {global_batch} does not split over {hosts} host(s)"
    )
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % shards:
    raise BistilError(
      f"batch_size {global_batch} does not split over the {shards} batch "
      f"shards of mesh {dict(mesh.shape)}"
    )
  return global_batch // hosts


def optim_config(optim, num_steps: int) -> state_lib.OptimConfig:
  """OptimConfig from a config's `optim` block for a run of `num_steps`
  training steps (optimiser updates = steps / accumulate_steps; warmup is
  capped at that, for stages whose length comes from epochs)."""
  updates = max(num_steps // optim.accumulate_steps, 1)
  return state_lib.OptimConfig(
    learning_rate=optim.learning_rate,
    warmup_steps=min(optim.warmup_steps, updates),
    total_steps=updates,
    weight_decay=optim.weight_decay,
    clip_norm=optim.clip_norm or None,
    accumulate_steps=optim.accumulate_steps,
  )


def check_seq_len(config: ModelConfig, max_seq_len: int, what: str) -> None:
  """Rows longer than the position table would read garbage positions."""
  if max_seq_len > config.max_length:
    raise BistilError(
      f"data.max_seq_len {max_seq_len} exceeds the {what}'s "
      f"{config.max_length} positions (max_position_embeddings)"
    )


def cast(params: Any, dtype: str) -> Any:
  """Floating leaves to `dtype` (host numpy)."""
  dt = np.dtype(dtype) if dtype != "bfloat16" else jax.numpy.bfloat16
  return jax.tree.map(
    lambda x: (
      np.asarray(x).astype(dt)
      if np.issubdtype(np.asarray(x).dtype, np.floating)
      else x
    ),
    params,
  )


def shard_params(
  params: Any, config: ModelConfig, mesh: jax.sharding.Mesh
) -> tuple[Any, Any]:
  """Host params -> sharded device arrays, plus their shardings."""
  shardings = partitioning.param_shardings(config, mesh)
  return partitioning.shard(params, shardings), shardings


def init_state(
  params: Any,
  config: ModelConfig,
  tx: optax.GradientTransformation,
  mesh: jax.sharding.Mesh,
) -> tuple[state_lib.TrainState, Any]:
  """A sharded TrainState (optimiser state sharded like the params)."""
  sharded, _ = shard_params(params, config, mesh)
  with partitioning.activate(mesh):
    state = jax.jit(state_lib.create_state, static_argnums=1)(sharded, tx)
  return state, jax.tree.map(lambda x: x.sharding, state)


def make_checkpointer(directory: str, train) -> ckpt.Checkpointer:
  """The Checkpointer of a workdir (or stage dir) from a `train` block."""
  return ckpt.Checkpointer(
    directory,
    every=train.checkpoint_every,
    keep=train.keep_checkpoints,
    use_async=train.async_checkpoints,
  )


def restore_latest(
  checkpointer: ckpt.Checkpointer, state: Any, batches: Any
) -> tuple[Any, int]:
  """(state, step) from the newest checkpoint that restores, if any (a
  damaged newer step is moved aside with one warning); the batch iterator
  (anything with `restore(data_state)`) continues from the saved position."""
  found = checkpointer.restore_latest(ckpt.abstract_like(state))
  if found is None:
    return state, 0
  step, restored, data = found
  log.info("resuming from %s step %d", checkpointer.directory, step)
  batches.restore(data)
  return restored, step


def parameter_overview(params: Any, title: str) -> str:
  """A one-line size summary for the log."""
  leaves = jax.tree.leaves(params)
  n = sum(int(np.prod(x.shape)) for x in leaves)
  dtypes = sorted({str(x.dtype) for x in leaves})
  return f"{title}: {n / 1e6:.2f}M parameters in {len(leaves)} arrays {dtypes}"


def export_dir(workdir: str) -> str:
  return os.path.join(workdir, ckpt.EXPORT)
