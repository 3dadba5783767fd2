"""Workdirs and Orbax checkpoints shared by every training phase.

A workdir holds (DESIGN.md "workdir"):
  run.json         the phase, the config as run, and the recovery changes
                   made on resume ("changes": step, key, old, new, time)
  .lock            held by the running job (host, pid, start time)
  checkpoints/     Orbax CheckpointManager steps: items "state" (TrainState,
                   masks included where a phase has them) and "data" (the
                   input iterator position, JSON)
  checkpoints.bad/ steps that could not be restored, moved aside (never
                   deleted) when a run fell back to an older step
  metrics/         TensorBoard event files + metrics.jsonl
  export/          the exported HF model dir (or SFT dir)

Running a command again on its workdir resumes from the latest checkpoint
that restores. A workdir made by another phase or config is refused unless
the caller passes overwrite=True, except for the declared recovery keys
(RECOVERY_KEYS: e.g. a lower learning rate after a NaN stop), which may
change on resume and are recorded; a non-empty directory that is not a
bistil workdir is always refused, so no user data is ever removed.

Every file operation goes through the path layer (`bistil_jax.paths`), so a
workdir may be a `gs://` path (GCS has no empty directories and no rglob; a
rename is a copy + delete, so nothing here relies on either being cheap or
atomic).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from bistil_jax import configlib, paths
from bistil_jax.errors import BistilError

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
CHECKPOINTS = "checkpoints"
BAD_CHECKPOINTS = "checkpoints.bad"
METRICS = "metrics"
EXPORT = "export"
OURS = (RUN_FILE, CHECKPOINTS, BAD_CHECKPOINTS, METRICS, EXPORT)

# Config keys that may change when a run is resumed, without --overwrite:
# the documented recovery after a non-finite stop. Each leaves the shape of
# the optimiser state alone (the checkpoint still restores) and only
# changes the updates from the resumed step on: the learning-rate schedule
# (a pure function of the step), decoupled weight decay, and the clipping
# threshold while clipping stays on. Not here: optim.accumulate_steps (it
# wraps the optimiser in MultiSteps, a different state, and rescales the
# schedule), turning clipping on or off (adds/removes a chain element),
# b1/b2 (the moments were accumulated with the old ones), and every data,
# model or loss key (they change what the run is).
RECOVERY_KEYS = (
  "optim.learning_rate",
  "optim.warmup_steps",
  "optim.clip_norm",
  "optim.weight_decay",
)


def _recovery_refusal(key: str, old: Any, new: Any) -> str | None:
  """Why changing recovery key `key` from old to new cannot resume."""
  if key == "optim.clip_norm" and bool(old) != bool(new):
    return (
      f"{key} {old} -> {new} turns clipping {'on' if new else 'off'}, which "
      "changes the optimiser state; change it only between non-zero values"
    )
  return None


def _path(p: str | os.PathLike) -> epath.Path:
  # Through the path layer: a remote workdir's bucket answers in time or
  # the user gets one line naming it (issue 21).
  return paths.path(p)


def _write_json_atomic(path: epath.Path, obj: Any) -> None:
  # Write a sibling then replace: a crash mid-write leaves the old file (on
  # GCS the object upload itself is atomic; replace is copy + delete).
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
  tmp.replace(path)


def read_run(workdir: str) -> dict[str, Any]:
  """The run.json of a workdir."""
  path = _path(workdir) / RUN_FILE
  if not path.is_file():
    raise BistilError(f"{workdir} is not a bistil workdir (no {RUN_FILE})")
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise BistilError(f"{path} is unreadable: {e}") from None


def _lookup(tree: Mapping[str, Any], key: str) -> Any:
  node: Any = tree
  for part in key.split("."):
    if not isinstance(node, Mapping) or part not in node:
      return "<absent>"
    node = node[part]
  return node


def _latest_steps(workdir: epath.Path, names: Sequence[str]) -> dict[str, int]:
  """{checkpoint dir name: its newest step} for the dirs that have steps."""
  out = {}
  for name in names:
    d = workdir / name
    if d.is_dir():
      steps = [int(c.name) for c in d.iterdir() if c.name.isdigit()]
      if steps:
        out[name] = max(steps)
  return out


def _covered(k: str, keys: Sequence[str]) -> bool:
  return any(k == s or k.startswith(s + ".") for s in keys)


def _compare_run(
  workdir: str,
  old: Mapping[str, Any],
  phase: str,
  config: Mapping[str, Any],
  *,
  overwrite: bool,
  resume_safe: Sequence[str],
  recovery: Sequence[str],
) -> tuple[list[str], list[tuple[str, Any, Any]]]:
  """(differing keys, allowed recovery changes) of a run.json against this
  run; raises unless they are compatible or `overwrite`."""
  diffs, changes, refusals = [], [], []
  if old.get("phase") != phase:
    diffs.append(f"phase ({old.get('phase')} != {phase})")
  for k in configlib.diff_keys(old.get("config", {}), dict(config)):
    if _covered(k, resume_safe):
      continue
    if _covered(k, recovery):
      a, b = _lookup(old.get("config", {}), k), _lookup(config, k)
      why = _recovery_refusal(k, a, b)
      if why:
        refusals.append(why)
        diffs.append(k)
      else:
        changes.append((k, a, b))
      continue
    diffs.append(k)
  if diffs and not overwrite:
    more = f"; {refusals[0]}" if refusals else ""
    raise BistilError(
      f"workdir {workdir} holds another run (differs in: "
      f"{', '.join(diffs[:8])}){more}; use --overwrite or another "
      f"--workdir (resuming may change only {', '.join(recovery)})"
    )
  return diffs, changes


def _inspect(
  workdir: str,
  phase: str,
  config: Mapping[str, Any],
  *,
  overwrite: bool,
  resume_safe: Sequence[str],
  recovery: Sequence[str],
) -> tuple[dict[str, Any] | None, list[str], list[tuple[str, Any, Any]]]:
  """(the run.json there or None, differing keys, allowed recovery changes);
  raises on a workdir this run may not use. Changes nothing."""
  wd = _path(workdir)
  if not wd.exists():
    return None, [], []
  if not wd.is_dir():
    raise BistilError(f"workdir {workdir} exists and is not a directory")
  if not (wd / RUN_FILE).is_file():
    if any(not e.name.startswith(".") for e in wd.iterdir()):
      raise BistilError(
        f"workdir {workdir} is not empty and is not a bistil workdir; "
        "choose an empty or new directory"
      )
    return None, [], []
  old = read_run(workdir)
  diffs, changes = _compare_run(
    workdir,
    old,
    phase,
    config,
    overwrite=overwrite,
    resume_safe=resume_safe,
    recovery=recovery,
  )
  return old, diffs, changes


def check_workdir(
  workdir: str,
  phase: str,
  config: Mapping[str, Any],
  *,
  overwrite: bool = False,
  resume_safe: Sequence[str] = (),
  recovery: Sequence[str] = RECOVERY_KEYS,
) -> None:
  """Raises what `prepare_workdir` would raise, changing nothing.

  For a check before a run's expensive loads (teacher, corpora): a workdir
  that is a file, holds files bistil did not write, or holds another run is
  refused at once.
  """
  _inspect(
    workdir,
    phase,
    config,
    overwrite=overwrite,
    resume_safe=resume_safe,
    recovery=recovery,
  )


def prepare_workdir(
  workdir: str,
  phase: str,
  config: Mapping[str, Any],
  *,
  overwrite: bool = False,
  resume_safe: Sequence[str] = (),
  recovery: Sequence[str] = RECOVERY_KEYS,
  outputs: Sequence[str] = (),
) -> bool:
  """Creates or checks a workdir; returns True when it may hold a run.

  Args:
    workdir: the directory (local or `gs://...`).
    phase: "distil", "sft", ... recorded and compared.
    config: the plain config dict of this run.
    overwrite: replace the bistil outputs of a different run.
    resume_safe: dotted config keys allowed to differ on resume (logging
      and checkpoint cadence).
    recovery: dotted config keys allowed to differ on resume and recorded
      in run.json "changes" (default RECOVERY_KEYS).
    outputs: names the phase writes besides run.json, checkpoints/,
      metrics/ and export/ (removed with them on overwrite; stage
      checkpoint dirs among them are searched for the resume step).

  Returns:
    True if the workdir already held this run (resume), else False.

  Raises:
    BistilError: the dir belongs to another run (without overwrite) or is a
      non-empty directory that bistil did not make.
  """
  old, diffs, changes = _inspect(
    workdir,
    phase,
    config,
    overwrite=overwrite,
    resume_safe=resume_safe,
    recovery=recovery,
  )
  wd = _path(workdir)
  wd.mkdir(parents=True, exist_ok=True)
  run_path = wd / RUN_FILE
  resumed = False
  record: dict[str, Any] = {"phase": phase, "config": dict(config)}
  if old is not None:
    if diffs:
      log.warning("--overwrite: removing the previous run in %s", workdir)
      if jax.process_index() == 0:
        for name in (*OURS, *outputs):
          p = wd / name
          if p.is_dir():
            p.rmtree()
          elif p.exists():
            p.unlink()
    else:
      resumed = True
      history = list(old.get("changes", []))
      if changes:
        steps = _latest_steps(wd, (CHECKPOINTS, *outputs))
        step: Any = (
          next(iter(steps.values())) if len(steps) == 1 else (steps or 0)
        )
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        for k, a, b in changes:
          history.append(
            {"step": step, "key": k, "old": a, "new": b, "time": now}
          )
          log.warning("resuming with %s changed: %r -> %r", k, a, b)
      record["changes"] = history
      if old == record:
        return True
  if jax.process_index() == 0:
    _write_json_atomic(run_path, record)
  return resumed


# ------------------------------------------------------------------ lock
def _lock_holder(info: Mapping[str, Any]) -> str:
  return (
    f"host {info.get('host', '?')} pid {info.get('pid', '?')} since "
    f"{info.get('start', '?')}"
  )


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


def _take_lock(workdir: str, lock: epath.Path, me: Mapping[str, Any]) -> None:
  """Creates `lock` holding `me`, taking over a dead local run's lock once.

  Raises:
    BistilError: a live run (or one on another host) holds it.
  """
  text = json.dumps(me)
  for attempt in range(2):
    if paths.create_exclusive(lock, text):
      return
    try:
      other = json.loads(lock.read_text())
    except (OSError, ValueError):
      other = {}
    same_host = other.get("host") == me["host"]
    pid = other.get("pid")
    if (
      attempt == 0
      and same_host
      and isinstance(pid, int)
      and not _pid_alive(pid)
    ):
      log.warning(
        "taking over the stale lock %s of %s (the process is gone)",
        lock,
        _lock_holder(other),
      )
      with contextlib.suppress(FileNotFoundError):
        lock.unlink()
      continue
    where = "" if same_host else "; if that run is gone, delete the file"
    raise BistilError(
      f"workdir {workdir} is in use by another run ({_lock_holder(other)}; "
      f"lock {lock}){where}"
    )
  # Both tries lost: two runs took the stale lock over at the same time.
  raise BistilError(  # pragma: no cover
    f"workdir {workdir}: could not take the lock {lock}"
  )


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
  """SIGTERM raises SystemExit in the body, so the lock is released.

  Multi-host: SIGTERM belongs to JAX's preemption service (the loop saves
  at the agreed step), so it is not taken over there.
  """
  old_handler = None

  def on_term(signum, frame):
    del frame
    raise SystemExit(128 + signum)

  if jax.process_count() == 1:
    with contextlib.suppress(ValueError):  # not the main thread
      old_handler = signal.signal(signal.SIGTERM, on_term)
  try:
    yield
  finally:
    if old_handler is not None:
      signal.signal(signal.SIGTERM, old_handler)


def _release_lock(
  lock: epath.Path, pid: int, created: epath.Path | None
) -> None:
  """Removes our own lock, and the workdir `created` if it stayed empty."""
  try:  # release only our own lock (a forced takeover replaced it)
    if json.loads(lock.read_text()).get("pid") == pid:
      lock.unlink()
    # Bad input refused before the workdir was used leaves no trace.
    if created is not None and created.is_dir() and not list(created.iterdir()):
      created.rmdir()
  except (OSError, ValueError):
    pass


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
  """Holds `<workdir>/.lock` for the body: one run per workdir.

  Takes the lock before anything else is written (only the workdir itself
  is created, and removed again if nothing else was put there), releases
  it on exit, error or SIGTERM (turned into SystemExit outside the
  training loop, which handles it itself). A second run is refused in one
  line naming the holder; a lock of a dead process on this host is taken
  over with a warning. In multi-host runs process 0 holds it.

  What works where (the limits):
  - local disks and NFSv3+: the file is created with O_CREAT | O_EXCL,
    atomic, so of two runs started at the same instant exactly one wins.
  - gs://: created with the generation precondition ifGenerationMatch=0
    (gcsfs "create" mode, marked experimental by gcsfs): atomic on the
    server. Other fsspec filesystems: check-then-write, a race window of
    one round trip between two starts.
  - a SIGKILL (OOM killer, kill -9) leaves the lock behind: it is taken
    over at the next start on the same host (the pid is gone). A lock left
    by another host cannot be checked (no remote pid test): the error
    names host and pid and says to delete the file if that run is gone.
  - the lock is advisory: it guards bistil runs, not other writers, and
    a pid reused by an unrelated process on the same host keeps a stale
    lock "alive" until the file is deleted.

  Raises:
    BistilError: another run holds the lock.
  """
  if jax.process_index() != 0:
    yield
    return
  wd = _path(workdir)
  if wd.exists() and not wd.is_dir():
    raise BistilError(f"workdir {workdir} exists and is not a directory")
  created = not wd.exists()
  wd.mkdir(parents=True, exist_ok=True)
  lock = wd / LOCK_FILE
  me = {
    "host": socket.gethostname(),
    "pid": os.getpid(),
    "start": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
  }
  _take_lock(workdir, lock, me)
  try:
    with _sigterm_as_exit():
      yield
  finally:
    _release_lock(lock, me["pid"], wd if created else None)


def check_finite_tree(tree: Any, what: str) -> None:
  """Refuses a tree (host or device) with a NaN/inf floating leaf."""
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    a = np.asarray(x)
    if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
      raise BistilError(
        f"{what} holds non-finite values ({jax.tree_util.keystr(path)}); "
        "it was not written"
      )


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs with shardings: the restore target of a tree."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
    tree,
  )


def _first_line(e: BaseException) -> str:
  """The first line of an error, without TensorStore's appended dump."""
  text = str(e).strip()
  if not text:
    return type(e).__name__
  line = text.splitlines()[0].split(" See full TensorStore details")[0]
  return line[:200]


