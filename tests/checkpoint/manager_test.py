"""Workdirs: recovery changes on resume, the lock, checkpoint fallback."""

import asyncio
import gc
import glob
import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bistil_jax.checkpoint import manager as ckpt
from bistil_jax.errors import BistilError

CONFIG = {
  "optim": {"learning_rate": 1e-3, "clip_norm": 1.0, "warmup_steps": 10},
  "data": {"batch_size": 8},
}


def changed(**optim):
  return {**CONFIG, "optim": {**CONFIG["optim"], **optim}}


def test_recovery_keys_change_on_resume_and_are_recorded(tmp_path):
  wd = str(tmp_path / "wd")
  assert not ckpt.prepare_workdir(wd, "distil", CONFIG)
  os.makedirs(os.path.join(wd, "checkpoints", "6"))
  assert ckpt.prepare_workdir(wd, "distil", changed(learning_rate=1e-4))
  run = ckpt.read_run(wd)
  assert run["config"]["optim"]["learning_rate"] == 1e-4
  (change,) = run["changes"]
  assert change["step"] == 6
  assert change["key"] == "optim.learning_rate"
  assert (change["old"], change["new"]) == (1e-3, 1e-4)
  assert "time" in change
  # The same config again: resumes, nothing more recorded.
  assert ckpt.prepare_workdir(wd, "distil", changed(learning_rate=1e-4))
  assert len(ckpt.read_run(wd)["changes"]) == 1


def test_other_keys_and_clipping_on_off_are_refused(tmp_path):
  wd = str(tmp_path / "wd")
  ckpt.prepare_workdir(wd, "distil", CONFIG)
  other = {**CONFIG, "data": {"batch_size": 16}}
  with pytest.raises(BistilError, match="differs in: data.batch_size"):
    ckpt.prepare_workdir(wd, "distil", other)
  with pytest.raises(BistilError, match="turns clipping off"):
    ckpt.prepare_workdir(wd, "distil", changed(clip_norm=0.0))
  assert ckpt.read_run(wd)["config"] == CONFIG  # untouched


def test_lock_refuses_a_second_holder_and_is_released(tmp_path):
  wd = str(tmp_path / "wd")
  with ckpt.workdir_lock(wd):
    info = json.loads(open(os.path.join(wd, ".lock")).read())
    assert info["pid"] == os.getpid() and info["host"] and info["start"]
    with pytest.raises(
      BistilError, match=f"in use by another run .*pid {os.getpid()}"
    ):
      with ckpt.workdir_lock(wd):
        pass
  assert not os.path.exists(os.path.join(wd, ".lock"))
  assert not os.path.exists(wd)  # made for nothing: removed again
  with pytest.raises(ValueError):
    with ckpt.workdir_lock(wd):
      os.makedirs(os.path.join(wd, "checkpoints"))
      raise ValueError("boom")
  assert not os.path.exists(os.path.join(wd, ".lock"))
  assert os.path.isdir(os.path.join(wd, "checkpoints"))


def test_stale_lock_is_taken_over_and_foreign_lock_refused(tmp_path, caplog):
  wd = tmp_path / "wd"
  wd.mkdir()
  dead = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"],
    capture_output=True,
    text=True,
    check=True,
  )
  pid = int(dead.stdout)
  import socket

  lock = wd / ".lock"
  lock.write_text(
    json.dumps({"host": socket.gethostname(), "pid": pid, "start": "x"})
  )
  with caplog.at_level(logging.WARNING):
    with ckpt.workdir_lock(str(wd)):
      assert json.loads(lock.read_text())["pid"] == os.getpid()
  assert "stale lock" in caplog.text
  lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "start": "x"}))
  with pytest.raises(
    BistilError, match="host elsewhere pid 1.*delete the file"
  ):
    with ckpt.workdir_lock(str(wd)):
      pass
  assert lock.exists()  # someone else's lock is never removed


