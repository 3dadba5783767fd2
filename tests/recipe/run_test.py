"""`bistil run` end to end on the tiny config over synthetic languages:
an MMT dir in, the merged export and the report out, in one command; and
(slow) resuming after a kill, and a changed phase-2 setting."""

import json
import logging
import os
import subprocess

import pytest

from bistil_jax.recipe import stages
from tests import faults
from tests.recipe.common import REPO, bistil, make_data, run_args, stage_lines


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return make_data(str(tmp_path_factory.mktemp("recipe") / "synth"))


def numbers(root):
  """The results.json numbers that must not depend on how the run went
  (latency does)."""
  with open(os.path.join(root, "report", "results.json")) as f:
    res = json.load(f)
  sizes = {w: {k: v for k, v in z.items() if k != "latency_ms"}
           for w, z in res["size"].items()}  # fmt: skip
  return res["scores"], sizes, res["stages"]["sft"]["fingerprint"]


def test_one_command_from_mmt_to_export_and_report(data, tmp_path):
  root = str(tmp_path / "run")
  code, out = bistil(*run_args(data, root))
  assert code == 0
  assert stage_lines(out) == {n: "run" for n in stages.NAMES}
  for name in ("report.md", "results.json", "scores.png"):
    assert os.path.isfile(os.path.join(root, "report", name))
  with open(os.path.join(root, "report", "results.json")) as f:
    res = json.load(f)
  assert res["sets"] == ["b1", "b2"]
  assert 0 <= res["scores"]["student"]["b2"]["accuracy"] <= 1
  assert res["size"]["student"]["params"] < res["size"]["teacher"]["params"]
  assert res["speedup_cpu"] > 0
  report = open(os.path.join(root, "report", "report.md")).read()
  assert "| b2 |" in report and "Speed-up over the teacher" in report
  # The merged student is a plain HF dir that transformers' pipeline loads.
  import transformers  # noqa: PLC0415

  tagger = transformers.pipeline(
    "token-classification", model=os.path.join(root, "export", "model")
  )
  assert tagger("a b c") is not None
  code, out = bistil(*run_args(data, root))  # all done: nothing runs
  assert code == 0 and set(stage_lines(out).values()) == {"skipped"}

  # The same student and task teacher, given to a second run (as for a
  # second task): phase 1 is not redone, phase 2 reads the given student.
  student = os.path.join(root, "distil", "workdir", "export")
  again = str(tmp_path / "given")
  given = [f"--config.student={student}", "--config.measure.batch=2",
           "--config.task_teacher.model="
           + os.path.join(root, "task_teacher", "workdir", "export")]  # fmt: skip
  code, out = bistil(*run_args(data, again, *given))
  assert code == 0
  assert not os.path.exists(os.path.join(again, "trim", "model"))
  assert not os.path.exists(os.path.join(again, "distil", "workdir"))
  with open(os.path.join(again, "sft", "workdir", "run.json")) as f:
    assert json.load(f)["config"]["student"]["model"] == student
  with open(os.path.join(again, "report", "results.json")) as f:
    res2 = json.load(f)
  assert res2["size"]["student"]["params"] == res["size"]["student"]["params"]
  assert res2["scores"]["teacher"] == res["scores"]["teacher"]
  assert res2["latency_batch"] == 2
  with open(os.path.join(again, "measure", "student.json")) as f:
    assert json.load(f)["latency"][0]["batch_size"] == 2


@pytest.mark.slow
def test_killed_runs_finish_with_the_same_numbers(data, tmp_path, caplog):
  """Killed inside phase 1 (a hard exit after step 7), stopped at a stage
  boundary (--until task_teacher), killed after a stage's work but before
  its record: the resumed run reports what an uninterrupted run does."""
  ref = str(tmp_path / "ref")
  assert bistil(*run_args(data, ref))[0] == 0
  root = str(tmp_path / "killed")
  proc = subprocess.run(
    faults.command(run_args(data, root), exit_after=7),
    cwd=REPO, capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  assert proc.returncode == 137, proc.stderr[-2000:]
  assert not os.path.exists(os.path.join(root, "distil", "stage.json"))
  caplog.set_level(logging.INFO)
  code, out = bistil(*run_args(data, root, "--until", "task_teacher"))
  assert code == 0
  lines = stage_lines(out)
  assert lines["trim"] == "skipped" and lines["distil"] == "resumed"
  # Phase 1 went on from its checkpoint of step 5, not from the start.
  resumed = [r.getMessage() for r in caplog.records if "resuming" in r.msg]
  assert any("distil" in m and m.endswith("step 5") for m in resumed), resumed
  # A kill between the end of sft's work and its record.
  code, out = bistil(*run_args(data, root, "--until", "sft"))
  os.remove(os.path.join(root, "sft", "stage.json"))
  code, out = bistil(*run_args(data, root))
  assert code == 0
  lines = stage_lines(out)
  assert lines["distil"] == "skipped" and lines["sft"] == "resumed"
  assert lines["report"] == "run"
  assert numbers(root) == numbers(ref)


@pytest.mark.slow
def test_a_new_phase_2_learning_rate_reruns_sft_and_later(data, tmp_path):
  root = str(tmp_path / "run")
  assert bistil(*run_args(data, root))[0] == 0
  before = numbers(root)
  code, out = bistil(
    *run_args(data, root, "--config.sft.optim.learning_rate=3e-3")
  )
  assert code == 0
  ran = [n for n, word in stage_lines(out).items() if word != "skipped"]
  assert ran == ["sft", "evaluate", "measure", "export", "report"]
  assert "sft: rerun (because sft.optim.learning_rate changed)" in out
  assert numbers(root)[2] != before[2]
