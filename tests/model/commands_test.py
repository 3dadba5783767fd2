"""`bistil init` says what a tokenizer dir lacks and how to make it."""

import contextlib
import io
import os
import tempfile

from absl.testing import absltest

from bistil_jax import cli


def run_cli(*argv):
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    code = cli.main(list(argv))
  return code, err.getvalue().strip().splitlines()[-1]


class InitTokenizerTest(absltest.TestCase):
  def test_a_dir_without_tokenizer_json(self):
    with tempfile.TemporaryDirectory() as tmp:
      tok = os.path.join(tmp, "tok")
      os.makedirs(tok)
      with open(os.path.join(tok, "vocab.txt"), "w") as f:
        f.write("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\n")
      out = os.path.join(tmp, "m")
      argv = ["init", "--preset", "tiny", "--out", out, "--tokenizer"]
      self.assertEqual(
        run_cli(*argv, tok),
        (
          2,
          f"error: {tok} has no tokenizer.json (the fast-tokenizer file "
          "bistil reads); write it with transformers: "
          f"AutoTokenizer.from_pretrained('{tok}').save_pretrained('{tok}')",
        ),
      )
      missing = os.path.join(tmp, "nope")
      self.assertEqual(
        run_cli(*argv, missing),
        (2, f"error: tokenizer dir {missing} does not exist"),
      )
      self.assertFalse(os.path.exists(out))


if __name__ == "__main__":
  absltest.main()
