"""Every `bistil ...` command a config docstring, the README or a user doc
(DOCS) shows parses with the real CLI parser and, for the commands that take
a config, builds that command's config with the given overrides; a `bistil
run` config also passes the recipe's validation, which reads no file (the
models and corpora they name are the user's)."""

import glob
import os
import re
import shlex

from absl.testing import absltest

from bistil_jax import cli, configlib
from bistil_jax.errors import BistilError
from bistil_jax.recipe import stages

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
# Markdown docs whose commands run from the repository root, like README's.
DOCS = ("README.md", "docs/recipe.md")


def commands(text: str, markdown: bool = False) -> list[str]:
  """Shell lines that run `bistil ...` (in a Markdown file: inside code
  blocks), backslash continuations joined, `[optional]` brackets dropped."""
  if markdown:
    text = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S))
  text = re.sub(r"\s*\\\n\s*", " ", text)
  out = []
  for line in text.splitlines():
    m = re.match(r"^\s*(?:\S.*&& )?bistil (\w[\w-]*.*)$", line)
    if m:
      cmd = m.group(1).split(" #")[0].strip()
      out.append(re.sub(r"[\[\]]", "", cmd))
  return out


def sources():
  for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
    with open(path) as f:
      yield path, f.read()
  for doc in DOCS:
    with open(os.path.join(REPO, doc)) as f:
      yield doc, f.read()


class DocCommandsTest(absltest.TestCase):
  def test_every_shown_command_parses_and_builds_its_config(self):
    parser = cli.build_parser()
    seen = 0
    for where, text in sources():
      for cmd in commands(text, markdown=where.endswith(".md")):
        argv = shlex.split(cmd.replace("...", "X"))
        with self.subTest(where=where, cmd=cmd):
          try:
            args, rest = parser.parse_known_args(argv)
          except SystemExit:
            self.fail(f"{where}: `bistil {cmd}` does not parse")
          if not getattr(args, "accepts_overrides", False):
            self.assertEqual(rest, [], f"{where}: unknown args in {cmd}")
            continue
          overrides = configlib.parse_override_args(rest)
          old = os.getcwd()
          os.chdir(REPO if where in DOCS else os.path.dirname(REPO))
          try:
            config = configlib.build_config(
              args.config, overrides, args.command
            )
            if args.command == "run":
              stages.validate(config)
          except BistilError as e:
            self.fail(f"{where}: `bistil {cmd}`: {e}")
          finally:
            os.chdir(old)
          seen += 1
    self.assertGreater(seen, 5)

  def test_the_extractor_finds_continued_commands(self):
    text = "  bistil distil --config c.py:tiny \\\n    --config.a=1\nbistil\n"
    self.assertEqual(commands(text), ["distil --config c.py:tiny --config.a=1"])
    md = (
      "see `bistil demo --x` here\n```bash\npip install . && bistil demo\n```"
    )
    self.assertEqual(commands(md, markdown=True), ["demo"])


if __name__ == "__main__":
  absltest.main()
