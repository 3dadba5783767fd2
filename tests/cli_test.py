"""The command line as a new user meets it: help, init, measure, quiet logs.

The subprocess tests run `python -m bistil_jax.cli` as a user would, without
JAX_PLATFORMS (so jax probes for a TPU as on any CPU machine), and assert
that none of the noise a first run used to show is there.
"""

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import tempfile

import jax
import numpy as np
from absl.testing import absltest

from bistil_jax import cli, configlib, measure
from bistil_jax.checkpoint import hf
from bistil_jax.errors import BistilError
from bistil_jax.model import commands as model_commands
from bistil_jax.model.encoder import init_params
from bistil_jax.synthetic import tokenizer as tok_lib
from bistil_jax.train import loop
from tests import fixtures
from tests.data.vocab_test import make_wordpiece_dir
from tests.fixtures import write_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lines a CPU run must not print (issue 15).
NOISE = (
  "libtpu",  # jax's failed TPU probe
  "Unable to initialize backend",
  "torch weights",  # model.safetensors named as torch
  ".tmp-",  # staging dirs named in messages
  "\r",  # carriage-return progress in a log
)


def bistil(*argv: str, cwd: str) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  env.pop("JAX_PLATFORMS", None)  # as on a user's CPU machine
  env.pop("XLA_FLAGS", None)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run(
    [sys.executable, "-m", "bistil_jax.cli", *argv],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def run_in_process(*argv: str) -> tuple[int, str]:
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    code = cli.main([str(a) for a in argv])
  return code, out.getvalue()


class TempDirTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.root = tmp.name
    self.tok = os.path.join(self.root, "tok")
    make_wordpiece_dir(self.tok)

  def path(self, *parts: str) -> str:
    return os.path.join(self.root, *parts)


class QuietLogsTest(TempDirTest):
  def assert_quiet(self, proc: subprocess.CompletedProcess) -> None:
    self.assertEqual(proc.returncode, 0, proc.stderr)
    for text in (proc.stdout, proc.stderr):
      for noise in NOISE:
        self.assertNotIn(noise, text, f"{noise!r} in:\n{text}")

  def test_a_first_run_prints_no_noise(self):
    proc = bistil(
      "init", "--preset", "tiny", "--tokenizer", self.tok, "--out", "init",
      "--seed", "1", cwd=self.root,
    )  # fmt: skip
    self.assert_quiet(proc)
    self.assertRegex(proc.stderr, r"initialised \S+ .* in init\n")  # final path

    proc = bistil("inspect", "--json", "init", cwd=self.root)
    self.assert_quiet(proc)
    self.assertEqual(json.loads(proc.stdout)["weights_format"], "safetensors")

    proc = bistil(
      "measure", "init", "--seq-len", "16", "--batch-shapes", "2x16",
      "--repeats", "2", "--json", cwd=self.root,
    )  # fmt: skip
    self.assert_quiet(proc)
    self.assertIn("safetensors weights", proc.stderr)
    info = json.loads(proc.stdout)
    self.assertGreater(info["parameters"]["total"], 0)

    src = write_corpus(self.path("src.txt"), "aa", 200)
    tgt = write_corpus(self.path("tgt.txt"), "bb", 200)
    proc = bistil(
      "trim-vocab", "--model", "init", "--source", src, "--target", tgt,
      "--out", "trimmed", cwd=self.root,
    )  # fmt: skip
    self.assert_quiet(proc)
    self.assertIn("to trimmed", proc.stderr)  # the final path is named
    self.assertIn("tokens/s\n", proc.stderr)  # progress as whole lines

  def test_the_tpu_probe_is_hidden_unless_verbose_or_expected(self):
    name = "jax._src.xla_bridge"
    old = logging.getLogger(name).level
    self.addCleanup(logging.getLogger(name).setLevel, old)
    logging.getLogger(name).setLevel(logging.NOTSET)
    with absltest.mock.patch.dict(os.environ, {"JAX_PLATFORMS": "tpu"}):
      cli.quiet_backend_probe()
    self.assertEqual(logging.getLogger(name).level, logging.NOTSET)
    with absltest.mock.patch.dict(os.environ, {"JAX_PLATFORMS": ""}):
      cli.quiet_backend_probe()
    self.assertEqual(logging.getLogger(name).level, logging.WARNING)


class HelpTest(absltest.TestCase):
  def test_every_command_shows_its_defaults(self):
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0]
    for name, p in sub.choices.items():
      text = p.format_help()
      for action in p._actions:
        if (
          action.option_strings
          and action.default not in (None, False, [])
          and action.default != "==SUPPRESS=="
        ):
          self.assertIn(
            "default", action.help or "", f"{name} {action.option_strings}"
          )
      # A user's clone has no shared/ dir: help points inside the repo.
      for bad in ("METHOD.md", "DESIGN.md", "STYLE.md", "shared/docs"):
        self.assertNotIn(bad, text, name)
    demo_help = sub.choices["demo"].format_help()
    self.assertIn("(default: bistil_demo)", demo_help)


