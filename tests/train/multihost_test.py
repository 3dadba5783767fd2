"""A real two-process phase-1 run on one machine (gloo CPU collectives):
each process reads its shard of the corpora, the global batch is assembled
from host-local pieces, and both processes see the same global loss."""

import os
import re
import socket
import subprocess
import sys
import tempfile

from absl.testing import absltest

from bistil_jax.checkpoint import hf
from bistil_jax.checkpoint import manager as ckpt
from tests import fixtures

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class TwoProcessTest(absltest.TestCase):
  def test_two_processes_train_one_model(self):
    with tempfile.TemporaryDirectory() as root:
      teacher = fixtures.make_teacher_dir(root)
      wd = os.path.join(root, "run")
      args = fixtures.distil_args(
        root,
        teacher,
        **{
          "train.num_steps": 6,
          "train.log_every": 3,
          "train.checkpoint_every": 3,
        },
      )
      port = free_port()
      procs = []
      for i in range(2):
        env = dict(
          os.environ,
          XLA_FLAGS="--xla_force_host_platform_device_count=4",
          JAX_PLATFORMS="cpu",
          BISTIL_DISTRIBUTED="1",
          BISTIL_COORDINATOR=f"127.0.0.1:{port}",
          BISTIL_NUM_PROCESSES="2",
          BISTIL_PROCESS_ID=str(i),
        )
        procs.append(
          subprocess.Popen(
            [
              sys.executable,
              "-m",
              "bistil_jax.cli",
              "distil",
              "--workdir",
              wd,
              *args,
            ],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
          )
        )
      logs = [p.communicate(timeout=400)[0] for p in procs]
      for p, log in zip(procs, logs, strict=True):
        self.assertEqual(p.returncode, 0, log[-3000:])
      pattern = re.compile(r"step 6/6 .*?\| loss ([0-9.e+-]+)")
      losses = [pattern.search(log).group(1) for log in logs]
      self.assertEqual(losses[0], losses[1])
      self.assertIn("process 1 of 2, 4 local / 8 global devices", logs[1])
      self.assertEqual(ckpt.Checkpointer(wd, every=3).all_steps(), [3, 6])
      model, _ = hf.load_hf(os.path.join(wd, "export"))
      self.assertEqual(model.config.num_hidden_layers, 2)


if __name__ == "__main__":
  absltest.main()
