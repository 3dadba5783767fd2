"""A tiny MMT and synthetic data for `bistil run` tests (built, not shipped)."""

import contextlib
import dataclasses
import io
import os

from bistil_jax import cli, configlib, paths
from bistil_jax.recipe import runner, stages

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIG = os.path.join(REPO, "configs", "run.py")

# Few steps: the tests check the plumbing, not the scores.
FAST = [
  "--config.distil.train.num_steps=10",
  "--config.distil.train.eval_every=5",
  "--config.distil.train.checkpoint_every=5",
  "--config.task_teacher.train.train.epochs=1",
  "--config.sft.train.epochs=1",
  "--config.sft.sparse.epochs=1",
  "--config.measure.repeats=2",
]


def bistil(*argv) -> tuple[int, str]:
  """`bistil ARGV` in this process: (exit status, stdout)."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    code = cli.main([str(a) for a in argv])
  return code, out.getvalue()


def make_data(root: str) -> str:
  """`bistil synth` of b1 and b2 (small) and `bistil init` of a 2-layer
  teacher in root/teacher: what configs/run.py:tiny,data=root reads."""
  if paths.path(os.path.join(root, "teacher", "config.json")).is_file():
    return root
  code, _ = bistil(
    "synth", "--out", root, "--languages", "b1,b2",
    "--corpus-sentences", 400, "--corpus-dev-sentences", 40,
    "--task-sentences", 96, "--task-eval-sentences", 48,
    "--tokenizer-vocab", 600, "--overwrite",
  )  # fmt: skip
  assert code == 0
  code, _ = bistil(
    "init", "--preset", "tiny", "--tokenizer", os.path.join(root, "tokenizer"),
    "--out", os.path.join(root, "teacher"),
    "--set", "num_hidden_layers=2", "--set", "hidden_size=32",
    "--set", "num_attention_heads=2", "--set", "intermediate_size=64",
    "--set", "max_position_embeddings=128",
  )  # fmt: skip
  assert code == 0
  return root


def run_args(data: str, workdir: str, *extra: str) -> list[str]:
  return [
    "run", "--config", f"{CONFIG}:tiny,data={data}", "--workdir", workdir,
    *FAST, *extra,
  ]  # fmt: skip


def stage_lines(stdout: str) -> dict[str, str]:
  """stage -> its word (skipped, resumed, run, rerun) from run's output."""
  out = {}
  for line in stdout.splitlines():
    name, sep, rest = line.partition(": ")
    if sep and rest.split(" ")[0] in ("skipped", "resumed", "run", "rerun"):
      out[name] = rest.split(" ")[0]
  return out


def stub_stages(monkeypatch, data: str, root: str):
  """Every stage's work replaced by a stub that records that it ran and
  writes DIR/<stage>/out.txt (through the path layer: root may be gs://);
  returns go(*overrides, selected=...) -> (stages run, name -> action) of
  `runner.execute` on the tiny config over `data` (never read)."""
  ran = []

  def stub(name):
    def run(c, root):
      ran.append(name)
      paths.write_text(f"{root}/{name}/out.txt", name)

    return run

  for name, st in list(stages.BY_NAME.items()):
    fake = dataclasses.replace(st, run=stub(name), check=lambda c: None)
    monkeypatch.setitem(stages.BY_NAME, name, fake)

  def go(*overrides, selected=None):
    ran.clear()
    c = configlib.build_config(
      f"{CONFIG}:tiny,data={data}", dict(o.split("=", 1) for o in overrides)
    )
    plan = runner.execute(c, root, selected or stages.NAMES)
    return list(ran), {n: p.action for n, p in plan.items()}

  return go
