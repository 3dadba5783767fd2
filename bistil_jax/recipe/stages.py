"""The recipe's stages: what each reads, what determines it, how it runs.

Every stage works in its own sub-workdir DIR/<stage>/ and runs one or more
public commands: the training stages call the commands' run functions with
their config block (configs/run.py holds each stage's own config), the
others go through `cli.main` with the flags a user would type. Paths go
through `bistil_jax.paths`, so DIR and every input may be gs://.

Where each writes: recipe/layout.py.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from bistil_jax import cli, configlib, paths
from bistil_jax import tasks as tasks_lib
from bistil_jax.data import corpus
from bistil_jax.errors import BistilError
from bistil_jax.recipe import report
from bistil_jax.recipe.layout import (
  SIDES,
  escape,
  eval_sets,
  join,
  lang_sft_workdir,
  lang_sfts,
  merged,
  student,
  task_sft,
  task_teacher,
  trimmed,
  workdir,
)
from bistil_jax.train import distil, lang_sft, task

log = logging.getLogger(__name__)

LANG_SFT_MODES = ("none", "given", "train")


def run_command(argv: list[Any]) -> None:
  """One public CLI command; a failure stops the recipe with its message."""
  argv = [str(a) for a in argv]
  log.info("$ bistil %s", " ".join(argv))
  code = cli.main(argv)
  if code != 0:
    raise BistilError(f"`bistil {argv[0]}` failed (exit {code}); see above")


# ----------------------------------------------- fields the recipe fills
PER_LANGUAGE = "<each language's>"


def derived(c, root: str) -> dict[str, dict[str, str]]:
  """Block -> {field: value} the recipe sets in each stage's config.

  A value "" leaves the block's own value (the user may set it); any other
  value requires the block's field to be "" or that value already.
  """
  sfts = lang_sfts(c, root)
  t_model, t_sfts = task_teacher(c, root)
  task_eval = f"dev={escape(c.task.dev)}" if c.task.dev else ""
  devs = [f"{s}={escape(c[s].dev)}" for s in SIDES if c[s].dev]
  return {
    "lang_sft.train": {
      "student.model": trimmed(root),
      "data.corpus": PER_LANGUAGE,
      "eval.sets": PER_LANGUAGE,
    },
    "distil": {
      "teacher.model": trimmed(root),
      "teacher.sfts": ",".join(f"{s}={escape(d)}" for s, d in sfts.items()),
      "data.source": c.source.corpus,
      "data.target": c.target.corpus,
      "eval.sets": ",".join(devs) if len(devs) == 2 else "",
    },
    "task_teacher.train": {
      "task": c.task.name,
      "student.model": c.teacher,
      "data.train": c.task.train,
      "eval.sets": task_eval,
    },
    "sft": {
      "task": c.task.name,
      "student.model": student(c, root),
      "teacher.model": t_model,
      "teacher.sfts": ",".join(escape(d) for d in t_sfts),
      "data.train": c.task.train,
      "eval.sets": task_eval,
    },
  }


def _get(tree, dotted: str):
  for part in dotted.split("."):
    tree = tree[part]
  return tree


def _set(tree, dotted: str, value) -> None:
  *parents, leaf = dotted.split(".")
  for part in parents:
    tree = tree[part]
  tree[leaf] = value


def filled(c, root: str, block: str, **per_language: str):
  """A copy of the config block `block` with the recipe's fields set."""
  cfg = copy.deepcopy(_get(c, block))
  for key, value in derived(c, root)[block].items():
    if value == PER_LANGUAGE:
      value = per_language[key.replace(".", "_")]
    if value:
      _set(cfg, key, value)
  return cfg


def check_derived(c) -> None:
  """Refuses a stage block that sets a field the recipe fills otherwise."""
  for block, fields in derived(c, "DIR").items():
    for key, value in fields.items():
      mine = _get(c, f"{block}.{key}")
      if mine == "" or mine == value or value == "":
        continue
      if key == "task":
        raise BistilError(
          f"config.{block}.task is {mine!r} but task.name is {value!r}: pick "
          f"the task in the config argument (configs/run.py:VARIANT,"
          f"task={value}) so that every block gets that task's defaults"
        )
      raise BistilError(
        f"config.{block}.{key} is set to {mine!r}, but the recipe fills it "
        "from the top-level fields (teacher, source, target, task) and the "
        "stages before: leave it empty"
      )


# ------------------------------------------------------------ the stages
@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage: the stages it reads, the config fields that determine it
  (dotted keys; the fingerprint hashes their values), an input check made
  before any stage runs, its run function (config, DIR), and the config
  field naming a model dir that, when set, replaces the stage's work (the
  stage then only checks that dir)."""

  name: str
  needs: tuple[str, ...]
  keys: Callable[[Any], tuple[str, ...]]
  run: Callable[[Any, str], None]
  check: Callable[[Any], None] = lambda c: None
  help: str = ""
  given: str = ""

  def given_dir(self, c) -> str:
    """The dir that replaces the stage's work ("" when it runs)."""
    return _get(c, self.given) if self.given else ""


