"""Where the recipe's stages write, under DIR (a local dir or gs://).

  trim/model/              the vocabulary-trimmed teacher (trim-vocab)
  lang_sft/{source,target}/export/   language SFTs (lang-sft; mode=train)
  distil/workdir/export/   the phase-1 student (distil)
  task_teacher/workdir/export/       the task teacher (finetune)
  sft/workdir/export/      the student's task SFT (sft, phase 2)
  evaluate/{student,teacher}.json    test scores (evaluate)
  measure/{student,teacher}.json     sizes and CPU latency (measure)
  export/model/            the student with its task SFT merged (export-hf)
  report/                  report.md, results.json, scores.png

Each stage's dir also holds its records (recipe/state.py).
"""

from __future__ import annotations

from bistil_jax import configlib, paths
from bistil_jax.errors import BistilError

SIDES = ("source", "target")
# The stages in the order they run (recipe/stages.py `STAGES` runs them).
STAGE_NAMES = ("trim", "lang_sft", "distil", "task_teacher", "sft",
               "evaluate", "measure", "export", "report")  # fmt: skip


def join(base: str, *names: str) -> str:
  """`base/names...` through the path layer (a local dir or gs://...)."""
  return str(paths.path(base).joinpath(*names))


def escape(item: str) -> str:
  r"""A path as one item of a comma-separated config list (`\,`, `\\`)."""
  return item.replace("\\", "\\\\").replace(",", "\\,")


def trimmed(root: str) -> str:
  return join(root, "trim", "model")


def lang_sft_workdir(root: str, side: str) -> str:
  return join(root, "lang_sft", side)


def lang_sfts(c, root: str) -> dict[str, str]:
  """side -> language SFT dir ({} for mode none)."""
  if c.lang_sft.mode == "given":
    return {s: c.lang_sft[s] for s in SIDES}
  if c.lang_sft.mode == "train":
    return {s: join(lang_sft_workdir(root, s), "export") for s in SIDES}
  return {}


def workdir(root: str, stage: str) -> str:
  """The training command's workdir of a training stage."""
  return join(root, stage, "workdir")


def student(c, root: str) -> str:
  """The phase-1 student: the given dir (config.student), else distil's."""
  return c.student or join(workdir(root, "distil"), "export")


def task_sft(root: str) -> str:
  return join(workdir(root, "sft"), "export")


def task_teacher(c, root: str) -> tuple[str, list[str]]:
  """(model dir, SFT dirs applied to it) of the task teacher: the given
  dir, the finetuned HF dir, or the MMT plus its task SFT (a sparse
  finetune exports an SFT dir)."""
  if c.task_teacher.model:
    return c.task_teacher.model, []
  out = join(workdir(root, "task_teacher"), "export")
  if c.task_teacher.train.sparse.enabled:
    return c.teacher, [out]
  return out, []


def merged(root: str) -> str:
  return join(root, "export", "model")


def eval_sets(c) -> list[tuple[str, str]]:
  """(name, spec) of every evaluated split: the source (its test set, else
  task.dev) then each target test set (a bare spec named target.lang)."""
  src = c.task.source_test or c.task.dev
  out = [(c.source.lang, src)] if src else []
  for name, spec in configlib.parse_named_list(c.task.target_tests):
    out.append((c.target.lang if name.startswith("set") else name, spec))
  names = [n for n, _ in out]
  if len(set(names)) != len(names):
    raise BistilError(
      f"task.target_tests: the evaluated sets {names} repeat a name; name "
      "each test set (NAME=SPEC) apart from source.lang"
    )
  return out
