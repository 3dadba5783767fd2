"""The outer training loop shared by every phase.

The loop owns what every phase needs and nothing phase-specific: iterating
the (prefetched, resumable) batches, calling the jitted step, accumulating
metrics on device and averaging them exactly on the host at log time,
progress lines (steps/s, tokens/s, ETA), TensorBoard + JSON-lines metrics
from process 0, periodic evaluation, asynchronous Orbax checkpoints with the
data position, a finite-loss guard, and preemption (SIGTERM: save, then
stop; rerunning the command resumes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from bistil_jax.checkpoint import manager as ckpt
from bistil_jax.errors import BistilError

log = logging.getLogger(__name__)

# Fault injection for the resume tests: after finishing step k the process
# waits for committed checkpoints and exits hard (os._exit(137)), as a
# killed job would, without the loop's normal shutdown.
FAULT_ENV = "BISTIL_FAULT_AT_STEP"


class NonFiniteLoss(BistilError):
  """A loss or gradient norm became NaN/inf."""


class Preempted(BistilError):
  """SIGTERM/SIGINT arrived; a checkpoint was saved."""


# ---------------------------------------------------------------- metrics
def reduce_metrics(history: list[Mapping[str, Any]]) -> dict[str, float]:
  """Host-side exact averages of per-step metric dicts.

  "<term>/total" and "<term>/count" pairs become "<term>" = sum(total) /
  sum(count); "tokens" is summed; "lr" keeps its last value; every other
  key is averaged over steps.
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
    else:
      out[key] = float(values.mean())
  return out


class MetricWriter:
  """TensorBoard event files + metrics.jsonl, on process 0 only."""

  def __init__(self, logdir: str, *, start_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.logdir = logdir
    self._tb = None
    self._jsonl = None
    if not self.enabled:
      return
    os.makedirs(logdir, exist_ok=True)
    path = os.path.join(logdir, "metrics.jsonl")
    if start_step > 0 and os.path.exists(path):
      # A resumed run replays the steps after its checkpoint: drop the rows
      # logged after it (a row at step s covers steps <= s).
      with open(path) as f:
        rows = [
          r for r in f if r.strip() and json.loads(r)["step"] <= start_step
        ]
      with open(path, "w") as f:
        f.writelines(rows)
    self._jsonl = open(path, "a")  # noqa: SIM115 - closed in close()
    try:
      from tensorboardX import SummaryWriter
    except ImportError:  # pragma: no cover - a runtime dependency
      log.warning("tensorboardX missing: metrics go to metrics.jsonl only")
      return
    # purge_step hides events a killed run wrote after its last checkpoint.
    self._tb = SummaryWriter(
      logdir,
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
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()

  def text(self, step: int, tag: str, text: str) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_text(tag, text, global_step=step)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None


def read_metrics(logdir: str) -> list[dict[str, float]]:
  """The rows of metrics.jsonl (for tests, reports and plots)."""
  path = os.path.join(logdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(r) for r in f if r.strip()]


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}"


def format_progress(
  step: int, total: int, values: Mapping[str, float], steps_per_s: float
) -> str:
  """One progress line: step, losses, throughput, ETA."""
  parts = [f"step {step}/{total} ({100 * step / max(total, 1):.0f}%)"]
  for key, value in values.items():
    if key in ("tokens", "lr", "steps_per_s", "tokens_per_s"):
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
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

  def __init__(self):
    self.signum: int | None = None
    self._old: dict[int, Any] = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
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
    log.warning("signal %d: stopping after this step", signum)

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _check_finite(values: Mapping[str, float], first: int, last: int) -> None:
  bad = [
    k
    for k in ("loss", "grad_norm")
    if k in values and not math.isfinite(values[k])
  ]
  if bad:
    raise NonFiniteLoss(
      f"non-finite {' and '.join(bad)} between steps {first} and {last}; "
      "lower the learning rate or check the data (the last checkpoint is "
      "kept)"
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
    NonFiniteLoss: a logged loss or gradient norm is NaN/inf.
    Preempted: a stop signal arrived; a checkpoint of the last completed
      step was saved.
  """
  total = settings.num_steps
  fault_at = int(os.environ.get(FAULT_ENV, "-1"))
  pending: list[dict[str, Any]] = []
  last_values: dict[str, float] = {}
  t_log, step_log = time.perf_counter(), start_step
  off = settings.step_offset
  p = settings.prefix

  def evaluate(step: int):
    if eval_fn is None:
      return
    t0 = time.perf_counter()
    values = dict(eval_fn(state))
    writer.scalars(step + off, {f"eval/{k}": v for k, v in values.items()})
    shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
    log.info(
      "eval at step %d (%.1fs): %s", step, time.perf_counter() - t0, shown
    )

  def save(step: int, force: bool = False):
    if checkpointer is not None:
      checkpointer.save(step, state, data_state(), force=force)

  step = start_step
  with _StopSignal() as stop:
    while step < total:
      batch = next(batches)
      state, metrics = step_fn(state, batch)
      pending.append(metrics)
      step += 1
      if step % settings.log_every == 0 or step == total:
        host = jax.device_get(pending)
        pending = []
        values = reduce_metrics(host)
        _check_finite(values, step - len(host) + 1, step)
        now = time.perf_counter()
        rate = (step - step_log) / max(now - t_log, 1e-9)
        values["steps_per_s"] = rate
        if "tokens" in values:
          values["tokens_per_s"] = values.pop("tokens") / max(now - t_log, 1e-9)
        t_log, step_log = now, step
        writer.scalars(step + off, {f"{p}/{k}": v for k, v in values.items()})
        log.info("%s", format_progress(step, total, values, rate))
        last_values = values
      if checkpointer is not None and checkpointer.should_save(step):
        save(step)
      if settings.eval_every and step % settings.eval_every == 0:
        if step < total:
          evaluate(step)
      if step == fault_at:
        if pending:  # make the guard see the steps before the fault
          jax.device_get(pending)
        if checkpointer is not None:
          checkpointer.wait()
        writer.close()
        log.warning("fault injection: exiting hard after step %d", step)
        os._exit(137)
      if stop.signum is not None and step < total:
        save(step, force=True)
        if checkpointer is not None:
          checkpointer.wait()
        writer.flush()
        raise Preempted(
          f"stopped by signal {stop.signum} after step {step}; the state "
          "is saved, rerun the same command to resume"
        )
  # The last step is always a log step, so no metrics are pending here.
  evaluate(step)
  save(step, force=True)
  if checkpointer is not None:
    checkpointer.wait()
  writer.flush()
  return state, last_values
