"""`bistil synth`: write a synthetic multilingual dataset."""

from __future__ import annotations

import argparse
import time

from bistil_jax.synthetic import languages as lang_lib
from bistil_jax.synthetic import tokenizer, writer


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
  """Adds the `synth` subcommand to an argparse subparsers object."""
  defaults = writer.Sizes()
  p = subparsers.add_parser(
    "synth",
    help="write synthetic related languages with corpora and tasks",
    description=(
      "Generate a family of artificial languages (related groups with "
      "shared word order and cognates, distant groups without) and write "
      "text corpora plus aligned POS, NER and NLI data for each."
    ),
  )
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
  p.add_argument(
    "--num-languages",
    type=int,
    default=8,
    help="languages in the family (default 8)",
  )
  p.add_argument(
    "--languages",
    nargs="+",
    default=None,
    metavar="CODE",
    help="codes to write, e.g. a1 a2 b1 or a1,a2,b1 (default: all)",
  )
  p.add_argument(
    "--corpus-sentences",
    type=int,
    default=defaults.corpus_train,
    help=f"training corpus lines per language (default "
    f"{defaults.corpus_train})",
  )
  p.add_argument(
    "--corpus-dev-sentences",
    type=int,
    default=defaults.corpus_dev,
    help=f"dev corpus lines per language (default {defaults.corpus_dev})",
  )
  p.add_argument(
    "--task-sentences",
    type=int,
    default=defaults.task_train,
    help=f"training sentences/pairs per task and language (default "
    f"{defaults.task_train})",
  )
  p.add_argument(
    "--task-eval-sentences",
    type=int,
    default=defaults.task_test,
    help=f"dev and test sentences/pairs each (default {defaults.task_test})",
  )
  p.add_argument(
    "--tokenizer-vocab",
    type=int,
    default=None,
    metavar="N",
    help="also train an N-token WordPiece tokenizer on all training corpora "
    "(balanced per language) into OUT/tokenizer (default: no tokenizer)",
  )
  p.add_argument(
    "--qa",
    action="store_true",
    help="also write an extractive QA task per language, SQuAD v1.1 JSON "
    "in OUT/qa/LANG/SPLIT.json (as many stories as tagging sentences)",
  )
  p.add_argument(
    "--overwrite",
    action="store_true",
    help="replace a dataset in a non-empty output directory",
  )
  p.set_defaults(func=run)
  return p


def run(args: argparse.Namespace) -> int:
  """Writes the dataset and prints a summary; returns the exit status."""
  start = time.perf_counter()
  family = lang_lib.make_family(
    seed=args.seed, num_languages=args.num_languages
  )
  languages = None
  if args.languages:
    languages = [c for arg in args.languages for c in arg.split(",") if c]
  if args.tokenizer_vocab is not None:  # checked before anything is written
    tokenizer.check_vocab_size(args.tokenizer_vocab)
  sizes = writer.Sizes.coerce(
    {
      "corpus_train": args.corpus_sentences,
      "corpus_dev": args.corpus_dev_sentences,
      "task_train": args.task_sentences,
      "task_dev": args.task_eval_sentences,
      "task_test": args.task_eval_sentences,
    }
  )
  paths = writer.write_dataset(
    args.out,
    family,
    languages,
    sizes,
    overwrite=args.overwrite,
    qa=args.qa,
    overwrite_flag="--overwrite",
  )
  codes = list(paths.corpora)
  tok = None
  if args.tokenizer_vocab is not None:
    tok = tokenizer.train_wordpiece(
      [paths.corpora[c]["train"] for c in codes],
      paths.root / "tokenizer",
      vocab_size=args.tokenizer_vocab,
      overwrite=args.overwrite,
    )
  elapsed = time.perf_counter() - start
  print(f"Wrote a synthetic dataset to {paths.root} in {elapsed:.1f} s")
  print(
    f"  family: seed {family.seed}, {len(family.codes)} languages in "
    f"{len(family.groups)} groups ({paths.family.name}, "
    f"{paths.description.name})"
  )
  for code in codes:
    lang = family.language(code)
    print(f"  {code}: group {lang.group}, {lang.order.summary()}")
  print(
    f"  sizes per language: corpus {sizes.corpus_train} train + "
    f"{sizes.corpus_dev} dev lines; POS/NER/NLI {sizes.task_train} train, "
    f"{sizes.task_dev} dev, {sizes.task_test} test"
  )
  if args.qa:
    print(
      f"  QA (SQuAD v1.1): {sizes.task_train} train, {sizes.task_dev} dev, "
      f"{sizes.task_test} test stories, one question each"
    )
  if tok is not None:
    print(
      f"  tokenizer: WordPiece, {tok.get_vocab_size()} tokens, "
      f"{paths.root / 'tokenizer'}"
    )
  chosen = set(codes)
  close = [f"{a}-{b}" for a, b in family.close_pairs() if {a, b} <= chosen]
  distant = [f"{a}-{b}" for a, b in family.distant_pairs() if {a, b} <= chosen]
  print(f"  close pairs (same group): {' '.join(close) or 'none'}")
  print(f"  distant pairs: {' '.join(distant) or 'none'}")
  source, close_target, distant_target = family.transfer_languages(codes)
  targets = [f"source {source}"]
  missing = []
  for kind, code in (("close", close_target), ("distant", distant_target)):
    if code is None:  # every other language is in (or out of) its group
      missing.append(kind)
    else:
      targets.append(f"{kind} target {code}")
  note = f" (no {' or '.join(missing)} target among {' '.join(codes)})"
  print(f"  suggested transfer: {', '.join(targets)}{note if missing else ''}")
  return 0
