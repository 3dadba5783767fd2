"""Paths in `name=path` lists may hold commas: `bistil evaluate --data` takes
one split per flag, and `eval.sets` escapes a comma as `\\,`."""

import contextlib
import io
import os
import tempfile

import jax
from absl.testing import absltest

from bistil_jax import cli, configlib
from bistil_jax.checkpoint import hf, surgery
from bistil_jax.data import task_files
from bistil_jax.model import init_params, preset
from tests import fixtures
from tests.data.vocab_test import make_wordpiece_dir


def run_cli(argv):
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main(argv)
  return code, out.getvalue(), err.getvalue()


class NamedPathsTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.root = tmp.name

  def test_eval_sets_escape_a_comma(self):
    self.assertEqual(
      configlib.parse_named_list(r"dev=data/odd\,name.conllu,mt=b\\c.txt"),
      [("dev", "data/odd,name.conllu"), ("mt", r"b\c.txt")],
    )
    self.assertEqual(  # unescaped, the comma still separates
      configlib.parse_named_list("dev=data/odd,name.conllu"),
      [("dev", "data/odd"), ("set1", "name.conllu")],
    )

  def test_sft_lists_escape_a_comma(self):
    # teacher.sfts / student.sfts: the same `\,` escape as eval.sets.
    odd, plain = "/sfts/odd,name", "/sfts/plain"
    self.assertEqual(
      surgery.split_list("/sfts/odd\\,name, /sfts/plain,"), [odd, plain]
    )
    self.assertEqual(
      surgery.language_sfts("source=/sfts/odd\\,name,/sfts/plain"),
      ([odd, plain], [plain]),
    )

  def test_evaluate_data_takes_a_path_with_a_comma(self):
    tok_dir = os.path.join(self.root, "tokenizer")
    tok = make_wordpiece_dir(tok_dir)
    cfg = preset(
      "tiny",
      head="token_classification",
      vocab_size=tok.get_vocab_size(),
      num_labels=len(task_files.UPOS_LABELS),
      id2label=task_files.UPOS_LABELS,
    )
    model = os.path.join(self.root, "model")
    hf.save_hf(
      model, cfg, init_params(cfg, jax.random.PRNGKey(0)), tokenizer_dir=tok_dir
    )
    odd = os.path.join(self.root, "data", "odd,name.conllu")
    os.makedirs(os.path.dirname(odd))
    fixtures.write_conllu(odd, 4, seed=0)
    base = ["evaluate", "--model", model, "--task", "pos", "--max-seq-len"]
    code, out, err = run_cli([*base, "64", "--data", f"dev={odd}"])
    self.assertEqual(code, 0, err)
    self.assertRegex(out, r"\ndev +\d")
    code, out, err = run_cli([*base, "64", "--data", odd])  # bare: its path
    self.assertEqual(code, 0, err)
    self.assertIn("odd,name.conllu", out)
    code, _, err = run_cli(
      [*base, "64", "--data", f"dev={odd}", "--data", f"dev={odd}"]
    )
    self.assertEqual(code, 2)
    self.assertEqual(
      err.strip().splitlines()[-1], "error: --data names dev more than once"
    )


if __name__ == "__main__":
  absltest.main()
