"""`bistil inspect` and `bistil export-hf`."""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from typing import Any

import jax
import numpy as np

from bistil_jax import cli, paths
from bistil_jax.checkpoint import hf, parser_head
from bistil_jax.errors import BistilError
from bistil_jax.model.config import FAMILIES

# The body prefixes of head classes' names ("bert.", "deberta.", ...).
BODY_PREFIXES = frozenset(f.hf_names for f in FAMILIES.values())


def parameter_groups(state: dict[str, np.ndarray]) -> dict[str, int]:
  """Parameter counts by group from HF (PyTorch-named) tensors.

  Groups: word/position/type embeddings, embedding LayerNorm, one entry per
  encoder layer, other encoder tensors (DeBERTa's relative table), pooler,
  head. The word embeddings count real rows only.
  """
  groups: dict[str, int] = defaultdict(int)
  for key, x in state.items():
    parts = key.split(".")
    if parts[0] in BODY_PREFIXES:
      parts = parts[1:]
    if parts[0] == "embeddings":
      name = f"embeddings.{parts[1]}"
    elif parts[0] == "encoder" and parts[1] == "layer":
      name = f"encoder.layer.{int(parts[2]):02d}"
    elif parts[0] == "encoder":  # DeBERTa's relative table and its norm
      name = f"encoder.{parts[1]}"
    elif parts[0] == "pooler":
      name = "pooler"
    else:
      name = f"head.{parts[0]}"
    groups[name] += int(np.prod(x.shape))
  return dict(sorted(groups.items()))


def inspect_dir(path: str) -> dict[str, Any]:
  """Architecture, parameter counts by group, vocab size and stored dtype."""
  model, params = hf.load_hf(path)
  cfg = model.config
  raw, _ = hf.read_weights(path)
  dtypes = sorted({str(np.asarray(v).dtype) for v in raw.values()})
  if cfg.head == parser_head.HEAD:  # encoder tensors + the parser head file's
    body_cfg, body, _ = parser_head.split_for_export(cfg, params)
    state = hf.params_to_hf(body, body_cfg, "torch")
    head = parser_head.head_to_torch(params)
    state.update({f"parser_head.{k}": v for k, v in head.items()})
  else:
    state = hf.params_to_hf(params, cfg, "torch")
  groups = parameter_groups(state)
  layers = sum(v for k, v in groups.items() if k.startswith("encoder.layer."))
  total = sum(groups.values())
  return {
    "path": path,
    "architecture": cfg.architecture,
    "model_type": cfg.model_type,
    "weights_format": hf.weights_format(path),
    "stored_dtypes": dtypes,
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.hidden_size,
    "num_hidden_layers": cfg.num_hidden_layers,
    "num_attention_heads": cfg.num_attention_heads,
    "intermediate_size": cfg.intermediate_size,
    "max_position_embeddings": cfg.max_position_embeddings,
    "pooler": cfg.add_pooler,
    "labels": list(cfg.label_names) if cfg.head not in ("none", "mlm") else [],
    "parameters": {
      "total": total,
      "embeddings": sum(
        v for k, v in groups.items() if k.startswith("embeddings.")
      ),
      "encoder_layers": layers,
      "per_layer": layers // max(cfg.num_hidden_layers, 1),
      "groups": groups,
    },
    "tokenizer_files": [
      n for n in hf.TOKENIZER_FILES if (paths.path(path) / n).is_file()
    ],
  }


def format_inspect(info: dict[str, Any]) -> str:
  p = info["parameters"]
  lines = [
    f"{info['path']}: {info['architecture']} ({info['weights_format']} "
    f"weights, {', '.join(info['stored_dtypes'])})",
    f"  layers {info['num_hidden_layers']}, hidden {info['hidden_size']}, "
    f"heads {info['num_attention_heads']}, ffn {info['intermediate_size']}, "
    f"positions {info['max_position_embeddings']}",
    f"  vocab {info['vocab_size']:,}, pooler {info['pooler']}, "
    f"tokenizer {', '.join(info['tokenizer_files']) or 'none'}",
    f"  parameters {p['total']:,} (embeddings {p['embeddings']:,}, "
    f"encoder {p['encoder_layers']:,} = {p['per_layer']:,} per layer)",
  ]
  for name, n in p["groups"].items():
    if not name.startswith("encoder.layer."):
      lines.append(f"    {name:<36} {n:>14,}")
  if info["labels"]:
    lines.append(f"  labels {info['labels']}")
  return "\n".join(lines)


def _run_inspect(args: argparse.Namespace) -> int:
  info = inspect_dir(args.model_dir)
  print(json.dumps(info, indent=2) if args.json else format_inspect(info))
  return 0


def _model_from_workdir(workdir: str, step: int | None):
  """(model, params, tokenizer dir) of a training workdir's checkpoint."""
  from bistil_jax.checkpoint import manager

  run = manager.read_run(workdir)
  phase = run.get("phase")
  if phase in ("distil", "pretrain"):
    from bistil_jax.train import distil

    return distil.model_from_workdir(workdir, run, step)
  raise BistilError(f"cannot export a {phase!r} workdir")


# Trained BERT/XLM-R weights stay within a few units (LayerNorm scales near
# 1, embeddings near 0.1); weights beyond this bound come from a run that
# diverged (lr=1e6 with warm-up: 1.5e5 by step 3, loss 2.8e9).
SANE_WEIGHT = 1e4