class InitTest(TempDirTest):
  def test_init_from_a_preset_with_overrides(self):
    out = self.path("m")
    code, _ = run_in_process(
      "init", "--preset", "tiny", "--tokenizer", self.tok, "--out", out,
      "--seed", 3, "--set", "num_hidden_layers=3", "--set", "hidden_size=48",
      "--set", "num_attention_heads=4",
    )  # fmt: skip
    self.assertEqual(code, 0)
    model, params = hf.load_hf(out)
    cfg = model.config
    self.assertEqual(
      (cfg.num_hidden_layers, cfg.hidden_size, cfg.head), (3, 48, "mlm")
    )
    with open(os.path.join(self.tok, "vocab.txt")) as f:
      self.assertEqual(cfg.vocab_size, len(f.read().splitlines()))
    want = init_params(cfg.replace(dtype="float32"), jax.random.PRNGKey(3))
    np.testing.assert_array_equal(
      params["embeddings"]["word_embeddings"]["embedding"][: cfg.vocab_size],
      np.asarray(want["embeddings"]["word_embeddings"]["embedding"])[
        : cfg.vocab_size
      ],
    )
    with open(os.path.join(out, tok_lib.INIT_RECORD)) as f:
      record = json.load(f)
    self.assertEqual(record["seed"], 3)
    self.assertEqual(record["overrides"]["num_hidden_layers"], 3)

  def test_init_replaces_its_own_dir_and_refuses_others(self):
    out = self.path("m")
    args = ["init", "--preset", "tiny", "--tokenizer", self.tok, "--out", out]
    self.assertEqual(run_in_process(*args, "--seed", 0)[0], 0)
    before = hf.read_weights(out)[0]
    self.assertEqual(run_in_process(*args, "--seed", 1)[0], 0)
    after = hf.read_weights(out)[0]
    key = "bert.embeddings.word_embeddings.weight"
    self.assertFalse(np.array_equal(before[key], after[key]))

    foreign = self.path("foreign")
    os.makedirs(foreign)
    with open(os.path.join(foreign, "notes.txt"), "w") as f:
      f.write("mine")
    args[-1] = foreign
    code, _ = run_in_process(*args)
    self.assertEqual(code, 2)
    with open(os.path.join(foreign, "notes.txt")) as f:
      self.assertEqual(f.read(), "mine")

  def test_bad_arguments_are_one_line_errors(self):
    with self.assertRaisesRegex(BistilError, "not a model config field"):
      model_commands.parse_sets(["hidden=3"])
    with self.assertRaisesRegex(BistilError, "FIELD=VALUE"):
      model_commands.parse_sets(["hidden_size"])
    with self.assertRaisesRegex(BistilError, "unknown model preset"):
      model_commands.init_model(self.path("x"), self.tok, preset_name="huge")
    with self.assertRaisesRegex(BistilError, "BATCHxLENGTH"):
      measure.parse_batch_shapes("8by64")


