"""`bistil distil`: phase-1 training from a config file."""

from __future__ import annotations

import argparse
import functools
import logging

from bistil_jax import cli, configlib

log = logging.getLogger(__name__)


def add_config_args(p: argparse.ArgumentParser, default: str) -> None:
  """--config/--workdir/--overwrite; `--config.a.b=v` overrides follow."""
  p.add_argument(
    "--config",
    default=default,
    help=(
      f"config file and variant, path.py[:arg] (default {default}; the "
      "shipped configs resolve from any directory)"
    ),
  )
  p.add_argument("--workdir", required=True, help="run directory")
  p.add_argument(
    "--overwrite",
    action="store_true",
    help="replace a different run in --workdir (its bistil outputs only)",
  )
  p.set_defaults(accepts_overrides=True)


def register(subparsers: argparse._SubParsersAction) -> None:
  p = subparsers.add_parser(
    "distil",
    help="phase 1: distil a bilingual student from a (trimmed) teacher",
    description=(
      "Phase 1: trains a student with fewer layers against the "
      "teacher on source and target corpora; resumes from --workdir; "
      "exports an HF model dir to WORKDIR/export. Override any config field "
      "with --config.a.b=VALUE (see docs/configs.md)."
    ),
  )
  add_config_args(p, "configs/distil.py:tiny")
  p.set_defaults(func=run_distil)
  p = subparsers.add_parser(
    "pretrain",
    help="MLM-train a model dir on two corpora (no teacher)",
    description=(
      "MLM training of --config.student.model itself (configs/pretrain.py): "
      "the demo's teacher and the scratch baseline."
    ),
  )
  add_config_args(p, "configs/pretrain.py:tiny")
  p.set_defaults(func=functools.partial(run_distil, phase="pretrain"))
  register_task(subparsers)
  register_lang_sft(subparsers)
  register_evaluate(subparsers)


def run_distil(args: argparse.Namespace, phase: str = "distil") -> int:
  from bistil_jax.train import distil

  config = configlib.build_config(args.config, args.overrides, phase)
  out = distil.run(config, args.workdir, overwrite=args.overwrite, phase=phase)
  if out:
    print(f"{'student' if phase == 'distil' else 'model'}: {out}")
  return 0


def register_task(subparsers: argparse._SubParsersAction) -> None:
  p = subparsers.add_parser(
    "finetune",
    help="task-tune a model (the teacher) on gold labels, dense or LT-SFT",
    description=(
      "Task-tunes --config.student.model on --config.data.train (gold "
      "labels); "
      "exports an HF dir (dense) or an SFT dir (sparse.enabled)."
    ),
  )
  add_config_args(p, "configs/finetune.py:pos")
  p.set_defaults(func=functools.partial(run_task, phase="finetune"))

  p = subparsers.add_parser(
    "sft",
    help="phase 2: LT-SFT of the student against a task teacher",
    description=(
      "Phase 2: LT-SFT of --config.student.model (the phase-1 student) "
      "against --config.teacher.model; exports a task SFT dir to "
      "WORKDIR/export."
    ),
  )
  add_config_args(p, "configs/sft.py:pos")
  p.set_defaults(func=functools.partial(run_task, phase="sft"))


def run_task(args: argparse.Namespace, phase: str) -> int:
  from bistil_jax.train import task

  config = configlib.build_config(args.config, args.overrides, phase)
  out = task.run(config, args.workdir, phase=phase, overwrite=args.overwrite)
  print(f"{phase}: {out}")
  return 0


def register_lang_sft(subparsers: argparse._SubParsersAction) -> None:
  p = subparsers.add_parser(
    "lang-sft",
    help="train a language SFT: LT-SFT of an MMT with MLM on one corpus",
    description=(
      "LT-SFT of --config.student.model (an MLM model dir) on "
      "--config.data.corpus with the MLM objective (configs/lang_sft.py); "
      "exports a language SFT dir to WORKDIR/export for "
      "--config.teacher.sfts of `bistil distil`."
    ),
  )
  add_config_args(p, "configs/lang_sft.py")
  p.set_defaults(func=run_lang_sft)


def run_lang_sft(args: argparse.Namespace) -> int:
  from bistil_jax.train import lang_sft

  config = configlib.build_config(args.config, args.overrides, "lang-sft")
  out = lang_sft.run(config, args.workdir, overwrite=args.overwrite)
  if out:
    print(f"language SFT: {out}")
  return 0


