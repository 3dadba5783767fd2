"""Workdirs and Orbax checkpoints shared by every training phase.

A workdir holds (DESIGN.md "workdir"):
  run.json        the phase and the config as run (written once, at step 0)
  checkpoints/    Orbax CheckpointManager steps: items "state" (TrainState,
                  masks included where a phase has them) and "data" (the
                  input iterator position, JSON)
  metrics/        TensorBoard event files + metrics.jsonl
  export/         the exported HF model dir (or SFT dir)

Running a command again on its workdir resumes from the latest checkpoint.
A workdir made by another phase or config is refused unless the caller
passes overwrite=True; a non-empty directory that is not a bistil workdir is
always refused, so no user data is ever removed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp

from bistil_jax import configlib
from bistil_jax.errors import BistilError

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
METRICS = "metrics"
EXPORT = "export"
OURS = (RUN_FILE, CHECKPOINTS, METRICS, EXPORT)


def _write_json_atomic(path: str, obj: Any) -> None:
  d = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".run-", dir=d)
  with os.fdopen(fd, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def read_run(workdir: str) -> dict[str, Any]:
  """The run.json of a workdir."""
  path = os.path.join(workdir, RUN_FILE)
  if not os.path.isfile(path):
    raise BistilError(f"{workdir} is not a bistil workdir (no {RUN_FILE})")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise BistilError(f"{path} is unreadable: {e}") from None


def prepare_workdir(
  workdir: str,
  phase: str,
  config: Mapping[str, Any],
  *,
  overwrite: bool = False,
  resume_safe: Sequence[str] = (),
  outputs: Sequence[str] = (),
) -> bool:
  """Creates or checks a workdir; returns True when it may hold a run.

  Args:
    workdir: the directory.
    phase: "distil", "sft", ... recorded and compared.
    config: the plain config dict of this run.
    overwrite: replace the bistil outputs of a different run.
    resume_safe: dotted config keys allowed to differ on resume (logging
      and checkpoint cadence).
    outputs: names the phase writes besides run.json, checkpoints/,
      metrics/ and export/ (removed with them on overwrite).

  Returns:
    True if the workdir already held this run (resume), else False.

  Raises:
    BistilError: the dir belongs to another run (without overwrite) or is a
      non-empty directory that bistil did not make.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise BistilError(f"workdir {workdir} exists and is not a directory")
  os.makedirs(workdir, exist_ok=True)
  entries = [e for e in os.listdir(workdir) if not e.startswith(".")]
  run_path = os.path.join(workdir, RUN_FILE)
  resumed = False
  if entries and not os.path.isfile(run_path):
    raise BistilError(
      f"workdir {workdir} is not empty and is not a bistil workdir; "
      "choose an empty or new directory"
    )
  if os.path.isfile(run_path):
    old = read_run(workdir)
    diffs = []
    if old.get("phase") != phase:
      diffs.append(f"phase ({old.get('phase')} != {phase})")
    diffs += [
      k
      for k in configlib.diff_keys(old.get("config", {}), dict(config))
      if not any(k == s or k.startswith(s + ".") for s in resume_safe)
    ]
    if diffs and not overwrite:
      raise BistilError(
        f"workdir {workdir} holds another run (differs in: "
        f"{', '.join(diffs[:8])}); use --overwrite or another --workdir"
      )
    if diffs:
      log.warning("--overwrite: removing the previous run in %s", workdir)
      if jax.process_index() == 0:
        for name in (*OURS, *outputs):
          p = os.path.join(workdir, name)
          if os.path.isdir(p):
            shutil.rmtree(p)
          elif os.path.exists(p):
            os.remove(p)
    else:
      resumed = True
  if not resumed and jax.process_index() == 0:
    _write_json_atomic(run_path, {"phase": phase, "config": dict(config)})
  return resumed


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs with shardings: the restore target of a tree."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
    tree,
  )


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
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINTS))
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
    return self._mngr.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data))
      ),
      force=force,
    )

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores step `step` into the (sharded) abstract target."""
    try:
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
        f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
      ) from e
    return out["state"], dict(out["data"] or {})

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


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
  directory = os.path.abspath(os.path.join(workdir, CHECKPOINTS))
  if not os.path.isdir(directory):
    raise BistilError(f"{workdir} has no checkpoints")
  steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit())
  if not steps:
    raise BistilError(f"{workdir} has no finished checkpoint")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise BistilError(f"{workdir} has no checkpoint {step}; it has {steps}")
  path = os.path.join(directory, str(step), "state")
  ck = ocp.StandardCheckpointer()
  try:
    meta = ck.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), tree
    )
    state = ck.restore(path, target)
  except Exception as e:
    raise BistilError(
      f"checkpoint {path} cannot be read ({type(e).__name__}: "
      f"{str(e).splitlines()[0][:200]})"
    ) from e
  finally:
    ck.close()
  return step, jax.tree.map(lambda x: jax.device_get(x), dict(state))
