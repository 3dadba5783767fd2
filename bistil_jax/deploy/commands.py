"""`bistil export-onnx` and `bistil predict` (docs/deploy.md)."""

from __future__ import annotations

import argparse
import json
import sys

from bistil_jax import cli

# What a window is when neither a flag nor the task run says: BERT's usual
# inference length, and the benchmark's.
DEFAULT_MAX_SEQ_LEN = 128


def _settings(args, cfg, task) -> tuple[int, dict[str, int]]:
  """(max_seq_len, task options): a flag, else what the task run recorded
  (sft.json / bistil_run.json), else the defaults."""
  from bistil_jax.checkpoint import surgery

  keys = ("max_seq_len", *(task.options if task else ()))
  record, _ = surgery.recorded_run(args.model, args.sft, keys)
  max_len = args.max_seq_len or record.get("max_seq_len", DEFAULT_MAX_SEQ_LEN)
  options = {}
  if task is not None:
    options = {k: int(record.get(k, v)) for k, v in task.options.items()}
  return min(int(max_len), cfg.max_length), options


def _task(name):
  from bistil_jax import tasks

  return tasks.get(name) if name else None


def _load(args):
  """(model, params) of --model with every --sft merged."""
  from bistil_jax.checkpoint import hf, surgery

  if args.sft:
    return surgery.merged_model(args.model, args.sft)
  return hf.load_hf(args.model)


def _check_head(cfg, task) -> None:
  from bistil_jax.errors import BistilError

  if task is not None and cfg.head != task.head:
    raise BistilError(
      f"the model has a {cfg.head} head; {task.name} needs {task.head} (pass "
      "the task SFT with --sft, or a task-tuned model)"
    )


def _run_export(args: argparse.Namespace) -> int:
  from bistil_jax import paths
  from bistil_jax.checkpoint import hf
  from bistil_jax.deploy import onnx, predict
  from bistil_jax.errors import BistilError

  if args.eval and not args.task:
    raise BistilError("--eval needs --task")
  task = _task(args.task)
  model, params = _load(args)
  cfg = model.config
  onnx.check_head(cfg.head)
  _check_head(cfg, task)
  max_len, options = _settings(args, cfg, task)
  tok = args.tokenizer or args.model
  has_tok = any((paths.path(tok) / n).is_file() for n in hf.TOKENIZER_FILES)
  if args.tokenizer and not has_tok:
    raise BistilError(f"no tokenizer files in {args.tokenizer}")
  onnx.export(
    args.out,
    model,
    params,
    tokenizer_dir=tok if has_tok else None,
    max_seq_len=max_len,
    task=task.name if task else None,
    options=options,
    int8=args.int8,
    overwrite=args.overwrite,
  )
  sizes = onnx.model_bytes(args.out)
  print(
    f"wrote {cfg.head} ONNX model ("
    + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sizes.items())
    + f", max_seq_len {max_len}) to {args.out}"
  )
  if args.eval:
    backends = [
      predict.jax_backend(model, params, args.model, max_len, options)
    ]
    backends += [predict.onnx_backend(args.out, p) for p in sorted(sizes)]
    results = {
      b.name: predict.evaluate(task, b, args.eval, args.batch_size)
      for b in backends
    }
    head = task.headline
    base = results["jax"][head]
    for name, r in results.items():
      print(f"  {name:<10} {head} {r[head]:.4f} ({r[head] - base:+.4f} vs jax)")
    if args.eval_out:
      paths.write_text(args.eval_out, json.dumps(results, indent=2))
  return 0


def _run_predict(args: argparse.Namespace) -> int:
  from bistil_jax import paths
  from bistil_jax.deploy import onnx, predict
  from bistil_jax.errors import BistilError

  task = _task(args.task)
  task.check_predict()
  if onnx.is_onnx_dir(args.model):
    if args.sft:
      raise BistilError("--sft applies to HF model dirs; an ONNX dir is merged")
    meta = onnx.read_meta(args.model)
    if meta["head"] != task.head:
      raise BistilError(
        f"{args.model} has a {meta['head']} head; {task.name} needs {task.head}"
      )
    backend = predict.onnx_backend(
      args.model, "int8" if args.int8 else "fp32", args.max_seq_len
    )
  else:
    if args.int8:
      raise BistilError("--int8 needs an ONNX dir (bistil export-onnx --int8)")
    model, params = _load(args)
    _check_head(model.config, task)
    max_len, options = _settings(args, model.config, task)
    backend = predict.jax_backend(model, params, args.model, max_len, options)
  if args.input and args.input != "-":
    lines = paths.read_text(args.input).splitlines()
  else:
    lines = sys.stdin.read().splitlines()
  records = predict.predict_lines(task, backend, lines, args.batch_size)
  text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
  if args.out:
    paths.write_text(args.out, text)
  else:
    sys.stdout.write(text)
  return 0


