"""`bistil export-hf` refuses what it should not export silently: the
weights of a run that diverged, and a damaged latest step (naming the step
that can be exported instead)."""

import contextlib
import io
import json
import os
import tempfile

import jax
import jax.numpy as jnp
from absl.testing import absltest

from bistil_jax import cli
from bistil_jax.checkpoint import hf
from bistil_jax.checkpoint import manager as ckpt
from bistil_jax.model import init_params, preset
from bistil_jax.train import distil
from tests.data.vocab_test import make_wordpiece_dir


def run_cli(*argv):
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main([str(a) for a in argv])
  return code, err.getvalue()


def last_line(err: str) -> str:
  return err.strip().splitlines()[-1]


class ExportTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.root = tmp.name
    self.tok_dir = os.path.join(self.root, "tokenizer")
    tok = make_wordpiece_dir(self.tok_dir)
    self.cfg = preset("tiny", head="mlm", vocab_size=tok.get_vocab_size())
    self.params = init_params(self.cfg, jax.random.PRNGKey(0))

  def workdir(self, scales: dict[int, float]) -> str:
    """A phase-1 workdir with one checkpoint per step, its weights scaled
    by `scales[step]` (a diverging run's)."""
    wd = os.path.join(self.root, "run")
    os.makedirs(wd)
    run = {"phase": "distil", "config": {"data": {"tokenizer": self.tok_dir}}}
    with open(os.path.join(wd, ckpt.RUN_FILE), "w") as f:
      json.dump(run, f)
    with open(os.path.join(wd, distil.STUDENT_CONFIG), "w") as f:
      json.dump(self.cfg.to_hf_dict(), f)
    saver = ckpt.Checkpointer(wd, every=1, keep=10, use_async=False)
    for step, scale in scales.items():
      params = jax.tree.map(lambda x, s=scale: jnp.asarray(x) * s, self.params)
      saver.save(step, {"step": jnp.int32(step), "params": params}, {})
    saver.wait()
    saver.close()
    return wd

  def test_a_diverged_checkpoint_is_refused_unless_forced(self):
    wd = self.workdir({1: 1.0, 2: 1.0, 3: 1e6})
    out = os.path.join(self.root, "out")
    code, err = run_cli("export-hf", "--workdir", wd, "--out", out)
    self.assertEqual(code, 2, err)
    self.assertRegex(
      last_line(err),
      rf"^error: step 3 of {wd} holds weights up to [\d.e+]+ \(at "
      r"\['.*'\]; trained weights stay far below 10000\): the run diverged; "
      r"step 2 is intact: export it with --step 2, or pass --force to "
      r"export it$",
    )
    self.assertFalse(os.path.exists(out))
    code, err = run_cli("export-hf", "--workdir", wd, "--step", 2, "--out", out)
    self.assertEqual(code, 0, err)
    code, err = run_cli(
      "export-hf", "--workdir", wd, "--out", out, "--overwrite", "--force"
    )
    self.assertEqual(code, 0, err)
    self.assertRegex(err, r"warning: step 3 of .* the run diverged; exporting")

  def test_a_diverged_model_dir_is_refused(self):
    big = jax.tree.map(lambda x: x * 1e6, self.params)
    model = os.path.join(self.root, "model")
    hf.save_hf(model, self.cfg, big, tokenizer_dir=self.tok_dir)
    out = os.path.join(self.root, "out")
    code, err = run_cli("export-hf", "--model", model, "--out", out)
    self.assertEqual(code, 2, err)
    self.assertRegex(last_line(err), r"the run diverged; retrain it, or pass")
    self.assertFalse(os.path.exists(out))

  def test_a_damaged_latest_step_names_the_intact_one(self):
    wd = self.workdir({1: 1.0, 2: 1.0})
    state = os.path.join(wd, ckpt.CHECKPOINTS, "2", "state")
    for dirpath, _, files in os.walk(state):  # a truncated copy
      for name in files:
        if not name.startswith("_"):
          os.truncate(os.path.join(dirpath, name), 0)
    out = os.path.join(self.root, "out")
    code, err = run_cli("export-hf", "--workdir", wd, "--out", out)
    self.assertEqual(code, 2, err)
    self.assertRegex(
      last_line(err),
      r"^error: checkpoint .*/2/state cannot be read \(.*\); step 1 is "
      r"intact: export it with --step 1$",
    )
    self.assertFalse(os.path.exists(out))


if __name__ == "__main__":
  absltest.main()
