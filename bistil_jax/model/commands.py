"""`bistil init` and `bistil measure`: make a random model dir, measure one.

  bistil init --preset tiny --tokenizer TOK_DIR --out init/ [--seed 0] \
      [--set num_hidden_layers=4 --set hidden_size=64]
  bistil init --config student/config.json --tokenizer student/ --out scratch/
  bistil measure MODEL_DIR [--sft SFT_DIR] [--seq-len 128] \
      [--batch-shapes 8x128,1x128] [--json | --out measure.json]

`init` writes an HF model dir (config.json, model.safetensors, flax msgpack,
tokenizer files) with an MLM head and random weights, sized to the
tokenizer: the scratch baseline and the demo's teacher start from one. The
dir also holds `bistil_init.json` (how it was made); `init` replaces a dir
that has one and refuses any other non-empty dir unless `--overwrite`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import logging
from typing import Any

from bistil_jax import cli, paths
from bistil_jax.errors import BistilError
from bistil_jax.model.config import ModelConfig, preset

log = logging.getLogger(__name__)


# -------------------------------------------------------------------- init
def parse_sets(items: list[str]) -> dict[str, Any]:
  """["hidden_size=64", "model_type=bert"] -> {"hidden_size": 64, ...}.

  Values are Python literals where they parse as one (numbers, True,
  None, quoted strings), bare strings otherwise.

  Raises:
    BistilError: an item without "=", or a field ModelConfig lacks.
  """
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  out: dict[str, Any] = {}
  for item in items:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
      raise BistilError(f"--set {item!r} is not FIELD=VALUE")
    if key not in fields:
      raise BistilError(
        f"--set {key}: not a model config field; have {sorted(fields)}"
      )
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def _config_from(config_path: str) -> ModelConfig:
  """A ModelConfig from a config.json, or a model dir holding one.

  For a dir with model.safetensors, a BERT pooler in the weights is kept
  (config.json does not say whether a model has one).
  """
  path = paths.path(config_path)
  weights = None
  if path.is_dir():
    weights = path / "model.safetensors"
    path = path / "config.json"
  if not path.is_file():
    raise BistilError(f"no config.json at {config_path}")
  try:
    d = json.loads(path.read_text())
  except ValueError as e:
    raise BistilError(f"cannot parse {path}: {e}") from None
  kw = {}
  if weights is not None and weights.is_file():
    from safetensors import safe_open  # noqa: PLC0415

    with (
      paths.local_copy(weights) as local,
      safe_open(local, framework="numpy") as f,
    ):
      kw["add_pooler"] = any(
        k.startswith("pooler.") or ".pooler." in k for k in f.keys()
      )
  return ModelConfig.from_hf_dict(d, **kw)


def check_fast_tokenizer(tokenizer: str) -> None:
  """Refuses a tokenizer dir without tokenizer.json, saying how to make it."""
  from bistil_jax.data import vocab

  d = paths.path(tokenizer)
  if not d.is_dir():
    raise BistilError(f"tokenizer dir {tokenizer} does not exist")
  if not (d / vocab.TOKENIZER_JSON).is_file():
    raise vocab.no_tokenizer_json(tokenizer)


def init_model(
  out: str,
  tokenizer: str,
  *,
  preset_name: str | None = None,
  config: str | None = None,
  overrides: dict[str, Any] | None = None,
  seed: int = 0,
  overwrite: bool = False,
) -> ModelConfig:
  """Writes a randomly initialised MLM model dir for a tokenizer.

  Args:
    out: the output model dir.
    tokenizer: a dir with the tokenizer files (tokenizer.json, ...).
    preset_name: a size preset ("tiny", "mbert", "xlmr-base", ...).
    config: or a config.json (or a model dir with one) to copy the
      architecture from.
    overrides: ModelConfig fields set on top (e.g. {"hidden_size": 64}).
    seed: the init seed.
    overwrite: also replace a non-empty dir `init` did not write.

  Returns:
    The saved config (head "mlm", vocab size and pad id from the tokenizer).

  Raises:
    BistilError: not exactly one of preset/config, a bad field, an
      unreadable tokenizer, or a non-empty `out` that is not init's.
  """
  from bistil_jax.synthetic import tokenizer as tok_lib  # noqa: PLC0415

  if (preset_name is None) == (config is None):
    raise BistilError("init needs exactly one of --preset or --config")
  overrides = dict(overrides or {})
  if preset_name is not None:
    cfg = preset(preset_name)
  else:
    cfg = _config_from(config)
  try:
    cfg = cfg.replace(**overrides)
  except (TypeError, ValueError) as e:
    raise BistilError(f"bad model config override: {e}") from None
  check_fast_tokenizer(tokenizer)
  out_path = paths.path(out)
  ours = (out_path / tok_lib.INIT_RECORD).is_file()
  record = {
    "preset": preset_name,
    "config": None if config is None else str(config),
    "overrides": overrides,
    "tokenizer": str(tokenizer),
    "seed": seed,
  }
  return tok_lib.init_model_dir(
    out,
    tokenizer,
    cfg,
    seed,
    overwrite=overwrite or ours,
    record=record,
  )


def _run_init(args: argparse.Namespace) -> int:
  cfg = init_model(
    args.out,
    args.tokenizer,
    preset_name=args.preset,
    config=args.config,
    overrides=parse_sets(args.set),
    seed=args.seed,
    overwrite=args.overwrite,
  )
  print(
    f"wrote a random {cfg.architecture} ({cfg.num_hidden_layers} layers, "
    f"width {cfg.hidden_size}, vocab {cfg.vocab_size}) to {args.out}"
  )
  return 0


# ----------------------------------------------------------------- measure
def _run_measure(args: argparse.Namespace) -> int:
  from bistil_jax import measure  # noqa: PLC0415
  from bistil_jax.deploy import commands as deploy  # noqa: PLC0415
  from bistil_jax.deploy import onnx  # noqa: PLC0415

  if onnx.is_onnx_dir(args.model_dir):  # an export-onnx dir: ONNX Runtime
    if args.sft:
      raise BistilError("--sft: an ONNX dir has its SFTs merged already")
    args.onnx_dir = args.model_dir
    args.batch_shapes = args.batch_shapes or deploy.MEASURE_SHAPES
    return deploy.run_measure(args)
  if args.teacher:
    raise BistilError("--teacher is for an ONNX dir (bistil export-onnx)")
  info = measure.measure_dir(
    args.model_dir,
    args.sft,
    seq_len=args.seq_len,
    batch_shapes=(
      measure.parse_batch_shapes(args.batch_shapes)
      if args.batch_shapes
      else None
    ),
    warmup=args.warmup,
    repeats=args.repeats,
    with_latency=not args.no_latency,
    platform=args.device,
  )
  text = json.dumps(info, indent=2)
  if args.out:
    paths.write_text(args.out, text + "\n")
  print(text if args.json else measure.format_measure(info))
  return 0


# --------------------------------------------------------------------- cli
def register(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser(
    "init",
    help="write a randomly initialised HF model dir for a tokenizer",
    description=(
      "Writes config.json, model.safetensors, flax_model.msgpack and the "
      "tokenizer files of a random MLM model, from a size preset or a "
      "config.json; vocab size and pad id come from the tokenizer."
    ),
  )
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument(
    "--preset",
    help="size preset: tiny, tiny-xlmr, tiny-deberta, mbert, distilmbert, xlmr-base",
  )
  src.add_argument(
    "--config",
    help="config.json (or a model dir with one) to copy the architecture of",
  )
  p.add_argument("--tokenizer", required=True, help="tokenizer dir")
  p.add_argument("--out", required=True, help="output model dir")
  p.add_argument("--seed", type=int, default=0, help="init seed")
  p.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="FIELD=VALUE",
    help="model config field to change, e.g. num_hidden_layers=4 (repeatable)",
  )
  p.add_argument(
    "--overwrite",
    action="store_true",
    help="replace a non-empty dir that bistil init did not write",
  )
  p.set_defaults(func=_run_init)
  _register_measure(sub)


def _register_measure(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser(
    "measure",
    help="parameters, MACs, latency and size on disk of a model dir",
    description=(
      "Parameters by group, matmul MACs per sequence, forward-pass latency "
      "(median of --repeats after --warmup untimed passes, compile time "
      "apart) at each batch shape on the current default device (or "
      "--device), and bytes on disk."
    ),
  )
  p.add_argument(
    "model_dir",
    help="HF model dir, or an ONNX dir of `bistil export-onnx` (timed with "
    "ONNX Runtime at fp32 and int8; see also --teacher)",
  )
  cli.add_sft_argument(p)
  p.add_argument(
    "--seq-len",
    type=int,
    help=(
      "length of the MAC count (default: 128, or the model's max length "
      "where that is shorter)"
    ),
  )
  p.add_argument(
    "--batch-shapes",
    help="comma-separated BATCHxLENGTH shapes to time (default: 8xSEQ_LEN)",
  )
  p.add_argument(
    "--warmup", type=int, default=2, help="untimed passes per shape"
  )
  p.add_argument(
    "--repeats", type=int, default=10, help="timed passes per shape"
  )
  p.add_argument(
    "--device",
    help="time on this platform (cpu, gpu, tpu) instead of the default device",
  )
  p.add_argument(
    "--no-latency", action="store_true", help="sizes and MACs only"
  )
  p.add_argument(
    "--threads", type=int, default=0, help="ONNX dir: intra-op threads (0: all)"
  )
  p.add_argument(
    "--teacher",
    help="ONNX dir only: an ONNX dir or HF model dir timed at fp32 at the "
    "same shapes; each row gets its speed-up over it (the paper's column)",
  )
  p.add_argument("--json", action="store_true", help="print JSON")
  p.add_argument("--out", help="also write the JSON to this file")
  p.set_defaults(func=_run_measure)
