"""`bistil run` with every path on `gs://` (the offline emulator,
tests/gcs.py): the records and plans of each stage on the bucket with the
stages stubbed (fast), and (slow) the whole tiny recipe reading its teacher,
corpora and task files from the bucket and writing its workdir, merged
export and report there. Nothing may land on the local disk under a `gs:`
name."""

import json
import os

import pytest

from bistil_jax import paths
from bistil_jax.checkpoint import hf
from bistil_jax.errors import BistilError
from bistil_jax.recipe import stages, state
from tests.recipe.common import (
  bistil,
  make_data,
  run_args,
  stage_lines,
  stub_stages,
)


def test_records_and_plans_on_gcs(gcs_root, monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)  # a stray local "gs:" dir would appear here
  d = f"{gcs_root}/records/sft"
  s, inputs = {"sft": {"optim": {"learning_rate": 1e-3}}}, {"distil": "d0"}
  p = state.plan("sft", d, s, inputs)
  assert p.line() == "sft: run (new)"
  state.mark_started(d, p)
  assert state.plan("sft", d, s, inputs).action == "resume"
  state.mark_done(d, p, 1.5)
  assert state.plan("sft", d, s, inputs).line() == "sft: skipped (up to date)"
  assert state.done_fingerprint(d) == p.fingerprint
  s2 = {"sft": {"optim": {"learning_rate": 2e-3}}}
  assert state.plan("sft", d, s2, inputs).line() == (
    "sft: rerun (because sft.optim.learning_rate changed)"
  )
  paths.write_text(f"{d}/{state.DONE}", "{")  # torn: unfinished, not done
  assert state.plan("sft", d, s, inputs).action == "resume"
  other = f"{gcs_root}/records/trim"
  paths.write_text(f"{other}/model/config.json", "{}")
  with pytest.raises(BistilError, match="holds files but no record"):
    state.plan("trim", other, {}, {})  # not this run's: never removed
  paths.write_text(f"{other}/{state.STARTED}", "")  # ours, torn
  p = state.plan("trim", other, {}, {})
  assert p.action == "rerun" and "unreadable" in p.reason
  state.clear(other, "trim")
  assert [c.name for c in paths.path(other).iterdir()] == [state.STARTED]
  assert state.plan("trim", other, {}, {}).action == "rerun"

  # The runner over stubbed stages: run all, skip all, rerun downstream.
  go = stub_stages(monkeypatch, f"{gcs_root}/data", f"{gcs_root}/run")
  ran, _ = go()
  assert ran == list(stages.NAMES)
  for name in stages.NAMES:
    rec = json.loads(paths.read_text(f"{gcs_root}/run/{name}/{state.DONE}"))
    assert rec["stage"] == name
  assert go() == ([], {n: "skip" for n in stages.NAMES})
  paths.rmtree(f"{gcs_root}/run/distil/{state.DONE}")
  ran, actions = go("sft.optim.learning_rate=0.01")
  assert ran == ["distil", "sft", "evaluate", "measure", "export", "report"]
  assert actions["distil"] == "resume" and actions["sft"] == "rerun"
  assert go("sft.optim.learning_rate=0.01")[0] == []
  assert not os.path.exists("gs:"), "a local gs: directory was created"


# The files of `bistil synth` that configs/run.py:tiny,task=pos reads.
INPUTS = [
  *(f"corpora/{n}" for n in ("b1.txt", "b1.dev.txt", "b2.txt", "b2.dev.txt")),
  *(f"pos/b1/{n}.conllu" for n in ("train", "dev", "test")),
  "pos/b2/test.conllu",
]


@pytest.mark.slow
def test_the_whole_run_on_gcs(gcs_root, tmp_path_factory, monkeypatch):
  local = make_data(str(tmp_path_factory.mktemp("recipe") / "synth"))
  monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
  data = f"{gcs_root}/synth"
  paths.copy_tree(os.path.join(local, "teacher"), f"{data}/teacher")
  for name in INPUTS:
    paths.copy_file(os.path.join(local, name), f"{data}/{name}")
  root = f"{gcs_root}/run"
  code, out = bistil(*run_args(data, root))
  assert code == 0
  assert stage_lines(out) == {n: "run" for n in stages.NAMES}
  res = json.loads(paths.read_text(f"{root}/report/results.json"))
  assert res["sets"] == ["b1", "b2"] and res["export"] == f"{root}/export/model"
  assert 0 <= res["scores"]["student"]["b2"]["accuracy"] <= 1
  assert set(res["stages"]) == set(stages.NAMES) - {"report"}
  assert "| b2 |" in paths.read_text(f"{root}/report/report.md")
  assert paths.path(f"{root}/report/scores.png").is_file()
  model, _ = hf.load_hf(f"{root}/export/model")  # the merged student
  assert model.config.head == "token_classification"
  assert model.config.num_hidden_layers == 1
  code, out = bistil(*run_args(data, root))  # all done: nothing runs
  assert code == 0 and set(stage_lines(out).values()) == {"skipped"}
  assert len(stage_lines(out)) == len(stages.NAMES)
  assert not os.path.exists("gs:"), "a local gs: directory was created"
