"""`bistil <command>`: the command-line entry point.

Each command lives in its own module exposing `register(subparsers)`, which
adds a parser whose `func(args) -> int` runs it. Bad input raises
`BistilError`; main() prints it as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from bistil_jax.errors import BistilError

# Modules contributing subcommands, in help order.
COMMAND_MODULES = (
  "bistil_jax.checkpoint.commands",
  "bistil_jax.data.trim_cli",
  "bistil_jax.synthetic.cli",
  "bistil_jax.train.commands",
  "bistil_jax.demo",
)

# Multi-process runs (TPU pods, multi-node GPU) set this; see launch/.
DISTRIBUTED_ENV = "BISTIL_DISTRIBUTED"


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="bistil",
    description=(
      "BiStil in JAX: distil small bilingual students from multilingual "
      "transformers."
    ),
  )
  parser.add_argument(
    "-v", "--verbose", action="store_true", help="debug logging"
  )
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  sub.required = True
  for name in COMMAND_MODULES:
    importlib.import_module(name).register(sub)
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args, rest = parser.parse_known_args(argv)
  if rest and not getattr(args, "accepts_overrides", False):
    parser.error(f"unrecognized arguments: {' '.join(rest)}")
  logging.basicConfig(
    level=logging.DEBUG if args.verbose else logging.INFO,
    format="%(levelname).1s %(name)s: %(message)s",
    stream=sys.stderr,
  )
  # absl (pulled in by orbax/clu) installs its own handler; keep ours.
  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    if getattr(args, "accepts_overrides", False):
      from bistil_jax import configlib

      args.overrides = configlib.parse_override_args(rest)
      _maybe_initialize_distributed()
    return int(args.func(args) or 0)
  except BistilError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return 130


def _maybe_initialize_distributed() -> None:
  """jax.distributed.initialize() when the launcher asks for it.

  BISTIL_DISTRIBUTED=1: on Cloud TPU VMs JAX finds the coordinator itself;
  multi-process GPU runs also set BISTIL_COORDINATOR (host:port),
  BISTIL_NUM_PROCESSES and BISTIL_PROCESS_ID (see launch/local_gpu.sh).
  """
  import os

  if os.environ.get(DISTRIBUTED_ENV, "") not in ("1", "true"):
    return
  import jax

  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    # Several CPU processes (tests, debugging) need gloo collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kw = {}
  if os.environ.get("BISTIL_COORDINATOR"):
    kw = dict(
      coordinator_address=os.environ["BISTIL_COORDINATOR"],
      num_processes=int(os.environ["BISTIL_NUM_PROCESSES"]),
      process_id=int(os.environ["BISTIL_PROCESS_ID"]),
    )
  jax.distributed.initialize(**kw)
  logging.getLogger(__name__).info(
    "process %d of %d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


if __name__ == "__main__":
  sys.exit(main())
