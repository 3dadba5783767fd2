"""The driver skeleton every phase runs (STYLE.md 17).

mesh -> data -> models -> state -> restore -> loop -> export. A phase module
(distil.py: phase 1 and MLM pre-training; task.py: task-tuning and phase 2)
declares its data, models, loss and export as one or more `Stage`s; this
module runs them, identically for every phase, on one host or many:

  with driver.start(config, workdir, phase, overwrite=...) as claim:
    ...                                 # the expensive loads, under the lock
    ctx = claim.open()                  # run.json: create, resume or refuse
    state = driver.run_stage(ctx, driver.Stage(...))  # restore + loop
    driver.host_params(state.params)                  # export
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from bistil_jax import configlib, partitioning, paths
from bistil_jax.checkpoint import manager as ckpt
from bistil_jax.data import pipeline
from bistil_jax.errors import BistilError
from bistil_jax.model.config import ModelConfig
from bistil_jax.model.encoder import abstract_params
from bistil_jax.train import loop, steps
from bistil_jax.train import state as state_lib

log = logging.getLogger(__name__)

# Config keys that may change when a run is resumed (cadence, not results).
RESUME_SAFE = (
  "train.log_every",
  "train.eval_every",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "train.async_checkpoints",
  "train.export",
  "eval",
  "data.prefetch",
)

# Hooks every stage's loop calls after each step (loop.StepHook): the
# extension point for what no command argument reaches, such as a
# profiler or the tests' fault and signal injection (tests/faults.py).
STEP_HOOKS: list[loop.StepHook] = []


# ---------------------------------------------------------------- context
@dataclasses.dataclass
class Context:
  """What every stage of one run shares."""

  config: ml_collections.ConfigDict
  workdir: str
  phase: str
  mesh: jax.sharding.Mesh
  rules: tuple[tuple[str, Any], ...]
  key: jax.Array  # the run's key (folded per step inside the step)

  def param_shardings(self, cfg: ModelConfig) -> Any:
    return partitioning.param_shardings(
      abstract_params(cfg), self.mesh, self.rules
    )

  def shard(self, params: Any, cfg: ModelConfig) -> Any:
    return partitioning.shard(params, self.param_shardings(cfg))

  @property
  def replicated(self) -> jax.sharding.NamedSharding:
    return partitioning.replicated(self.mesh)

  def activate(self):
    return partitioning.activate(self.mesh, self.rules)

  def to_global(self, batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Host batch -> global arrays (scalars such as the language tag are
    host-side routing information and stay behind)."""
    arrays = {k: v for k, v in batch.items() if np.ndim(v) > 0}
    return pipeline.to_global(arrays, self.mesh)


def build_mesh(mesh_cfg) -> tuple[jax.sharding.Mesh, tuple]:
  """The (data, fsdp, tensor) mesh and the axis rules (defaults updated by
  `mesh.rules`, pairs of (logical name, mesh axes))."""
  mesh = partitioning.make_mesh(tuple(mesh_cfg.shape))
  rules = partitioning.merge_rules(mesh_cfg.rules)
  log.info(
    "mesh %s over %d %s device(s), %d process(es)",
    dict(mesh.shape),
    mesh.size,
    jax.devices()[0].platform,
    jax.process_count(),
  )
  return mesh, rules


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


def _at_least(config, key: str, low, what: str = "") -> None:
  node = config
  for part in key.split("."):
    if part not in node:
      return  # a field of another phase's schema
    node = node[part]
  if node < low:
    raise BistilError(f"config.{key} must be >= {low}, got {node}{what}")


