"""Writes a synthetic dataset: corpora and labelled tasks per language.

Layout of the output directory (`{lang}` is a language code, `{split}` one of
train, dev, test):

  family.json                 every generator parameter (`load_family` reads it)
  family.txt                  `Family.describe()`
  manifest.json               languages, sizes, suggested pairs, relative paths
  corpora/{lang}.txt          unlabelled text, one sentence per line (train)
  corpora/{lang}.dev.txt      held-out unlabelled text
  pos/{lang}/{split}.conllu   UD CoNLL-U: UPOS, features, heads, relations
  ner/{lang}/{split}.txt      two columns, token and IOB2 tag (PER/LOC/ORG)
  nli/{lang}/{split}.jsonl    {"id", "premise", "hypothesis", "label"}
  qa/{lang}/{split}.json      SQuAD v1.1 (only with qa=True / `--qa`)

Task files of different languages are translations of one another: the item
with one id has the same latent content in every language.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from bistil_jax import paths
from bistil_jax.errors import BistilError
from bistil_jax.synthetic import latent as lt
from bistil_jax.synthetic import qa as qa_lib
from bistil_jax.synthetic import tasks
from bistil_jax.synthetic.languages import Family

MANIFEST_FORMAT = "bistil_jax.synthetic.dataset/1"
TASKS = ("pos", "ner", "nli")
# Entries of an output directory that write_dataset owns (and replaces).
_OWNED = ("corpora", "pos", "ner", "nli", "qa", "family.json", "family.txt")
_MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Sentences per language and split.

  Attributes:
    corpus_train: lines of unlabelled text per language.
    corpus_dev: held-out lines per language.
    task_train: training sentences (tagging) and pairs (NLI) per language.
    task_dev: dev sentences and pairs per language.
    task_test: test sentences and pairs per language.
  """

  corpus_train: int = 20_000
  corpus_dev: int = 1_000
  task_train: int = 2_000
  task_dev: int = 500
  task_test: int = 500

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BistilError(
          f"size {field.name} must be a positive integer, got {value!r}"
        )

  @classmethod
  def coerce(cls, sizes: Sizes | Mapping[str, int] | None) -> Sizes:
    """Sizes from None (defaults), a Sizes, or a mapping of overrides.

    Raises:
      BistilError: an unknown key or a value that is not a positive integer.
    """
    if sizes is None:
      return cls()
    if isinstance(sizes, cls):
      return sizes
    if not isinstance(sizes, Mapping):
      raise BistilError(
        f"sizes must be a Sizes or a mapping, got {type(sizes).__name__}"
      )
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(sizes) - known)
    if unknown:
      raise BistilError(
        f"unknown size key(s) {', '.join(map(str, unknown))}; known: "
        f"{', '.join(sorted(known))}"
      )
    return cls(**sizes)

  def task(self) -> dict[str, int]:
    return {
      "train": self.task_train,
      "dev": self.task_dev,
      "test": self.task_test,
    }


@dataclasses.dataclass(frozen=True)
class DatasetPaths:
  """Where write_dataset put everything.

  Attributes:
    root: the output directory.
    family: family.json.
    description: family.txt.
    manifest: manifest.json.
    corpora: lang -> {"train", "dev"} -> text file.
    pos: lang -> split -> CoNLL-U file.
    ner: lang -> split -> IOB2 file.
    nli: lang -> split -> JSONL file.
    qa: lang -> split -> SQuAD v1.1 JSON file (empty unless written).
  """

  root: paths.Path
  family: paths.Path
  description: paths.Path
  manifest: paths.Path
  corpora: dict[str, dict[str, paths.Path]]
  pos: dict[str, dict[str, paths.Path]]
  ner: dict[str, dict[str, paths.Path]]
  nli: dict[str, dict[str, paths.Path]]
  qa: dict[str, dict[str, paths.Path]] = dataclasses.field(default_factory=dict)

  def files(self) -> list[paths.Path]:
    """Every written file."""
    out = [self.family, self.description, self.manifest]
    for table in (self.corpora, self.pos, self.ner, self.nli, self.qa):
      for by_split in table.values():
        out.extend(by_split.values())
    return out


