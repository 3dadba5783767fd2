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

from bistil_jax import paths
from bistil_jax.errors import BistilError

# Modules contributing subcommands, in help order.
COMMAND_MODULES = (
  "bistil_jax.checkpoint.commands",
  "bistil_jax.model.commands",
  "bistil_jax.data.trim_cli",
  "bistil_jax.synthetic.cli",
  "bistil_jax.train.commands",
  "bistil_jax.deploy.commands",
  "bistil_jax.recipe.commands",
)

# Multi-process runs (TPU pods, multi-node GPU) set this; see launch/.
DISTRIBUTED_ENV = "BISTIL_DISTRIBUTED"


def add_sft_argument(p: argparse.ArgumentParser) -> None:
  """The `--sft` option of every command that reads a model with SFTs."""
  p.add_argument(
    "--sft",
    action="append",
    default=[],
    help="SFT dir merged into the model, in order (repeatable; a task SFT "
    "brings its head)",
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
  for p in sub.choices.values():
    show_defaults(p)
  return parser


def show_defaults(parser: argparse.ArgumentParser) -> None:
  """Appends "(default: X)" to the help of every option that has one.

  Unlike argparse.ArgumentDefaultsHelpFormatter this also covers options
  without a help text, and skips flags (a store_true default is False)
  and options whose help already names the default.
  """
  for action in parser._actions:  # noqa: SLF001 - argparse has no API
    default = action.default
    if (
      default is None
      or default is False
      or default == []
      or default is argparse.SUPPRESS
      or isinstance(action, argparse._HelpAction)  # noqa: SLF001
      or not action.option_strings
    ):
      continue
    help_ = action.help or ""
    if "default" in help_:
      continue
    action.help = (help_ + " " if help_ else "") + "(default: %(default)s)"


def quiet_backend_probe() -> None:
  """Hides jax's "Unable to initialize backend 'tpu'" line on CPU/GPU hosts.

  jax probes every backend it knows and logs each failed probe at INFO on
  `jax._src.xla_bridge`; with our INFO root logger that prints a libtpu.so
  error on every machine without a TPU. The line is kept when a TPU is
  expected (JAX_PLATFORMS names tpu, where a failure is an error anyway),
  and jax's WARNING that a TPU is present but libtpu missing still shows.
  """
  import os

  if "tpu" in os.environ.get("JAX_PLATFORMS", "").lower():
    return
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


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
  if not args.verbose:
    quiet_backend_probe()
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
  except Exception as e:
    # Backstop: a storage request outside the path layer's check failed
    # (the network went away mid-run, credentials expired). One line, not
    # the client's chained tracebacks.
    failure = paths.remote_failure(e)
    if failure is None:
      raise
    print(f"error: {remote_failure_line(failure)}", file=sys.stderr)
    return 2


def remote_failure_line(err: BaseException) -> str:
  """One line for a failed cloud storage request (see paths.remote_cause)."""
  cause, advice = paths.remote_cause(err)
  first = (str(err).strip().splitlines() or [""])[0][:200]
  return (
    f"a cloud storage request failed: {cause} "
    f"({type(err).__name__}: {first}); {advice}"
  )


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