def check_config(config: ml_collections.ConfigDict) -> None:
  """The blocks every phase shares (train, optim, data, eval), checked with
  nothing touched: a bad value is refused before the workdir, its lock or
  any model or corpus exists, so the corrected command simply runs.

  Raises:
    BistilError: the first bad value, named with its key.
  """
  _at_least(config, "train.num_steps", 0, " (0 exports the initialisation)")
  _at_least(config, "train.epochs", 0)
  _at_least(config, "train.log_every", 1)
  _at_least(config, "train.eval_every", 0, " (0 evaluates at the end only)")
  _at_least(config, "train.checkpoint_every", 1)
  _at_least(config, "train.keep_checkpoints", 1)
  _at_least(config, "optim.warmup_steps", 0)
  _at_least(config, "optim.weight_decay", 0)
  _at_least(config, "optim.clip_norm", 0, " (0 disables clipping)")
  _at_least(config, "optim.accumulate_steps", 1)
  if config.optim.learning_rate <= 0:
    raise BistilError(
      f"config.optim.learning_rate must be > 0, got "
      f"{config.optim.learning_rate}"
    )
  _at_least(config, "data.batch_size", 1)
  _at_least(config, "data.max_seq_len", 2, " (a row holds [CLS] and [SEP])")
  _at_least(config, "data.prefetch", 0)
  _at_least(config, "data.max_lines", 0, " (0 reads every line)")
  _at_least(config, "data.shards", 0, " (0: one per host)")
  _at_least(config, "seed", 0)
  p = config.data.get("mlm_probability")
  if p is not None and not 0.0 <= p <= 1.0:
    raise BistilError(f"config.data.mlm_probability must be in [0, 1], got {p}")
  block = config.data.get("balance_block")
  if block is not None and (block < 2 or block % 2):
    raise BistilError(
      f"config.data.balance_block must be even and >= 2, got {block}"
    )
  _at_least(config, "eval.batches", 1)
  configlib.parse_named_list(config.eval.sets)  # duplicate names


@dataclasses.dataclass
class Claim:
  """A locked workdir whose run.json is not written yet (`start`)."""

  config: ml_collections.ConfigDict
  workdir: str
  phase: str
  mesh: tuple[jax.sharding.Mesh, tuple]
  overwrite: bool
  outputs: Sequence[str]

  def open(self) -> Context:
    """Creates, resumes or refuses the run in the workdir (run.json) and
    returns the run's Context. Call it once the inputs are loaded and
    checked, so a refused input leaves no run.json behind."""
    ckpt.prepare_workdir(
      self.workdir,
      self.phase,
      configlib.to_dict(self.config),
      overwrite=self.overwrite,
      resume_safe=RESUME_SAFE,
      recovery=ckpt.RECOVERY_KEYS,
      outputs=self.outputs,
    )
    mesh, rules = self.mesh
    key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), 2)
    return Context(self.config, self.workdir, self.phase, mesh, rules, key)


@contextlib.contextmanager
def start(
  config: ml_collections.ConfigDict,
  workdir: str,
  phase: str,
  *,
  overwrite: bool = False,
  outputs: Sequence[str] = (),
) -> Iterator[Claim]:
  """Checks the config, builds the mesh and holds the workdir lock
  (checkpoint/manager.py) for the body, which loads the run's inputs and
  then calls `claim.open()`.

  Order matters to a user: the config is checked first (nothing exists
  yet), then the lock is taken (a busy workdir is refused at once, not
  after minutes of loading a teacher), then the inputs are loaded and only
  then is run.json written (an input refused on the way leaves the workdir
  as it was, so the corrected command is not "another run"). A workdir
  of another run is refused right after the lock, before the loads.

  Args:
    config: the phase's config (phase-specific checks already done).
    workdir: the run's directory.
    phase: the phase name recorded in run.json.
    overwrite: replace another run in `workdir`.
    outputs: names the phase writes in the workdir besides the standard ones.
  """
  check_config(config)
  mesh = build_mesh(config.mesh)
  per_host_batch(config.data.batch_size, mesh[0])
  with ckpt.workdir_lock(workdir):  # one run per workdir
    # Another run's workdir is refused before the loads, too.
    ckpt.check_workdir(
      workdir,
      phase,
      configlib.to_dict(config),
      overwrite=overwrite,
      resume_safe=RESUME_SAFE,
      recovery=ckpt.RECOVERY_KEYS,
    )
    yield Claim(config, workdir, phase, mesh, overwrite, tuple(outputs))


