"""A sparse LT-SFT stage killed and restarted: the mask comes back from its
checkpoint, the dense stage is not re-run, and the final SFT is
bit-identical to an uninterrupted run's."""

import os
import re
import subprocess
import tempfile

import numpy as np
from absl.testing import absltest

from bistil_jax.checkpoint import sft as sft_lib
from bistil_jax.data import tasks
from tests import faults, fixtures

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def finetune(workdir, args, exit_after=None):
  return subprocess.run(
    faults.command(
      ["finetune", "--workdir", workdir, *args], exit_after=exit_after
    ),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )


class SparseResumeTest(absltest.TestCase):
  def test_killed_sparse_stage_resumes_with_its_mask(self):
    with tempfile.TemporaryDirectory() as root:
      teacher = fixtures.make_teacher_dir(root)
      train = fixtures.write_conllu(os.path.join(root, "train.conllu"), 64, 0)
      args = [
        "--config",
        os.path.join(REPO, "configs", "finetune.py:pos,variant=tiny"),
        f"--config.student.model={teacher}",
        f"--config.data.train={train}",
        "--config.sparse.enabled=true",
        "--config.train.epochs=1",  # 4 dense steps of 16
        "--config.sparse.epochs=2",  # 8 sparse steps
        "--config.train.checkpoint_every=2",
        "--config.train.log_every=2",
      ]
      wd = os.path.join(root, "killed")
      # Step 6 exists in the sparse stage only: the dense one ends at 4.
      out = finetune(wd, args, exit_after=6)
      self.assertEqual(out.returncode, 137, out.stderr[-3000:])
      self.assertTrue(os.path.isdir(os.path.join(wd, "sparse", "checkpoints")))
      out = finetune(wd, args)
      self.assertEqual(out.returncode, 0, out.stderr[-3000:])
      log = out.stderr
      self.assertIn("its mask is restored", log)
      self.assertIn("resuming from", log)
      self.assertNotIn("LT-SFT: ", log.replace("LT-SFT: the sparse", ""))
      self.assertNotIn(os.path.join(wd, "dense"), log)
      ref = os.path.join(root, "whole")
      out = finetune(ref, args)
      self.assertEqual(out.returncode, 0, out.stderr[-3000:])
      # Bucketed batches: at most one compiled step per bucket length.
      compiled = re.findall(r"compiled for (\d+) batch shape", out.stderr)
      self.assertLen(compiled, 2)  # dense and sparse stage
      for n in compiled:
        self.assertBetween(int(n), 1, len(tasks.bucket_lengths(64)))
      a = sft_lib.load_sft(os.path.join(wd, "export"))
      b = sft_lib.load_sft(os.path.join(ref, "export"))
      self.assertEqual(sorted(a.diffs), sorted(b.diffs))
      for k in a.diffs:
        for x, y in zip(a.diffs[k], b.diffs[k], strict=True):
          np.testing.assert_array_equal(x, y, err_msg=k)
      for k in a.dense:
        np.testing.assert_array_equal(a.dense[k], b.dense[k], err_msg=k)


if __name__ == "__main__":
  absltest.main()
