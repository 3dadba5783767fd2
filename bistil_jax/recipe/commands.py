"""`bistil run`: one config, one command, MMT + language pair -> an
evaluated, deployable student (docs/recipe.md); and `bistil demo`, which
runs it on synthetic languages beside the baselines (bistil_jax/demo.py).

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
  _register_demo(subparsers)
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
  # The stages (and the demo) load orbax, which sets up logging on import:
  # only once cli.main has set it up (as every command module defers its
  # work).
  from bistil_jax.recipe import runner, stages  # noqa: PLC0415

  selected = stages.select(args.stages, args.until)
  config = configlib.build_config(args.config, args.overrides, "run")
  runner.execute(config, args.workdir, selected)
  return 0


def _register_demo(subparsers: argparse._SubParsersAction) -> None:
  p = subparsers.add_parser(
    "demo",
    help="the whole pipeline on synthetic languages, with a results table",
    description="`bistil demo`: the whole BiStil pipeline on synthetic "
    "languages, on a CPU: `bistil synth`, a small MMT, and per target "
    "language `bistil run` beside a scratch and a multilingual student.",
  )
  p.add_argument("--out", default="bistil_demo", help="output dir")
  p.add_argument("--quick", action="store_true", help="~4 minute version")
  p.add_argument("--seeds", default="0", help="comma-separated seeds")
  p.add_argument(
    "--tasks",
    default="pos",
    help="comma-separated tasks, of pos, dp, qa (default pos): each gets "
    "its task teacher, every student's phase 2 and a report table",
  )
  p.add_argument(
    "--ablation",
    action="store_true",
    help="also compare student inits x phase-1 loss mixes (close target, "
    "every seed of --seeds)",
  )
  p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
  from bistil_jax import demo  # noqa: PLC0415 - loads orbax, as run does

  return demo.run(args)