# ----------------------------------------------------------------- stages
@dataclasses.dataclass
class Stage:
  """One run of the loop: what a phase declares.

  Attributes:
    name: "train" for one-stage phases (checkpoints in the workdir), else
      the stage name ("dense", "sparse": checkpoints in workdir/NAME); also
      the metric prefix.
    model_config: the trained model's config (shardings).
    params: its host params at step 0.
    loss_fn: (params, frozen, batch, key) -> (loss, {name: LossTerm}).
    batches: host batches with state() / restore(data_state).
    num_steps: steps of this stage (0: no training, e.g. an export of the
      initialisation).
    frozen: host batch -> the frozen device tree the loss reads for it (a
      language's teacher, the LT-SFT origin, projections).
    mask: host bool tree like params (LT-SFT), or None; saved in the state.
    eval_fn: state -> {name: value}, or None.
    step_offset: added to the step in metrics (the sparse stage follows the
      dense one on one axis).
    prefetch: host batches prepared ahead in a thread (0: none).
    batch_shape: (global rows, padded length) of the largest batch, for
      the memory estimate.
    eval_every: evaluation cadence in steps (None: `train.eval_every`).
    select_best: "SET/METRIC" of the eval_fn's keys ("dev/accuracy";
      "source+target/loss" sums the sets' values; a loss term is better
      lower, any other metric higher), or None: the stage returns the
      evaluated state that scored best (kept in workdir/.../best, so a
      resumed stage still knows it) instead of the last one, as the
      released NER/DP training reloads its best epoch and phase 1 its
      lowest held-out loss.
  """

  name: str
  model_config: ModelConfig
  params: Any
  loss_fn: Callable[..., Any]
  batches: Any
  num_steps: int
  frozen: Callable[[Mapping[str, Any]], Any] = lambda batch: None
  mask: Any = None
  eval_fn: Callable[[Any], Mapping[str, float]] | None = None
  step_offset: int = 0
  prefetch: int = 0
  batch_shape: tuple[int, int] = (0, 0)
  eval_every: int | None = None
  select_best: str | None = None


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


def init_state(
  ctx: Context, stage: Stage, tx: optax.GradientTransformation
) -> tuple[state_lib.TrainState, Any]:
  """The sharded TrainState of a stage (optimiser state and mask sharded
  like the params), built on the devices from sharded params."""
  p_sh = ctx.param_shardings(stage.model_config)
  params = partitioning.shard(stage.params, p_sh)
  mask = None if stage.mask is None else partitioning.shard(stage.mask, p_sh)
  with ctx.activate():
    state = jax.jit(state_lib.create_state, static_argnums=1)(params, tx, mask)
  return state, jax.tree.map(lambda x: x.sharding, state)


def stage_dir(ctx: Context, name: str) -> str:
  return ctx.workdir if name == "train" else str(paths.path(ctx.workdir) / name)


def run_stage(ctx: Context, stage: Stage) -> state_lib.TrainState:
  """Builds the state, restores the stage's latest checkpoint, runs the
  loop to `stage.num_steps` and returns the final (device) state."""
  tcfg = ctx.config.train
  optim = optim_config(ctx.config.optim, stage.num_steps)
  tx = state_lib.make_optimizer(optim)
  state, state_sh = init_state(ctx, stage, tx)
  log.info("%s", memory_report(state, stage, ctx.mesh))
  if stage.num_steps == 0:
    log.info("%s: 0 steps, the initial parameters are the result", stage.name)
    return state
  jstep = jax.jit(
    functools.partial(
      steps.train_step,
      loss_fn=stage.loss_fn,
      tx=tx,
      lr_schedule=state_lib.lr_at_step(optim),
    ),
    out_shardings=(state_sh, ctx.replicated),
    donate_argnums=(0,),
  )
  checkpointer = ckpt.Checkpointer(
    stage_dir(ctx, stage.name),
    every=tcfg.checkpoint_every,
    keep=tcfg.keep_checkpoints,
    use_async=tcfg.async_checkpoints,
  )
  state, start = restore_latest(checkpointer, state, stage.batches)
  best = None
  if stage.eval_fn is not None and stage.select_best:
    best = BestState(stage_dir(ctx, stage.name), stage.select_best)

  def step_fn(state, batch):
    return jstep(state, stage.frozen(batch), ctx.to_global(batch), ctx.key)

  try:
    state = _loop_stage(ctx, stage, state, step_fn, start, checkpointer, best)
  finally:
    checkpointer.close()
    if best is not None:
      best.close()
  # Bucketed batches compile one step per padded length (a bounded set).
  log.info(
    "%s: the step compiled for %d batch shape(s)",
    stage.name,
    jstep._cache_size(),  # noqa: SLF001 - jax has no public counter
  )
  return state


