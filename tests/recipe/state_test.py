"""Fingerprints, records and the skip / resume / rerun logic of `bistil
run`, with the stages' work replaced by stubs (no training)."""

import dataclasses
import json
import os

import pytest

from bistil_jax import paths
from bistil_jax.errors import BistilError
from bistil_jax.recipe import stages, state
from tests.recipe.common import CONFIG, bistil, stage_lines, stub_stages


def test_fingerprint_is_canonical_and_sensitive():
  a = state.fingerprint({"x": 1, "y": [1, 2]}, {"up": "f0"})
  assert a == state.fingerprint({"y": [1, 2], "x": 1}, {"up": "f0"})
  assert a != state.fingerprint({"x": 2, "y": [1, 2]}, {"up": "f0"})
  assert a != state.fingerprint({"x": 1, "y": [1, 2]}, {"up": "f1"})
  assert len(a) == 16


def test_plan_reads_the_records(tmp_path):
  d = str(tmp_path / "sft")
  s, inputs = {"sft": {"optim": {"learning_rate": 1e-3}}}, {"distil": "d0"}
  p = state.plan("sft", d, s, inputs)
  assert (p.action, p.line()) == ("run", "sft: run (new)")
  state.mark_started(d, p)
  assert state.plan("sft", d, s, inputs).action == "resume"
  state.mark_done(d, p, 1.5)
  assert state.plan("sft", d, s, inputs).line() == "sft: skipped (up to date)"
  s2 = {"sft": {"optim": {"learning_rate": 2e-3}}}
  assert state.plan("sft", d, s2, inputs).line() == (
    "sft: rerun (because sft.optim.learning_rate changed)"
  )
  assert state.plan("sft", d, s, {"distil": "d1"}).line() == (
    "sft: rerun (because its input distil changed)"
  )
  # A torn record reads as absent: the stage is unfinished, not done.
  (tmp_path / "sft" / state.DONE).write_text("{")
  assert state.plan("sft", d, s, inputs).action == "resume"


def test_a_dir_without_records_is_rerun(tmp_path):
  (tmp_path / "trim").mkdir()  # killed before its first record was written
  p = state.plan("trim", str(tmp_path / "trim"), {}, {})
  assert p.action == "rerun" and "no record" in p.reason
  (tmp_path / "trim" / ".stage.started.json.tmp-0a1b2c3d").write_text("{")
  assert state.plan("trim", str(tmp_path / "trim"), {}, {}).action == "rerun"


def test_torn_records_read_as_unfinished(tmp_path):
  d = str(tmp_path / "sft")
  p = state.plan("sft", d, {"x": 1}, {})
  state.mark_started(d, p)
  (tmp_path / "sft" / "out.txt").write_text("partial")
  (tmp_path / "sft" / state.DONE).write_text('{"stage": "sft", "finger')
  assert state.plan("sft", d, {"x": 1}, {}).action == "resume"
  (tmp_path / "sft" / state.STARTED).write_text("")  # both torn: redo
  p = state.plan("sft", d, {"x": 1}, {})
  assert p.action == "rerun" and "unreadable" in p.reason
  (tmp_path / "sft" / state.DONE).write_text('["no", "fingerprint"]')
  assert state.plan("sft", d, {"x": 1}, {}).action == "rerun"


def test_select():
  assert stages.select(None, None) == stages.NAMES
  assert stages.select(None, "distil") == ("trim", "lang_sft", "distil")
  assert stages.select("report,sft", None) == ("sft", "report")
  # Named twice, out of order, spaced: each once, in pipeline order.
  assert stages.select(" sft,trim , sft,", None) == ("trim", "sft")
  assert stages.select("report,trim,distil", "distil") == ("trim", "distil")
  with pytest.raises(BistilError, match="--until distil selects no stage"):
    stages.select("sft,report", "distil")
  for stages_, until in (("sft,bogus", None), (None, "bogus"), (",", None)):
    with pytest.raises(BistilError, match="unknown stage"):
      stages.select(stages_, until)