def _relative_layout(
  languages: Sequence[str], qa: bool = False
) -> dict[str, Any]:
  out = {
    "family": "family.json",
    "description": "family.txt",
    "corpora": {
      lang: {"train": f"corpora/{lang}.txt", "dev": f"corpora/{lang}.dev.txt"}
      for lang in languages
    },
    "pos": {
      lang: {s: f"pos/{lang}/{s}.conllu" for s in tasks.SPLITS}
      for lang in languages
    },
    "ner": {
      lang: {s: f"ner/{lang}/{s}.txt" for s in tasks.SPLITS}
      for lang in languages
    },
    "nli": {
      lang: {s: f"nli/{lang}/{s}.jsonl" for s in tasks.SPLITS}
      for lang in languages
    },
  }
  if qa:
    out["qa"] = {
      lang: {s: f"qa/{lang}/{s}.json" for s in tasks.SPLITS}
      for lang in languages
    }
  return out


def _paths(root: paths.Path, layout: Mapping[str, Any]) -> DatasetPaths:
  def table(key):
    return {
      lang: {split: root / rel for split, rel in by_split.items()}
      for lang, by_split in layout[key].items()
    }

  return DatasetPaths(
    root=root,
    family=root / layout["family"],
    description=root / layout["description"],
    manifest=root / _MANIFEST,
    corpora=table("corpora"),
    pos=table("pos"),
    ner=table("ner"),
    nli=table("nli"),
    qa=table("qa") if "qa" in layout else {},
  )


def _check_languages(
  family: Family, languages: Sequence[str] | None
) -> list[str]:
  if languages is None:
    return list(family.codes)
  if isinstance(languages, str):
    raise BistilError(
      f"languages must be a list of codes, got the string {languages!r}"
    )
  codes = list(languages)
  if not codes:
    raise BistilError("languages is empty; name at least one language")
  for code in codes:
    family.language(code)  # Raises for an unknown code.
  duplicates = sorted({c for c in codes if codes.count(c) > 1})
  if duplicates:
    raise BistilError(f"language(s) listed twice: {', '.join(duplicates)}")
  return codes


def _prepare_dir(root: paths.Path, overwrite: bool, flag: str) -> None:
  if root.exists() and not root.is_dir():
    raise BistilError(f"output path {root} exists and is not a directory")
  if root.is_dir() and any(root.iterdir()):
    if not overwrite:
      raise BistilError(
        f"output directory {root} is not empty; pass {flag} to replace "
        "the dataset in it (files it did not write are kept)"
      )
    # Only what an earlier run wrote goes; other files stay.
    for name in (_MANIFEST, *_OWNED):
      path = root / name
      paths.rmtree(path)
  paths.mkdirs(root)


def _write(path: paths.Path, text: str) -> None:
  """Writes atomically, so a file is either whole or absent."""
  paths.write_text(path, text)


def write_dataset(
  out_dir: str | os.PathLike[str],
  family: Family,
  languages: Sequence[str] | None = None,
  sizes: Sizes | Mapping[str, int] | None = None,
  overwrite: bool = False,
  qa: bool = False,
  overwrite_flag: str = "overwrite=True",
) -> DatasetPaths:
  """Generates and writes corpora and tasks for some languages of a family.

  Args:
    out_dir: the output directory; created if missing.
    family: the language family (`make_family`).
    languages: codes to emit (default: all of the family's).
    sizes: a `Sizes`, a mapping of overrides of its fields, or None.
    overwrite: replace a dataset in a non-empty `out_dir`.
    qa: also write the extractive QA task (synthetic/qa.py), as many
      stories per split as tagging sentences.
    overwrite_flag: how the caller's user sets `overwrite`, for the error
      (the CLI's "--overwrite").

  Returns:
    The paths of everything written.

  Raises:
    BistilError: bad languages or sizes, or a non-empty `out_dir` without
      `overwrite`. Nothing is written in that case.
  """
  if not isinstance(family, Family):
    raise BistilError(
      f"family must be a synthetic Family, got {type(family).__name__}"
    )
  codes = _check_languages(family, languages)
  sizes = Sizes.coerce(sizes)
  root = paths.path(out_dir)
  _prepare_dir(root, overwrite, overwrite_flag)
  layout = _relative_layout(codes, qa)
  out = _paths(root, layout)

  data = tasks.make_task_data(family, sizes.task())
  held_out = data.sentences("dev") | data.sentences("test")
  for code in codes:
    _write_corpora(out, family, code, sizes, held_out)
    _write_tasks(out, family, code, data)
  if qa:
    _write_qa(out, family, codes, sizes)

  family.save(out.family)
  _write(out.description, family.describe() + "\n")
  manifest = _manifest(family, codes, sizes, layout)
  # Written last: its presence marks a complete dataset.
  _write(out.manifest, json.dumps(manifest, indent=1) + "\n")
  return out


