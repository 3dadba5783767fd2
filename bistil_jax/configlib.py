r"""Experiment configs: `path.py[:arg]` files with `get_config(arg)`.

A config file defines `get_config(arg: str | None) -> ConfigDict` (STYLE.md
point 10). The command line picks it with `--config configs/distil.py:tiny`
and overrides fields with `--config.optim.learning_rate=3e-4`. The returned
config is locked, so reading or writing a key that does not exist is an
error rather than a silently ignored typo.

What ml_collections does here: the config itself (`ConfigDict`), locking
(`lock()`: no new keys), the type of an overridden field (assignment casts
int to float and list to tuple and refuses other types; `apply_overrides`
turns its TypeError into our one-line error) and the JSON of run.json
(`to_json_best_effort`).

What stays here, because ml_collections does it otherwise or not at all:
  - loading (`load_config`): `config_flags.ConfigFileFlagParser` splits at
    the first ":" (a path may hold one), keeps an import error until the
    config is first read and reports errors with a traceback; ours is one
    line (BistilError) and resolves a bare name or "configs/NAME.py" to the
    shipped configs of a source checkout or an installed wheel;
  - the `--config.a.b=v` arguments (`parse_override_args`): config_flags
    reads them only as absl flags, and the CLI is argparse; the text of a
    value is parsed here (bool words such as "on", a bare scalar for a
    tuple field, a bare word as a string for an untyped field), and a
    whole block or None is refused, which ConfigDict would accept;
  - the walk to an overridden key: `config_flags.config_path` looks up
    attributes first, so `--config.train.items=3` would reach a method of
    ConfigDict instead of being an unknown key;
  - suggestions for a misspelt key (`suggest_key`): a locked ConfigDict's
    own "Did you mean" compares the name with its block's fields by
    difflib alone (cutoff 0.75), so "optim.lr" finds nothing (we also try
    initials: learning_rate) and neither does "data.num_steps" (we also
    try the same name in another block: train.num_steps);
  - `check_command` (another command's config named as such),
    `check_keys_set` (a required field is "" in the shipped configs and in
    run.json; `required_placeholder` would change both), `diff_keys`
    (plain dicts of run.json), `\,` escapes and named lists
    (`parse_named_list`), and `expand` (`~` in paths).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections

from bistil_jax import paths
from bistil_jax.errors import BistilError

ConfigDict = ml_collections.ConfigDict


def repo_configs_dir() -> pathlib.Path:
  """The shipped `configs/` directory.

  A source checkout (editable install) has it beside the package; a wheel
  (`pip install .`) installs the same files as `bistil_jax/_configs`.
  """
  here = pathlib.Path(__file__).resolve().parent
  checkout = here.parent / "configs"
  if (checkout / "common.py").is_file():
    return checkout
  return here / "_configs"


def _resolve(path: str) -> pathlib.Path:
  """A config path as given, else the shipped copy of it: a bare name
  ("distil") or a relative "configs/NAME.py" from any working directory."""
  p = pathlib.Path(path)
  if p.exists():
    return p
  if not p.suffix:
    return repo_configs_dir() / f"{path}.py"
  if not p.is_absolute() and p.parts[:1] == ("configs",):
    return repo_configs_dir().joinpath(*p.parts[1:])
  return p


def split_spec(spec: str) -> tuple[str, str | None]:
  """ "configs/distil.py:tiny" -> ("configs/distil.py", "tiny")."""
  path, sep, arg = spec.partition(":")
  if path.endswith(".py") or not sep:
    return path, (arg if sep else None)
  # A ":" inside the path itself (rare): split at the last ".py:".
  idx = spec.rfind(".py:")
  if idx < 0:
    return spec, None
  return spec[: idx + 3], spec[idx + 4 :]


def load_config(spec: str) -> ConfigDict:
  """Imports a config file and calls its `get_config(arg)`.

  A bare name such as "distil", or "configs/distil.py" where the working
  directory has no such file, resolves to the shipped configs (source
  checkout or installed wheel).

  Raises:
    BistilError: missing file, no get_config, or an error inside it.
  """
  path, arg = split_spec(spec)
  p = _resolve(path)
  if not p.is_file():
    raise BistilError(f"config file not found: {path}")
  mod_spec = importlib.util.spec_from_file_location(f"_bistil_cfg_{p.stem}", p)
  module = importlib.util.module_from_spec(mod_spec)
  try:
    mod_spec.loader.exec_module(module)
  except Exception as e:  # the user's file: report, do not trace
    raise BistilError(f"config file {p} failed to import: {e!r}") from e
  if not hasattr(module, "get_config"):
    raise BistilError(f"config file {p} defines no get_config(arg)")
  try:
    config = module.get_config(arg)
  except BistilError:
    raise
  except Exception as e:
    raise BistilError(f"{p}: get_config({arg!r}) failed: {e!r}") from e
  if not isinstance(config, ConfigDict):
    raise BistilError(
      f"{p}: get_config must return an ml_collections.ConfigDict"
    )
  return config


def load_sibling(config_file: str, name: str):
  """Imports `name.py` from the directory of a config file (e.g. common)."""
  path = pathlib.Path(config_file).resolve().parent / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"_bistil_cfg_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _keys(config: ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for k, v in config.items():
    name = f"{prefix}{k}"
    if isinstance(v, ConfigDict):
      out.extend(_keys(v, name + "."))
    else:
      out.append(name)
  return out


def _closeness(typed: str, field: str) -> float:
  """How close a typed field name is to a real one: difflib's ratio
  against the name or its initials ("lr" for learning_rate)."""
  initials = "".join(w[:1] for w in field.split("_") if w)
  return max(
    difflib.SequenceMatcher(None, typed, field).ratio(),
    difflib.SequenceMatcher(None, typed, initials).ratio()
    if len(initials) > 1
    else 0.0,
  )


def suggest_key(key: str, keys: Sequence[str]) -> str | None:
  """The known key a mistyped one most likely meant, or None.

  Fields of the same block come first, compared by name alone (comparing
  whole dotted keys lets the shared "optim." prefix outweigh the name:
  optim.lrr looked closest to optim.clip_norm); then the same name in
  another block (data.num_steps -> train.num_steps); then whole keys.
  """
  block, _, leaf = key.rpartition(".")
  scored = [
    (_closeness(leaf, k.rpartition(".")[2]), k)
    for k in keys
    if k.rpartition(".")[0] == block
  ]
  scored = [(v, k) for v, k in scored if v >= 0.6]
  if scored:
    return max(scored, key=lambda vk: vk[0])[1]
  same = [k for k in keys if k.rpartition(".")[2] == leaf]
  if len(same) == 1:
    return same[0]
  close = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
  return close[0] if close else None


def _unknown(config: ConfigDict, key: str) -> BistilError:
  close = suggest_key(key, _keys(config))
  hint = f" (did you mean {close}?)" if close else ""
  return BistilError(f"unknown config key {key}{hint}")


def _parse_value(key: str, text: str, current: Any) -> Any:
  """Parses an override string for a field whose value is `current`.

  Only the text is read here; the type is ConfigDict's to enforce when the
  value is assigned (apply_overrides): it casts int to float and list to
  tuple and refuses the rest.
  """
  if isinstance(current, bool):
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
      return True
    if low in ("0", "false", "no", "off"):
      return False
    raise BistilError(f"config.{key} is a bool, got {text!r}")
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if current is None:  # an untyped field: a bare word is a string
      return text
    raise _wrong_type(key, text, current) from None
  if isinstance(current, tuple) and not isinstance(value, tuple | list):
    value = (value,)  # --config.mesh.shape=4 for (4,)
  return value


def _wrong_type(key: str, text: str, current: Any) -> BistilError:
  return BistilError(
    f"config.{key} expects {type(current).__name__}, got {text!r}"
  )


def apply_overrides(config: ConfigDict, overrides: Mapping[str, str]) -> None:
  """Sets dotted keys from strings; unknown keys and values of another
  type than the field's are errors."""
  for key, text in overrides.items():
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
      if part not in node or not isinstance(node[part], ConfigDict):
        raise _unknown(config, key)
      node = node[part]
    if parts[-1] not in node:
      raise _unknown(config, key)
    current = node[parts[-1]]
    value = _parse_value(key, text, current)
    # ConfigDict would take a dict for a whole block (dropping its other
    # fields) and None for any field: neither is an override of a value.
    if isinstance(current, ConfigDict) or (
      value is None and current is not None
    ):
      raise _wrong_type(key, text, current)
    try:
      node[parts[-1]] = value
    except TypeError:  # ConfigDict refused the type
      raise _wrong_type(key, text, current) from None


