"""`bistil lang-sft` with every input and output on `gs://` (the emulator,
tests/gcs.py), and phase 1 applying the remote language SFT."""

import json
import os

import pytest

from bistil_jax import paths
from bistil_jax.checkpoint import sft as sft_lib
from tests import fixtures
from tests.paths_cli_test import run

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def config(name):
  return os.path.join(REPO, "configs", name)


# tests/train/gcs_train_test.py runs every other training command through the
# same path layer on the emulator; this one adds lang-sft (slow: ~3 min).
@pytest.mark.slow
def test_lang_sft_on_gcs(gcs_root, tmp_path, monkeypatch):
  local = tmp_path / "local"
  teacher = fixtures.make_teacher_dir(str(local), layers=2)
  src = fixtures.write_corpus(str(local / "src.txt"), "aa", 200)
  tgt = fixtures.write_corpus(str(local / "tgt.txt"), "bb", 200)
  r = gcs_root
  paths.copy_tree(teacher, f"{r}/in/teacher")
  for p in (src, tgt):
    paths.copy_file(p, f"{r}/in/{os.path.basename(p)}")
  monkeypatch.chdir(tmp_path)  # a stray local "gs:" dir would appear here
  wd = f"{r}/lang"
  argv = [
    "lang-sft", "--config", config("lang_sft.py:tiny"), "--workdir", wd,
    f"--config.student.model={r}/in/teacher",
    f"--config.data.corpus={r}/in/src.txt",
    f"--config.eval.sets=dev={r}/in/src.txt",
    "--config.train.num_steps=4", "--config.sparse.num_steps=4",
    "--config.train.checkpoint_every=2",
  ]  # fmt: skip
  run(*argv)
  run(*argv)  # a finished run resumes from its remote checkpoints
  sft = sft_lib.load_sft(f"{wd}/export")
  assert sft.meta["kind"] == "language" and sft.nnz > 0
  assert "base" in json.loads(paths.read_text(f"{wd}/results.json"))
  run("distil", "--config", config("distil.py:tiny"), "--workdir",
      f"{r}/distil", f"--config.teacher.model={r}/in/teacher",
      f"--config.data.source={r}/in/src.txt",
      f"--config.data.target={r}/in/tgt.txt",
      f"--config.teacher.sfts=source={wd}/export",
      "--config.train.num_steps=2", "--config.train.export=false")  # fmt: skip
  assert not os.path.exists("gs:"), "a local gs: directory was created"