class ScratchBaselineTest(TempDirTest):
  """`init` + `pretrain` + `measure` give the demo's scratch baseline and
  its size/latency columns from the command line alone."""

  def test_scratch_baseline_from_the_cli(self):
    # A stand-in for a phase-1 student: a model dir with a tokenizer.
    student = self.path("student")
    run_in_process(
      "init", "--preset", "tiny", "--tokenizer", self.tok, "--out", student,
      "--seed", 7,
    )  # fmt: skip
    # The scratch init the demo runs: the student's architecture and
    # tokenizer, seed 1000 + seed; the same weights as a direct init.
    scratch_init = self.path("scratch_init")
    code, _ = run_in_process(
      "init", "--config", student, "--tokenizer", student,
      "--out", scratch_init, "--seed", 1000,
    )  # fmt: skip
    self.assertEqual(code, 0)
    smodel, _ = hf.load_hf(student)
    want = init_params(
      smodel.config.replace(head="mlm"), jax.random.PRNGKey(1000)
    )
    _, got = hf.load_hf(scratch_init)
    for path in (("encoder", "layer", "0", "output", "dense", "kernel"),):
      a, b = got, want
      for k in path:
        a, b = a[k], b[k]
      np.testing.assert_array_equal(a, np.asarray(b))

    src = write_corpus(self.path("src.txt"), "aa", 100)
    tgt = write_corpus(self.path("tgt.txt"), "bb", 100)
    workdir = self.path("scratch")
    code, _ = run_in_process(
      "pretrain", "--config",
      str(configlib.repo_configs_dir() / "pretrain.py:tiny"),
      "--workdir", workdir, f"--config.student.model={scratch_init}",
      f"--config.data.source={src}", f"--config.data.target={tgt}",
      "--config.train.num_steps=3", "--config.train.log_every=1",
      "--config.train.checkpoint_every=3", "--config.data.batch_size=8",
      "--config.data.max_seq_len=32", "--config.train.async_checkpoints=false",
    )  # fmt: skip
    self.assertEqual(code, 0)
    scratch = os.path.join(workdir, "export")
    _, trained = hf.load_hf(scratch)
    self.assertFalse(
      np.array_equal(
        trained["encoder"]["layer"]["0"]["output"]["dense"]["kernel"],
        got["encoder"]["layer"]["0"]["output"]["dense"]["kernel"],
      )
    )

    out = self.path("scratch.measure.json")
    code, _ = run_in_process(
      "measure", scratch, "--seq-len", 32, "--batch-shapes", "8x32",
      "--repeats", 2, "--out", out,
    )  # fmt: skip
    self.assertEqual(code, 0)
    with open(out) as f:
      info = json.load(f)
    model, params = hf.load_hf(scratch)
    counts = measure.count_parameters(params, model.config)
    self.assertEqual(info["parameters"]["total"], counts["total"])
    self.assertEqual(
      info["parameters"]["encoder"] + info["parameters"]["embeddings"]
      + info["parameters"]["head"], counts["total"],
    )  # fmt: skip
    self.assertEqual(
      info["macs_per_sequence"]["analytic"],
      measure.analytic_macs(model.config, 1, 32)["total"],
    )
    (lat,) = info["latency"]
    self.assertEqual((lat["batch_size"], lat["seq_len"]), (8, 32))
    self.assertGreater(lat["median_ms"], 0)
    self.assertGreater(info["disk_bytes"]["model"], 0)


class ExportInitTest(TempDirTest):
  def test_zero_steps_is_a_valid_run(self):
    self.assertEqual(loop.LoopSettings(num_steps=0).num_steps, 0)
    with self.assertRaisesRegex(BistilError, "num_steps must be >= 0"):
      loop.LoopSettings(num_steps=-1)

  def test_distil_with_zero_steps_exports_the_initialisation(self):
    teacher = fixtures.make_teacher_dir(self.root)
    workdir = self.path("run")
    argv = ["distil", "--workdir", workdir]
    argv += fixtures.distil_args(self.root, teacher, **{"train.num_steps": 0})
    for _ in range(2):  # the rerun resumes at step 0 and exports again
      self.assertEqual(run_in_process(*argv)[0], 0)
    _, student = hf.load_hf(os.path.join(workdir, "export"))
    _, tparams = hf.load_hf(teacher)
    # teacher_layers init, reduction 2: student layer 0 <- teacher layer 1.
    np.testing.assert_array_equal(
      student["encoder"]["layer"]["0"]["output"]["dense"]["kernel"],
      tparams["encoder"]["layer"]["1"]["output"]["dense"]["kernel"],
    )


if __name__ == "__main__":
  absltest.main()
