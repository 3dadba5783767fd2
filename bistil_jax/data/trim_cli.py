"""`bistil trim-vocab`: trim an HF model dir to a source/target vocabulary.

Example:

  bistil trim-vocab --model mbert/ --source en.txt.gz \\
      --target hf:wikimedia/wikipedia:20231101.mt:train --out mbert-en-mt/

CORPUS specs are described in `bistil_jax.data.corpus`. `BistilError`s
propagate to the main CLI, which prints `error: ...` and exits 2.
"""

from __future__ import annotations

import argparse

from bistil_jax.checkpoint import trim
from bistil_jax.errors import BistilError

DEFAULT_THRESHOLD = 1e-6


def _threshold(s: str) -> float | None:
  if s.lower() in ("none", "off"):
    return None
  try:
    return float(s)
  except ValueError:
    raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
  """Adds the `trim-vocab` subcommand.

  Args:
    subparsers: from `parser.add_subparsers()`.

  Returns:
    The subcommand's parser (its `func` default is `run`).
  """
  p = subparsers.add_parser(
    "trim-vocab",
    help="trim a model's vocabulary to a source and a target corpus",
    description=(
      "Counts the tokens of two corpora with the model's tokenizer, keeps "
      "ids with max(p_src, p_tgt) >= threshold (plus special tokens) and "
      "writes a trimmed HF model dir with vocab_map.json and "
      "trim_report.json."
    ),
  )
  p.add_argument("--model", required=True, metavar="DIR", help="HF model dir")
  p.add_argument(
    "--source",
    metavar="CORPUS",
    help="source corpus: FILE[.gz] | text:PATH | json:PATH[:COL] | "
    "hf:NAME[:CONFIG]:SPLIT[:COL]",
  )
  p.add_argument("--target", metavar="CORPUS", help="target corpus")
  p.add_argument("--out", required=True, metavar="DIR", help="output dir")
  p.add_argument(
    "--threshold",
    type=_threshold,
    default=None,
    help="keep ids whose unigram probability in either corpus is >= this "
    f"(default {DEFAULT_THRESHOLD:g}; none when --coverage is given; "
    "'none' disables)",
  )
  p.add_argument(
    "--min-count",
    type=int,
    default=None,
    metavar="N",
    help="also require a count >= N in at least one corpus",
  )
  p.add_argument(
    "--coverage",
    type=float,
    default=None,
    metavar="F",
    help="keep the most frequent ids covering share F of each corpus' "
    "tokens (union with --threshold)",
  )
  p.add_argument("--counts-in", metavar="F", help="reuse saved counts (.npz)")
  p.add_argument("--counts-out", metavar="F", help="save the counts (.npz)")
  p.add_argument(
    "--max-lines",
    type=int,
    default=None,
    metavar="N",
    help="read at most N lines of each corpus",
  )
  p.add_argument(
    "--threads",
    type=int,
    default=None,
    metavar="N",
    help="encoding threads (default: all cores)",
  )
  p.add_argument(
    "--overwrite", action="store_true", help="replace a non-empty --out"
  )
  p.add_argument(
    "--quiet", action="store_true", help="no progress lines on stderr"
  )
  p.set_defaults(func=run)
  return p


def run(args: argparse.Namespace) -> int:
  """Runs `trim-vocab` and prints the summary.

  Args:
    args: parsed arguments of the subcommand.

  Returns:
    0 on success.

  Raises:
    BistilError: for any bad input.
  """
  if args.counts_in is None and not (args.source and args.target):
    raise BistilError(
      "trim-vocab needs both corpora (--source and --target), or --counts-in "
      "F with the counts an earlier --counts-out saved"
    )
  threshold = args.threshold
  if threshold is None and args.coverage is None:
    threshold = DEFAULT_THRESHOLD
  report = trim.trim_model_dir(
    args.model,
    args.source,
    args.target,
    args.out,
    threshold=threshold,
    min_count=args.min_count,
    coverage=args.coverage,
    counts_in=args.counts_in,
    counts_out=args.counts_out,
    max_lines=args.max_lines,
    overwrite=args.overwrite,
    num_threads=args.threads,
    progress=not args.quiet,
  )
  print(report["summary"])
  return 0
