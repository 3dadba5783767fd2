"""`bistil distil`: phase-1 training from a config file."""

from __future__ import annotations

import argparse
import logging

from bistil_jax import configlib

log = logging.getLogger(__name__)


def add_config_args(p: argparse.ArgumentParser, default: str) -> None:
  """--config/--workdir/--overwrite; `--config.a.b=v` overrides follow."""
  p.add_argument(
    "--config",
    default=default,
    help=f"config file and variant, path.py[:arg] (default {default})",
  )
  p.add_argument("--workdir", required=True, help="run directory")
  p.add_argument(
    "--overwrite",
    action="store_true",
    help="replace a different run in --workdir (its bistil outputs only)",
  )
  p.set_defaults(accepts_overrides=True)


def register(subparsers: argparse._SubParsersAction) -> None:
  p = subparsers.add_parser(
    "distil",
    help="phase 1: distil a bilingual student from a (trimmed) teacher",
    description=(
      "Phase 1 (METHOD.md 2): trains a student with fewer layers against the "
      "teacher on source and target corpora; resumes from --workdir; "
      "exports an HF model dir to WORKDIR/export. Override any config field "
      "with --config.a.b=VALUE."
    ),
  )
  add_config_args(p, "configs/distil.py:tiny")
  p.set_defaults(func=run_distil)


def run_distil(args: argparse.Namespace) -> int:
  from bistil_jax.train import distil

  config = configlib.build_config(args.config, args.overrides)
  out = distil.run(config, args.workdir, overwrite=args.overwrite)
  if out:
    print(f"student: {out}")
  return 0
