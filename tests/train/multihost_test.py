"""Real two-process runs on one machine (gloo CPU collectives, 2 x 4 CPU
devices) of phase 1 and of LT-SFT task training on FSDP meshes: each
process reads only its part of the data, the global batch is assembled
from host-local pieces, process 0 exports one model, and its parameters
equal those of a one-process 8-device run within 1e-5."""

import json
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np
from absl.testing import absltest
from flax.traverse_util import flatten_dict

from bistil_jax import sparse
from bistil_jax.checkpoint import hf
from bistil_jax.checkpoint import manager as ckpt
from tests import fixtures

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TIMEOUT_S = 600


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(argv, processes, devices):
  """Starts `bistil ARGV` as `processes` coordinated processes."""
  port = free_port()
  procs = []
  for i in range(processes):
    env = dict(
      os.environ,
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
      JAX_PLATFORMS="cpu",
    )
    if processes > 1:
      env.update(
        BISTIL_DISTRIBUTED="1",
        BISTIL_COORDINATOR=f"127.0.0.1:{port}",
        BISTIL_NUM_PROCESSES=str(processes),
        BISTIL_PROCESS_ID=str(i),
      )
    procs.append(
      subprocess.Popen(
        [sys.executable, "-m", "bistil_jax.cli", *argv],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
    )
  return procs


def finish(procs):
  logs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
  for p, log in zip(procs, logs, strict=True):
    assert p.returncode == 0, log[-4000:]
  return logs


def flat(params):
  return {k: np.asarray(v) for k, v in flatten_dict(params, sep="/").items()}


class TwoProcessTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self._tmp = tempfile.TemporaryDirectory()
    self.root = self._tmp.name
    self.teacher = fixtures.make_teacher_dir(self.root)

  def tearDown(self):
    self._tmp.cleanup()
    super().tearDown()

  def assert_same_params(self, a_dir, b_dir):
    a, b = flat(hf.load_hf(a_dir)[1]), flat(hf.load_hf(b_dir)[1])
    self.assertEqual(sorted(a), sorted(b))
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-5, err_msg=k)

  def test_phase_one_two_hosts_equal_one_host(self):
    args = fixtures.distil_args(
      self.root,
      self.teacher,
      **{
        "train.num_steps": 6,
        "train.log_every": 3,
        "train.checkpoint_every": 3,
        "data.shards": 2,  # the same global batches on 1 and 2 hosts
      },
    )
    one, two = (os.path.join(self.root, n) for n in ("one", "two"))
    # One after the other: 8 device threads per run on 2 cores already wait
    # long for each other's collectives (XLA's rendezvous gives up at 40 s).
    logs = finish(
      launch(
        ["distil", "--workdir", one, *args, "--config.mesh.shape=(1,8,1)"],
        1,
        8,
      )
    )
    logs += finish(
      launch(
        ["distil", "--workdir", two, *args, "--config.mesh.shape=(2,4,1)"],
        2,
        4,
      )
    )
    self.assertIn("process 1 of 2, 4 local / 8 global devices", logs[2])
    self.assertEqual(ckpt.Checkpointer(two, every=3).all_steps(), [3, 6])
    self.assertIn("exported the model", logs[1])
    self.assertNotIn("exported the model", logs[2])  # process 0 only
    self.assert_same_params(
      os.path.join(one, "export"), os.path.join(two, "export")
    )

  def test_lt_sft_two_hosts_equal_one_host(self):
    train = fixtures.write_conllu(
      os.path.join(self.root, "train.conllu"), 64, 0
    )
    test = fixtures.write_conllu(os.path.join(self.root, "test.conllu"), 20, 1)
    args = [
      "--config",
      os.path.join(REPO, "configs", "finetune.py:pos,variant=tiny"),
      f"--config.student.model={self.teacher}",
      f"--config.data.train={train}",
      f"--config.eval.sets=test={test}",
      "--config.sparse.enabled=true",
      "--config.train.epochs=1",
      "--config.sparse.epochs=1",
      "--config.train.log_every=2",
      "--config.mesh.shape=(1,8,1)",
    ]
    one, two = (os.path.join(self.root, n) for n in ("ft1", "ft2"))
    finish(launch(["finetune", "--workdir", one, *args], 1, 8))
    finish(launch(["finetune", "--workdir", two, *args], 2, 4))
    a = sparse.load_sft(os.path.join(one, "export"))
    b = sparse.load_sft(os.path.join(two, "export"))
    self.assertEqual(sorted(a.diffs), sorted(b.diffs))
    for k in a.diffs:
      np.testing.assert_array_equal(a.diffs[k][0], b.diffs[k][0], err_msg=k)
      np.testing.assert_allclose(
        a.diffs[k][1], b.diffs[k][1], rtol=0, atol=1e-5, err_msg=k
      )
    for k in a.dense:
      np.testing.assert_allclose(a.dense[k], b.dense[k], atol=1e-5, err_msg=k)
    with open(os.path.join(one, "results.json")) as f:
      res_one = json.load(f)
    with open(os.path.join(two, "results.json")) as f:
      res_two = json.load(f)
    self.assertAlmostEqual(
      res_one["test"]["accuracy"], res_two["test"]["accuracy"], places=6
    )


if __name__ == "__main__":
  absltest.main()