def largest_weight(params: Any) -> tuple[float, str]:
  """(max |w| over the floating leaves, the key of the leaf holding it)."""
  best, where = 0.0, ""
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    a = np.asarray(x)
    if np.issubdtype(a.dtype, np.floating) and a.size:
      m = float(np.max(np.abs(a)))
      if m > best:
        best, where = m, jax.tree_util.keystr(path)
  return best, where


def checkpoint_steps(workdir: str) -> list[int]:
  """The finished checkpoint steps of a workdir, oldest first."""
  from bistil_jax.checkpoint import manager

  d = paths.path(workdir) / manager.CHECKPOINTS
  if not d.is_dir():
    return []
  return sorted(int(c.name) for c in d.iterdir() if c.name.isdigit())


def earlier_good_step(workdir: str, before: int) -> int | None:
  """The newest step before `before` that reads and holds sane weights."""
  for step in reversed([s for s in checkpoint_steps(workdir) if s < before]):
    try:
      _, params, _ = _model_from_workdir(workdir, step)
    except BistilError:
      continue
    if largest_weight(params)[0] <= SANE_WEIGHT:
      return step
  return None


def _earlier(workdir: str, step: int) -> str:
  good = earlier_good_step(workdir, step)
  if good is None:
    return "no earlier step of it reads with sane weights"
  return f"step {good} is intact: export it with --step {good}"


def _run_export(args: argparse.Namespace) -> int:
  if (args.model is None) == (args.workdir is None):
    raise BistilError("export-hf needs exactly one of --model or --workdir")
  record: dict = {}
  if args.workdir:
    from bistil_jax.checkpoint import manager

    steps = checkpoint_steps(args.workdir)
    step = args.step if args.step is not None else (steps or [None])[-1]
    try:
      model, params, tok_dir = _model_from_workdir(args.workdir, args.step)
    except BistilError as e:
      if args.step is not None or step is None:
        raise
      # The latest step is damaged: name the one that can be exported.
      raise BistilError(f"{e}; {_earlier(args.workdir, step)}") from None
    manager.check_finite_tree(params, f"the checkpoint of {args.workdir}")
    what = f"step {step} of {args.workdir}"
  elif args.sft:
    from bistil_jax import tasks
    from bistil_jax.checkpoint import surgery

    model, params = surgery.merged_model(args.model, args.sft)
    tok_dir = args.model
    what = f"{args.model} with {', '.join(args.sft)}"
    # What the task run used (max_seq_len, ...) goes with the merged model,
    # so `bistil evaluate` of it encodes as the run did.
    record = surgery.recorded_run(args.model, args.sft, tasks.RECORDED)[0]
  else:
    model, params = hf.load_hf(args.model)
    tok_dir = args.model
    what = args.model
    record = hf.read_run_record(args.model)
  big, where = largest_weight(params)
  if big > SANE_WEIGHT:
    # Refused, not only warned about: a diverged model exports and loads
    # fine and fails only downstream, after a fine-tuning run or an
    # evaluation was spent on it; a warning in a pipeline's log is missed.
    line = (
      f"{what} holds weights up to {big:.3g} (at {where}; trained weights "
      f"stay far below {SANE_WEIGHT:g}): the run diverged"
    )
    if not args.force:
      hint = _earlier(args.workdir, step) if args.workdir else "retrain it"
      raise BistilError(f"{line}; {hint}, or pass --force to export it")
    print(f"warning: {line}; exporting it anyway (--force)", file=sys.stderr)
  tok = args.tokenizer or tok_dir
  has_tok = any((paths.path(tok) / n).is_file() for n in hf.TOKENIZER_FILES)
  if args.tokenizer and not has_tok:
    raise BistilError(f"no tokenizer files in {args.tokenizer}")
  hf.save_hf(
    args.out,
    model,
    params,
    tokenizer_dir=tok if has_tok else None,
    overwrite=args.overwrite,
    write_flax=not args.no_flax,
    record=record,
  )
  print(f"wrote {model.config.architecture} to {args.out}")
  return 0


def register(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser(
    "inspect",
    help="architecture, parameter counts and vocab of an HF model dir",
  )
  p.add_argument("model_dir")
  p.add_argument("--json", action="store_true", help="print JSON")
  p.set_defaults(func=_run_inspect)

  p = sub.add_parser(
    "export-hf",
    help="write a plain HF model dir (safetensors + flax msgpack + "
    "tokenizer) from a model dir",
  )
  p.add_argument("--model", help="input HF model dir (any supported weights)")
  p.add_argument(
    "--workdir",
    help="a training workdir: export its latest (or --step) checkpoint",
  )
  p.add_argument("--step", type=int, help="checkpoint step for --workdir")
  cli.add_sft_argument(p)
  p.add_argument("--tokenizer", help="tokenizer dir (default: --model)")
  p.add_argument("--out", required=True, help="output dir")
  p.add_argument("--overwrite", action="store_true")
  p.add_argument(
    "--force",
    action="store_true",
    help=(
      f"export weights beyond |w| > {SANE_WEIGHT:g} (a diverged run), which "
      "are refused otherwise"
    ),
  )
  p.add_argument(
    "--no-flax", action="store_true", help="skip flax_model.msgpack"
  )
  p.set_defaults(func=_run_export)
