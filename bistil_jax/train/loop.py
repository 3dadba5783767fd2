"""The outer training loop shared by every phase.

The loop owns what every phase needs and nothing phase-specific: iterating
the (prefetched, resumable) batches, calling the jitted step, accumulating
metrics on device and averaging them exactly on the host at log time,
progress lines (steps/s, tokens/s, ETA), TensorBoard + JSON-lines metrics
from process 0, periodic evaluation, asynchronous Orbax checkpoints with the
data position, a finite-state guard, and preemption (SIGTERM/SIGINT: save
the current step, then stop; rerunning the command resumes).

Finite-state guarantee: every step's metrics carry an on-device "finite"
flag (loss and gradient norm finite). The loop keeps the flags of the steps
since the last sync on the device and reads them only at log steps and
before every checkpoint save, so no step pays a host sync; a checkpoint is
written only when every step up to it was finite and its state holds no
NaN/inf, and the error names the first non-finite step exactly.

Step hooks (`StepHook`, the `hooks` argument) are the one extension point:
each is called with a `StepEnd` after every step, once its log line,
checkpoint and evaluation are done and before a stop signal is acted on.
The driver passes `driver.STEP_HOOKS`; the tests inject faults and signals
through it (tests/faults.py), so nothing here reads the environment.

Dispatch is kept at most one step ahead of the device (the loop waits for
step k-1 after queueing step k), so a stop signal is acted on within one
step even though JAX dispatches asynchronously.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bistil_jax import paths
from bistil_jax.checkpoint import manager as ckpt
from bistil_jax.errors import BistilError

log = logging.getLogger(__name__)


class NonFiniteLoss(BistilError):
  """A loss or gradient norm became NaN/inf."""


class Preempted(BistilError):
  """SIGTERM/SIGINT arrived; a checkpoint was saved."""


# ---------------------------------------------------------------- metrics
def reduce_metrics(history: list[Mapping[str, Any]]) -> dict[str, float]:
  """Host-side exact averages of per-step metric dicts.

  "<term>/total" and "<term>/count" pairs become "<term>" = sum(total) /
  sum(count); "tokens" is summed; "lr" keeps its last value; "finite" is
  the minimum (1.0 only when every step was finite; averaging would report
  e.g. 0.9 for a window with a NaN step); every other key is averaged over
  steps.
  """
  if not history:
    return {}
  out: dict[str, float] = {}
  keys = history[0].keys()
  for key in keys:
    values = np.asarray([float(h[key]) for h in history], np.float64)
    if key.endswith("/count"):
      continue
    if key.endswith("/total"):
      name = key[: -len("/total")]
      count = sum(float(h[f"{name}/count"]) for h in history)
      out[name] = float(values.sum() / max(count, 1e-12))
    elif key == "tokens":
      out[key] = float(values.sum())
    elif key == "lr":
      out[key] = float(values[-1])
    elif key == "finite":
      out[key] = float(values.min())
    else:
      out[key] = float(values.mean())
  return out


class MetricWriter:
  """TensorBoard event files + metrics.jsonl, on process 0 only.

  Paths go through `bistil_jax.paths`, so `gs://...` works: local files are
  appended to; on object stores (no append) the rows are kept and the whole
  file is rewritten at flush/close and at most every `rewrite_secs`.
  TensorBoard events for a remote logdir are written to a local staging dir
  and copied up at the same times: tensorboardX's own GCS writer re-uploads
  its whole buffer at every flush and again from `__del__` at interpreter
  exit (which hangs once the store is unreachable).
  """

  def __init__(
    self, logdir: str, *, start_step: int = 0, rewrite_secs: float = 30.0
  ):
    self.enabled = jax.process_index() == 0
    self.logdir = logdir
    self._tb = None
    self._tb_local: str | None = None  # remote logdir: local event files
    self._jsonl = None
    self._rows: list[str] | None = None  # remote: every row, rewritten
    self._path = paths.path(logdir) / "metrics.jsonl"
    self._rewrite_secs = rewrite_secs
    self._written = time.monotonic()
    if not self.enabled:
      return
    paths.mkdirs(logdir)
    rows = []
    if self._path.exists():
      rows = [r + "\n" for r in self._path.read_text().splitlines() if r]
      if start_step > 0:
        # A resumed run replays the steps after its checkpoint: drop the
        # rows logged after it (a row at step s covers steps <= s).
        kept = [r for r in rows if json.loads(r)["step"] <= start_step]
        if len(kept) != len(rows):
          rows = kept
          self._path.write_text("".join(rows))
    if paths.is_remote(self._path):
      self._rows = rows
    else:
      self._jsonl = self._path.open("a")  # noqa: SIM115 - closed in close()
    try:
      from tensorboardX import SummaryWriter
    except ImportError:  # pragma: no cover - a runtime dependency
      log.warning("tensorboardX missing: metrics go to metrics.jsonl only")
      return
    tb_dir = str(logdir)
    if self._rows is not None:
      self._tb_local = tb_dir = tempfile.mkdtemp(prefix="bistil-tb-")
    # purge_step hides events a killed run wrote after its last checkpoint.
    self._tb = SummaryWriter(
      tb_dir,
      purge_step=start_step + 1 if start_step > 0 else None,
      flush_secs=10,
    )

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    for key, value in values.items():
      if self._tb is not None:
        self._tb.add_scalar(key, float(value), global_step=step)
    row = {"step": int(step), **{k: float(v) for k, v in values.items()}}
    line = json.dumps(row) + "\n"
    if self._rows is not None:
      self._rows.append(line)
      if time.monotonic() - self._written > self._rewrite_secs:
        self._rewrite()
    elif self._jsonl is not None:
      with paths.disk_full_as_error(self._path):
        self._jsonl.write(line)
        self._jsonl.flush()

  def _rewrite(self) -> None:
    if self._rows is not None:
      paths.write_text(self._path, "".join(self._rows))
      self._written = time.monotonic()
    if self._tb_local is not None:
      if self._tb is not None:
        self._tb.flush()
      for f in paths.path(self._tb_local).iterdir():
        paths.copy_file(f, paths.path(self.logdir) / f.name)

  def text(self, step: int, tag: str, text: str) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_text(tag, text, global_step=step)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()
    self._rewrite()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._rows is not None:
      self._rewrite()
      self._rows = None
    if self._tb_local is not None:
      paths.rmtree(self._tb_local)
      self._tb_local = None


def read_metrics(logdir: str) -> list[dict[str, float]]:
  """The rows of metrics.jsonl (for tests, reports and plots)."""
  path = paths.path(logdir) / "metrics.jsonl"
  if not path.is_file():
    return []
  return [json.loads(r) for r in path.read_text().splitlines() if r.strip()]


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}"


def format_progress(
  step: int,
  total: int,
  values: Mapping[str, float],
  steps_per_s: float,
  prefix: str = "",
) -> str:
  """One progress line: stage, step, losses, throughput, ETA.

  `prefix` names the stage ("sparse step 10/186"), so a multi-stage phase
  does not look like a restart when its step count starts again.
  """
  stage = f"{prefix} " if prefix else ""
  parts = [f"{stage}step {step}/{total} ({100 * step / max(total, 1):.0f}%)"]
  for key, value in values.items():
    if key in ("tokens", "lr", "steps_per_s", "tokens_per_s", "finite"):
      continue
    parts.append(f"{key} {value:.4g}")
  if "lr" in values:
    parts.append(f"lr {values['lr']:.3g}")
  parts.append(f"{steps_per_s:.2f} steps/s")
  if "tokens_per_s" in values:
    parts.append(f"{values['tokens_per_s'] / 1e3:.1f}k tok/s")
  eta = (total - step) / steps_per_s if steps_per_s > 0 else math.inf
  parts.append(f"ETA {_duration(eta)}")
  return " | ".join(parts)


# ------------------------------------------------------------------ loop
@dataclasses.dataclass
class LoopSettings:
  """Cadences of one run of the loop (all in steps)."""

  num_steps: int  # stop after this many steps in total (0: none, export init)
  log_every: int = 50
  eval_every: int = 0  # 0: evaluate only at the end
  prefix: str = "train"  # metric namespace, e.g. "train", "sft_dense"
  step_offset: int = 0  # added to steps in metrics (multi-stage phases)

  def __post_init__(self):
    if self.num_steps < 0:
      raise BistilError(f"num_steps must be >= 0, got {self.num_steps}")
    if self.log_every < 1:
      raise BistilError(f"log_every must be >= 1, got {self.log_every}")
    if self.eval_every < 0:
      raise BistilError(f"eval_every must be >= 0, got {self.eval_every}")


class _StopSignal:
  """Turns SIGTERM/SIGINT into a flag the loop checks after every step.

  In a multi-host run with JAX's preemption service, SIGTERM belongs to
  that service (it agrees on one step for every host, see
  `_preemption_sync`), so only SIGINT is handled here.
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self.signum: int | None = None
    self._signals = signals
    self._old: dict[int, Any] = {}

  def __enter__(self):
    for sig in self._signals:
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: no handlers
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:  # second signal: give up at once
      raise KeyboardInterrupt
    self.signum = signum
    log.warning("signal %d: saving the current step, then stopping", signum)

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _preemption_sync() -> Callable[[int], bool] | None:
  """`reached_preemption_sync_point` where it works, else None.

  It needs `jax.distributed` with the preemption service (Cloud TPU
  multi-host); single-process CPU/GPU runs have no client (it returns
  False) and a client without the service raises: both mean "not here".
  """
  if jax.process_count() <= 1:
    return None
  from jax.experimental import multihost_utils  # noqa: PLC0415

  try:
    multihost_utils.reached_preemption_sync_point(0)
  except RuntimeError as e:
    log.warning(
      "no preemption service (%s): a SIGTERM on one host is not "
      "synchronised; enable jax_enable_preemption_service",
      str(e).splitlines()[0],
    )
    return None
  return multihost_utils.reached_preemption_sync_point


