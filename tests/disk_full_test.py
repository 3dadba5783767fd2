"""A full disk ends a command in one line (issue 21, item 4).

The commands write to a real, tiny tmpfs (mounting needs root, as on CI;
elsewhere the tests skip and say why): `export-hf` fails writing the model,
`distil` fails writing a checkpoint. Each must exit 2 with one `error:`
line that says the disk is full and names the path, print no traceback,
and leave nothing half-written.
"""

import contextlib
import os
import subprocess
import sys

import pytest

from bistil_jax import paths
from tests import fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def tiny_fs(where, kib: int):
  """A tmpfs of `kib` KiB mounted at `where`, unmounted afterwards."""
  os.makedirs(where)
  if os.geteuid() != 0:
    pytest.skip("mounting a tiny tmpfs needs root (CI runs as root)")
  r = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(where)],
    capture_output=True,
    text=True,
  )
  if r.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
  try:
    yield str(where)
  finally:
    if subprocess.run(["umount", str(where)]).returncode != 0:
      subprocess.run(["umount", "-l", str(where)], check=True)  # still busy


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  root = tmp_path_factory.mktemp("in")
  return fixtures.make_teacher_dir(str(root), layers=2), str(root)


def bistil(*argv, cwd):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run(
    [sys.executable, "-m", "bistil_jax.cli", *map(str, argv)],
    cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
  )  # fmt: skip


def listing(root) -> list[str]:
  return sorted(
    os.path.relpath(os.path.join(d, n), root)
    for d, dirs, files in os.walk(root)
    for n in dirs + files
  )


def one_error_line(r) -> str:
  assert r.returncode == 2, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
  assert len(errors) == 1, r.stderr[-3000:]
  assert r.stderr.rstrip().endswith(errors[0]), r.stderr[-3000:]
  return errors[0]


def test_export_hf_on_a_full_disk(teacher, tmp_path):
  model, _ = teacher  # about 900 KB of weights: no file fits in 256 KiB
  with tiny_fs(tmp_path / "fs", 256) as fs:
    out = os.path.join(fs, "out")
    r = bistil("export-hf", "--model", model, "--out", out, cwd=tmp_path)
    line = one_error_line(r)
    assert f"{out}: the disk is full" in line, line
    assert "bytes needed" in line and "bytes free" in line, line
    assert listing(fs) == []  # no half-written export, no temporary dir


def test_distil_checkpoint_on_a_full_disk(teacher, tmp_path):
  """The first checkpoint fits, the second does not (keep=3 would keep
  both): the run stops at the second with one line, the first is kept and
  the partial step is removed."""
  model, root = teacher
  with tiny_fs(tmp_path / "fs", 1300) as fs:
    wd = os.path.join(fs, "run")
    r = bistil(
      "distil", "--workdir", wd, *fixtures.distil_args(root, model),
      "--config.train.num_steps=6", "--config.train.checkpoint_every=2",
      cwd=tmp_path,
    )  # fmt: skip
    line = one_error_line(r)
    assert f"{wd}/checkpoints: the disk is full" in line, line
    assert "checkpoint step 4 of about" in line, line
    assert "resume from step 2" in line, line
    # Only log lines before it: orbax's writer-thread tracebacks and the
    # closed-loop reports of its other writes are gone.
    noise = [
      ln for ln in r.stderr.splitlines()
      if not ln.startswith(("I ", "W ", "error:"))
    ]  # fmt: skip
    assert not noise, r.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2"]
    assert not os.path.exists(os.path.join(wd, ".lock"))


def test_disk_full_is_recognised_in_each_form():
  tensorstore = ValueError(
    'RESOURCE_EXHAUSTED: Error writing "params.x/0": Failed to write 263707 '
    "bytes to file 18: No space left on device [os_error_code='28']"
  )
  assert paths.is_disk_full(tensorstore)
  assert paths.is_disk_full(OSError(28, "No space left on device"))
  try:
    try:
      raise OSError(122, "Disk quota exceeded")
    except OSError as e:
      raise RuntimeError("save failed") from e
  except RuntimeError as e:
    assert paths.is_disk_full(e)
  assert not paths.is_disk_full(OSError(13, "Permission denied"))
  assert not paths.is_disk_full(ValueError("RESOURCE_EXHAUSTED: out of memory"))


def test_disk_full_error_is_one_line(tmp_path):
  e = paths.DiskFullError(tmp_path / "out", 1234567, what="writing x.bin")
  text = str(e)
  assert "\n" not in text
  assert text.startswith(f"{tmp_path / 'out'}: the disk is full (writing x.bin")
  assert "1,234,567 bytes needed" in text and "bytes free" in text


def test_metrics_row_on_a_full_disk(tmp_path):
  """A metrics row that cannot be written (the disk filled mid-run) is one
  line naming metrics.jsonl, not an OSError traceback."""
  from bistil_jax.train import loop  # noqa: PLC0415

  writer = loop.MetricWriter(str(tmp_path / "metrics"))
  writer.scalars(1, {"train/loss": 1.0})

  class FullDisk:
    def __init__(self, f):
      self.f = f

    def write(self, text):
      raise OSError(28, "No space left on device")

    def close(self):
      self.f.close()

  writer._jsonl = FullDisk(writer._jsonl)  # noqa: SLF001 - the lowest layer
  try:
    with pytest.raises(paths.DiskFullError, match="metrics.jsonl: the disk"):
      writer.scalars(2, {"train/loss": 1.0})
  finally:
    writer.close()
