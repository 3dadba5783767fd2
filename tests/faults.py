"""Fault and signal injection for the tests, kept out of the product.

The training loop offers step hooks (`driver.STEP_HOOKS`, `loop.StepHook`);
this module builds the two the tests need and runs the CLI with them:

  python -m tests.faults [--exit-after-step K] [--sigterm-at-step K] \\
    -- BISTIL_ARGS...

behaves as `python -m bistil_jax.cli BISTIL_ARGS...` with the hooks
installed. A step number counts within a stage, in whichever stage first
reaches it (an LT-SFT run's dense stage, then its sparse one).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

from bistil_jax import cli

if TYPE_CHECKING:
  from bistil_jax.train import loop

log = logging.getLogger(__name__)

FLAGS = {"--exit-after-step": "exit", "--sigterm-at-step": "sigterm"}


def exit_after_step(k: int) -> loop.StepHook:
  """After step k: wait for committed checkpoints and exit hard (status
  137, no normal shutdown), as a killed job would."""

  def hook(event: loop.StepEnd) -> None:
    if event.step == k:
      event.settle()  # the guard sees the steps before the fault
      log.warning("fault injection: exiting hard after step %d", k)
      os._exit(137)

  return hook


def sigterm_at_step(k: int) -> loop.StepHook:
  """After step k: the process sends itself SIGTERM, as a scheduler would
  at a random moment."""

  def hook(event: loop.StepEnd) -> None:
    if event.step == k:
      os.kill(os.getpid(), signal.SIGTERM)

  return hook


def command(bistil_args, *, exit_after=None, sigterm_at=None) -> list[str]:
  """The argv of a subprocess running `bistil BISTIL_ARGS` with faults."""
  argv = [sys.executable, "-m", "tests.faults"]
  if exit_after is not None:
    argv += ["--exit-after-step", str(exit_after)]
  if sigterm_at is not None:
    argv += ["--sigterm-at-step", str(sigterm_at)]
  return [*argv, "--", *bistil_args]


def main(argv: list[str]) -> int:
  make = {"exit": exit_after_step, "sigterm": sigterm_at_step}
  hooks = []
  while argv and argv[0] != "--":
    hooks.append(make[FLAGS[argv[0]]](int(argv[1])))
    argv = argv[2:]
  # The driver imports orbax, which logs through absl at import time and so
  # gives the bare root logger a default handler; cli.main sets up logging
  # (the format the tests read) only on a bare root, as a plain run has.
  handlers = list(logging.root.handlers)
  from bistil_jax.train import driver  # noqa: PLC0415

  logging.root.handlers[:] = handlers
  driver.STEP_HOOKS.extend(hooks)
  try:
    return cli.main(argv[1:])
  finally:
    for hook in hooks:
      driver.STEP_HOOKS.remove(hook)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
