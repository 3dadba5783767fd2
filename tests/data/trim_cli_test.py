"""`bistil trim-vocab`'s own argument errors name its flags."""

import contextlib
import io
import os
import tempfile

from absl.testing import absltest

from bistil_jax import cli


class TrimCliTest(absltest.TestCase):
  def test_missing_corpora_name_the_flags(self):
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "out")
      for corpora in ([], ["--source", os.path.join(tmp, "src.txt")]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
          code = cli.main(
            ["trim-vocab", "--model", tmp, "--out", out, *corpora]
          )
        self.assertEqual(code, 2)
        self.assertEqual(
          err.getvalue().strip().splitlines()[-1],
          "error: trim-vocab needs both corpora (--source and --target), or "
          "--counts-in F with the counts an earlier --counts-out saved",
        )
        self.assertFalse(os.path.exists(out))


if __name__ == "__main__":
  absltest.main()
