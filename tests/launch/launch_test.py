"""launch/*.sh: syntax, shellcheck and the commands a dry run prints."""

import glob
import os
import shutil
import subprocess

from absl.testing import absltest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "launch", "*.sh")))


def dry(script, *args, **env):
  out = subprocess.run(
    ["bash", os.path.join(REPO, "launch", script), "--dry-run", *args],
    env={**os.environ, **env},
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert out.returncode == 0, out.stderr
  return [line for line in out.stdout.splitlines() if line.startswith("+ ")]


class LaunchTest(absltest.TestCase):
  def test_bash_syntax(self):
    self.assertLen(SCRIPTS, 4)
    for s in SCRIPTS:
      subprocess.run(["bash", "-n", s], check=True)

  def test_shellcheck(self):
    if not shutil.which("shellcheck"):
      if os.environ.get("CI"):
        self.fail("CI must install shellcheck (apt-get install shellcheck)")
      self.skipTest("shellcheck is not installed")
    out = subprocess.run(
      ["shellcheck", "-x", *SCRIPTS], cwd=REPO, capture_output=True, text=True
    )
    self.assertEqual(out.returncode, 0, out.stdout)

  def test_tpu_vm_run_prints_one_ssh_to_every_worker(self):
    lines = dry(
      "tpu_vm.sh",
      "run",
      "distil",
      "--workdir",
      "gs://b/run",
      ZONE="us-central2-b",
      TPU="t1",
    )
    self.assertLen(lines, 1)
    self.assertIn("gcloud compute tpus tpu-vm ssh t1 --worker=all", lines[0])
    self.assertIn("BISTIL_DISTRIBUTED=1", lines[0])
    self.assertIn("gs://b/run", lines[0])
    self.assertIn("--zone us-central2-b", lines[0])

  def test_tpu_vm_create_and_copy(self):
    env = dict(ZONE="z", TPU="t1", TYPE="v4-32")
    (create,) = dry("tpu_vm.sh", "create", **env)
    self.assertIn("create t1 --accelerator-type v4-32", create)
    copy = dry("tpu_vm.sh", "copy", **env)
    self.assertEqual([c.split()[1] for c in copy], ["tar", "gcloud", "gcloud"])
    self.assertIn("--worker=all", copy[1])

  def test_local_gpu_one_process_per_gpu(self):
    lines = dry("local_gpu.sh", "distil", "--workdir", "w", NPROC="2")
    self.assertLen(lines, 2)
    for i, line in enumerate(lines):
      self.assertIn(f"CUDA_VISIBLE_DEVICES={i}", line)
      self.assertIn(f"BISTIL_PROCESS_ID={i}", line)
      self.assertIn("BISTIL_NUM_PROCESSES=2", line)

  def test_on_host_bootstraps_then_runs_bistil(self):
    lines = dry("on_host.sh", "distil", "--workdir", "w", EXTRA="cuda")
    self.assertIn("pip install -q .\\[cuda\\]", lines[2])
    self.assertEqual(lines[-1], "+ .venv/bin/bistil distil --workdir w")


if __name__ == "__main__":
  absltest.main()
