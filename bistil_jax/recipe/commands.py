"""`bistil run`: one config, one command, MMT + language pair -> an
evaluated, deployable student (docs/recipe.md).

Stages, in order: trim -> lang_sft -> distil -> task_teacher -> sft ->
evaluate -> measure -> export -> report, each in DIR/<stage>/ with a
fingerprint record written last. A rerun skips the stages that are done
with the same settings, resumes an unfinished one (training resumes from
its checkpoints) and reruns those whose settings, or inputs, changed,
printing one line per stage.
"""

from __future__ import annotations

import argparse
import logging
import time

from bistil_jax import configlib, paths
from bistil_jax.errors import BistilError
from bistil_jax.recipe import layout, stages, state

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "configs/run.py:tiny"


def register(subparsers: argparse._SubParsersAction) -> None:
  p = subparsers.add_parser(
    "run",
    help="the whole recipe: MMT + language pair -> evaluated, exported student",
    description=(
      "Runs trim-vocab, lang-sft, distil, finetune, sft, evaluate, measure "
      "and export-hf --sft from one config (configs/run.py), each stage in "
      "WORKDIR/<stage>/, and writes WORKDIR/report/. Rerunning skips the "
      "stages done with the same settings and reruns those downstream of a "
      "change. Stages: " + ", ".join(stages.NAMES) + ". Override any field "
      "with --config.a.b=VALUE (e.g. --config.sft.optim.learning_rate=1e-4)."
    ),
  )
  p.add_argument(
    "--config",
    default=DEFAULT_CONFIG,
    help="config file and variant, path.py[:arg]",
  )
  p.add_argument("--workdir", required=True, help="the run's directory")
  p.add_argument(
    "--stages",
    help="comma-separated stages to run (the stages they read must be "
    "done with the same settings)",
  )
  p.add_argument("--until", help="run the stages up to and including this")
  p.set_defaults(func=run, accepts_overrides=True)


def run(args: argparse.Namespace) -> int:
  selected = stages.select(args.stages, args.until)
  config = configlib.build_config(args.config, args.overrides, "run")
  execute(config, args.workdir, selected)
  return 0


def plans(config, root: str) -> dict[str, state.Plan]:
  """Every stage's plan, in order (a fingerprint needs its inputs')."""
  out: dict[str, state.Plan] = {}
  for st in stages.STAGES:
    inputs = {n: out[n].fingerprint for n in st.needs}
    settings = stages.settings(config, st.keys(config))
    out[st.name] = state.plan(
      st.name, layout.join(root, st.name), settings, inputs
    )
  return out


def check_inputs(todo: list[str], selected, plan) -> None:
  """Refuses a stage whose input stage neither runs now nor is done.

  Raises:
    BistilError: naming the stage and the missing input.
  """
  for name in todo:
    for need in stages.BY_NAME[name].needs:
      if need not in selected and plan[need].action != state.SKIP:
        raise BistilError(
          f"stage {name} reads {need}, which is not done with these "
          f"settings ({plan[need].reason}); run it first (--until {need}) "
          "or add it to --stages"
        )


def execute(config, root: str, selected: tuple[str, ...]) -> dict:
  """Validates, checks every input, then runs the selected stages.

  Nothing runs (and no stage is marked) when the config or an input is
  bad. One run at a time per DIR: DIR/.lock is held from the planning on
  (checkpoint/manager.py `workdir_lock`: a second run is refused in one
  line). Prints one line per selected stage: skipped / resumed / run /
  rerun, with the reason.

  Returns:
    stage name -> the Plan it followed.
  """
  from bistil_jax.checkpoint import manager  # noqa: PLC0415 - loads JAX

  stages.validate(config)
  if paths.path(root).is_file():
    raise BistilError(f"--workdir {root} is a file, not a directory")
  with manager.workdir_lock(root):
    plan = plans(config, root)
    todo = [n for n in selected if plan[n].action != state.SKIP]
    check_inputs(todo, selected, plan)
    for name in todo:
      stages.BY_NAME[name].check(config)
    for name in selected:
      run_stage(config, root, plan[name])
  if "report" in selected:
    print(f"report: {layout.join(root, 'report', 'report.md')}")
  return {n: plan[n] for n in selected}


def run_stage(config, root: str, p: state.Plan) -> None:
  """Prints the stage's line, then skips it or (re)runs it between its
  STARTED and DONE records."""
  print(p.line(), flush=True)
  if p.action == state.SKIP:
    return
  stage_dir = layout.join(root, p.stage)
  if p.action == state.RERUN:
    state.clear(stage_dir, p.stage)
  state.mark_started(stage_dir, p)
  start = time.perf_counter()
  stages.BY_NAME[p.stage].run(config, root)
  seconds = time.perf_counter() - start
  state.mark_done(stage_dir, p, seconds)
  log.info("stage %s done in %.1f s", p.stage, seconds)