def parse_override_args(argv: Sequence[str]) -> dict[str, str]:
  """Collects `--config.a.b=v` / `--config.a.b v` from leftover argv."""
  out: dict[str, str] = {}
  i = 0
  while i < len(argv):
    arg = argv[i]
    if not arg.startswith("--config."):
      raise BistilError(f"unrecognised argument: {arg}")
    body = arg[len("--config.") :]
    if "=" in body:
      key, value = body.split("=", 1)
    else:
      if i + 1 >= len(argv):
        raise BistilError(f"{arg} needs a value")
      key, value = body, argv[i + 1]
      i += 1
    out[key] = value
    i += 1
  return out


# The shipped config of each training command (configs/FILE).
COMMAND_CONFIGS = {
  "distil": "distil.py",
  "pretrain": "pretrain.py",
  "finetune": "finetune.py",
  "sft": "sft.py",
  "lang-sft": "lang_sft.py",
  "run": "run.py",
}


def _lookup(tree: Mapping[str, Any], key: str) -> Any:
  for part in key.split("."):
    tree = tree[part]
  return tree


def check_command(config: ConfigDict, spec: str, command: str) -> None:
  """Refuses the config of another command in one line that says so.

  Without this, `bistil distil --config configs/sft.py:pos` failed on the
  first field distil reads ("unknown config key data.source"), which does
  not tell the user they passed phase 2's config. Another command's config
  is recognised by its file (a shipped config) or by its fields: it lacks
  some of this command's fields and has all of another's.

  Raises:
    BistilError: the config belongs to another command.
  """
  if command not in COMMAND_CONFIGS:
    return
  path, _ = split_spec(spec)
  shipped = repo_configs_dir()
  own = COMMAND_CONFIGS[command]
  resolved = _resolve(path).resolve()
  for other, name in COMMAND_CONFIGS.items():
    if other != command and resolved == (shipped / name).resolve():
      raise BistilError(
        f"{path} is the config of `bistil {other}`, not `bistil {command}` "
        f"(its config is configs/{own})"
      )
  keys = set(_keys(config))
  mine = load_config(str(shipped / own))
  # Fields a user must set ("" by default, e.g. data.source) tell most.
  missing = sorted(
    set(_keys(mine)) - keys, key=lambda k: (_lookup(mine, k) != "", k)
  )
  if not missing:
    return
  for other, name in COMMAND_CONFIGS.items():
    if (
      other != command and set(_keys(load_config(str(shipped / name)))) <= keys
    ):
      raise BistilError(
        f"{path} is a config of `bistil {other}` (it has no "
        f"{', '.join(missing[:2])}), "
        f"not of `bistil {command}` (its config is configs/{own})"
      )


