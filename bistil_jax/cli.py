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
)


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
  args = parser.parse_args(argv)
  logging.basicConfig(
    level=logging.DEBUG if args.verbose else logging.INFO,
    format="%(levelname).1s %(name)s: %(message)s",
    stream=sys.stderr,
  )
  # absl (pulled in by orbax/clu) installs its own handler; keep ours.
  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    return int(args.func(args) or 0)
  except BistilError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
