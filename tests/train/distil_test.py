"""`bistil distil` end to end on a tiny teacher: losses fall, export loads,
resume after a hard kill is bit-identical, bad input leaves no trace."""

import contextlib
import io
import json
import os
import subprocess
import tempfile

import jax
import numpy as np
import torch
import transformers
from absl.testing import absltest

from bistil_jax import cli
from bistil_jax.checkpoint import hf
from bistil_jax.checkpoint import manager as ckpt
from bistil_jax.checkpoint import sft as sft_lib
from bistil_jax.model import init_params, preset
from bistil_jax.train import loop
from tests import faults, fixtures

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def run_cli(argv):
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    code = cli.main(argv)
  return code, err.getvalue()


class DistilCliTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.TemporaryDirectory()
    cls.root = cls._tmp.name
    cls.teacher = fixtures.make_teacher_dir(cls.root)

  @classmethod
  def tearDownClass(cls):
    cls._tmp.cleanup()
    super().tearDownClass()

  def workdir(self, name):
    return os.path.join(self.root, name)

  def train_rows(self, wd, **overrides):
    args = fixtures.distil_args(
      self.root, self.teacher, **{"train.log_every": 10, **overrides}
    )
    dev = fixtures.write_corpus(os.path.join(self.root, "dev.txt"), "bb", 60, 7)
    code, err = run_cli(
      ["distil", "--workdir", wd, *args, f"--config.eval.sets=target={dev}"]
    )
    self.assertEqual(code, 0, err)
    rows = loop.read_metrics(os.path.join(wd, "metrics"))
    return [r for r in rows if "train/loss" in r]

  def assert_terms_fall(self, rows, terms):
    self.assertEqual([r["step"] for r in rows], [10, 20, 30])
    for term in (*terms, "loss"):
      first, last = rows[0][f"train/{term}"], rows[-1][f"train/{term}"]
      self.assertLess(last, 0.9 * first, term)
    present = {k.split("/")[1] for k in rows[0] if "/" in k} & {
      "hidden",
      "attention",
      "kl",
      "mlm",
    }
    self.assertEqual(present, set(terms))

  def test_kl_and_hidden_terms_fall(self):
    rows = self.train_rows(
      self.workdir("kl_hidden"), **{"loss.kl": 1.0, "loss.attention": 0.0}
    )
    self.assert_terms_fall(rows, ("hidden", "kl"))

  def test_every_enabled_term_falls_and_the_export_loads(self):
    wd = self.workdir("default")
    # Attention-probability MSE is ~1e-6 here (copied layers, 64 keys), so
    # at weight 1 the hidden term alone drives training and the attention
    # term drifts at noise level; weighted up, both terms are trained.
    rows = self.train_rows(wd, **{"loss.attention": 1000.0})
    self.assert_terms_fall(rows, ("hidden", "attention"))
    for key in ("train/grad_norm", "train/lr", "train/steps_per_s"):
      self.assertIn(key, rows[0])
    evals = [
      r
      for r in loop.read_metrics(os.path.join(wd, "metrics"))
      if "eval/target/agreement" in r
    ]
    self.assertLen(evals, 1)
    self.assertBetween(evals[0]["eval/target/agreement"], 0.0, 1.0)
    self.assertTrue(
      any(
        n.startswith("events.out.tfevents")
        for n in os.listdir(os.path.join(wd, "metrics"))
      )
    )

    export = os.path.join(wd, "export")
    model, params = hf.load_hf(export)
    self.assertEqual(model.config.num_hidden_layers, 2)
    self.assertTrue(os.path.isfile(os.path.join(export, "tokenizer.json")))
    pt = transformers.AutoModelForMaskedLM.from_pretrained(export).eval()
    ids = np.array([[2, 30, 41, 52, 3]], np.int64)
    with torch.no_grad():
      ref = pt(torch.from_numpy(ids)).logits.numpy()
    ours = np.asarray(
      model.apply({"params": params}, ids.astype(np.int32)).logits
    )
    np.testing.assert_allclose(
      ours[..., : model.config.vocab_size], ref, atol=1e-4
    )

  def test_resume_after_a_kill_is_bit_identical(self):
    over = {"train.num_steps": 16, "train.checkpoint_every": 4}
    args = fixtures.distil_args(self.root, self.teacher, **over)
    full = self.workdir("full")
    self.assertEqual(run_cli(["distil", "--workdir", full, *args])[0], 0)

    killed = self.workdir("killed")
    proc = subprocess.run(
      faults.command(["distil", "--workdir", killed, *args], exit_after=10),
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
    )
    self.assertEqual(proc.returncode, 137, proc.stderr[-2000:])
    self.assertEqual(
      max(
        int(s)
        for s in os.listdir(os.path.join(killed, "checkpoints"))
        if s.isdigit()
      ),
      8,
    )
    self.assertFalse(os.path.exists(os.path.join(killed, "export")))
    with self.assertLogs("bistil_jax.train.driver", "INFO") as logs:
      code, err = run_cli(["distil", "--workdir", killed, *args])
    self.assertEqual(code, 0, err)
    self.assertIn("step 8", "\n".join(logs.output))

    _, a = ckpt.read_state(full, 16)
    _, b = ckpt.read_state(killed, 16)
    leaves_a = jax.tree.leaves(a)
    self.assertLen(jax.tree.leaves(b), len(leaves_a))
    for x, y in zip(leaves_a, jax.tree.leaves(b), strict=True):
      np.testing.assert_array_equal(x, y)
    # The resumed run's metrics replace the rows the killed run wrote
    # after its last checkpoint.
    steps = [
      r["step"]
      for r in loop.read_metrics(os.path.join(killed, "metrics"))
      if "train/loss" in r
    ]
    self.assertEqual(steps, [10, 16])

  def test_export_hf_from_workdir(self):
    wd = self.workdir("for_export")
    args = fixtures.distil_args(
      self.root, self.teacher, **{"train.num_steps": 4, "train.export": False}
    )
    self.assertEqual(run_cli(["distil", "--workdir", wd, *args])[0], 0)
    self.assertFalse(os.path.exists(os.path.join(wd, "export")))
    out = os.path.join(self.root, "exported")
    code, err = run_cli(["export-hf", "--workdir", wd, "--out", out])
    self.assertEqual(code, 0, err)
    model, _ = hf.load_hf(out)
    self.assertEqual(model.config.num_hidden_layers, 2)

  def language_sft(self, name, model_dir):
    """An SFT that moves layer 0's query kernel of `model_dir`'s params."""
    _, base = hf.load_hf(model_dir)
    cfg = hf.load_hf(model_dir)[0].config
    trained = jax.tree.map(np.array, base)
    q = trained["encoder"]["layer"]["0"]["attention"]["self"]["query"]
    q["kernel"][:4, :4] += 0.5
    sft = sft_lib.sft_from_params(
      trained, base, kind="language", vocab_size=cfg.vocab_size
    )
    out = os.path.join(self.root, name)
    sft_lib.save_sft(out, sft, overwrite=True)
    return out

  def test_per_language_teacher_sft(self):
    sft = self.language_sft("lang_sft", self.teacher)
    wd = self.workdir("with_sft")
    args = fixtures.distil_args(
      self.root, self.teacher, **{"train.num_steps": 2}
    )
    with self.assertLogs("bistil_jax", "INFO") as logs:
      code, err = run_cli(
        [
          "distil",
          "--workdir",
          wd,
          *args,
          f"--config.teacher.sfts=target={sft}",
        ]
      )
    self.assertEqual(code, 0, err)
    self.assertIn(f"target teacher: + SFT {sft}", "\n".join(logs.output))
    self.assertNotIn("source teacher", "\n".join(logs.output))

  def test_language_sft_of_another_model_is_refused(self):
    other = os.path.join(self.root, "other_teacher")
    fixtures_dir = fixtures.make_teacher_dir(other, seed=5)
    sft = self.language_sft("other_sft", fixtures_dir)
    wd = self.workdir("wrong_sft")
    args = fixtures.distil_args(self.root, self.teacher)
    self.assert_refused(
      ["distil", "--workdir", wd, *args, f"--config.teacher.sfts=source={sft}"],
      "SFT .*was made for base model",
      wd,
    )
    small = os.path.join(self.root, "narrow")
    cfg = preset(
      "tiny",
      head="mlm",
      vocab_size=510,
      num_hidden_layers=4,
      hidden_size=32,
      num_attention_heads=4,
      intermediate_size=64,
    )
    hf.save_hf(
      small,
      cfg,
      init_params(cfg, jax.random.PRNGKey(0)),
      tokenizer_dir=os.path.join(self.root, "tokenizer"),
      overwrite=True,
    )
    sft = self.language_sft("narrow_sft", small)
    self.assert_refused(
      ["distil", "--workdir", wd, *args, f"--config.teacher.sfts=source={sft}"],
      "SFT",
      wd,
    )

  # ----------------------------------------------------------- bad input
  def assert_refused(self, argv, pattern, workdir):
    existed = os.path.exists(workdir)
    before = sorted(os.listdir(workdir)) if existed else None
    code, err = run_cli(argv)
    self.assertEqual(code, 2, err)
    last = err.strip().splitlines()[-1]
    self.assertRegex(last, "^error: .*" + pattern)
    if existed:
      self.assertEqual(sorted(os.listdir(workdir)), before)
    else:
      self.assertFalse(
        os.path.exists(workdir), "a refused run made its workdir"
      )

  def test_unknown_config_key(self):
    wd = self.workdir("typo")
    args = fixtures.distil_args(self.root, self.teacher)
    self.assert_refused(
      ["distil", "--workdir", wd, *args, "--config.optim.lr=1e-3"],
      r"unknown config key optim.lr \(did you mean optim\.",
      wd,
    )
    self.assert_refused(
      ["distil", "--workdir", wd, *args, "--config.train.num_steps=many"],
      "train.num_steps expects int",
      wd,
    )

  def test_vocab_mismatch(self):
    small = os.path.join(self.root, "small_teacher")
    cfg = preset(
      "tiny",
      head="mlm",
      vocab_size=100,
      num_hidden_layers=2,
      hidden_size=64,
      num_attention_heads=4,
      intermediate_size=128,
    )
    hf.save_hf(
      small,
      cfg,
      init_params(cfg, jax.random.PRNGKey(0)),
      tokenizer_dir=os.path.join(self.root, "tokenizer"),
      overwrite=True,
    )
    wd = self.workdir("vocab")
    args = fixtures.distil_args(self.root, small)
    self.assert_refused(
      ["distil", "--workdir", wd, *args],
      r"tokenizer has \d+ tokens but the teacher's vocab_size is 100",
      wd,
    )

  def test_corpus_shorter_than_a_batch_and_empty(self):
    wd = self.workdir("short")
    short = fixtures.write_corpus(os.path.join(self.root, "short.txt"), "aa", 2)
    args = fixtures.distil_args(self.root, self.teacher)
    self.assert_refused(
      ["distil", "--workdir", wd, *args, f"--config.data.source={short}"],
      "shorter than one batch",
      wd,
    )
    empty = os.path.join(self.root, "empty.txt")
    open(empty, "w").close()
    self.assert_refused(
      ["distil", "--workdir", wd, *args, f"--config.data.target={empty}"],
      "empty",
      wd,
    )
    self.assert_refused(
      [
        "distil",
        "--workdir",
        wd,
        *args,
        "--config.data.source=/nonexistent.txt",
      ],
      "nonexistent",
      wd,
    )

  def test_workdir_of_another_run_or_not_ours(self):
    wd = self.workdir("other")
    args = fixtures.distil_args(
      self.root, self.teacher, **{"train.num_steps": 2}
    )
    self.assertEqual(run_cli(["distil", "--workdir", wd, *args])[0], 0)
    run_json = open(os.path.join(wd, "run.json")).read()
    self.assert_refused(
      ["distil", "--workdir", wd, *args, "--config.data.mlm_probability=0.2"],
      "holds another run .*data.mlm_probability",
      wd,
    )
    self.assertEqual(open(os.path.join(wd, "run.json")).read(), run_json)
    code, err = run_cli(
      [
        "distil",
        "--workdir",
        wd,
        *args,
        "--config.data.mlm_probability=0.2",
        "--overwrite",
      ]
    )
    self.assertEqual(code, 0, err)
    self.assertEqual(
      json.load(open(os.path.join(wd, "run.json")))["config"]["data"][
        "mlm_probability"
      ],
      0.2,
    )

    foreign = self.workdir("foreign")
    os.makedirs(foreign)
    with open(os.path.join(foreign, "notes.txt"), "w") as f:
      f.write("mine")
    for extra in ([], ["--overwrite"]):
      self.assert_refused(
        ["distil", "--workdir", foreign, *args, *extra],
        "not a bistil workdir",
        foreign,
      )
    self.assertEqual(open(os.path.join(foreign, "notes.txt")).read(), "mine")


if __name__ == "__main__":
  absltest.main()