def _loop_stage(ctx, stage, state, step_fn, start, checkpointer, best):
  """The loop of a stage from `start` (prefetched batches, its metric
  writer, its best state) and the stage's result."""
  tcfg = ctx.config.train
  batches = stage.batches
  if stage.prefetch:
    batches = pipeline.prefetch(batches, size=stage.prefetch)
  metrics_dir = str(paths.path(ctx.workdir) / ckpt.METRICS)
  writer = loop.MetricWriter(metrics_dir, start_step=start + stage.step_offset)
  try:
    with ctx.activate():  # mesh + axis rules for every step
      state, _ = loop.run_loop(
        state,
        step_fn=step_fn,
        batches=batches,
        data_state=batches.state,
        start_step=start,
        settings=loop.LoopSettings(
          num_steps=stage.num_steps,
          log_every=min(tcfg.log_every, stage.num_steps),
          eval_every=tcfg.eval_every
          if stage.eval_every is None
          else stage.eval_every,
          prefix=stage.name,
          step_offset=stage.step_offset,
        ),
        checkpointer=checkpointer,
        writer=writer,
        eval_fn=stage.eval_fn if best is None else best.wrap(stage.eval_fn),
        hooks=STEP_HOOKS,
      )
    return state if best is None else best.select(state)
  finally:
    if stage.prefetch:
      batches.close()
    writer.close()


BEST = "best"  # a stage's best evaluated state, beside its checkpoints

# Metrics that are better lower when a stage keeps its best state: the loss
# and its terms (every other metric, accuracy or F1, is better higher).
LOWER_IS_BETTER = (
  "loss", "kl", "hidden", "attention", "mlm", "gold", "l1"
)  # fmt: skip


def selection_value(values: Mapping[str, float], key: str) -> float:
  """The value of a `select_best` key: "SET/METRIC", or "A+B/METRIC", the
  sum of the sets' values.

  Raises:
    BistilError: a key whose sets are not all evaluated.
  """
  sets, _, metric = key.rpartition("/")
  names = [f"{s}/{metric}" for s in sets.split("+")]
  missing = [n for n in names if n not in values]
  if not sets or missing:
    raise BistilError(
      f"select_best metric {key!r} is not evaluated; known: "
      f"{', '.join(sorted(values))}"
    )
  return float(sum(float(values[n]) for n in names))


class BestState:
  """The best-scoring evaluated state of a stage, on disk beside its
  checkpoints (`DIR/best`: one checkpoint and best.json), so that a
  resumed stage compares against what it found before the interruption.
  Ties keep the earlier state."""

  def __init__(self, directory: str, key: str):
    self.key = key
    # Stored and compared as a score, higher is better: a loss negated.
    self.sign = -1.0 if key.rpartition("/")[2] in LOWER_IS_BETTER else 1.0
    self.root = paths.path(directory) / BEST
    self.ckpt = ckpt.Checkpointer(
      str(self.root), every=1, keep=1, use_async=False
    )
    info = self.root / "best.json"
    self.step, self.value = None, -float("inf")
    if info.is_file():
      found = json.loads(info.read_text())
      if found.get("metric") == key and found["step"] in self.ckpt.all_steps():
        self.step = int(found["step"])
        self.value = self.sign * float(found["value"])

  def wrap(self, eval_fn):
    def evaluated(state):
      values = eval_fn(state)
      score = self.sign * selection_value(values, self.key)
      if score > self.value:
        self.offer(state, score)
      return values

    return evaluated

  def offer(self, state, score: float) -> None:
    step = int(jax.device_get(state.step))
    value = self.sign * score  # the metric itself, as logged
    # keep=1: orbax drops the previous best once this one is written.
    self.ckpt.save(step, state, {"metric": self.key, "value": value})
    self.ckpt.wait()
    if jax.process_index() == 0:
      (self.root / "best.json").write_text(
        json.dumps({"metric": self.key, "value": value, "step": step})
      )
    self.step, self.value = step, score

  def select(self, state):
    """`state`, or the best state when an earlier one scored higher."""
    final = int(jax.device_get(state.step))
    value = self.sign * self.value
    if self.step is None or self.step == final:
      log.info("best %s %.4f: the final step %d", self.key, value, final)
      return state
    restored, _ = self.ckpt.restore(self.step, ckpt.abstract_like(state))
    log.info(
      "best %s %.4f at step %d: the stage's result (not its last step %d)",
      self.key,
      value,
      self.step,
      final,
    )
    return restored

  def close(self) -> None:
    self.ckpt.close()


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


