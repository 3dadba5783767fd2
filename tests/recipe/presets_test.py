"""configs/run.py: every preset builds and validates (no files are read)."""

import pytest

from bistil_jax import configlib
from bistil_jax.errors import BistilError
from bistil_jax.recipe import layout, stages
from tests.recipe.common import CONFIG

PAPER = [
  ("ner", "hau", 83.5, 81.0),
  ("dp", "mt", 55.4, 54.1),
  ("nli", "aym", 58.1, 58.9),
  ("qa", "ar", 73.0, 69.4),
]


@pytest.mark.parametrize("task,tgt,ltsft,tf", PAPER)
def test_paper_presets_build_and_validate(task, tgt, ltsft, tf):
  c = configlib.build_config(f"{CONFIG}:paper,task={task},tgt={tgt}")
  stages.validate(c)
  assert (c.source.lang, c.target.lang, c.task.name) == ("en", tgt, task)
  assert (c.paper.ltsft, c.paper.bistil_tf) == (ltsft, tf)
  assert c.task.train.startswith("hf:")
  assert c.task.target_tests.startswith(f"{tgt}=hf:")
  # Each block is its stage's own config, with the paper's budgets.
  assert c.sft.task == c.task_teacher.train.task == task
  assert c.distil.train.num_steps == 200_000
  assert c.distil.train.select_best == "source+target/loss"
  assert c.distil.student.layer_reduction == 2
  assert c.sft.sparse.density == 0.08


def test_the_tiny_preset_validates_for_every_task():
  for task in ("pos", "ner", "nli", "dp", "qa"):
    stages.validate(configlib.build_config(f"{CONFIG}:tiny,task={task}"))


def test_the_paper_has_no_row_for_an_unknown_target():
  with pytest.raises(BistilError, match="no ner row for 'xx'"):
    configlib.build_config(f"{CONFIG}:paper,task=ner,tgt=xx")


def test_the_help_lists_the_stages_in_the_order_they_run():
  # `bistil run --help` reads layout's names without loading the stages.
  assert stages.NAMES == layout.STAGE_NAMES
