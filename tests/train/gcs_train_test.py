"""The training commands with every input and output on `gs://` (the
fake-gcs-server emulator, tests/gcs.py): `distil`, `pretrain`, `finetune`
(LT-SFT) and `sft` read their models, tokenizers, corpora and task data
from the bucket, write workdirs (run.json, checkpoints, metrics, export)
there, and `export-hf --workdir` and `evaluate` read them back. Nothing may
land on the local disk under a `gs:` name."""

import json
import os

import pytest

from bistil_jax import paths
from bistil_jax.checkpoint import hf
from bistil_jax.train import loop
from tests import fixtures
from tests.paths_cli_test import run

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def config(name):
  return os.path.join(REPO, "configs", name)


@pytest.fixture
def remote(gcs_root, tmp_path):
  """The fixture teacher, corpora and POS data uploaded to the bucket."""
  local = tmp_path / "local"
  teacher = fixtures.make_teacher_dir(str(local))
  src = fixtures.write_corpus(str(local / "src.txt"), "aa", 200)
  tgt = fixtures.write_corpus(str(local / "tgt.txt"), "bb", 200)
  pos = fixtures.write_conllu(str(local / "train.conllu"), 48, 0)
  out = {}
  for name, p in (("teacher", teacher), ("src", src), ("tgt", tgt)):
    dst = f"{gcs_root}/in/{os.path.basename(p)}"
    copy = paths.copy_tree if os.path.isdir(p) else paths.copy_file
    copy(p, dst)
    out[name] = dst
  out["pos"] = f"{gcs_root}/in/train.conllu"
  paths.copy_file(pos, out["pos"])
  out["root"] = gcs_root
  return out


def test_every_training_command_on_gcs(remote, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a stray local "gs:" dir would appear here
  r = remote["root"]
  tiny = ["--config.train.num_steps=4", "--config.train.checkpoint_every=2"]
  data = [
    f"--config.data.source={remote['src']}",
    f"--config.data.target={remote['tgt']}",
  ]
  # Phase 1 from the remote teacher into a remote workdir.
  wd = f"{r}/distil"
  run("distil", "--config", config("distil.py:tiny"), "--workdir", wd,
      f"--config.teacher.model={remote['teacher']}", *data, *tiny)  # fmt: skip
  student = f"{wd}/export"
  assert hf.load_hf(student)[0].config.num_hidden_layers == 2
  run_json = json.loads(paths.read_text(f"{wd}/run.json"))
  assert run_json["phase"] == "distil"
  assert loop.read_metrics(f"{wd}/metrics"), "no metrics rows on gs://"
  # A rerun resumes from the remote checkpoints.
  run("distil", "--config", config("distil.py:tiny"), "--workdir", wd,
      f"--config.teacher.model={remote['teacher']}", *data, *tiny)  # fmt: skip
  run("export-hf", "--workdir", wd, "--out", f"{r}/exported")
  assert hf.load_hf(f"{r}/exported")[0].config.num_hidden_layers == 2
  # MLM pre-training of the remote student.
  run("pretrain", "--config", config("pretrain.py:tiny"),
      "--workdir", f"{r}/mlm", f"--config.student.model={student}",
      *data, *tiny)  # fmt: skip
  # Teacher task-tuning (LT-SFT: both stages, the mask in checkpoints).
  task = [
    f"--config.data.train={remote['pos']}",
    f"--config.eval.sets=dev={remote['pos']}",
    "--config.train.epochs=0.5",
  ]
  run("finetune", "--config", config("finetune.py:pos,variant=tiny"),
      "--workdir", f"{r}/teacher", f"--config.student.model={remote['teacher']}",
      *task)  # fmt: skip
  teacher_pos = f"{r}/teacher/export"
  # Phase 2 against it, then evaluate the student + SFT.
  run("sft", "--config", config("sft.py:pos,variant=tiny"),
      "--workdir", f"{r}/sft", f"--config.student.model={student}",
      f"--config.teacher.model={teacher_pos}", "--config.sparse.epochs=0.5",
      *task)  # fmt: skip
  results = json.loads(paths.read_text(f"{r}/sft/results.json"))
  out = f"{r}/eval.json"
  run("evaluate", "--model", student, "--sft", f"{r}/sft/export",
      "--task", "pos", "--data", f"dev={remote['pos']}", "--max-seq-len", "64",
      "--out", out)  # fmt: skip
  assert json.loads(paths.read_text(out))["dev"] == results["dev"]
  assert not os.path.exists("gs:"), "a local gs: directory was created"