@jax.jit
def _tree_finite(tree: Any) -> jax.Array:
  leaves = [
    jnp.all(jnp.isfinite(x))
    for x in jax.tree.leaves(tree)
    if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def state_is_finite(state: Any) -> bool:
  """True when every floating leaf of `state` is finite (one host sync)."""
  return bool(jax.device_get(_tree_finite(state)))


class _FiniteGuard:
  """The per-step "finite" flags since the last sync, kept on device.

  `check(step)` reads them (one transfer) and raises NonFiniteLoss naming
  the first non-finite step; steps whose metrics lack "finite" (custom
  step functions) are judged by their loss and grad_norm.
  """

  def __init__(self, checkpointer):
    self._flags: list[tuple[int, Any, Mapping[str, Any]]] = []
    self._checkpointer = checkpointer

  def add(self, step: int, metrics: Mapping[str, Any]) -> None:
    flag = metrics.get("finite")
    if flag is None:
      flag = {k: metrics[k] for k in ("loss", "grad_norm") if k in metrics}
    self._flags.append((step, flag, metrics))

  def check(self) -> None:
    if not self._flags:
      return
    flags = jax.device_get([f for _, f, _ in self._flags])
    entries, self._flags = self._flags, []
    for (step, _, metrics), flag in zip(entries, flags, strict=True):
      if isinstance(flag, dict):
        ok = all(math.isfinite(float(v)) for v in flag.values())
      else:
        ok = float(flag) > 0.5
      if not ok:
        names = [
          k
          for k in ("loss", "grad_norm")
          if k in metrics and not math.isfinite(float(metrics[k]))
        ]
        self.fail(step, " and ".join(names) or "loss")

  def fail(self, step: int, what: str) -> None:
    last = None
    if self._checkpointer is not None:
      self._checkpointer.wait()
      last = self._checkpointer.latest_step()
    kept = (
      f"the last finite checkpoint is step {last}"
      if last is not None
      else "no checkpoint was saved"
    )
    raise NonFiniteLoss(
      f"non-finite {what} at step {step}; {kept}; resume with a lower "
      "optim.learning_rate (or optim.clip_norm / optim.warmup_steps: "
      "allowed on resume without --overwrite), or check the data"
    )


@dataclasses.dataclass(frozen=True)
class StepEnd:
  """What a step hook sees once a step is done (logged, saved, evaluated).

  Attributes:
    step: the step just finished (within its stage, 1-based).
    total: the stage's last step.
    prefix: the stage's metric namespace ("train", "dense", "sparse").
    settle: makes everything up to `step` durable: checks the finite flags,
      waits for the checkpoint writes and flushes the metrics.
  """

  step: int
  total: int
  prefix: str
  settle: Callable[[], None]


# A per-step extension point: called after every step, before the loop
# acts on a stop signal (so a hook that raises one is seen at this step).
StepHook = Callable[[StepEnd], None]


def run_loop(
  state: Any,
  *,
  step_fn: Callable[[Any, Mapping[str, Any]], tuple[Any, dict[str, Any]]],
  batches: Iterator[Mapping[str, Any]],
  data_state: Callable[[], Mapping[str, Any]],
  start_step: int,
  settings: LoopSettings,
  checkpointer: ckpt.Checkpointer | None,
  writer: MetricWriter,
  eval_fn: Callable[[Any], Mapping[str, float]] | None = None,
  hooks: Sequence[StepHook] = (),
) -> tuple[Any, dict[str, float]]:
  """Runs steps start_step .. settings.num_steps - 1.

  Args:
    state: the train state at `start_step` (restored or fresh).
    step_fn: (state, host batch) -> (state, per-step metrics on device).
    batches: host batches; the first one is batch `start_step`.
    data_state: returns the iterator position after the last batch taken
      (saved with each checkpoint).
    start_step: the step of `state`.
    settings: cadences.
    checkpointer: saves state + data position; None disables checkpoints.
    writer: the metric writer.
    eval_fn: state -> {name: value}, written as "eval/<name>".
    hooks: called with a StepEnd after every step (instrumentation, and
      the tests' fault and signal injection).

  Returns:
    (final state, the last logged train metrics).

  Raises:
    NonFiniteLoss: a step's loss or gradient norm is NaN/inf (named
      exactly); no checkpoint at or after it was written.
    Preempted: a stop signal arrived; a checkpoint of the step at which the
      loop saw it was saved.
  """
  run = _Run(state, settings, checkpointer, writer, data_state, eval_fn)
  run.steps(step_fn, batches, start_step, tuple(hooks))
  return run.state, run.last_values


@dataclasses.dataclass
class _Run:
  """One run of the loop: the state and what the pieces of a step share."""

  state: Any
  settings: LoopSettings
  checkpointer: ckpt.Checkpointer | None
  writer: MetricWriter
  data_state: Callable[[], Mapping[str, Any]]
  eval_fn: Callable[[Any], Mapping[str, float]] | None
  pending: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  last_values: dict[str, float] = dataclasses.field(default_factory=dict)
  t_log: float = dataclasses.field(default_factory=time.perf_counter)
  step_log: int = 0

  def __post_init__(self):
    self.guard = _FiniteGuard(self.checkpointer)
    self.sync_point = _preemption_sync()

  def steps(self, step_fn, batches, start_step: int, hooks) -> None:
    """The steps to `settings.num_steps`, then the final eval and save."""
    total = self.settings.num_steps
    self.step_log = step = start_step
    previous = None  # the metrics of the step before the one just queued
    sync = self.sync_point
    signals = (signal.SIGINT,) if sync else (signal.SIGTERM, signal.SIGINT)
    with _StopSignal(signals) as stop:
      while step < total:
        self.state, metrics = step_fn(self.state, next(batches))
        step += 1
        self.pending.append(metrics)
        self.guard.add(step, metrics)
        # Bounded dispatch: step `step` is queued, so waiting for the one
        # before keeps the device busy and the host at most one step ahead.
        if previous is not None:
          jax.block_until_ready(previous)
        previous = metrics
        self.after_step(step)
        event = StepEnd(step, total, self.settings.prefix, self.settle)
        for hook in hooks:
          hook(event)
        self.stop_if_asked(step, stop.signum)
    # The last step is always a log step, so no metrics are pending here.
    self.guard.check()
    self.evaluate(step)
    self.save(step, force=True)
    self.settle()

  def after_step(self, step: int) -> None:
    """The step's log line, checkpoint and evaluation, at their cadences."""
    settings, total = self.settings, self.settings.num_steps
    if step % settings.log_every == 0 or step == total:
      self.log_metrics(step)
    if self.checkpointer is not None and self.checkpointer.should_save(step):
      self.save(step)
    if settings.eval_every and step % settings.eval_every == 0:
      if step < total:
        self.evaluate(step)

  def log_metrics(self, step: int) -> None:
    """Host averages of the steps since the last log, with throughput."""
    host = jax.device_get(self.pending)
    self.pending = []
    self.guard.check()
    values = reduce_metrics(host)
    now = time.perf_counter()
    elapsed = max(now - self.t_log, 1e-9)
    rate = (step - self.step_log) / elapsed
    values["steps_per_s"] = rate
    if "tokens" in values:
      values["tokens_per_s"] = values.pop("tokens") / elapsed
    self.t_log, self.step_log = now, step
    p, total = self.settings.prefix, self.settings.num_steps
    self.writer.scalars(
      step + self.settings.step_offset,
      {f"{p}/{k}": v for k, v in values.items()},
    )
    log.info("%s", format_progress(step, total, values, rate, p))
    self.last_values = values

  def evaluate(self, step: int) -> None:
    if self.eval_fn is None:
      return
    t0 = time.perf_counter()
    values = dict(self.eval_fn(self.state))
    self.writer.scalars(
      step + self.settings.step_offset,
      {f"eval/{k}": v for k, v in values.items()},
    )
    shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
    log.info(
      "%s eval at step %d (%.1fs): %s",
      self.settings.prefix,
      step,
      time.perf_counter() - t0,
      shown,
    )

  def save(self, step: int, force: bool = False) -> None:
    if self.checkpointer is None:
      return
    # Never write a poisoned checkpoint: every step so far was finite, and
    # the state itself (the update of the last step) holds no NaN/inf.
    self.guard.check()
    if not state_is_finite(self.state):
      self.guard.fail(step, "parameters")
    self.checkpointer.save(step, self.state, self.data_state(), force=force)

  def settle(self) -> None:
    """Everything up to now durable: finite flags read, checkpoint writes
    committed, metrics flushed."""
    self.guard.check()
    if self.checkpointer is not None:
      self.checkpointer.wait()
    self.writer.flush()

  def stop_if_asked(self, step: int, signum: int | None) -> None:
    """After a stop signal (or the hosts' agreed preemption step) before
    the last step: save this step and raise Preempted."""
    total = self.settings.num_steps
    preempted = self.sync_point is not None and self.sync_point(step)
    if (signum is None and not preempted) or step >= total:
      return
    self.save(step, force=True)
    if self.checkpointer is not None:
      self.checkpointer.wait()
    self.writer.flush()
    why = f"signal {signum}" if signum else "preemption"
    raise Preempted(
      f"stopped by {why} at {self.settings.prefix} step {step}; the state "
      "is saved, rerun the same command to resume"
    )
