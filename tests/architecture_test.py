"""The package's floors (docs/architecture.md), checked on its source.

Reads every module of bistil_jax with `ast` (imports inside functions
count) and fails on:
  - an import that runs upward (a module importing a higher floor);
  - an import circle between modules;
  - a `_private` name taken from another module;
  - an import of the package's own modules inside a function, outside the
    entry floor (where a lazy import keeps `bistil --help` fast).
`KNOWN` lists the violations the reshaping has not removed yet; a
violation not in it fails, and so does an entry of it that no longer
occurs (the list only shrinks).
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "bistil_jax"

# Floors, lowest first: a module may import its own floor (without a
# circle) and any floor below. The first matching entry places a module;
# an entry is a module name or a package prefix ending in ".".
FLOORS = (
  (
    "entry",
    (
      "bistil_jax",
      "cli",
      "demo",
      "*.commands",
      "data.trim_cli",
      "synthetic.cli",
      "recipe.",
    ),
  ),
  ("ground", ("errors", "paths", "configlib", "metrics")),
  ("compute", ("losses", "partitioning")),
  ("model", ("model.",)),
  ("data", ("data.", "sparse")),
  ("formats", ("checkpoint.",)),
  ("tasks", ("tasks.",)),
  ("train", ("train.", "measure", "synthetic.", "deploy.")),
)
ORDER = (
  "ground",
  "compute",
  "model",
  "data",
  "formats",
  "tasks",
  "train",
  "entry",
)

# Violations still in the tree: (kind, importer, imported or name).
KNOWN: set[tuple[str, str, str]] = set()


@dataclasses.dataclass(frozen=True)
class Import:
  importer: str  # module name without the "bistil_jax." prefix
  target: str  # imported module
  names: tuple[str, ...]  # names taken from it (from-imports)
  in_function: bool
  line: int


def module_name(path: pathlib.Path, root: pathlib.Path = PACKAGE) -> str:
  parts = list(path.relative_to(root).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts) or "bistil_jax"


def floor(module: str) -> str:
  for name, patterns in FLOORS:
    for p in patterns:
      if p.startswith("*.") and module.endswith(p[1:]):
        return name
      if module == p or (
        p.endswith(".") and (module.startswith(p) or module == p[:-1])
      ):
        return name
  raise AssertionError(f"module {module} is on no floor: add it to FLOORS")


def _function_imports(tree: ast.AST) -> set[int]:
  inner = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      for sub in ast.walk(node):
        if isinstance(sub, (ast.Import, ast.ImportFrom)):
          inner.add(id(sub))
  return inner


def _strip(name: str) -> str | None:
  if name == "bistil_jax":
    return "bistil_jax"
  if name.startswith("bistil_jax."):
    return name[len("bistil_jax.") :]
  return None


def imports_of(
  path: pathlib.Path, modules: set[str], root: pathlib.Path = PACKAGE
) -> tuple[list[Import], ast.AST]:
  """The package imports of one file; `from pkg import mod` counts as an
  import of pkg.mod."""
  me = module_name(path, root)
  tree = ast.parse(path.read_text(), str(path))
  inner = _function_imports(tree)
  pkg = me if path.name == "__init__.py" else me.rpartition(".")[0]
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        t = _strip(a.name)
        if t:
          out.append(Import(me, t, (), id(node) in inner, node.lineno))
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = ["bistil_jax", *pkg.split(".")] if pkg else ["bistil_jax"]
        base = base[: len(base) - node.level + 1]
        full = ".".join(base + ([node.module] if node.module else []))
      else:
        full = node.module or ""
      t = _strip(full)
      if not t:
        continue
      for a in node.names:
        sub = a.name if t == "bistil_jax" else f"{t}.{a.name}"
        if sub in modules:
          out.append(Import(me, sub, (), id(node) in inner, node.lineno))
        else:
          out.append(Import(me, t, (a.name,), id(node) in inner, node.lineno))
  return out, tree


def _private_attributes(tree: ast.AST, aliases: dict[str, str]):
  """(module, name) of every `alias._name` where alias is a package module."""
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.Attribute)
      and isinstance(node.value, ast.Name)
      and node.value.id in aliases
      and node.attr.startswith("_")
      and not node.attr.startswith("__")
    ):
      yield aliases[node.value.id], node.attr


def _aliases(tree: ast.AST, imports: list[Import]) -> dict[str, str]:
  """Local names bound to package modules (`from x import mod as m`)."""
  by_line: dict[int, list[Import]] = {}
  for imp in imports:
    if not imp.names:
      by_line.setdefault(imp.line, []).append(imp)
  out = {}
  for node in ast.walk(tree):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      for a in node.names:
        for imp in by_line.get(node.lineno, ()):
          if imp.target.rpartition(".")[2] == a.name.rpartition(".")[2]:
            out[a.asname or a.name.rpartition(".")[2]] = imp.target
  return out


def _cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(tuple(sorted(comp)))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def violations(root: pathlib.Path = PACKAGE) -> set[tuple[str, str, str]]:
  files = sorted(root.rglob("*.py"))
  modules = {module_name(p, root) for p in files}
  found: set[tuple[str, str, str]] = set()
  graph: dict[str, set[str]] = {}
  for path in files:
    imports, tree = imports_of(path, modules, root)
    for imp in imports:
      me, t = imp.importer, imp.target
      if t != me and t in modules:
        graph.setdefault(me, set()).add(t)
      if t in modules and t != "bistil_jax":
        if ORDER.index(floor(t)) > ORDER.index(floor(me)):
          found.add(("upward", me, t))
      if imp.in_function and floor(me) != "entry":
        found.add(("in-function", me, t))
      for n in imp.names:
        if n.startswith("_") and not n.startswith("__"):
          found.add(("private", me, f"{t}.{n}"))
    for mod, name in _private_attributes(tree, _aliases(tree, imports)):
      if mod != module_name(path, root):
        found.add(("private", module_name(path, root), f"{mod}.{name}"))
  for comp in _cycles(graph):
    found.add(("circle", comp[0], " <-> ".join(comp)))
  return found


def test_floors_hold():
  found = violations()
  new = sorted(found - KNOWN)
  gone = sorted(KNOWN - found)
  assert not new, "imports against docs/architecture.md:\n" + "\n".join(
    f"  {k}: {a} -> {b}" for k, a, b in new
  )
  assert not gone, "fixed, so remove from KNOWN:\n" + "\n".join(
    f"  {k}: {a} -> {b}" for k, a, b in gone
  )


def test_every_module_has_a_floor():
  for p in PACKAGE.rglob("*.py"):
    floor(module_name(p))


def _write(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
  pkg = root / "bistil_jax"
  for rel, text in files.items():
    f = pkg / rel
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(text)
  return pkg


@pytest.mark.parametrize(
  "files, want",
  [
    (  # a data module importing a checkpoint module
      {
        "data/a.py": "from bistil_jax.checkpoint import b\n",
        "checkpoint/b.py": "",
      },
      ("upward", "data.a", "checkpoint.b"),
    ),
    (  # the same, hidden in a function
      {
        "data/a.py": "def f():\n  from bistil_jax.checkpoint import b\n",
        "checkpoint/b.py": "",
      },
      ("upward", "data.a", "checkpoint.b"),
    ),
    (  # a circle on one floor, one side inside a function
      {
        "data/a.py": "from bistil_jax.data import b\n",
        "data/b.py": "def f():\n  import bistil_jax.data.a\n",
      },
      ("circle", "data.a", "data.a <-> data.b"),
    ),
    (  # a private name, imported
      {"data/a.py": "from bistil_jax.data.b import _x\n", "data/b.py": ""},
      ("private", "data.a", "data.b._x"),
    ),
    (  # a private name, through the module
      {
        "data/a.py": "from bistil_jax.data import b as bb\nbb._x()\n",
        "data/b.py": "",
      },
      ("private", "data.a", "data.b._x"),
    ),
    (  # a lazy import below the entry floor
      {
        "train/a.py": "def f():\n  from bistil_jax import paths\n",
        "paths.py": "",
      },
      ("in-function", "train.a", "paths"),
    ),
  ],
)
def test_each_kind_of_violation_is_caught(tmp_path, files, want):
  pkg = _write(tmp_path, {"__init__.py": "", **files})
  assert want in violations(pkg)


def test_downward_and_entry_imports_pass(tmp_path):
  pkg = _write(
    tmp_path,
    {
      "__init__.py": "",
      "paths.py": "",
      "data/a.py": "from bistil_jax import paths\n",
      "train/commands.py": "def f():\n  from bistil_jax.data import a\n",
    },
  )
  assert violations(pkg) == set()
