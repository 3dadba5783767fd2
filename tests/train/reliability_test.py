"""Faults as a user meets them, each a CLI run on tiny data (issue 11):
no poisoned checkpoint, recovery without --overwrite, fallback from a
damaged checkpoint, one run per workdir, stop at a signal's step."""

import contextlib
import glob
import io
import os
import random
import subprocess
import tempfile
import time

import jax
import numpy as np
from absl.testing import absltest

from bistil_jax import cli
from bistil_jax.checkpoint import manager as ckpt
from bistil_jax.train import loop
from tests import faults, fixtures

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def run_cli(argv):
  err = io.StringIO()
  with (
    contextlib.redirect_stderr(err),
    contextlib.redirect_stdout(io.StringIO()),
  ):
    code = cli.main(argv)
  return code, err.getvalue()


def spawn(argv, **faults_at):
  """`bistil ARGV` in a subprocess, with faults.command's injections."""
  return subprocess.Popen(
    faults.command(argv, **faults_at),
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def steps_in(wd, name="checkpoints"):
  d = os.path.join(wd, name)
  return (
    sorted(int(s) for s in os.listdir(d) if s.isdigit())
    if os.path.isdir(d)
    else []
  )


def all_finite(tree):
  return all(
    np.all(np.isfinite(x))
    for x in jax.tree.leaves(tree)
    if np.issubdtype(np.asarray(x).dtype, np.floating)
  )


class ReliabilityTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.TemporaryDirectory()
    cls.root = cls._tmp.name
    cls.teacher = fixtures.make_teacher_dir(cls.root)

  @classmethod
  def tearDownClass(cls):
    cls._tmp.cleanup()
    super().tearDownClass()

  def args(self, **over):
    return fixtures.distil_args(self.root, self.teacher, **over)

  def test_nan_leaves_no_poisoned_checkpoint_and_recovers(self):
    wd = os.path.join(self.root, "nan")
    over = {"train.checkpoint_every": 3, "train.log_every": 10}
    code, err = run_cli(
      [
        "distil",
        "--workdir",
        wd,
        *self.args(**over, **{"optim.learning_rate": 1e10}),
      ]
    )
    self.assertEqual(code, 2, err)
    line = err.strip().splitlines()[-1]
    first = int(line.split(" at step ")[1].split(";")[0])
    self.assertRegex(line, r"non-finite .* at step \d+; ")
    self.assertIn("optim.learning_rate", line)
    for step in steps_in(wd):
      self.assertLess(step, first)
      self.assertTrue(all_finite(ckpt.read_state(wd, step)[1]), step)
    self.assertFalse(os.path.exists(os.path.join(wd, "export")))
    code, err = run_cli(
      ["export-hf", "--workdir", wd, "--out", os.path.join(self.root, "x")]
    )
    self.assertEqual(code, 2, err)
    self.assertFalse(os.path.exists(os.path.join(self.root, "x")))

    # The documented recovery: same command, lower learning rate.
    code, err = run_cli(
      [
        "distil",
        "--workdir",
        wd,
        *self.args(**over, **{"optim.learning_rate": 1e-3}),
      ]
    )
    self.assertEqual(code, 0, err)
    run = ckpt.read_run(wd)
    self.assertEqual(run["config"]["optim"]["learning_rate"], 1e-3)
    self.assertEqual(
      [(c["key"], c["old"], c["new"]) for c in run["changes"]],
      [("optim.learning_rate", 1e10, 1e-3)],
    )
    _, state = ckpt.read_state(wd)
    self.assertTrue(all_finite(state["params"]))

  def test_export_refuses_a_non_finite_checkpoint(self):
    # A workdir of an older bistil that saved a NaN state.
    wd = os.path.join(self.root, "poisoned")
    over = {"train.num_steps": 4, "train.checkpoint_every": 4}
    self.assertEqual(
      run_cli(["distil", "--workdir", wd, *self.args(**over)])[0], 0
    )
    step, state = ckpt.read_state(wd)
    state = jax.tree.map(np.array, state)  # writable copies
    leaf = state["params"]["encoder"]["layer"]["0"]["output"]["dense"]["bias"]
    leaf[...] = np.nan
    c = ckpt.Checkpointer(wd, every=1, use_async=False)
    c.save(step + 1, state, {})
    c.close()
    out = os.path.join(self.root, "poisoned_export")
    code, err = run_cli(["export-hf", "--workdir", wd, "--out", out])
    self.assertEqual(code, 2, err)
    self.assertIn("non-finite", err)
    self.assertLen(err.strip().splitlines(), 1)
    self.assertFalse(os.path.exists(out))

  def test_damaged_latest_checkpoint_falls_back(self):
    over = {"train.num_steps": 16, "train.checkpoint_every": 4}
    full = os.path.join(self.root, "full")
    self.assertEqual(
      run_cli(["distil", "--workdir", full, *self.args(**over)])[0], 0
    )
    wd = os.path.join(self.root, "damaged")
    proc = spawn(["distil", "--workdir", wd, *self.args(**over)], exit_after=10)
    _, perr = proc.communicate(timeout=300)
    self.assertEqual(proc.returncode, 137, perr[-2000:])
    self.assertEqual(steps_in(wd), [4, 8])
    chunks = glob.glob(
      os.path.join(wd, "checkpoints", "8", "state", "**", "d", "*"),
      recursive=True,
    )
    os.remove(sorted(chunks)[0])

    proc = spawn(["distil", "--workdir", wd, *self.args(**over)])
    _, perr = proc.communicate(timeout=300)
    self.assertEqual(proc.returncode, 0, perr[-2000:])
    warnings = [l for l in perr.splitlines() if l.startswith("W ")]
    self.assertLen(warnings, 2, perr[-3000:])  # stale lock, bad step
    self.assertIn("stale lock", warnings[0])
    self.assertIn("checkpoint step 8", warnings[1])
    self.assertIn("resuming from step 4", warnings[1])
    self.assertNotIn("Traceback", perr)
    self.assertNotIn("Event loop is closed", perr)
    self.assertTrue(os.path.isdir(os.path.join(wd, "checkpoints.bad", "8")))
    _, a = ckpt.read_state(full, 16)
    _, b = ckpt.read_state(wd, 16)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      np.testing.assert_array_equal(x, y)

  def test_a_second_run_on_the_workdir_is_refused(self):
    wd = os.path.join(self.root, "busy")
    over = {"train.num_steps": 40, "train.log_every": 10}
    proc = spawn(["distil", "--workdir", wd, *self.args(**over)])
    lock = os.path.join(wd, ".lock")
    deadline = time.time() + 120
    while (
      not os.path.exists(lock)
      and proc.poll() is None
      and time.time() < deadline
    ):
      time.sleep(0.05)
    self.assertTrue(os.path.exists(lock), "the first run never took the lock")
    code, err = run_cli(["distil", "--workdir", wd, *self.args(**over)])
    self.assertEqual(code, 2, err)
    self.assertLen(err.strip().splitlines(), 1)
    self.assertIn(f"pid {proc.pid}", err)
    self.assertIn("in use by another run", err)
    _, perr = proc.communicate(timeout=300)
    self.assertEqual(proc.returncode, 0, perr[-2000:])
    rows = [
      r
      for r in loop.read_metrics(os.path.join(wd, "metrics"))
      if "train/loss" in r
    ]
    self.assertEqual([r["step"] for r in rows], [10, 20, 30, 40])
    self.assertFalse(os.path.exists(lock))

  def test_sigterm_at_a_random_step_saves_that_step(self):
    at = random.randint(2, 14)
    wd = os.path.join(self.root, f"sigterm{at}")
    over = {
      "train.num_steps": 16,
      "train.log_every": 100,
      "train.checkpoint_every": 100,
    }
    proc = spawn(
      ["distil", "--workdir", wd, *self.args(**over)],
      sigterm_at=at,
    )
    _, perr = proc.communicate(timeout=300)
    self.assertEqual(proc.returncode, 2, perr[-2000:])
    self.assertIn(f"stopped by signal 15 at train step {at};", perr)
    self.assertEqual(steps_in(wd), [at])
    self.assertFalse(os.path.exists(os.path.join(wd, ".lock")))
    code, err = run_cli(["distil", "--workdir", wd, *self.args(**over)])
    self.assertEqual(code, 0, err)
    self.assertEqual(ckpt.read_state(wd)[0], 16)


if __name__ == "__main__":
  absltest.main()