def has_checkpoint(ctx: Context, name: str) -> bool:
  """Whether stage `name` of this workdir has a finished checkpoint."""
  d = paths.path(stage_dir(ctx, name)) / ckpt.CHECKPOINTS
  return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


# ------------------------------------------------------------ host values
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


def host_params(tree: Any, dtype=np.float32) -> Any:
  """Device arrays -> host numpy on every process, gathering the shards
  other hosts hold (an FSDP mesh splits parameters across hosts)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    tree = multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(
    lambda x: (
      np.asarray(jax.device_get(x)).astype(dtype)
      if np.issubdtype(np.asarray(x).dtype, np.floating)
      else np.asarray(jax.device_get(x))
    ),
    tree,
  )


def check_seq_len(config: ModelConfig, max_seq_len: int, what: str) -> None:
  """Rows longer than the position table would read garbage positions."""
  if max_seq_len > config.max_length:
    raise BistilError(
      f"data.max_seq_len {max_seq_len} exceeds the {what}'s "
      f"{config.max_length} positions (max_position_embeddings)"
    )


def parameter_overview(params: Any, title: str) -> str:
  """A one-line size summary for the log."""
  leaves = jax.tree.leaves(params)
  n = sum(int(np.prod(x.shape)) for x in leaves)
  dtypes = sorted({str(x.dtype) for x in leaves})
  return f"{title}: {n / 1e6:.2f}M parameters in {len(leaves)} arrays {dtypes}"


# ----------------------------------------------------------------- memory
def device_bytes(tree: Any) -> int:
  """Bytes of `tree` on the most loaded device (shard shapes)."""
  per: dict[Any, int] = {}
  for x in jax.tree.leaves(tree):
    for s in x.addressable_shards:
      per[s.device] = per.get(s.device, 0) + s.data.nbytes
  return max(per.values(), default=0)


def activation_bytes(cfg: ModelConfig, rows: int, length: int) -> int:
  """A rough upper estimate of one device's training activations: per layer
  the residual-stream tensors (~16 x d), the MLP (~2 x ffn) and the
  attention probabilities (heads x l) per token, float32."""
  per_token = 16 * cfg.hidden_size + 2 * cfg.intermediate_size
  per_token += 2 * cfg.num_attention_heads * length
  return 4 * rows * length * per_token * cfg.num_hidden_layers


def memory_report(
  state: state_lib.TrainState, stage: Stage, mesh: jax.sharding.Mesh
) -> str:
  """One log line: per-device parameters, optimiser state, activations, and
  the device's capacity where the backend reports it."""
  config = stage.model_config
  batch, length = stage.batch_shape
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  rows = max(batch // max(shards, 1), 1)
  parts = {
    "params": device_bytes(state.params),
    "optimiser": device_bytes(state.opt_state),
    "activations (est.)": activation_bytes(config, rows, length),
  }
  total = sum(parts.values())
  text = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in parts.items())
  stats = jax.local_devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit")
  line = (
    f"{stage.name}: per-device memory {text}; total {total / 2**20:.1f} MiB"
  )
  if limit:
    line += f" of {limit / 2**30:.1f} GiB"
    if total > limit:
      log.warning("%s: the estimate exceeds the device memory", stage.name)
  return line