@pytest.fixture
def stubbed(monkeypatch, tmp_path):
  """Every stage's work replaced by a stub that records that it ran; the
  tiny config over data that is never read."""
  return stub_stages(monkeypatch, f"{tmp_path}/data", str(tmp_path / "run"))


def test_a_changed_setting_reruns_exactly_what_is_downstream(stubbed, capsys):
  ran, _ = stubbed()
  assert ran == list(stages.NAMES)
  assert stubbed()[0] == []  # all up to date
  ran, _ = stubbed("sft.optim.learning_rate=0.01")
  assert ran == ["sft", "evaluate", "measure", "export", "report"]
  out = capsys.readouterr().out
  assert "sft: rerun (because sft.optim.learning_rate changed)" in out
  assert "evaluate: rerun (because its input sft changed)" in out
  assert "task_teacher: skipped (up to date)" in out
  ran, _ = stubbed("sft.optim.learning_rate=0.01", "measure.repeats=3")
  assert ran == ["measure", "report"]
  ran, _ = stubbed("sft.optim.learning_rate=0.01", "measure.repeats=3",
                   "distil.loss.kl=1.0")  # fmt: skip
  assert ran == ["distil", "sft", "evaluate", "measure", "export", "report"]
  ran, _ = stubbed(
    "sft.optim.learning_rate=0.01", "measure.repeats=3", "distil.loss.kl=1.0",
    "task.target_tests=b2=elsewhere.conllu",
  )  # fmt: skip
  assert ran == ["evaluate", "report"]


def test_an_unfinished_stage_resumes(stubbed, tmp_path):
  stubbed()
  os.remove(tmp_path / "run" / "distil" / state.DONE)
  ran, actions = stubbed()
  assert ran == ["distil"] and actions["distil"] == "resume"
  assert actions["sft"] == "skip"  # same settings: its inputs are the same


def test_stages_and_until_run_a_part(stubbed):
  ran, _ = stubbed(selected=stages.select(None, "distil"))
  assert ran == ["trim", "lang_sft", "distil"]
  with pytest.raises(BistilError, match="stage sft reads task_teacher, which"):
    stubbed(selected=("sft",))
  ran, _ = stubbed(selected=("task_teacher", "sft"))
  assert ran == ["task_teacher", "sft"]


def test_a_block_field_the_recipe_fills_is_refused(stubbed, tmp_path):
  with pytest.raises(BistilError, match="config.distil.data.source is set"):
    stubbed("distil.data.source=x.txt")
  with pytest.raises(
    BistilError, match="config.task_teacher.train.task is 'pos' but task.name"
  ):
    stubbed("task.name=ner")
  assert not (tmp_path / "run").exists()


def _records(root):
  return [p for p, _, files in os.walk(root) if state.DONE in files]


def test_bad_input_is_one_line_and_marks_nothing(tmp_path, capsys):
  """Missing teacher, empty corpus, unknown stage, a config key typo."""
  data = tmp_path / "data"
  (data / "corpora").mkdir(parents=True)
  for lang in ("b1", "b2"):
    for name in (f"{lang}.txt", f"{lang}.dev.txt"):
      (data / "corpora" / name).write_text("a sentence\n")
  base = ["run", "--config", f"{CONFIG}:tiny,data={data}",
          "--workdir", tmp_path / "run"]  # fmt: skip
  cases = [
    ([], "config.teacher .*teacher is not an HF model dir"),
    (["--stages", "trim,sfft"], "--stages: unknown stage 'sfft'"),
    (["--config.sft.optim.lr=1"], "unknown config key sft.optim.lr \\(did you"),
    ([f"--config.student={data}"], "config.student .*data is not an HF model"),
  ]
  for extra, want in cases:
    assert bistil(*base, *extra)[0] == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert __import__("re").search(want, err[0]), err
  (data / "teacher").mkdir()
  (data / "teacher" / "config.json").write_text(json.dumps({}))
  (data / "corpora" / "b2.txt").write_text("\n\n")
  assert bistil(*base)[0] == 2
  err = capsys.readouterr().err.strip()
  assert (
    err == f"error: corpus {data}/corpora/b2.txt is empty (no non-empty lines)"
  )
  assert _records(tmp_path / "run") == []


