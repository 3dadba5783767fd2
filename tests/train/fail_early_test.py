"""Every training command checks its config before it creates or loads
anything, and takes the workdir lock before the expensive loads: a bad value
leaves no workdir behind (so the corrected command just runs), and a busy
workdir is refused before a teacher or corpus is read."""

import contextlib
import io
import os
import tempfile
from unittest import mock

from absl.testing import absltest, parameterized

from bistil_jax import cli
from bistil_jax.checkpoint import manager as ckpt
from bistil_jax.train import distil, lang_sft, task
from tests import fixtures

# Each command with the required fields set to paths that do not exist:
# nothing may be read before the config is checked and the lock is held.
COMMANDS = {
  "distil": [
    "--config.teacher.model=/nonexistent/teacher",
    "--config.data.source=/nonexistent/src.txt",
    "--config.data.target=/nonexistent/tgt.txt",
  ],
  "pretrain": [
    "--config.student.model=/nonexistent/model",
    "--config.data.source=/nonexistent/src.txt",
    "--config.data.target=/nonexistent/tgt.txt",
  ],
  "finetune": [
    "--config.student.model=/nonexistent/model",
    "--config.data.train=/nonexistent/train.conllu",
  ],
  "sft": [
    "--config.student.model=/nonexistent/model",
    "--config.teacher.model=/nonexistent/teacher",
    "--config.data.train=/nonexistent/train.conllu",
  ],
  "lang-sft": [
    "--config.student.model=/nonexistent/model",
    "--config.data.corpus=/nonexistent/corpus.txt",
  ],
}

# Where each command starts its expensive loads.
LOADERS = {
  "distil": (distil, "_models"),
  "pretrain": (distil, "_models"),
  "finetune": (task, "prepare"),
  "sft": (task, "prepare"),
  "lang-sft": (lang_sft, "_model"),
}


def run_cli(argv):
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    code = cli.main(argv)
  return code, err.getvalue()


def must_not_load(*args, **kwargs):
  raise AssertionError("an input was loaded before the check")


class FailEarlyTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.root = tmp.name

  @parameterized.parameters(
    ("train.num_steps=-5", "train.num_steps .*must be >= [01]"),
    ("optim.learning_rate=-1.0", "config.optim.learning_rate must be > 0"),
    ("train.log_every=0", "config.train.log_every must be >= 1, got 0"),
    ("data.batch_size=0", "config.data.batch_size must be >= 1, got 0"),
  )
  def test_a_bad_value_is_refused_before_anything_exists(self, override, line):
    for command, args in COMMANDS.items():
      if "num_steps" in override and command in ("finetune", "sft"):
        continue  # these run for train.epochs
      wd = os.path.join(self.root, command)
      module, name = LOADERS[command]
      with mock.patch.object(module, name, must_not_load):
        code, err = run_cli(
          [command, "--workdir", wd, *args, f"--config.{override}"]
        )
      self.assertEqual(code, 2, err)
      self.assertRegex(err.strip().splitlines()[-1], f"^error: .*{line}")
      self.assertFalse(os.path.exists(wd), f"{command} made its workdir")

  @parameterized.parameters(
    ("data.mlm_probability=1.5", "data.mlm_probability must be in \\[0, 1\\]"),
    ("data.balance_block=3", "data.balance_block must be even and >= 2"),
    ("data.shards=3", "data.batch_size 8 does not split over 3 data shards"),
    ("student.init=copy", "student.init must be one of"),
    ("eval.sets=dev=x.txt", "phase-1 dev sets are named source or target"),
  )
  def test_a_bad_phase_one_value_is_refused_before_anything_exists(
    self, override, line
  ):
    wd = os.path.join(self.root, "run")
    with mock.patch.object(distil, "_models", must_not_load):
      code, err = run_cli(
        ["distil", "--workdir", wd, *COMMANDS["distil"], f"--config.{override}"]
      )
    self.assertEqual(code, 2, err)
    self.assertRegex(err.strip().splitlines()[-1], f"^error: .*{line}")
    self.assertFalse(os.path.exists(wd))

  @parameterized.parameters(*COMMANDS)
  def test_a_busy_workdir_is_refused_before_the_loads(self, command):
    wd = os.path.join(self.root, "busy")
    module, name = LOADERS[command]
    with ckpt.workdir_lock(wd), mock.patch.object(module, name, must_not_load):
      code, err = run_cli([command, "--workdir", wd, *COMMANDS[command]])
    self.assertEqual(code, 2, err)
    self.assertRegex(
      err.strip().splitlines()[-1], r"^error: workdir .*busy is in use by"
    )
    self.assertFalse(os.path.exists(wd))

  @parameterized.parameters(*COMMANDS)
  def test_another_runs_workdir_is_refused_before_the_loads(self, command):
    wd = os.path.join(self.root, "other")
    os.makedirs(wd)
    # A run.json of another phase (or, for distil, another config).
    other = "finetune" if command == "distil" else "distil"
    ckpt.prepare_workdir(wd, other, {"seed": 1})
    module, name = LOADERS[command]
    with mock.patch.object(module, name, must_not_load):
      code, err = run_cli([command, "--workdir", wd, *COMMANDS[command]])
    self.assertEqual(code, 2, err)
    self.assertRegex(
      err.strip().splitlines()[-1],
      r"^error: workdir .*other holds another run \(differs in: phase",
    )
    self.assertEqual(os.listdir(wd), ["run.json"])
    # Files bistil did not write: refused as well, before the loads.
    mine = os.path.join(self.root, "mine")
    os.makedirs(mine)
    with open(os.path.join(mine, "notes.txt"), "w") as f:
      f.write("keep")
    with mock.patch.object(module, name, must_not_load):
      code, err = run_cli([command, "--workdir", mine, *COMMANDS[command]])
    self.assertEqual(code, 2, err)
    self.assertIn("is not a bistil workdir", err.strip().splitlines()[-1])
    self.assertEqual(os.listdir(mine), ["notes.txt"])

  def test_the_corrected_command_runs(self):
    teacher = fixtures.make_teacher_dir(self.root, layers=2)
    args = fixtures.distil_args(self.root, teacher)
    wd = os.path.join(self.root, "run")
    code, err = run_cli(
      ["distil", "--workdir", wd, *args, "--config.train.num_steps=-5"]
    )
    self.assertEqual(code, 2, err)
    self.assertFalse(os.path.exists(wd))
    # 0 steps: the whole start (lock, loads, run.json, export), no training.
    code, err = run_cli(
      ["distil", "--workdir", wd, *args, "--config.train.num_steps=0"]
    )
    self.assertEqual(code, 0, err)
    self.assertEqual(ckpt.read_run(wd)["config"]["train"]["num_steps"], 0)


if __name__ == "__main__":
  absltest.main()
