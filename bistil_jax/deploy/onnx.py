"""ONNX export of a task model, int8 quantisation and ONNX Runtime sessions.

Route: the model is written as an HF dir (`checkpoint.hf.write_hf`), loaded
into transformers' PyTorch class of its head and exported with
`torch.onnx.export` (TorchScript exporter, dynamic batch and sequence
axes). Exporting the Flax function directly with jax2onnx 0.17.1 was
measured and rejected (docs/deploy.md): it pins orbax-checkpoint<0.11.37
against our 0.12.8, so no exactly pinned extra can hold both; it needs the
position ids as an extra input (it cannot broadcast `arange` to a symbolic
shape); and it took 21.7 s against torch's 4.2 s for the same 2-layer
model (both within 2e-7 of Flax).

An ONNX dir holds `model.onnx` (fp32), optionally `model.int8.onnx`
(dynamic quantisation: int8 weights, activations quantised at run time),
the tokenizer files and `onnx.json` (head, labels, max length, task and its
options). It is built locally, then moved into place through the path
layer (`paths.atomic_dir`), so the output may be on any filesystem.

torch, transformers, onnx and onnxruntime are the `onnx` extra; they are
imported when first needed, so the package works without them.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bistil_jax import measure, paths
from bistil_jax.checkpoint import hf
from bistil_jax.errors import BistilError
from bistil_jax.model.encoder import Model
from bistil_jax.tasks import base

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
META_FILE = "onnx.json"
INPUTS = base.INPUT_KEYS  # the graph's inputs are a task batch's arrays
OUTPUT = "logits"
OPSET = 17
# transformers' PyTorch class of each exportable head. The biaffine parser
# has no HF class (its head is a separate file) and is not exported.
HEAD_CLASSES = {
  "token_classification": "AutoModelForTokenClassification",
  "sequence_classification": "AutoModelForSequenceClassification",
  "question_answering": "AutoModelForQuestionAnswering",
}
EXTRA_HINT = "pip install 'bistil_jax[onnx]'"


def require(module: str) -> Any:
  """Imports a module of the `onnx` extra, or fails in one line."""
  try:
    return importlib.import_module(module)
  except ImportError:
    raise BistilError(
      f"ONNX export and inference need {module.split('.')[0]}: {EXTRA_HINT}"
    ) from None


def check_head(head: str) -> None:
  if head not in HEAD_CLASSES:
    raise BistilError(
      f"cannot export a {head!r} head to ONNX; exportable heads: "
      f"{', '.join(HEAD_CLASSES)}"
    )


def torch_module(hf_dir: str, head: str) -> Any:
  """The HF PyTorch model of `hf_dir` behind one call
  (input_ids, attention_mask, token_type_ids) -> logits shaped as the Flax
  model's: QA's start and end logits are stacked to [b, l, 2]."""
  torch = require("torch")
  transformers = require("transformers")
  cls = getattr(transformers, HEAD_CLASSES[head])
  # Eager attention: a plain MatMul/Softmax graph that every ONNX Runtime
  # version runs and fuses, not the exporter's rendering of SDPA.
  inner = cls.from_pretrained(hf_dir, attn_implementation="eager").eval()
  # DistilBERT's classes take no token types: the exporter then leaves
  # the unused input out of the graph (and `run` feeds what it has).
  with_types = "token_type_ids" in inspect.signature(inner.forward).parameters

  class Logits(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.inner = inner

    def forward(self, input_ids, attention_mask, token_type_ids):
      types = {"token_type_ids": token_type_ids} if with_types else {}
      out = self.inner(
        input_ids=input_ids,
        attention_mask=attention_mask,
        return_dict=True,
        **types,
      )
      if head == "question_answering":
        return torch.stack([out.start_logits, out.end_logits], dim=-1)
      return out.logits

  return Logits().eval()


def export_torch(module: Any, out_file: str, opset: int = OPSET) -> None:
  """torch.onnx.export with dynamic batch and sequence axes."""
  torch = require("torch")
  ids = torch.ones((2, 8), dtype=torch.long)
  axes = {n: {0: "batch", 1: "sequence"} for n in (*INPUTS, OUTPUT)}
  with torch.no_grad(), warnings.catch_warnings():
    # The TorchScript exporter's deprecation notice and the tracer's
    # warnings about Python branches on shapes (transformers' mask code,
    # constant for a given padding layout) say nothing the user can act on.
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", torch.jit.TracerWarning)
    torch.onnx.export(
      module,
      (ids, torch.ones_like(ids), torch.zeros_like(ids)),
      out_file,
      input_names=list(INPUTS),
      output_names=[OUTPUT],
      dynamic_axes=axes,
      opset_version=opset,
      # The TorchScript exporter: the dynamo one needs onnxscript.
      dynamo=False,
    )


def quantize_int8(src: str, dst: str) -> None:
  """Dynamic quantisation: int8 weights, activations quantised per call."""
  quant = require("onnxruntime.quantization")
  # The quantiser logs a line per tensor on the root logger at INFO (and
  # a pre-processing hint at WARNING): keep them out of the command's log.
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.ERROR)
  try:
    quant.quantize_dynamic(src, dst, weight_type=quant.QuantType.QInt8)
  finally:
    root.setLevel(level)


def export(
  out: paths.PathLike,
  model: Model,
  params: Mapping[str, Any],
  *,
  tokenizer_dir: paths.PathLike | None,
  max_seq_len: int,
  task: str | None = None,
  options: Mapping[str, int] | None = None,
  int8: bool = False,
  overwrite: bool = False,
) -> dict[str, Any]:
  """Writes an ONNX dir of a task model (see the module docstring).

  Args:
    out: the output dir (local or a URL); written atomically.
    model: the Flax model (its config's head must be in HEAD_CLASSES).
    params: its parameters (an SFT already merged).
    tokenizer_dir: dir whose tokenizer files are copied in, or None.
    max_seq_len: the window length the task run used.
    task: the task name, recorded for `bistil predict`.
    options: the task's encoding and decoding options, recorded.
    int8: also write the dynamically quantised model.
    overwrite: replace an existing non-empty dir.

  Returns:
    The metadata written as META_FILE.
  """
  cfg = model.config
  check_head(cfg.head)
  hf.check_out_dir(out, overwrite)
  meta = {
    "head": cfg.head,
    "model_type": cfg.model_type,
    "vocab_size": cfg.vocab_size,
    "num_hidden_layers": cfg.num_hidden_layers,
    "labels": list(cfg.label_names),
    "max_seq_len": int(max_seq_len),
    "task": task,
    "options": dict(options or {}),
    "inputs": list(INPUTS),
    "output": OUTPUT,
    "opset": OPSET,
    "files": {"fp32": ONNX_FILE, **({"int8": INT8_FILE} if int8 else {})},
  }
  with tempfile.TemporaryDirectory(prefix="bistil-onnx-") as scratch:
    work = paths.path(scratch)  # local: torch and ONNX Runtime write here
    hf_dir = str(work / "hf")
    hf.write_hf(hf_dir, model, params, write_flax=False)
    fp32 = str(work / ONNX_FILE)
    export_torch(torch_module(hf_dir, cfg.head), fp32)
    if int8:
      quantize_int8(fp32, str(work / INT8_FILE))
    with paths.atomic_dir(out) as tmp:
      for name in meta["files"].values():
        paths.copy_file(work / name, tmp / name)
      if tokenizer_dir is not None:
        hf.copy_tokenizer(tokenizer_dir, tmp)
      paths.write_text(
        tmp / META_FILE, json.dumps(meta, indent=2, sort_keys=True)
      )
  return meta


def is_onnx_dir(path: paths.PathLike) -> bool:
  return (paths.path(path) / META_FILE).is_file()


def read_meta(path: paths.PathLike) -> dict[str, Any]:
  """The META_FILE of an ONNX dir."""
  p = paths.path(path) / META_FILE
  if not p.is_file():
    raise BistilError(f"{path} is no ONNX dir (no {META_FILE})")
  try:
    meta = json.loads(paths.read_text(p))
  except json.JSONDecodeError as e:
    raise BistilError(f"{p} is not valid JSON: {e}") from None
  if not isinstance(meta, dict) or "files" not in meta:
    raise BistilError(f"{p} is no ONNX dir description")
  return meta


def session(model_file: paths.PathLike, threads: int = 0) -> Any:
  """An ONNX Runtime CPU session of a model file on any filesystem.

  Args:
    model_file: the .onnx file.
    threads: intra-op threads (0: ONNX Runtime's default, every core).
  """
  ort = require("onnxruntime")
  opts = ort.SessionOptions()
  opts.intra_op_num_threads = threads
  opts.log_severity_level = 3  # keep its warnings off our stderr
  data = paths.path(model_file).read_bytes()
  return ort.InferenceSession(
    data, sess_options=opts, providers=["CPUExecutionProvider"]
  )


def dir_session(
  onnx_dir: paths.PathLike, precision: str = "fp32", threads: int = 0
) -> tuple[Any, dict[str, Any]]:
  """(session, metadata) of an ONNX dir at `precision` (fp32 | int8)."""
  meta = read_meta(onnx_dir)
  name = meta["files"].get(precision)
  if name is None:
    have = ", ".join(sorted(meta["files"]))
    raise BistilError(
      f"{onnx_dir} has no {precision} model (it has {have}; export with "
      "--int8 for one)"
    )
  return session(paths.path(onnx_dir) / name, threads), meta


def run(sess: Any, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
  """The logits of one batch (int inputs [b, l]; ONNX wants int64).

  Only the graph's inputs are fed: a model without token types
  (DistilBERT) has no token_type_ids input.
  """
  names = {i.name for i in sess.get_inputs()}
  feed = {k: np.asarray(arrays[k], np.int64) for k in INPUTS if k in names}
  return sess.run([OUTPUT], feed)[0]


def model_bytes(onnx_dir: paths.PathLike) -> dict[str, int]:
  """Bytes on disk of each precision's model file."""
  meta = read_meta(onnx_dir)
  return {
    k: paths.path(onnx_dir).joinpath(v).stat().length
    for k, v in meta["files"].items()
  }


def labels_of(meta: Mapping[str, Any]) -> Sequence[str]:
  return tuple(meta.get("labels") or ())


def synthetic_inputs(
  batch_size: int, seq_len: int, vocab_size: int, seed: int = 0
) -> dict[str, np.ndarray]:
  """Random full-length rows (ids past the usual special ids)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(min(5, vocab_size - 1), vocab_size, (batch_size, seq_len))
  ids = ids.astype(np.int32)
  return {
    "input_ids": ids,
    "attention_mask": np.ones_like(ids),
    "token_type_ids": np.zeros_like(ids),
  }


def latency(
  sess: Any,
  batch_size: int,
  seq_len: int,
  vocab_size: int,
  *,
  warmup: int = 2,
  repeats: int = 10,
) -> dict[str, Any]:
  """Wall-clock time of one ONNX Runtime forward pass, as
  `measure.latency` times the Flax one: `warmup` untimed passes, then the
  median (and spread) of `repeats` timed ones.

  Raises:
    BistilError: for a bad shape or counts.
  """
  if batch_size < 1 or seq_len < 1:
    raise BistilError(f"batch shape {batch_size}x{seq_len} must be positive")
  if warmup < 0 or repeats < 1:
    raise BistilError(f"warmup {warmup} must be >= 0, repeats {repeats} >= 1")
  arrays = synthetic_inputs(batch_size, seq_len, vocab_size)
  times = measure.timed(lambda: run(sess, arrays), warmup, repeats)
  return measure.latency_stats(times, batch_size, seq_len, warmup)


def measure_dir(
  onnx_dir: paths.PathLike,
  shapes: Sequence[tuple[int, int]],
  *,
  warmup: int = 2,
  repeats: int = 10,
  threads: int = 0,
) -> dict[str, Any]:
  """Latency of every precision of an ONNX dir at each batch shape, and
  the bytes of each model file (`bistil measure` of an ONNX dir)."""
  meta = read_meta(onnx_dir)
  sizes = model_bytes(onnx_dir)
  rows = []
  for precision in sorted(meta["files"]):
    sess, _ = dir_session(onnx_dir, precision, threads)
    for b, l in shapes:
      r = latency(
        sess, b, l, int(meta["vocab_size"]), warmup=warmup, repeats=repeats
      )
      rows.append({"precision": precision, **r})
  return {"path": str(onnx_dir), "bytes": sizes, "latency": rows}


def format_measure(info: Mapping[str, Any]) -> str:
  """`measure_dir`'s result (with a speed-up column where the rows have
  one) as text."""
  lines = [f"{info['path']}:"]
  for k, v in info["bytes"].items():
    lines.append(f"  {k}: {v / 2**20:.1f} MiB on disk")
  for r in info["latency"]:
    what = f"{r['model']} {r['backend']}" if "model" in r else r["precision"]
    line = (
      f"  {what} {r['batch_size']}x{r['seq_len']}: "
      f"{r['median_ms']:.2f} ms median ({r['min_ms']:.2f}-{r['max_ms']:.2f}), "
      f"{r['sequences_per_s']:.1f} seq/s"
    )
    if "speedup" in r:
      line += f", speed-up {r['speedup']:.2f}x"
    lines.append(line)
  return "\n".join(lines)
