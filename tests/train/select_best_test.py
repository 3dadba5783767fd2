"""Phase 1 keeps its lowest held-out loss (`train.select_best`).

The paper selects the phase-1 checkpoint with the lowest loss on held-out
text, evaluated every so many steps. A tiny distil run is evaluated every
10 steps with the held-out losses scripted to fall and then rise late; the
export must be the lowest-loss step's model, not the last step's.
"""

import json
import os
import tempfile
from unittest import mock

import jax
import numpy as np
from absl.testing import absltest
from flax.traverse_util import flatten_dict

from bistil_jax.checkpoint import hf
from bistil_jax.checkpoint import manager as ckpt
from bistil_jax.errors import BistilError
from bistil_jax.train import distil, driver
from tests import fixtures
from tests.train.task_test import run_cli

# Summed source+target held-out loss by step: lowest at 20, rising after.
SCRIPTED = {10: (2.0, 2.5), 20: (1.0, 1.2), 30: (1.5, 1.4)}


def scripted_eval_fn(real):
  """distil._eval_fn with the held-out losses replaced by SCRIPTED."""

  def make(*args):
    evaluate = real(*args)

    def scripted(state):
      out = evaluate(state)
      step = int(jax.device_get(state.step))
      out["source/loss"], out["target/loss"] = SCRIPTED[step]
      return out

    return scripted

  return make


class SelectionValueTest(absltest.TestCase):
  def test_sums_sets_and_names_what_is_missing(self):
    values = {"source/loss": 1.5, "target/loss": 2.0, "dev/f1": 0.5}
    self.assertEqual(driver.selection_value(values, "source+target/loss"), 3.5)
    self.assertEqual(driver.selection_value(values, "dev/f1"), 0.5)
    for bad in ("source+dev/loss", "loss", "target/acc"):
      with self.assertRaisesRegex(BistilError, "is not evaluated; known"):
        driver.selection_value(values, bad)


class DistilSelectBestTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.TemporaryDirectory()
    root = cls.root = cls._tmp.name
    teacher = fixtures.make_teacher_dir(root)
    src_dev = fixtures.write_corpus(os.path.join(root, "sd.txt"), "aa", 120, 1)
    tgt_dev = fixtures.write_corpus(os.path.join(root, "td.txt"), "bb", 120, 1)
    cls.args = fixtures.distil_args(
      root,
      teacher,
      **{
        "train.num_steps": 30,
        "train.eval_every": 10,
        "train.checkpoint_every": 10,
        "train.keep_checkpoints": 3,
        "eval.sets": f"source={src_dev},target={tgt_dev}",
      },
    )
    cls.wd = os.path.join(root, "run")
    with mock.patch.object(
      distil, "_eval_fn", scripted_eval_fn(distil._eval_fn)
    ):
      code, _, err = run_cli(
        [
          "distil",
          "--workdir",
          cls.wd,
          *cls.args,
          "--config.train.select_best=source+target/loss",
        ]
      )
    assert code == 0, err

  @classmethod
  def tearDownClass(cls):
    cls._tmp.cleanup()
    super().tearDownClass()

  def test_the_export_is_the_lowest_loss_step(self):
    with open(os.path.join(self.wd, driver.BEST, "best.json")) as f:
      info = json.load(f)
    self.assertEqual(info["step"], 20)
    self.assertAlmostEqual(info["value"], sum(SCRIPTED[20]))
    _, exported = hf.load_hf(os.path.join(self.wd, ckpt.EXPORT))
    exported = flatten_dict(exported, sep="/")
    for step, same in ((20, True), (30, False)):
      _, state = ckpt.read_state(self.wd, step)
      trained = flatten_dict(state["params"], sep="/")
      key = "encoder/layer/0/attention/self/query/kernel"
      equal = np.array_equal(np.asarray(trained[key]), exported[key])
      self.assertEqual(equal, same, f"step {step}")

  def test_bad_settings_fail_in_one_line_before_any_work(self):
    cases = [
      ("source+dev/loss", 10, "must be SET/METRIC or SET+SET/METRIC"),
      ("loss", 10, "must be SET/METRIC"),
      ("source/loss", 0, "needs train.eval_every > 0"),
    ]
    for best, every, error in cases:
      wd = os.path.join(self.root, f"bad-{every}-{best.replace('/', '_')}")
      code, _, err = run_cli(
        [
          "distil",
          "--workdir",
          wd,
          *self.args,
          f"--config.train.select_best={best}",
          f"--config.train.eval_every={every}",
        ]
      )
      self.assertEqual(code, 2, err)
      self.assertIn(error, err)
      self.assertEqual(len(err.strip().splitlines()), 1, err)
      self.assertFalse(os.path.exists(wd))


if __name__ == "__main__":
  absltest.main()