def register_evaluate(subparsers: argparse._SubParsersAction) -> None:
  p = subparsers.add_parser(
    "evaluate",
    help="zero-shot task metrics of a model (+ SFTs) on labelled data",
    description=(
      "Loads --model, applies each --sft in order (a task SFT brings its "
      "head), predicts on each --data split and prints a table; --out "
      "writes the metrics as JSON."
    ),
  )
  p.add_argument("--model", required=True, help="HF model dir")
  cli.add_sft_argument(p)
  p.add_argument(
    "--task",
    required=True,
    help="the task, as its run's config.task names it (pos, ner, nli, dp, qa, ...)",
  )
  p.add_argument(
    "--data",
    action="append",
    required=True,
    help=(
      "NAME=SPEC (or SPEC) of a labelled split; repeat the flag for more "
      "splits (each value is one path, commas included)"
    ),
  )
  p.add_argument("--out", help="write metrics JSON here")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument(
    "--max-seq-len",
    type=int,
    help=(
      "tokens per window (default: the data.max_seq_len of the run that "
      "made the last --sft, or --model, as recorded with its export, so "
      "that its results.json is reproduced; min(256, the model's max "
      "length) for a model dir with no record)"
    ),
  )
  qa = p.add_argument_group(
    "qa windows and decoding (default: what the run that made the last "
    "--sft, or --model, recorded; else the released values)"
  )
  qa.add_argument(
    "--doc-stride",
    type=int,
    help="overlap of the windows of a long context, in tokens (default: "
    "recorded, else 128)",
  )
  qa.add_argument(
    "--n-best-size",
    type=int,
    help="start/end candidates per window (default: recorded, else 20)",
  )
  qa.add_argument(
    "--max-answer-length",
    type=int,
    help="longest answer, in tokens (default: recorded, else 30)",
  )
  p.set_defaults(func=run_evaluate)


def format_results(task: str, results: dict[str, dict]) -> str:
  """`bistil evaluate`'s table: a row per split, every score of the task
  (the headline first), then its counts named by what they count."""
  from bistil_jax import tasks

  kind = tasks.get(task)
  scores = [kind.headline, *kind.scores]
  for m in results.values():
    for k, v in m.items():
      if isinstance(v, float) and k not in scores:
        scores.append(k)
  counts = list(kind.counts)
  width = max([len("split"), *(len(n) for n in results)])
  cols = [max(len(c), 9) for c in scores] + [max(len(n), 9) for _, n in counts]
  names = scores + [n for _, n in counts]
  lines = [
    " ".join(
      [f"{'split':<{width}}"]
      + [f"{n:>{w}}" for n, w in zip(names, cols, strict=True)]
    )
  ]
  for name, m in results.items():
    cells = [f"{m[k]:.4f}" if k in m else "-" for k in scores]
    cells += [str(m.get(k, "-")) for k, _ in counts]
    lines.append(
      " ".join(
        [f"{name:<{width}}"]
        + [f"{c:>{w}}" for c, w in zip(cells, cols, strict=True)]
      )
    )
  return "\n".join(lines)


# What evaluate uses when nothing recorded the run's (also capped at the
# model's max length); a task's own options fall back to its defaults.
FALLBACK_MAX_SEQ_LEN = 256


def run_evaluate(args: argparse.Namespace) -> int:
  import functools
  import json

  import jax

  from bistil_jax import configlib, paths, tasks
  from bistil_jax.checkpoint import surgery
  from bistil_jax.data import vocab
  from bistil_jax.errors import BistilError
  from bistil_jax.train import task as task_lib

  task = tasks.get(args.task)  # an unknown name: one line listing the known
  model, params = surgery.merged_model(args.model, args.sft)
  cfg = model.config
  if cfg.head != task.head:
    raise BistilError(
      f"the model has a {cfg.head} head; {args.task} needs {task.head} (pass "
      "the task SFT with --sft, or a task-tuned model)"
    )
  tokenizer, _ = vocab.load_tokenizer_dir(args.model)
  labels = tuple(cfg.label_names)
  keys = ("max_seq_len", *task.options)
  record, where = surgery.recorded_run(args.model, args.sft, keys)
  fallback = {"max_seq_len": FALLBACK_MAX_SEQ_LEN, **task.options}

  def setting(name: str) -> tuple[int, str]:
    """A flag given, else the run's record, else the fallback."""
    if getattr(args, name, None) is not None:
      return getattr(args, name), "--" + name.replace("_", "-")
    if name in record:
      return record[name], where
    return fallback[name], ""

  max_len, source = setting("max_seq_len")
  if not source:
    source = (
      f"no run recorded one: min({max_len}, the model's max length "
      f"{cfg.max_length})"
    )
  max_len = min(max_len, cfg.max_length)
  log.info("evaluating at max_seq_len %d (%s)", max_len, source)
  jpredict = jax.jit(
    functools.partial(task_lib.predict, model=model, task=task)
  )
  chosen = {k: setting(k) for k in task.options}
  options = {k: v for k, (v, _) in chosen.items()}
  if chosen:
    log.info(
      "%s options: %s",
      task.name,
      ", ".join(f"{k} {v} ({w or 'default'})" for k, (v, w) in chosen.items()),
    )
  results = {}
  for item in args.data:  # one split per flag: a path may hold commas
    name, spec = configlib.parse_named_item(item)
    name = spec if name is None else name
    if name in results:
      raise BistilError(f"--data names {name} more than once")
    data = task_lib.encode_split(
      task, spec, tokenizer, labels, max_len, **options
    )
    results[name] = task_lib.evaluate_data(
      jpredict, params, data, args.batch_size, task
    )
  print(format_results(args.task, results))
  if args.out:
    out = {"model": args.model, "sfts": args.sft, "task": args.task, **results}
    paths.write_text(args.out, json.dumps(out, indent=2))
  return 0
