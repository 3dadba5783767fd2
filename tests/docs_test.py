"""Every link and repository path the README and docs/ name exists in the repo.

A user's clone holds the repository and nothing beside it, so a link that
leaves it (../shared/...) or names a moved file is a broken page.
"""

import pathlib
import re

from absl.testing import absltest, parameterized

REPO = pathlib.Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# [text](target) in Markdown.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# Repository paths named in text or code: a top-level dir of the repo, then
# a path; or a top-level file.
TOP_DIRS = ("bistil_jax", "configs", "launch", "benchmarks", "tests", "docs")
REPO_PATH = re.compile(
  r"(?<![\w./-])((?:" + "|".join(TOP_DIRS) + r")/[\w./-]*"
  r"|setup\.py|pyproject\.toml|README\.md)"
)


# Citations of docs/method.md by section: "docs/method.md 2.4",
# "docs/method.md §4.4-4.6", "docs/method.md sections 4-5", "[method.md](
# method.md) 2.1", "docs/method.md 4.3, 7.4".
_NUM = r"\d+(?:\.\d+)?"
METHOD_REF = re.compile(
  r"(?<![\w.-])(?:docs/)?method\.md\)?\s*(?:§\s*|sections?\s+)?"
  rf"({_NUM}(?:(?:\s*[-,]\s*|\s+and\s+)§?{_NUM})*)"
)
METHOD_NAMED = re.compile(
  r'(?<![\w.-])(?:docs/)?method\.md\)?\s+"([A-Z][^"\n]*)"'
)
# Every file that may cite the method (tests too: their comments do).
CITING = [
  REPO / "README.md",
  *sorted((REPO / "docs").glob("*.md")),
  *sorted(
    p
    for top in ("bistil_jax", "configs", "benchmarks", "launch")
    for p in (REPO / top).rglob("*")
    if p.suffix in (".py", ".md", ".sh")
  ),
  *sorted((REPO / "tests").rglob("*.py")),
]


def method_sections(text: str) -> list[str]:
  """Section numbers cited in `text` ("4-5" and "4.4-4.6" give both ends)."""
  return [n for m in METHOD_REF.finditer(text) for n in re.findall(_NUM, m[1])]


def method_headings() -> tuple[set[str], set[str]]:
  """(section numbers, heading titles) of docs/method.md."""
  text = (REPO / "docs" / "method.md").read_text(encoding="utf-8")
  titles = re.findall(r"^#{2,3} (.+?)\s*$", text, re.M)
  numbers = {m[1] for t in titles if (m := re.match(r"(\d+(?:\.\d+)?)\.? ", t))}
  return numbers, set(titles)


def links(text: str) -> list[str]:
  return [m.group(1) for m in LINK.finditer(text)]


def repo_paths(text: str) -> list[str]:
  out = []
  for m in REPO_PATH.finditer(text):
    path = m.group(1).rstrip(".,")
    out.append(path)
  return out


class DocsTest(parameterized.TestCase):
  def test_there_are_pages(self):
    names = {p.name for p in PAGES}
    for name in (
      "architecture.md",
      "configs.md",
      "partitioning.md",
      "hf-conversion.md",
      "sft-format.md",
      "synthetic.md",
      "method.md",
    ):
      self.assertIn(name, names)

  @parameterized.parameters(*[str(p.relative_to(REPO)) for p in PAGES])
  def test_links_resolve_inside_the_repo(self, page):
    path = REPO / page
    text = path.read_text(encoding="utf-8")
    self.assertNotIn("shared/docs", text)
    for target in links(text):
      if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
        continue  # a web page, not a repository path
      local = target.split("#", 1)[0]
      if not local:
        continue  # an anchor on the same page
      resolved = (path.parent / local).resolve()
      self.assertTrue(
        resolved.is_relative_to(REPO), f"{page}: {target} leaves the repo"
      )
      self.assertTrue(resolved.exists(), f"{page}: {target} does not exist")

  @parameterized.parameters(*[str(p.relative_to(REPO)) for p in PAGES])
  def test_named_repository_paths_exist(self, page):
    text = (REPO / page).read_text(encoding="utf-8")
    for name in repo_paths(text):
      # configs/distil.py:tiny names configs/distil.py with an argument.
      file = name.split(":", 1)[0]
      self.assertTrue((REPO / file).exists(), f"{page} names {name}")

  def test_the_readme_links_every_page(self):
    text = (REPO / "docs" / "README.md").read_text(encoding="utf-8")
    targets = set(links(text))
    for page in PAGES:
      if page.parent.name == "docs" and page.name != "README.md":
        self.assertIn(page.name, targets)
    self.assertIn("docs/README.md", links((REPO / "README.md").read_text()))

  def test_method_citations_name_sections_that_exist(self):
    numbers, titles = method_headings()
    self.assertContainsSubset({"0", "1.1", "2.4", "4.4", "6", "7.4"}, numbers)
    cited = 0
    for path in CITING:
      text = path.read_text(encoding="utf-8")
      where = str(path.relative_to(REPO))
      for n in method_sections(text):
        self.assertIn(n, numbers, f"{where} cites docs/method.md {n}")
        cited += 1
      for name in METHOD_NAMED.findall(text):
        self.assertIn(name, titles, f"{where} cites docs/method.md {name!r}")
      if path.parent.name != "tests":
        # The method lives in the repository: no citation of a spec that
        # a user's clone lacks.
        self.assertNotRegex(text, r"\bMETHOD(\.md)?\b", where)
    self.assertGreater(cited, 50)

  def test_the_method_citation_finder_finds_citations(self):
    text = (
      "(docs/method.md 2.4). docs/method.md §4.4-4.6. docs/method.md "
      "sections 4-5; [method.md](method.md) 2.1, docs/method.md 4.3, 7.4; "
      'docs/method.md\n  2.3; docs/method.md "Project decisions"; '
      "docs/method.md (no section); other_method.md 9.9"
    )
    self.assertEqual(
      method_sections(text),
      ["2.4", "4.4", "4.6", "4", "5", "2.1", "4.3", "7.4", "2.3"],
    )
    self.assertEqual(METHOD_NAMED.findall(text), ["Project decisions"])

  def test_the_path_finder_finds_paths(self):
    # A guard on the regular expression itself, so the tests above cannot
    # pass by finding nothing.
    found = repo_paths("see `bistil_jax/measure.py`, configs/sft.py:pos.")
    self.assertEqual(found, ["bistil_jax/measure.py", "configs/sft.py"])
    self.assertEqual(repo_paths("runs/distil/export, data/tokenizer"), [])
    self.assertEqual(
      links("[a](b.md) [c](https://x.org/y)"), ["b.md", "https://x.org/y"]
    )


if __name__ == "__main__":
  absltest.main()