def build_config(
  spec: str,
  overrides: Mapping[str, str] | None = None,
  command: str | None = None,
):
  """load_config + overrides, then locked (typos become errors).

  Args:
    spec: `path.py[:arg]`.
    overrides: dotted key -> value text.
    command: the CLI command the config is for ("distil", ...): the config
      of another command is refused in so many words.
  """
  config = load_config(spec)
  if command is not None:
    check_command(config, spec, command)
  config.lock()
  apply_overrides(config, overrides or {})
  return config


def to_dict(config: ConfigDict) -> dict[str, Any]:
  """A JSON-serialisable plain dict (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def diff_keys(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
  """Dotted keys whose values differ between two plain config dicts."""
  out = []
  for key in sorted(set(a) | set(b)):
    va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
    if isinstance(va, Mapping) and isinstance(vb, Mapping):
      out.extend(f"{key}.{k}" for k in diff_keys(va, vb))
    elif va != vb:
      out.append(key)
  return out


def check_keys_set(config: ConfigDict, keys: Iterable[str]) -> None:
  """Errors for required string fields left empty."""
  for key in keys:
    node = config
    for part in key.split("."):
      node = node[part]
    if node in ("", None):
      raise BistilError(f"config.{key} must be set (--config.{key}=...)")


def split_escaped(spec: str) -> list[str]:
  r"""Splits a comma-separated list at its unescaped commas.

  `\,` is a comma inside an item (`dev=data/odd\,name.conllu` is one
  item) and `\\` a backslash; any other backslash stays as it is. Items
  are stripped; empty ones are dropped.
  """
  items, cur, i = [], [], 0
  while i < len(spec):
    c = spec[i]
    if c == "\\" and i + 1 < len(spec) and spec[i + 1] in ",\\":
      cur.append(spec[i + 1])
      i += 2
      continue
    if c == ",":
      items.append("".join(cur))
      cur = []
    else:
      cur.append(c)
    i += 1
  items.append("".join(cur))
  return [x.strip() for x in items if x.strip()]


def parse_named_item(item: str) -> tuple[str | None, str]:
  """ "dev=path" -> ("dev", "path"); a bare path -> (None, path). A name
  holds no "/" or ":", so "data/a=b.txt" and "gs://b/x=1" are bare paths."""
  name, sep, value = item.partition("=")
  if not sep or not name.strip() or "/" in name or ":" in name:
    return None, item.strip()
  return name.strip(), value.strip()


def parse_named_list(spec: str) -> list[tuple[str, str]]:
  r""" "dev=path,mt=path2" -> [(name, spec)]; a bare item is named by its
  position ("set0", ...). Names must be unique. A comma inside a path is
  written `\,` (split_escaped)."""
  out: list[tuple[str, str]] = []
  for i, item in enumerate(split_escaped(spec)):
    name, value = parse_named_item(item)
    out.append((f"set{i}" if name is None else name, value))
  names = [n for n, _ in out]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise BistilError(f"{spec!r} names {', '.join(dup)} more than once")
  return out


def expand(path: str) -> str:
  """`~` expanded on a local path; URLs and specs (`hf:...`) as they are."""
  if not path or not path.startswith("~"):
    return path
  return os.fspath(paths.path(path))