def _drop_closed_loop_reports() -> None:
  """Stops the stray tracebacks of a failed restore's other array reads.

  When one array of a restore fails, orbax's asyncio loop ends while
  TensorStore reads of the other arrays are still in flight; each of them
  then calls `loop.call_soon_threadsafe` on the closed loop from a
  TensorStore thread, and Python reports that as an unraisable exception
  (one traceback per array), or asyncio logs "Task exception was never
  retrieved" for their tasks when they are collected. The failure itself is
  reported by `Checkpointer.restore`; only these follow-up reports are
  dropped.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_bistil", False):
    return

  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      return
    previous(unraisable)

  hook._bistil = True  # type: ignore[attr-defined]
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_drop_unretrieved_restore_reads)


def _drop_unretrieved_restore_reads(record: logging.LogRecord) -> bool:
  """False for asyncio's "Task exception was never retrieved" report of an
  orbax array read: the other reads of a restore that already failed, whose
  tasks are garbage-collected later (a full traceback each, at any time)."""
  msg = record.getMessage()
  return not (
    msg.startswith("Task exception was never retrieved")
    and "async_deserialize" in msg
  )


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
  """Silences orbax's and absl's log chatter around a restore attempt.

  A failing restore logs TensorStore's multi-line error text before it
  raises; we report the failure in one line ourselves.
  """
  _drop_closed_loop_reports()
  loggers = [logging.getLogger(n) for n in ("absl", "orbax", "tensorstore")]
  levels = [lg.level for lg in loggers]
  for lg in loggers:
    lg.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    for lg, level in zip(loggers, levels, strict=True):
      lg.setLevel(level)


class _DropDiskFull(logging.Filter):
  """Drops orbax's logged tracebacks of a save that failed on a full disk.

  Orbax's writer threads log the tensorstore error with its traceback
  (absl, ERROR) before the save raises, and asyncio reports each write
  whose failure nobody retrieved; Checkpointer reports the failure in one
  line, so those records are noise. Every other record passes.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    err = record.exc_info[1] if record.exc_info else None
    if err is not None and paths.is_disk_full(err):
      return False
    return not paths.is_disk_full(Exception(record.getMessage()))