def test_a_directory_of_another_run_is_refused_not_removed(stubbed, tmp_path):
  """A record of another stage, files without any record, a file where a
  stage dir goes: one error before any stage runs, nothing removed."""
  run = tmp_path / "run"
  (run / "sft").mkdir(parents=True)
  (run / "sft" / state.DONE).write_text(
    json.dumps({"stage": "distil", "fingerprint": "0" * 16})
  )
  with pytest.raises(BistilError, match="holds the record of stage 'distil', "):
    stubbed()
  (run / "sft" / state.DONE).unlink()
  (run / "sft" / "mine.txt").write_text("a user's file")
  with pytest.raises(BistilError, match="sft holds files but no record"):
    stubbed()
  assert (run / "sft" / "mine.txt").read_text() == "a user's file"
  os.remove(run / "sft" / "mine.txt")
  (run / "sft").rmdir()
  (run / "report").write_text("a file")
  with pytest.raises(BistilError, match="report is a file, not a stage's"):
    stubbed()
  assert _records(run) == [] and not (run / "trim").exists()


def test_an_interrupt_leaves_the_stage_started_never_done(
  stubbed, tmp_path, monkeypatch
):
  """Ctrl-C inside a stage: `bistil run` exits 130 with its STARTED record
  and no DONE one; the next run resumes it and runs what follows."""

  def interrupted(c, root):
    (tmp_path / "run" / "distil" / "part.txt").write_text("half")
    raise KeyboardInterrupt

  real = stages.BY_NAME["distil"]
  monkeypatch.setitem(
    stages.BY_NAME, "distil", dataclasses.replace(real, run=interrupted)
  )
  args = ["run", "--config", f"{CONFIG}:tiny,data={tmp_path}/data",
          "--workdir", tmp_path / "run"]  # fmt: skip
  code, out = bistil(*args)
  assert code == 130 and stage_lines(out)["distil"] == "run"
  d = tmp_path / "run" / "distil"
  assert (d / state.STARTED).is_file() and not (d / state.DONE).exists()
  assert not (tmp_path / "run" / "sft").exists()
  monkeypatch.setitem(stages.BY_NAME, "distil", real)
  ran, actions = stubbed()
  assert actions["trim"] == "skip" and actions["distil"] == "resume"
  assert ran == list(stages.NAMES[2:])
  assert (d / "part.txt").is_file()  # resumed on its work, not cleared


def test_a_rerun_stopped_while_removing_is_cleared_again(
  stubbed, tmp_path, monkeypatch
):
  stubbed()
  real, calls = paths.rmtree, []

  def stop_at_second(p, missing_ok=True):
    calls.append(p)
    if len(calls) == 2:
      raise KeyboardInterrupt
    real(p, missing_ok)

  monkeypatch.setattr(paths, "rmtree", stop_at_second)
  with pytest.raises(KeyboardInterrupt):
    stubbed("sft.optim.learning_rate=0.01")
  monkeypatch.setattr(paths, "rmtree", real)
  d = tmp_path / "run" / "sft"
  assert (d / "out.txt").exists() and not (d / state.DONE).exists()
  # Back to the old settings: its old outputs are half gone, so not resumed.
  ran, actions = stubbed()
  assert actions["sft"] == "rerun" and ran[0] == "sft"
  assert stubbed()[0] == []


def test_one_run_at_a_time_per_dir(stubbed, tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  other = {"host": "elsewhere", "pid": 1, "start": "2026-01-01T00:00:00"}
  (run / ".lock").write_text(json.dumps(other))
  with pytest.raises(
    BistilError, match="in use by another run .host elsewhere"
  ):
    stubbed()
  assert _records(run) == []
  (run / ".lock").unlink()
  assert stubbed()[0] == list(stages.NAMES)
  assert not (run / ".lock").exists()  # released