def save_steps(wd, steps):
  c = ckpt.Checkpointer(wd, every=1, keep=10, use_async=False)
  for s in steps:
    c.save(
      s, {"w": jnp.full((4, 4), float(s)), "step": jnp.int32(s)}, {"pos": s}
    )
  c.close()


def target():
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return {
    "w": jax.ShapeDtypeStruct((4, 4), jnp.float32, sharding=dev),
    "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=dev),
  }


def break_step(wd, step):
  files = glob.glob(
    os.path.join(wd, "checkpoints", str(step), "state", "**", "d", "*"),
    recursive=True,
  )
  assert files
  for f in files:
    os.remove(f)


def test_restore_latest_falls_back_and_moves_the_bad_step_aside(
  tmp_path, caplog, capfd
):
  wd = str(tmp_path / "wd")
  save_steps(wd, [3, 6])
  break_step(wd, 6)
  c = ckpt.Checkpointer(wd, every=1, use_async=False)
  with caplog.at_level(logging.WARNING):
    step, state, data = c.restore_latest(target())
  c.close()
  assert step == 3 and data == {"pos": 3}
  np.testing.assert_array_equal(state["w"], np.full((4, 4), 3.0))
  warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
  assert len(warnings) == 1 and "step 6" in warnings[0].getMessage()
  assert "\n" not in warnings[0].getMessage()
  assert "Event loop is closed" not in capfd.readouterr().err
  assert os.path.isdir(os.path.join(wd, "checkpoints.bad", "6", "state"))
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3"]


def _unretrieved_failure(coro_fn):
  """Runs a failing task whose exception nobody retrieves, then collects it
  (asyncio then logs "Task exception was never retrieved")."""
  loop = asyncio.new_event_loop()
  task = loop.create_task(coro_fn())
  loop.run_until_complete(asyncio.sleep(0.01))
  loop.close()
  del task
  gc.collect()


def test_unretrieved_reads_of_a_failed_restore_are_not_logged(tmp_path, caplog):
  async def async_deserialize():  # the name of orbax's array read
    raise ValueError("NOT_FOUND: a chunk of the bad step")

  async def other():
    raise ValueError("somebody else's failure")

  wd = str(tmp_path / "wd")
  save_steps(wd, [3, 6])
  break_step(wd, 6)
  c = ckpt.Checkpointer(wd, every=1, use_async=False)
  c.restore_latest(target())  # installs the filter
  c.close()
  with caplog.at_level(logging.ERROR, logger="asyncio"):
    _unretrieved_failure(async_deserialize)
    _unretrieved_failure(other)
  reports = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
  assert len(reports) == 1, reports
  assert "other()" in reports[0]


def test_restore_latest_error_when_none_restores_moves_nothing(tmp_path):
  wd = str(tmp_path / "wd")
  save_steps(wd, [3])
  break_step(wd, 3)
  c = ckpt.Checkpointer(wd, every=1, use_async=False)
  with pytest.raises(
    BistilError, match="no checkpoint in .* restores .*nothing was moved"
  ):
    c.restore_latest(target())
  c.close()
  assert os.listdir(os.path.join(wd, "checkpoints")) == ["3"]


def test_read_state_is_quiet(tmp_path, caplog, capfd):
  wd = str(tmp_path / "wd")
  save_steps(wd, [2])
  with caplog.at_level(logging.INFO):
    step, state = ckpt.read_state(wd)
  assert step == 2 and float(state["w"][0, 0]) == 2.0
  assert (
    "Metadata file does not exist" not in caplog.text + capfd.readouterr().err
  )


def test_check_finite_tree():
  ckpt.check_finite_tree({"a": np.ones(3), "i": np.arange(3)}, "x")
  with pytest.raises(
    BistilError, match=r"x holds non-finite values \(\['b'\]\)"
  ):
    ckpt.check_finite_tree({"a": np.ones(3), "b": np.array([1.0, np.nan])}, "x")
