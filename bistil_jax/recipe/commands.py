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

from bistil_jax import configlib
from bistil_jax.recipe import layout

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
      "change. Stages: "
      + ", ".join(layout.STAGE_NAMES)
      + ". Override any field "
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
  # The stages load orbax, which sets up logging on import: only once
  # cli.main has set it up (as every command module defers its work).
  from bistil_jax.recipe import runner, stages  # noqa: PLC0415

  selected = stages.select(args.stages, args.until)
  config = configlib.build_config(args.config, args.overrides, "run")
  runner.execute(config, args.workdir, selected)
  return 0
