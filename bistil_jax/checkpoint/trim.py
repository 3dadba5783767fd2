"""`trim_model_dir`: an HF model dir trimmed to a source/target vocabulary.

docs/method.md section 1, step 5: all the steps of `bistil_jax.data.vocab`
(count, select, rewrite the tokenizer, slice the vocabulary rows) for an HF
model dir, written as a new HF model dir with `vocab_map.json` and
`trim_report.json`. The counting and selection live in `data.vocab`; this
module reads and writes the model dirs around them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from bistil_jax import paths
from bistil_jax.checkpoint import hf
from bistil_jax.data import corpus, vocab
from bistil_jax.errors import BistilError

log = logging.getLogger(__name__)

TRIM_REPORT = "trim_report.json"
# Warn when the original tokenizer maps more than this share of a corpus'
# tokens to its unknown token (wrong script, wrong normaliser, binary data).
UNK_WARN_RATE = 0.05
CORPORA = ("source", "target")


def _counted(lines: Iterable[str], stats: dict[str, Any]) -> Iterator[str]:
  for line in lines:
    stats["lines"] += 1
    yield line


def _corpus_stats(
  counts: np.ndarray, old2new: np.ndarray, unk_id: int | None
) -> dict[str, Any]:
  total = int(counts.sum())
  dropped = int(counts[old2new < 0].sum())
  unk = int(counts[unk_id]) if unk_id is not None else 0
  return {
    "tokens": total,
    "distinct_ids": int(np.count_nonzero(counts)),
    "unk_rate_original": unk / total,
    # Share of tokens whose id was dropped: these get re-segmented by the
    # trimmed tokenizer (into kept pieces or the unknown token).
    "dropped_token_share": dropped / total,
  }


def format_summary(report: Mapping[str, Any]) -> str:
  """A few human-readable lines from a trim report."""
  sel = report["selection"]
  crit = ", ".join(
    f"{k}={sel[k]}"
    for k in ("threshold", "min_count", "coverage")
    if sel[k] is not None
  )
  lines = [
    f"trimmed {report['model_dir']} -> {report['out_dir']} ({crit})",
    f"  tokenizer: {report['tokenizer_model']}, vocab "
    f"{report['vocab_size_before']:,} -> {report['vocab_size_after']:,} "
    f"({report['vocab_size_after'] / report['vocab_size_before']:.1%})",
    f"  parameters: {report['parameters_before']:,} -> "
    f"{report['parameters_after']:,}",
  ]
  for name, c in report["corpora"].items():
    lines.append(
      f"  {name}: {c['lines'] if c['lines'] is not None else '?'} lines, "
      f"{c['tokens']:,} tokens, unk (original) {c['unk_rate_original']:.3%}"
      f", dropped-id tokens {c['dropped_token_share']:.4%}"
    )
  if report["removed_tokenizer_files"]:
    lines.append(
      "  not carried over (untrimmed slow-tokenizer files): "
      + ", ".join(report["removed_tokenizer_files"])
    )
  return "\n".join(lines)


def _check_out_dir(model_dir: str, out_dir: str, overwrite: bool) -> None:
  if paths.path(out_dir).is_dir() and paths.path(model_dir).is_dir():
    if paths.same_path(out_dir, model_dir):
      raise BistilError(f"output dir {out_dir} is the input model dir")
  hf.check_out_dir(out_dir, overwrite)


def _load_counts(
  counts_in: str,
  tokenizer: Tokenizer,
  specs: Mapping[str, str | None],
  stats: dict[str, dict[str, Any]],
) -> dict[str, np.ndarray]:
  """Counts an earlier run saved; warns where they came from other corpora."""
  counts, meta = vocab.load_counts(counts_in, tokenizer)
  for name in CORPORA:
    if name not in counts:
      raise BistilError(f"counts file {counts_in} has no {name!r} counts")
    stats[name].update(meta.get(name, {}))
    spec = specs[name]
    if spec and stats[name].get("spec") not in (None, spec):
      log.warning(
        "counts_in %s was made from %s corpus %s, not %s",
        counts_in,
        name,
        stats[name]["spec"],
        spec,
      )
  return counts


def _count_corpora(
  tokenizer: Tokenizer,
  streams: Mapping[str, Iterable[str]],
  specs: Mapping[str, str | None],
  stats: dict[str, dict[str, Any]],
  max_lines: int | None,
  num_threads: int | None,
  progress: bool,
) -> dict[str, np.ndarray]:
  """Per-id token counts of both corpora; `stats` gets their line counts."""
  counts = {}
  for name in CORPORA:
    stats[name] = {"spec": specs[name], "lines": 0, "max_lines": max_lines}
    counts[name] = vocab.count_tokens(
      tokenizer,
      _counted(streams[name], stats[name]),
      num_threads=num_threads,
      progress=progress,
      desc=f"counting {name}",
    )
  return counts


def _warn_unknown(
  counts: Mapping[str, np.ndarray],
  stats: Mapping[str, Mapping[str, Any]],
  unk_id: int | None,
  model_dir: str,
) -> None:
  """Warns about a corpus the original tokenizer mostly cannot read."""
  for name in CORPORA:
    c = counts[name]
    if unk_id is not None and c.sum():
      rate = c[unk_id] / c.sum()
      if rate > UNK_WARN_RATE:
        log.warning(
          "%s corpus %s: %.1f%% of its tokens are unknown to the original "
          "tokenizer (%s)",
          name,
          stats[name].get("spec"),
          100 * rate,
          model_dir,
        )


@dataclasses.dataclass(frozen=True)
class _Model:
  """An HF model dir as loaded: tokenizer, params, config."""

  model_dir: str
  tokenizer: Tokenizer
  mtype: str  # the tokenizer model, "WordPiece" | "Unigram"
  params: Any
  config: Any

  @property
  def tokenizer_vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)


def _check_args(
  source: str | None,
  target: str | None,
  counts_in: str | None,
  selection: Mapping[str, Any],
  max_lines: int | None,
) -> None:
  """Refuses bad arguments before any corpus is read."""
  if counts_in is None and (not source or not target):
    raise BistilError("give both source and target corpora, or counts_in")
  vocab.check_selection_args(**selection)  # before counting
  if max_lines is not None and max_lines < 1:
    raise BistilError(f"max_lines must be >= 1, got {max_lines}")


def _open_corpora(
  specs: Mapping[str, str | None], counts_in: str | None, max_lines: int | None
) -> dict[str, Iterable[str]]:
  """Both corpora opened now, so a bad target fails before any counting."""
  if counts_in is not None:
    return {}
  return {
    name: corpus.iter_lines(specs[name], max_lines=max_lines)
    for name in CORPORA
  }


def _load_model(model_dir: str, tokenizer: Tokenizer, mtype: str) -> _Model:
  """The model of `model_dir`, checked to fit its tokenizer."""
  size = tokenizer.get_vocab_size(with_added_tokens=True)
  model, params = hf.load_hf(model_dir)
  config = model.config
  if size > config.vocab_size:
    raise BistilError(
      f"tokenizer has {size} ids but the model only "
      f"{config.vocab_size} embedding rows"
    )
  return _Model(model_dir, tokenizer, mtype, params, config)


def _corpus_counts(
  src: _Model,
  streams: Mapping[str, Iterable[str]],
  specs: Mapping[str, str | None],
  counts_in: str | None,
  counts_out: str | None,
  max_lines: int | None,
  num_threads: int | None,
  progress: bool,
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
  """(counts, stats) of both corpora: loaded from `counts_in` or counted,
  saved to `counts_out` if given; warns about mostly unknown corpora."""
  stats = {name: {"lines": None} for name in CORPORA}
  if counts_in is not None:
    counts = _load_counts(counts_in, src.tokenizer, specs, stats)
  else:
    counts = _count_corpora(
      src.tokenizer, streams, specs, stats, max_lines, num_threads, progress
    )
  if counts_out is not None:
    vocab.save_counts(counts_out, src.tokenizer, counts, meta=stats)
  unk_id = vocab.unk_token_id(src.tokenizer)
  _warn_unknown(counts, stats, unk_id, src.model_dir)
  return counts, stats


def _corpora_report(
  src: _Model,
  counts: Mapping[str, np.ndarray],
  stats: Mapping[str, Mapping[str, Any]],
  keep: np.ndarray,
) -> dict[str, Any]:
  old2new = vocab.old2new_array(keep, src.tokenizer_vocab_size)
  unk_id = vocab.unk_token_id(src.tokenizer)
  return {
    name: {
      "spec": stats[name].get("spec"),
      "lines": stats[name].get("lines"),
      "max_lines": stats[name].get("max_lines"),
      **_corpus_stats(counts[name], old2new, unk_id),
    }
    for name in CORPORA
  }


def _write_trimmed(
  new_dir: paths.Path, src: _Model, keep: np.ndarray, report: dict[str, Any]
) -> tuple[dict[str, Any], Any]:
  """Writes the trimmed tokenizer, model, vocab map and report to `new_dir`.

  Args:
    new_dir: the (staging) output dir.
    src: the model being trimmed.
    keep: the kept old ids, sorted.
    report: the report's fields about the run (see `trim_model_dir`):
      "out_dir", "selection", "corpora", "counts_in", "counts_out".

  Returns:
    (the full report, as written to trim_report.json; the new config).
  """
  config = src.config
  tok_info = vocab.write_trimmed_tokenizer(src.model_dir, new_dir, keep)
  new_params, new_config = vocab.slice_vocab_params(src.params, config, keep)
  hf.write_hf(new_dir, new_config, new_params)
  vocab.write_vocab_map(new_dir / vocab.VOCAB_MAP, keep)
  full = {
    "model_dir": src.model_dir,
    "out_dir": report["out_dir"],
    "tokenizer_model": src.mtype,
    "vocab_size_before": int(config.vocab_size),
    "vocab_size_after": int(keep.size),
    "tokenizer_vocab_size_before": int(src.tokenizer_vocab_size),
    "parameters_before": vocab.count_params(src.params, config),
    "parameters_after": vocab.count_params(new_params, new_config),
    "selection": report["selection"],
    "corpora": report["corpora"],
    "counts_in": report["counts_in"],
    "counts_out": report["counts_out"],
    "removed_tokenizer_files": tok_info["removed"],
    "removed_tokenizer_config_keys": tok_info["removed_keys"],
  }
  paths.write_text(new_dir / TRIM_REPORT, json.dumps(full, indent=2))
  return full, new_config


def _write(
  out_dir: str, src: _Model, keep: np.ndarray, run: dict[str, Any]
) -> dict[str, Any]:
  """Writes the trimmed model dir atomically; the report with its summary."""
  with paths.atomic_dir(out_dir) as new_dir:
    report, new_config = _write_trimmed(new_dir, src, keep, run)
  log.info(
    "wrote the trimmed %s (vocab %d -> %d) to %s",
    new_config.architecture,
    src.config.vocab_size,
    keep.size,
    out_dir,
  )
  if report["removed_tokenizer_files"]:
    log.warning(
      "left out untrimmed slow-tokenizer files %s: load %s with the fast "
      "tokenizer (tokenizer.json)",
      report["removed_tokenizer_files"],
      out_dir,
    )
  report["summary"] = format_summary(report)
  return report


def trim_model_dir(
  model_dir: str,
  source: str | None,
  target: str | None,
  out_dir: str,
  threshold: float | None = 1e-6,
  min_count: int | None = None,
  coverage: float | None = None,
  counts_in: str | None = None,
  counts_out: str | None = None,
  max_lines: int | None = None,
  overwrite: bool = False,
  num_threads: int | None = None,
  progress: bool = False,
) -> dict[str, Any]:
  """Trims an HF model dir to the vocabulary of a source and target corpus.

  Counts both corpora with the original tokenizer (or loads `counts_in`),
  selects the kept ids (`vocab.select_keep_ids`), rewrites the tokenizer,
  slices the model (`vocab.slice_vocab_params`) and saves a new HF model
  dir with `vocab_map.json` and `trim_report.json`. Everything is written
  in a temp sibling of `out_dir` and renamed at the end: a failure leaves no
  partial output and an existing `out_dir` untouched.

  Args:
    model_dir: HF model dir with tokenizer.json (WordPiece or Unigram).
    source: source CORPUS spec (see `data.corpus`); ignored with counts_in.
    target: target CORPUS spec; ignored with counts_in.
    out_dir: output dir; must not exist or be empty unless `overwrite`.
    threshold: see `vocab.select_keep_ids`.
    min_count: see `vocab.select_keep_ids`.
    coverage: see `vocab.select_keep_ids`.
    counts_in: .npz from an earlier `counts_out` (same tokenizer): skip
      counting.
    counts_out: where to save the counts.
    max_lines: read at most this many lines of each corpus.
    overwrite: replace a non-empty `out_dir`.
    num_threads: encoding threads (see `vocab.count_tokens`).
    progress: progress lines on stderr while counting.

  Returns:
    The report written to trim_report.json, plus "summary": printable text.

  Raises:
    BistilError: for any bad input (missing files, unsupported tokenizer,
      empty corpus, bad selection parameters, non-empty out_dir).
  """
  _check_out_dir(model_dir, out_dir, overwrite)
  tokenizer, tok_json = vocab.load_tokenizer_dir(model_dir)
  mtype = vocab.check_supported(tok_json)
  selection = dict(threshold=threshold, min_count=min_count, coverage=coverage)
  _check_args(source, target, counts_in, selection, max_lines)
  specs = {"source": source, "target": target}
  streams = _open_corpora(specs, counts_in, max_lines)
  src = _load_model(model_dir, tokenizer, mtype)
  counts, stats = _corpus_counts(
    src,
    streams,
    specs,
    counts_in,
    counts_out,
    max_lines,
    num_threads,
    progress,
  )
  specials = vocab.special_token_ids(
    tok_json, vocab.extra_special_tokens(model_dir)
  )
  keep = vocab.select_keep_ids(
    counts["source"], counts["target"], specials, **selection
  )
  run = {
    "out_dir": out_dir,
    "selection": selection | {"num_special": int(specials.size)},
    "corpora": _corpora_report(src, counts, stats, keep),
    "counts_in": counts_in,
    "counts_out": counts_out,
  }
  return _write(out_dir, src, keep, run)
