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

Dispatch is kept at most one step ahead of the device (the loop waits for
step k-1 after queueing step k), so a stop signal is acted on within one
step even though JAX dispatches asynchronously.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bistil_jax import paths
from bistil_jax.checkpoint import manager as ckpt
from bistil_jax.errors import BistilError

log = logging.getLogger(__name__)

# Fault injection for the resume tests: after finishing step k the process
# waits for committed checkpoints and exits hard (os._exit(137)), as a
# killed job would, without the loop's normal shutdown.
FAULT_ENV = "BISTIL_FAULT_AT_STEP"
# Signal injection for the preemption tests: after queueing step k the
# process sends itself SIGTERM, as a scheduler would at a random moment.
SIGNAL_ENV = "BISTIL_SIGTERM_AT_STEP"


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

  Returns:
    (final state, the last logged train metrics).

  Raises:
    NonFiniteLoss: a step's loss or gradient norm is NaN/inf (named
      exactly); no checkpoint at or after it was written.
    Preempted: a stop signal arrived; a checkpoint of the step at which the
      loop saw it was saved.
  """
  total = settings.num_steps
  fault_at = int(os.environ.get(FAULT_ENV, "-1"))
  signal_at = int(os.environ.get(SIGNAL_ENV, "-1"))
  pending: list[dict[str, Any]] = []
  last_values: dict[str, float] = {}
  t_log, step_log = time.perf_counter(), start_step
  off = settings.step_offset
  p = settings.prefix
  guard = _FiniteGuard(checkpointer)
  sync_point = _preemption_sync()

  def evaluate(step: int):
    if eval_fn is None:
      return
    t0 = time.perf_counter()
    values = dict(eval_fn(state))
    writer.scalars(step + off, {f"eval/{k}": v for k, v in values.items()})
    shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
    log.info(
      "%s eval at step %d (%.1fs): %s",
      p,
      step,
      time.perf_counter() - t0,
      shown,
    )

  def save(step: int, force: bool = False):
    if checkpointer is None:
      return
    # Never write a poisoned checkpoint: every step so far was finite, and
    # the state itself (the update of the last step) holds no NaN/inf.
    guard.check()
    if not state_is_finite(state):
      guard.fail(step, "parameters")
    checkpointer.save(step, state, data_state(), force=force)

  step = start_step
  previous = None  # the metrics of the step before the one just queued
  signals = (signal.SIGINT,) if sync_point else (signal.SIGTERM, signal.SIGINT)
  with _StopSignal(signals) as stop:
    while step < total:
      batch = next(batches)
      state, metrics = step_fn(state, batch)
      step += 1
      pending.append(metrics)
      guard.add(step, metrics)
      # Bounded dispatch: step `step` is queued, so waiting for the one
      # before keeps the device busy and the host at most one step ahead.
      if previous is not None:
        jax.block_until_ready(previous)
      previous = metrics
      if step == signal_at:
        os.kill(os.getpid(), signal.SIGTERM)
      if step % settings.log_every == 0 or step == total:
        host = jax.device_get(pending)
        pending = []
        guard.check()
        values = reduce_metrics(host)
        now = time.perf_counter()
        rate = (step - step_log) / max(now - t_log, 1e-9)
        values["steps_per_s"] = rate
        if "tokens" in values:
          values["tokens_per_s"] = values.pop("tokens") / max(now - t_log, 1e-9)
        t_log, step_log = now, step
        writer.scalars(step + off, {f"{p}/{k}": v for k, v in values.items()})
        log.info("%s", format_progress(step, total, values, rate, p))
        last_values = values
      if checkpointer is not None and checkpointer.should_save(step):
        save(step)
      if settings.eval_every and step % settings.eval_every == 0:
        if step < total:
          evaluate(step)
      if step == fault_at:
        guard.check()  # make the guard see the steps before the fault
        if checkpointer is not None:
          checkpointer.wait()
        writer.close()
        log.warning("fault injection: exiting hard after step %d", step)
        os._exit(137)
      preempted = sync_point is not None and sync_point(step)
      if (stop.signum is not None or preempted) and step < total:
        save(step, force=True)
        if checkpointer is not None:
          checkpointer.wait()
        writer.flush()
        why = f"signal {stop.signum}" if stop.signum else "preemption"
        raise Preempted(
          f"stopped by {why} at {p} step {step}; the state is saved, rerun "
          "the same command to resume"
        )
  # The last step is always a log step, so no metrics are pending here.
  guard.check()
  evaluate(step)
  save(step, force=True)
  if checkpointer is not None:
    checkpointer.wait()
  writer.flush()
  return state, last_values