_DROP_DISK_FULL = _DropDiskFull()


class Checkpointer:
  """One Orbax CheckpointManager per workdir: state + data position.

  Saves asynchronously every `every` steps (and on demand), keeps the last
  `keep`; Orbax writes each step into a temporary path and renames it when
  complete, so an interrupted save never hides the previous good step.
  """

  def __init__(
    self,
    workdir: str,
    *,
    every: int,
    keep: int = 3,
    use_async: bool = True,
  ):
    if every < 1:
      raise BistilError(f"checkpoint interval must be >= 1, got {every}")
    if keep < 1:
      raise BistilError(f"checkpoints to keep must be >= 1, got {keep}")
    wd = _path(workdir)
    if not paths.is_remote(wd):
      wd = wd.absolute()
    self.directory = wd / CHECKPOINTS
    self.every = every
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      save_interval_steps=1,  # the loop decides when to save
      enable_async_checkpointing=use_async,
      create=True,
    )
    self._mngr = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "data")
    )
    self._saving: tuple[int, int] | None = None  # (step, bytes) in flight
    self._failed = False  # a save failed and was reported
    # A failed save ends orbax's loop with writes in flight, as a failed
    # restore does: their follow-up reports go too.
    for name in ("absl", "asyncio"):  # writer threads; unretrieved writes
      logging.getLogger(name).addFilter(_DROP_DISK_FULL)  # once: a set
    _drop_closed_loop_reports()
    # NOTE: orbax's threads still running when the interpreter tears down
    # print thousands of lines (`sys.meta_path is None`); a caller whose
    # own cleanup failed before `close` still gets them joined.
    atexit.register(self._close_at_exit)

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def should_save(self, step: int) -> bool:
    return step % self.every == 0

  def save(
    self, step: int, state: Any, data: Mapping[str, Any], *, force=False
  ) -> bool:
    """Starts an (async) save of `state` and the data position at `step`."""
    if step in self.all_steps():
      return False
    self._saving = (step, _nbytes(state))
    try:
      return self._mngr.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(dict(data)),
        ),
        force=force,
      )
    except Exception as e:
      if not paths.is_disk_full(e):
        raise
      raise self._disk_full() from None

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores step `step` into the (sharded) abstract target."""
    try:
      with _quiet_orbax():
        out = self._mngr.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
          ),
        )
    except Exception as e:  # orbax raises many kinds; name the checkpoint
      raise BistilError(
        f"checkpoint step {step} in {self.directory} cannot be restored "
        f"({type(e).__name__}: {_first_line(e)})"
      ) from None
    return out["state"], dict(out["data"] or {})

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """(step, state, data) of the newest step that restores; None if none.

    A step that fails to restore (a deleted or truncated chunk, a bad
    metadata file) is reported in one warning line and moved aside to
    `checkpoints.bad/<step>` (never deleted: it may be worth inspecting),
    and the next older step is tried. A restored step whose state step
    differs from its name counts as failed too.

    Raises:
      BistilError: steps exist but none restores.
    """
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      return None
    failed: list[tuple[int, BistilError]] = []
    for step in steps:
      try:
        state, data = self.restore(step, abstract_state)
        held = getattr(state, "step", None)
        if held is not None and int(held) != step:
          raise BistilError(
            f"checkpoint step {step} in {self.directory} holds step {int(held)}"
          )
      except BistilError as e:
        failed.append((step, e))
        continue
      # Only now, with an older good step in hand, are the newer ones
      # known to be damaged (not, say, a target that no step matches).
      for bad, e in failed:
        moved = self._move_aside(bad)
        log.warning("%s; moved it to %s, resuming from step %d", e, moved, step)
      return step, state, data
    raise BistilError(
      f"no checkpoint in {self.directory} restores (steps {sorted(steps)}; "
      f"newest: {failed[0][1]}); nothing was moved or deleted; rerun with "
      "--overwrite to start again, or another --workdir"
    )

  def _move_aside(self, step: int) -> epath.Path:
    """Moves step dir `step` to checkpoints.bad/<step>[.n]; never deletes."""
    bad = self.directory.parent / BAD_CHECKPOINTS
    if jax.process_index() == 0:
      # A file, not just mkdir: GCS has no empty directories, and rename
      # needs the destination's folder to exist.
      bad.mkdir(parents=True, exist_ok=True)
      readme = bad / "README"
      if not readme.exists():
        readme.write_text(
          "Checkpoint steps that failed to restore, moved here by bistil "
          "when the run fell back to an older step. Not used by bistil; "
          "safe to inspect or delete.\n"
        )
      dst = bad / str(step)
      n = 1
      while dst.exists():
        dst = bad / f"{step}.{n}"
        n += 1
      (self.directory / str(step)).rename(dst)
    else:  # pragma: no cover - multi-host
      dst = bad / str(step)
    self._mngr.reload()
    return dst

  def wait(self) -> None:
    """Waits for the async save in flight; raises what it raised."""
    try:
      self._mngr.wait_until_finished()
    except Exception as e:
      if not paths.is_disk_full(e):
        raise
      raise self._disk_full() from None

  def close(self) -> None:
    """Waits for the save in flight and joins orbax's threads.

    Always closes the manager, even after a failed save: its threads left
    running at interpreter exit bury the error under thousands of lines
    (`sys.meta_path is None`). A failure already raised by `save` or
    `wait` is not raised again.
    """
    try:
      self.wait()
    except Exception:
      if not self._failed:
        raise
    finally:
      atexit.unregister(self._close_at_exit)
      with contextlib.suppress(Exception):
        self._mngr.close()

  def _close_at_exit(self) -> None:
    with contextlib.suppress(Exception):
      self._mngr.close()

  def _disk_full(self) -> BistilError:
    """A failed save on a full disk as one line; the partial step removed.

    Orbax writes a step into `<step>.orbax-checkpoint-tmp...` and renames
    it when complete, so the last good step is untouched; the partial
    directory is removed here to give the space back.
    """
    if self._failed:
      return BistilError(f"checkpoint save in {self.directory} failed")
    self._failed = True
    step, nbytes = self._saving or (None, None)
    with contextlib.suppress(Exception):
      self._mngr.wait_until_finished()  # nothing may write while we clean
    if step is not None and jax.process_index() == 0:
      for d in self.directory.iterdir():
        if d.name.startswith(f"{step}.orbax-checkpoint-tmp"):
          with contextlib.suppress(OSError):
            paths.rmtree(d)
    last = self._mngr.latest_step()
    resume = (
      f"rerun the same command to resume from step {last}"
      if last is not None
      else "rerun the same command"
    )
    what = f"checkpoint step {step}" if step is not None else ""
    if step is not None and nbytes:
      what += f" of about {nbytes:,} bytes"  # before orbax's compression
    return paths.DiskFullError(
      self.directory,
      what=what,
      advice=f"nothing was saved for that step; free some space and {resume}",
    )


def _nbytes(tree: Any) -> int:
  """Bytes of the arrays in a pytree (what a checkpoint of it needs)."""
  return sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(tree))


def read_state(
  workdir: str, step: int | None = None
) -> tuple[int, dict[str, Any]]:
  """A checkpointed state as host arrays, on any device topology.

  For exports and inspection outside the training job (which may have run
  on another mesh): every leaf is restored onto this process's first
  device and returned as numpy.

  Returns:
    (step, {"step", "params", "opt_state", ...} as nested dicts).
  """
  directory = _path(workdir) / CHECKPOINTS
  if not directory.is_dir():
    raise BistilError(f"{workdir} has no checkpoints")
  steps = sorted(int(c.name) for c in directory.iterdir() if c.name.isdigit())
  if not steps:
    raise BistilError(f"{workdir} has no finished checkpoint")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise BistilError(f"{workdir} has no checkpoint {step}; it has {steps}")
  path = directory / str(step) / "state"
  if not paths.is_remote(path):
    path = path.absolute()
  ck = ocp.StandardCheckpointer()
  try:
    # The item dir has no step-level metadata file of its own; orbax logs
    # "Metadata file does not exist" for it although the restore is fine.
    with _quiet_orbax():
      meta = ck.metadata(path)
      tree = getattr(meta, "item_metadata", meta)
      dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), tree
      )
      state = ck.restore(path, target)
  except Exception as e:
    raise BistilError(
      f"checkpoint {path} cannot be read ({type(e).__name__}: {_first_line(e)})"
    ) from None
  finally:
    ck.close()
  return step, jax.tree.map(lambda x: jax.device_get(x), dict(state))
