"""`bistil synth`: registration, summary, files, errors."""

import argparse
import contextlib
import io
import json
import os
import tempfile

from absl.testing import absltest

from bistil_jax.errors import BistilError
from bistil_jax.synthetic import cli


def _parser():
  parser = argparse.ArgumentParser(prog="bistil")
  cli.register(parser.add_subparsers(dest="command"))
  return parser


def _run(argv):
  args = _parser().parse_args(argv)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    status = args.func(args)
  return status, out.getvalue()


SMALL = [
    "--corpus-sentences", "20", "--corpus-dev-sentences", "5",
    "--task-sentences", "9", "--task-eval-sentences", "6",
]  # fmt: skip


class SynthCommandTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.out = os.path.join(tmp.name, "synth")

  def test_registers_synth_with_defaults(self):
    args = _parser().parse_args(["synth", "--out", "x"])
    self.assertIs(args.func, cli.run)
    self.assertEqual((args.seed, args.num_languages), (0, 8))
    self.assertIsNone(args.languages)
    self.assertFalse(args.overwrite)

  def test_run_writes_and_summarises(self):
    argv = ["synth", "--out", self.out, "--seed", "3"]
    status, text = _run([*argv, "--languages", "a1,a2", "c1", *SMALL])
    self.assertEqual(status, 0)
    self.assertIn("a1: group A", text)
    self.assertIn("close pairs (same group): a1-a2", text)
    self.assertIn("distant pairs: a1-c1 a2-c1", text)
    self.assertIn("source a1, close target a2, distant target c1", text)
    self.assertIn("9 train, 6 dev, 6 test", text)
    manifest = json.load(open(os.path.join(self.out, "manifest.json")))
    self.assertEqual(manifest["languages"], ["a1", "a2", "c1"])
    self.assertEqual(manifest["seed"], 3)
    with open(os.path.join(self.out, "corpora", "c1.txt")) as f:
      self.assertLen(f.read().splitlines(), 20)

  def test_summary_names_no_missing_target(self):
    status, text = _run(
      ["synth", "--out", self.out, "--languages", "a1,a2", *SMALL]
    )
    self.assertEqual(status, 0)
    self.assertNotIn("None", text)
    self.assertIn(
      "suggested transfer: source a1, close target a2 "
      "(no distant target among a1 a2)",
      text,
    )

  def test_non_empty_out_needs_overwrite(self):
    _run(["synth", "--out", self.out, "--languages", "a1", *SMALL])
    with self.assertRaisesRegex(
      BistilError, r"is not empty; pass --overwrite to replace the dataset"
    ):
      _run(["synth", "--out", self.out, "--languages", "a1", *SMALL])
    status, _ = _run(
      ["synth", "--out", self.out, "--languages", "b1", "--overwrite", *SMALL]
    )
    self.assertEqual(status, 0)
    self.assertEqual(sorted(os.listdir(os.path.join(self.out, "pos"))), ["b1"])

  def test_bad_arguments(self):
    for argv, match in (
      (["--languages", "q9"], "unknown synthetic language 'q9'"),
      (["--num-languages", "1"], "num_languages"),
      (["--seed", "-2"], "seed"),
      (["--corpus-sentences", "0"], "corpus_train"),
    ):
      with self.assertRaisesRegex(BistilError, match):
        _run(["synth", "--out", self.out, *SMALL, *argv])
      self.assertFalse(os.path.exists(self.out))


if __name__ == "__main__":
  absltest.main()