def check(c, name: str) -> None:
  """Stage `name`'s input check: its given dir's, or its own."""
  st = BY_NAME[name]
  given = st.given_dir(c)
  if given:
    _check_model_dir(given, f"config.{st.given}")
  else:
    st.check(c)


def settings(c, keys) -> dict[str, Any]:
  """The plain nested dict of config values at dotted `keys`."""
  out: dict[str, Any] = {}
  for key in keys:
    value = _get(c, key)
    if isinstance(value, configlib.ConfigDict):
      value = configlib.to_dict(value)
    *parents, leaf = key.split(".")
    node = out
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return out


CORPORA = ("source.corpus", "target.corpus", "source.dev", "target.dev")


def _check_model_dir(path: str, what: str) -> None:
  if not (paths.path(path) / "config.json").is_file():
    raise BistilError(f"{what} {path} is not an HF model dir (no config.json)")


def _check_teacher(c) -> None:
  _check_model_dir(c.teacher, "config.teacher")
  corpus.check_corpora([c[k.split(".")[0]][k.split(".")[1]] for k in CORPORA])


def _given(c) -> tuple[str, ...]:
  """("student",) when the student is given: a key of the phase-1 stages'
  fingerprints only then, so that runs recorded before it existed keep
  theirs."""
  return ("student",) if c.student else ()


def _run_trim(c, root: str) -> None:
  argv = ["trim-vocab", "--model", c.teacher, "--source", c.source.corpus]
  argv += ["--target", c.target.corpus, "--out", trimmed(root)]
  argv += ["--threshold", c.trim.threshold if c.trim.threshold > 0 else "none"]
  if c.trim.max_lines:
    argv += ["--max-lines", c.trim.max_lines]
  run_command([*argv, "--quiet", "--overwrite"])


def _lang_sft_keys(c) -> tuple[str, ...]:
  if c.lang_sft.mode == "given":
    keys = ("lang_sft.mode", "lang_sft.source", "lang_sft.target")
  elif c.lang_sft.mode == "train":
    keys = ("lang_sft.mode", "lang_sft.train", *CORPORA)
  else:
    keys = ("lang_sft.mode",)
  return (*_given(c), *keys)


def _check_lang_sft(c) -> None:
  if c.lang_sft.mode == "given":
    for side in SIDES:
      if not (paths.path(c.lang_sft[side]) / "sft.json").is_file():
        raise BistilError(
          f"config.lang_sft.{side} {c.lang_sft[side]} is not an SFT dir "
          "(no sft.json)"
        )


def _run_lang_sft(c, root: str) -> None:
  """`bistil lang-sft` of the trimmed teacher on each language's corpus."""
  if c.lang_sft.mode != "train":
    log.info("lang_sft: mode %s, nothing to train", c.lang_sft.mode)
    return

  for side in SIDES:
    dev = c[side].dev
    cfg = filled(
      c,
      root,
      "lang_sft.train",
      data_corpus=c[side].corpus,
      eval_sets=f"dev={escape(dev)}" if dev else "",
    )
    lang_sft.run(cfg, lang_sft_workdir(root, side))


def _run_distil(c, root: str) -> None:
  distil.run(filled(c, root, "distil"), workdir(root, "distil"))


def _task_teacher_keys(c) -> tuple[str, ...]:
  if c.task_teacher.model:
    return ("task_teacher.model",)
  return (
    "task_teacher.train",
    "teacher",
    "task.name",
    "task.train",
    "task.dev",
  )


def _check_task_teacher(c) -> None:
  _check_model_dir(c.teacher, "config.teacher")


def _run_task_teacher(c, root: str) -> None:
  cfg = filled(c, root, "task_teacher.train")
  task.run(cfg, workdir(root, "task_teacher"), phase="finetune")


def _run_sft(c, root: str) -> None:
  task.run(filled(c, root, "sft"), workdir(root, "sft"), phase="sft")


def models(c, root: str) -> dict[str, tuple[str, list[str]]]:
  """ "student" and "teacher" -> (model dir, SFT dirs): what is compared."""
  return {
    "student": (student(c, root), [task_sft(root)]),
    "teacher": task_teacher(c, root),
  }


def _run_evaluate(c, root: str) -> None:
  """`bistil evaluate` of the student and the task teacher on every set."""
  for who, (model, sfts) in models(c, root).items():
    argv = ["evaluate", "--model", model, "--task", c.task.name]
    argv += ["--batch-size", c.evaluate.batch_size]
    argv += ["--out", join(root, "evaluate", f"{who}.json")]
    for sft in sfts:
      argv += ["--sft", sft]
    for name, spec in eval_sets(c):
      argv += ["--data", f"{name}={spec}"]
    run_command(argv)


def _run_measure(c, root: str) -> None:
  """`bistil measure` of both, at batch 1 by default (the paper's CPU speed
  column)."""
  m = c.measure
  for who, (model, sfts) in models(c, root).items():
    argv = ["measure", model, "--seq-len", m.seq_len, "--repeats", m.repeats]
    argv += ["--batch-shapes", f"{m.batch}x{m.seq_len}", "--device", m.device]
    argv += ["--out", join(root, "measure", f"{who}.json")]
    for sft in sfts:
      argv += ["--sft", sft]
    run_command(argv)