def _teacher_rows(args, shapes) -> list[dict]:
  """fp32 latency of --teacher at each shape: ONNX Runtime for an ONNX
  dir, the jitted Flax forward (`measure.cpu_latency`) for an HF dir."""
  from bistil_jax import measure
  from bistil_jax.checkpoint import hf
  from bistil_jax.deploy import onnx

  kw = dict(warmup=args.warmup, repeats=args.repeats)
  if onnx.is_onnx_dir(args.teacher):
    sess, meta = onnx.dir_session(args.teacher, "fp32", args.threads)
    vocab = int(meta["vocab_size"])
    return [
      {"model": "teacher", "backend": "onnx fp32", **onnx.latency(
        sess, b, l, vocab, **kw
      )}
      for b, l in shapes
    ]  # fmt: skip
  model, params = hf.load_hf(args.teacher)
  return [
    {"model": "teacher", "backend": "jax fp32", **measure.cpu_latency(
      model, params, b, l, **kw
    )}
    for b, l in shapes
  ]  # fmt: skip


# The shapes `bistil measure` of an ONNX dir times by default: the paper's
# batch 1 and a serving batch.
MEASURE_SHAPES = "1x128,32x128"


def run_measure(args: argparse.Namespace) -> int:
  """`bistil measure` of an ONNX dir (model/commands.py dispatches here):
  ONNX Runtime latency of each precision, and with `--teacher` the paper's
  speed-up column."""
  from bistil_jax import measure
  from bistil_jax.deploy import onnx

  shapes = measure.parse_batch_shapes(args.batch_shapes)
  info = onnx.measure_dir(
    args.onnx_dir,
    shapes,
    warmup=args.warmup,
    repeats=args.repeats,
    threads=args.threads,
  )
  if args.teacher:
    # The paper's speed-up: the teacher's fp32 time over the row's, at the
    # same batch shape.
    teacher = _teacher_rows(args, shapes)
    base = {(r["batch_size"], r["seq_len"]): r["median_ms"] for r in teacher}
    for r in info["latency"]:
      r["model"], r["backend"] = "student", f"onnx {r['precision']}"
    info["latency"] = teacher + info["latency"]
    for r in info["latency"]:
      r["speedup"] = base[r["batch_size"], r["seq_len"]] / r["median_ms"]
    info["teacher"] = args.teacher
  if getattr(args, "out", None):  # `bistil measure --out`
    from bistil_jax import paths

    paths.write_text(args.out, json.dumps(info, indent=2) + "\n")
  print(json.dumps(info, indent=2) if args.json else onnx.format_measure(info))
  return 0


def register(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser(
    "export-onnx",
    help="write a task model (an SFT merged) as ONNX, optionally int8",
  )
  p.add_argument("--model", required=True, help="input HF model dir")
  cli.add_sft_argument(p)
  p.add_argument("--out", required=True, help="output ONNX dir")
  p.add_argument(
    "--int8",
    action="store_true",
    help="also write model.int8.onnx (dynamic quantisation)",
  )
  p.add_argument("--task", help="the task, recorded for bistil predict")
  p.add_argument(
    "--max-seq-len",
    type=int,
    help="window length recorded (default: the task run's, else "
    f"{DEFAULT_MAX_SEQ_LEN})",
  )
  p.add_argument("--tokenizer", help="tokenizer dir (default: --model)")
  p.add_argument("--overwrite", action="store_true")
  p.add_argument(
    "--eval",
    metavar="DATA",
    help="a labelled split: print the task metric of the Flax model and "
    "of each exported precision",
  )
  p.add_argument("--eval-out", help="write those metrics as JSON here")
  p.add_argument("--batch-size", type=int, default=32)
  p.set_defaults(func=_run_export)

  p = sub.add_parser(
    "predict",
    help="raw text in, labels out (JSONL), on a Flax or an ONNX model",
  )
  p.add_argument(
    "input",
    nargs="?",
    help="input text file, one example a line (default: stdin)",
  )
  p.add_argument(
    "--model", required=True, help="an HF model dir or an ONNX dir"
  )
  cli.add_sft_argument(p)
  p.add_argument("--task", required=True, help="the task name")
  p.add_argument(
    "--int8", action="store_true", help="the ONNX dir's int8 model"
  )
  p.add_argument("--max-seq-len", type=int)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--out", help="output JSONL file (default: stdout)")
  p.set_defaults(func=_run_predict)
