"""Runs `bistil run`'s stages: plans from the records, input checks, the
workdir lock, then each stage between its STARTED and DONE records
(recipe/state.py). `recipe/commands.py` is the command around it.
"""

from __future__ import annotations

import logging
import time

from bistil_jax import paths
from bistil_jax.checkpoint import manager
from bistil_jax.errors import BistilError
from bistil_jax.recipe import layout, stages, state

log = logging.getLogger(__name__)


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
  stages.validate(config)
  if paths.path(root).is_file():
    raise BistilError(f"--workdir {root} is a file, not a directory")
  with manager.workdir_lock(root):
    plan = plans(config, root)
    todo = [n for n in selected if plan[n].action != state.SKIP]
    check_inputs(todo, selected, plan)
    for name in todo:
      stages.check(config, name)
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
  st = stages.BY_NAME[p.stage]
  given = st.given_dir(config)
  if given:
    log.info("%s: given (config.%s), %s", p.stage, st.given, given)
  else:
    st.run(config, root)
  seconds = time.perf_counter() - start
  state.mark_done(stage_dir, p, seconds)
  log.info("stage %s done in %.1f s", p.stage, seconds)