def _run_export(c, root: str) -> None:
  argv = ["export-hf", "--model", student(c, root), "--sft", task_sft(root)]
  run_command([*argv, "--out", merged(root), "--overwrite"])


def _run_report(c, root: str) -> None:
  report.write(c, root, NAMES)


STAGES: tuple[Stage, ...] = (
  Stage("trim", (), lambda c: (*_given(c), "teacher", "source.corpus",
        "target.corpus", "trim"), _run_trim, _check_teacher,
        "trim-vocab: the teacher with the pair's vocabulary",
        given="student"),
  Stage("lang_sft", ("trim",), _lang_sft_keys, _run_lang_sft, _check_lang_sft,
        "lang-sft: a language SFT per language (or given, or none)",
        given="student"),
  Stage("distil", ("trim", "lang_sft"),
        lambda c: (*_given(c), "distil", *CORPORA), _run_distil,
        _check_teacher, "distil: phase 1, the lowest held-out-loss step",
        given="student"),
  Stage("task_teacher", (), _task_teacher_keys, _run_task_teacher,
        _check_task_teacher, "finetune: the task teacher (or given)",
        given="task_teacher.model"),
  Stage("sft", ("distil", "task_teacher"),
        lambda c: ("sft", "task.name", "task.train", "task.dev"), _run_sft,
        help="sft: phase 2, the student's task SFT"),
  Stage("evaluate", ("distil", "task_teacher", "sft"),
        lambda c: ("evaluate", "task.name", "task.dev", "task.source_test",
                   "task.target_tests", "source.lang", "target.lang"),
        _run_evaluate, help="evaluate: student and teacher on every test set"),
  Stage("measure", ("distil", "task_teacher", "sft"), lambda c: ("measure",),
        _run_measure, help="measure: sizes, MACs, CPU batch-1 latency"),
  Stage("export", ("distil", "sft"), lambda c: (), _run_export,
        help="export-hf --sft: the merged student for transformers"),
  Stage("report", ("distil", "evaluate", "measure", "export"),
        lambda c: ("paper", "task.name", "source.lang", "target.lang"),
        _run_report, help="report.md, results.json, scores.png"),
)  # fmt: skip
NAMES = tuple(s.name for s in STAGES)
BY_NAME = {s.name: s for s in STAGES}


def select(stages: str | None, until: str | None) -> tuple[str, ...]:
  """The stages to run, each once and in pipeline order (whatever order
  `stages` names them in): all, those of `stages` (comma-separated), those
  up to and including `until`, or those of `stages` up to `until`.

  Raises:
    BistilError: an unknown stage name, or none selected.
  """
  names = list(NAMES)
  if until:
    if until not in NAMES:
      raise BistilError(
        f"--until: unknown stage {until!r}; stages: {', '.join(NAMES)}"
      )
    names = names[: NAMES.index(until) + 1]
  if stages:
    asked = [s.strip() for s in stages.split(",") if s.strip()]
    bad = [s for s in asked if s not in NAMES]
    if bad or not asked:
      raise BistilError(
        f"--stages: unknown stage {', '.join(map(repr, bad)) or '(none)'}; "
        f"stages: {', '.join(NAMES)}"
      )
    names = [n for n in names if n in asked]
    if not names:
      raise BistilError(
        f"--stages {stages} --until {until} selects no stage: none of "
        f"them is {until} or before it (stages: {', '.join(NAMES)})"
      )
  return tuple(names)


def validate(c) -> None:
  """Checks a run config without touching its files (presets included).

  Raises:
    BistilError: a required field left empty, a bad mode, a task the
      registry does not know, a block field the recipe fills, or phase-1
      checkpoint selection without held-out corpora.
  """
  configlib.check_keys_set(
    c,
    ("teacher", "source.lang", "target.lang", "task.name", "task.train",
     "task.target_tests"),
  )  # fmt: skip
  if not c.student:  # phase 1 runs here: its corpora
    configlib.check_keys_set(c, ("source.corpus", "target.corpus"))
  if c.source.lang == c.target.lang:
    raise BistilError(f"source.lang and target.lang are both {c.source.lang}")
  if c.lang_sft.mode not in LANG_SFT_MODES:
    raise BistilError(
      f"config.lang_sft.mode {c.lang_sft.mode!r}: one of "
      f"{', '.join(LANG_SFT_MODES)}"
    )
  if c.lang_sft.mode == "given":
    configlib.check_keys_set(c, ("lang_sft.source", "lang_sft.target"))

  tasks_lib.get(c.task.name)  # an unknown name: one line listing the known
  selects = c.distil.train.select_best and not c.student
  if selects and not (c.source.dev and c.target.dev):
    raise BistilError(
      f"config.distil.train.select_best={c.distil.train.select_best!r} "
      "selects phase 1's step on held-out corpora: set source.dev and "
      "target.dev (or --config.distil.train.select_best=)"
    )
  eval_sets(c)
  check_derived(c)