def _write_corpora(
  out: DatasetPaths,
  family: Family,
  code: str,
  sizes: Sizes,
  held_out: set[lt.Sentence],
) -> None:
  """One language's unlabelled train and dev text, none of it `held_out`."""
  for split, n in (("train", sizes.corpus_train), ("dev", sizes.corpus_dev)):
    lines = tasks.corpus_sentences(family, code, n, split, held_out)
    _write(out.corpora[code][split], "\n".join(lines) + "\n")


def _write_tasks(
  out: DatasetPaths, family: Family, code: str, data: tasks.TaskData
) -> None:
  """One language's POS/DP (CoNLL-U), NER and NLI files of every split."""
  for split in tasks.SPLITS:
    conllu, iob2 = [], []
    for i, sentence in enumerate(data.tagging[split]):
      tokens = family.realize(sentence, code)
      conllu.append(tasks.conllu_block(tokens, f"{split}-{i}"))
      iob2.append(tasks.iob2_block(tokens))
    _write(out.pos[code][split], "".join(conllu))
    _write(out.ner[code][split], "".join(iob2))
    nli = [
      tasks.nli_line(family, item, code, f"{split}-{i}")
      for i, item in enumerate(data.nli[split])
    ]
    _write(out.nli[code][split], "\n".join(nli) + "\n")


def _write_qa(
  out: DatasetPaths, family: Family, codes: Sequence[str], sizes: Sizes
) -> None:
  """The QA stories of every split, realised in each language."""
  items = qa_lib.make_qa_items(family, sizes.task())
  for code in codes:
    for split in tasks.SPLITS:
      text = qa_lib.squad_json(family, items[split], code, split)
      _write(out.qa[code][split], text + "\n")


def _manifest(
  family: Family,
  codes: Sequence[str],
  sizes: Sizes,
  layout: Mapping[str, Any],
) -> dict[str, Any]:
  """manifest.json's content: what was written, and where (`layout`)."""
  source, close, distant = family.transfer_languages(codes)
  return {
    "format": MANIFEST_FORMAT,
    "seed": family.seed,
    "languages": codes,
    "family_languages": list(family.codes),
    "groups": {code: family.language(code).group for code in codes},
    "sizes": dataclasses.asdict(sizes),
    "transfer": {"source": source, "close": close, "distant": distant},
    "labels": {
      "upos": list(tasks.UPOS_TAGS),
      "deprel": list(tasks.DEPRELS),
      "ner": list(tasks.NER_TAGS),
      "nli": list(tasks.NLI_LABELS),
    },
    "files": layout,
  }


def read_dataset(out_dir: str | os.PathLike[str]) -> DatasetPaths:
  """The paths of a dataset written by `write_dataset`, from its manifest.

  Raises:
    BistilError: the directory holds no complete synthetic dataset.
  """
  root = paths.path(out_dir)
  path = root / _MANIFEST
  if not path.is_file():
    raise BistilError(f"no synthetic dataset in {root} (missing {_MANIFEST})")
  try:
    manifest = json.loads(paths.read_text(path))
  except json.JSONDecodeError as e:
    raise BistilError(f"{path} is not valid JSON: {e}") from e
  if (
    not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT
  ):
    raise BistilError(f"{path} is not a synthetic dataset manifest")
  return _paths(root, manifest["files"])
