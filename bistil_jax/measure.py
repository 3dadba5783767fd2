"""Model size, inference FLOPs and CPU latency (docs/method.md section 6).

  from bistil_jax import measure
  measure.count_parameters(params, model.config)   # total/embeddings/body/head
  measure.inference_flops(model, params, 32, 128)  # XLA flops, MACs, analytic
  measure.cpu_latency(model, params, 32, 128)      # median/p90 ms
  measure.measure_dir("model_dir")                 # all of it: bistil measure

Conventions. The original counts FLOPs with fvcore, which counts one per
multiply-accumulate (MAC) of every matmul/linear/einsum and ignores
element-wise ops. XLA's `cost_analysis()["flops"]` counts 2 per MAC plus the
element-wise work (softmax, GELU, LayerNorm, adds). `inference_flops`
reports the XLA count and `macs = flops / 2`, the XLA count on fvcore's
scale, next to an analytic matmul-only MAC count (`analytic_macs`). `macs`
exceeds the analytic count by the element-wise work only: measured +1.6%
for mBERT-sized layers (d=768, l=128), +4.5% at d=256, +28% per layer for
the d=32 test model. Compare models by `analytic_macs` (or by `macs` at
equal width); compare with the paper's numbers by `analytic_macs`.

Timing follows the original's protocol where JAX allows: a forward pass
without dropout on CPU, counted and timed in separate calls (tracing
inflates runtime). The original pinned PyTorch to one thread. XLA sizes
its CPU thread pool when JAX starts, and with jax 0.10 the old
XLA_FLAGS="--xla_cpu_multi_thread_eigen=false" no longer keeps it to one
core (measured: 1.6 CPU-seconds per second either way on 2 cores), so for
single-thread numbers pin the process: `taskset -c 0 python ...`.
Timings belong in benchmarks/, never in test assertions.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bistil_jax import paths
from bistil_jax.checkpoint import hf, surgery
from bistil_jax.data import vocab as vocab_lib
from bistil_jax.errors import BistilError
from bistil_jax.model import heads
from bistil_jax.model.config import ModelConfig
from bistil_jax.model.encoder import EXTRA_MACS, PARAM_GROUPS, Model

# Top-level parameter groups of our tree: the body's, then every head's.
_GROUPS = {
  **PARAM_GROUPS,
  **{h.key: "head" for h in heads.HEADS.values() if h.key is not None},
}


def _config(model: Model | ModelConfig) -> ModelConfig:
  return model.config if isinstance(model, Model) else model


def _model(model: Model | ModelConfig) -> Model:
  return model if isinstance(model, Model) else Model(model)


def _check_shape(config: ModelConfig, batch_size: int, seq_len: int) -> None:
  for name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise BistilError(f"{name} must be a positive integer, got {v!r}")
  if seq_len > config.max_length:
    raise BistilError(
      f"seq_len {seq_len} exceeds the model's max length {config.max_length}"
    )


# ------------------------------------------------------------------- size
def count_parameters(
  params: Mapping[str, Any], config: ModelConfig
) -> dict[str, int]:
  """Parameter counts as exported, by part of the model.

  Vocabulary-indexed leaves (word embeddings, MLM bias, untied decoder)
  count `config.vocab_size` rows, not the `padded_vocab_size` rows they
  hold (`vocab.count_params`). A tied MLM decoder is the word embedding
  matrix, counted once under "embeddings".

  Args:
    params: our nested params (numpy, jax or ShapeDtypeStruct leaves).
    config: their ModelConfig.

  Returns:
    {"total", "embeddings" (word, position, token-type embeddings and their
    LayerNorm), "body" (the layers and the pooler), "head" (MLM head or
    classifier)}; total = embeddings + body + head.

  Raises:
    BistilError: for a top-level group this model does not have.
  """
  unknown = sorted(set(params) - set(_GROUPS))
  if unknown:
    raise BistilError(f"unknown top-level parameter group(s) {unknown}")
  out = {"embeddings": 0, "body": 0, "head": 0}
  for key, tree in params.items():
    out[_GROUPS[key]] += vocab_lib.count_params({key: tree}, config)
  out["total"] = sum(out.values())
  return {k: out[k] for k in ("total", "embeddings", "body", "head")}


# ------------------------------------------------------------------ FLOPs
def analytic_macs(
  config: ModelConfig, batch_size: int, seq_len: int
) -> dict[str, int]:
  """Matmul multiply-accumulates of one forward pass (fvcore's convention).

  Per sequence of length l with width d and FFN width f, each layer does
  4·l·d² (Q, K, V, output projections) + 2·l²·d (scores and context)
  + 2·l·d·f (FFN) MACs. Heads: MLM l·d² + l·d·V over the padded vocabulary
  V that the program computes (fvcore on the exported PyTorch model would
  count `vocab_size` columns); token classification l·d·labels; sequence
  classification d² + d·labels (pooler or RoBERTa dense, on one token);
  the pooler of a model without a sequence head d². A body with more
  than BERT's matmuls adds its own term (`encoder.EXTRA_MACS`: DeBERTa's
  relative attention, per layer and term of `pos_att_type` 2s·d² for
  projecting the [2s, d] relative table, once per batch, and l·2s·d per
  sequence for scoring against it; deberta.relative_macs). Embedding
  lookups, gathers, LayerNorm and element-wise ops count nothing.

  Args:
    config: the model config.
    batch_size: sequences.
    seq_len: tokens per sequence (all attended).

  Returns:
    {"encoder", "head", "total"} MACs for the whole batch.
  """
  _check_shape(config, batch_size, seq_len)
  b, l = batch_size, seq_len
  d, f = config.hidden_size, config.intermediate_size
  layer = 4 * l * d * d + 2 * l * l * d + 2 * l * d * f
  encoder = b * config.num_hidden_layers * layer
  extra = EXTRA_MACS.get(config.family.body)
  if extra is not None:
    encoder += extra(config, b, l)
  spec = heads.HEADS[config.head]
  head = spec.macs(config, l)
  if config.add_pooler and not spec.macs_cover_pooler:
    head += d * d
  return {
    "encoder": encoder,
    "head": b * head,
    "total": encoder + b * head,
  }


def _forward(model: Model):
  """params, ids, mask -> logits (or last hidden state without a head)."""

  def fn(params, input_ids, attention_mask):
    out = model.apply(
      {"params": params},
      input_ids,
      attention_mask=attention_mask,
      deterministic=True,
    )
    return out.logits if out.logits is not None else out.last_hidden_state

  return fn


def _inputs(config: ModelConfig, batch_size: int, seq_len: int):
  ids = np.arange(batch_size * seq_len).reshape(batch_size, seq_len)
  ids = (ids % config.vocab_size).astype(np.int32)  # [b, l]
  return jnp.asarray(ids), jnp.ones_like(ids)


def _flops(stage) -> float | None:
  """cost_analysis()["flops"] of a Lowered or Compiled stage, if reported."""
  try:
    cost = stage.cost_analysis()
  except Exception:  # noqa: BLE001 - backends without cost analysis raise
    return None
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def inference_flops(
  model: Model | ModelConfig,
  params: Mapping[str, Any],
  batch_size: int,
  seq_len: int,
  *,
  with_compiled: bool = True,
) -> dict[str, Any]:
  """FLOPs of one jitted forward pass from XLA's cost analysis.

  The pass is deterministic (no dropout), returns the head's logits (or the
  last hidden state) and no attentions, over `batch_size` full sequences.

  `flops` is XLA's count on the program as lowered, before backend
  optimisation: it is the same on every backend and exactly linear in depth
  and batch. `compiled_flops` is the count after compilation
  (`.compile().cost_analysis()`); fusion can make it differ. On CPU it
  matches `flops` within 0.01% at d >= 256 but exceeds it at d=32, by an
  amount that grows with every layer (duplicated element-wise work in
  fusions, 22% at 4 layers).

  Args:
    model: the Model (or its ModelConfig).
    params: its params (only shapes and dtypes are used).
    batch_size: sequences.
    seq_len: tokens per sequence.
    with_compiled: also compile the program for `compiled_flops` (None
      otherwise; compiling a large model takes seconds).

  Returns:
    {"flops": XLA flops (2 per MAC + element-wise), "macs": flops / 2 (on
    fvcore's scale, see the module docstring), "analytic_macs":
    `analytic_macs(...)["total"]`, "compiled_flops", "backend",
    "batch_size", "seq_len"}.

  Raises:
    BistilError: for a bad shape, or a backend without cost analysis.
  """
  config = _config(model)
  _check_shape(config, batch_size, seq_len)
  ids, mask = _inputs(config, batch_size, seq_len)
  shapes = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params
  )
  lowered = jax.jit(_forward(_model(model))).lower(shapes, ids, mask)
  flops = _flops(lowered)
  compiled_flops = None
  if with_compiled or flops is None:
    compiled_flops = _flops(lowered.compile())
  if flops is None:
    flops = compiled_flops
  if flops is None:
    raise BistilError(
      f"XLA reports no cost analysis on backend {jax.default_backend()}"
    )
  return {
    "flops": flops,
    "macs": flops / 2,
    "analytic_macs": analytic_macs(config, batch_size, seq_len)["total"],
    "compiled_flops": compiled_flops,
    "backend": jax.default_backend(),
    "batch_size": batch_size,
    "seq_len": seq_len,
  }


# ---------------------------------------------------------------- latency
def latency(
  model: Model | ModelConfig,
  params: Mapping[str, Any],
  batch_size: int,
  seq_len: int,
  *,
  device: jax.Device | None = None,
  warmup: int = 2,
  repeats: int = 10,
) -> dict[str, Any]:
  """Wall-clock time of a jitted forward pass on one device.

  Params and inputs are placed on `device` (default: the first device of
  the default backend); the pass is compiled once (timed separately as
  `compile_ms`), run `warmup` times untimed, then `repeats` times, each
  waited for with `block_until_ready`.

  Args:
    model: the Model (or its ModelConfig).
    params: its params.
    batch_size: sequences per pass.
    seq_len: tokens per sequence.
    device: where to run (None: `jax.devices()[0]`).
    warmup: untimed passes first.
    repeats: timed passes.

  Returns:
    {"median_ms", "p90_ms", "mean_ms", "min_ms", "max_ms" (per pass),
    "sequences_per_s" (at the median), "compile_ms", "repeats", "warmup",
    "batch_size", "seq_len", "device"}.

  Raises:
    BistilError: for a bad shape or counts.
  """
  config = _config(model)
  _check_shape(config, batch_size, seq_len)
  if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
    raise BistilError(f"warmup must be an integer >= 0, got {warmup!r}")
  if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
    raise BistilError(f"repeats must be an integer >= 1, got {repeats!r}")
  device = device if device is not None else jax.devices()[0]
  params = jax.device_put(params, device)
  ids, mask = jax.device_put(_inputs(config, batch_size, seq_len), device)
  start = time.perf_counter()
  compiled = jax.jit(_forward(_model(model))).lower(params, ids, mask).compile()
  compile_ms = 1e3 * (time.perf_counter() - start)
  times = timed(
    lambda: jax.block_until_ready(compiled(params, ids, mask)), warmup, repeats
  )
  return {
    **latency_stats(times, batch_size, seq_len, warmup),
    "compile_ms": compile_ms,
    "device": str(device),
  }


def timed(fn, warmup: int, repeats: int) -> np.ndarray:
  """[repeats] milliseconds per call of `fn` (which must wait for its own
  result), after `warmup` untimed calls."""
  for _ in range(warmup):
    fn()
  times = np.empty(repeats)
  for i in range(repeats):
    start = time.perf_counter()
    fn()
    times[i] = 1e3 * (time.perf_counter() - start)
  return times


def latency_stats(
  times: np.ndarray, batch_size: int, seq_len: int, warmup: int
) -> dict[str, Any]:
  """The latency record of timed passes: median, p90, mean, min and max
  (ms per pass), sequences/s at the median, and the shape and counts."""
  median = float(np.median(times))
  return {
    "median_ms": median,
    "p90_ms": float(np.percentile(times, 90)),
    "mean_ms": float(times.mean()),
    "min_ms": float(times.min()),
    "max_ms": float(times.max()),
    "sequences_per_s": batch_size / (median / 1e3),
    "repeats": int(times.size),
    "warmup": warmup,
    "batch_size": batch_size,
    "seq_len": seq_len,
  }


def cpu_latency(
  model: Model | ModelConfig,
  params: Mapping[str, Any],
  batch_size: int,
  seq_len: int,
  *,
  warmup: int = 2,
  repeats: int = 10,
) -> dict[str, Any]:
  """`latency` on the first host CPU device (the paper's protocol)."""
  return latency(
    model,
    params,
    batch_size,
    seq_len,
    device=jax.devices("cpu")[0],
    warmup=warmup,
    repeats=repeats,
  )


# ------------------------------------------------------------- model dirs
def disk_size(path: str) -> dict[str, int]:
  """Bytes of the regular files directly in a model (or SFT) dir.

  Returns:
    {file name: bytes, ..., "total": their sum}.

  Raises:
    BistilError: the dir does not exist.
  """
  root = paths.path(path)
  if not root.is_dir():
    raise BistilError(f"model dir {path} does not exist")
  out = {p.name: p.stat().length for p in sorted(root.iterdir()) if p.is_file()}
  out["total"] = sum(out.values())
  return out


def parse_batch_shapes(spec: str) -> list[tuple[int, int]]:
  """Parses "8x64,1x128" into [(8, 64), (1, 128)] (batch x length).

  Raises:
    BistilError: a malformed shape.
  """
  shapes = []
  for part in spec.split(","):
    part = part.strip()
    if not part:
      continue
    b, sep, l = part.lower().partition("x")
    if not sep or not b.isdigit() or not l.isdigit():
      raise BistilError(
        f"batch shape {part!r} is not BATCHxLENGTH (e.g. 8x128)"
      )
    shapes.append((int(b), int(l)))
  if not shapes:
    raise BistilError(f"no batch shape in {spec!r}")
  return shapes


# `bistil measure`'s defaults, shortened to the model's max length (a tiny
# model has 64 positions).
DEFAULT_SEQ_LEN = 128
DEFAULT_BATCH = 8


def _load(model_dir: str, sft_dirs: Sequence[str]):
  """(model, params) of an HF model dir with the SFT dirs merged in."""
  if sft_dirs:
    return surgery.merged_model(model_dir, list(sft_dirs))
  return hf.load_hf(model_dir)


def _device(platform: str | None) -> jax.Device:
  """The first device of `platform` (None: of the default backend)."""
  try:
    return jax.devices(platform)[0] if platform else jax.devices()[0]
  except RuntimeError as e:
    raise BistilError(f"no {platform} device here: {e}") from None


def _size_and_macs(model: Model, params, seq_len: int) -> dict[str, Any]:
  """The "parameters" and "macs_per_sequence" entries of `measure_dir`."""
  counts = count_parameters(params, model.config)
  flops = inference_flops(model, params, 1, seq_len, with_compiled=False)
  return {
    "parameters": {
      "total": counts["total"],
      "embeddings": counts["embeddings"],
      "encoder": counts["body"],
      "head": counts["head"],
    },
    "macs_per_sequence": {
      "seq_len": seq_len,
      "analytic": flops["analytic_macs"],
      "xla": flops["macs"],
    },
  }


def _disk_bytes(model_dir: str, sft_dirs: Sequence[str]) -> dict[str, int]:
  disk_model = disk_size(model_dir)["total"]
  disk_sft = sum(disk_size(d)["total"] for d in sft_dirs)
  return {
    "model": disk_model,
    "sft": disk_sft,
    "total": disk_model + disk_sft,
  }


def measure_dir(
  model_dir: str,
  sft_dirs: Sequence[str] = (),
  *,
  seq_len: int | None = None,
  batch_shapes: Sequence[tuple[int, int]] | None = None,
  warmup: int = 2,
  repeats: int = 10,
  with_latency: bool = True,
  platform: str | None = None,
) -> dict[str, Any]:
  """Size, MACs and latency of an HF model dir (plus SFT dirs merged in).

  What `bistil measure` prints, and the size/latency columns of the demo.

  Args:
    model_dir: an HF model dir.
    sft_dirs: SFT dirs applied to it (a task SFT brings its head).
    seq_len: sequence length of the MAC count (per sequence); None:
      DEFAULT_SEQ_LEN, or the model's max length where that is shorter.
    batch_shapes: (batch, length) shapes to time; None: one batch of
      DEFAULT_BATCH sequences of `seq_len`.
    warmup: untimed passes before each timing.
    repeats: timed passes (the median is reported).
    with_latency: time the shapes (False: sizes and MACs only).
    platform: time on the first device of this platform ("cpu", "gpu",
      "tpu"; None: the default device).

  Returns:
    {"model_dir", "sft", "architecture", "parameters" {"total",
    "embeddings", "encoder" (layers + pooler), "head"}, "macs_per_sequence"
    {"seq_len", "analytic" (matmul MACs, fvcore's convention), "xla"
    (XLA flops / 2)}, "latency" [one `latency(...)` dict per shape] on
    "device", "disk_bytes" {"model", "sft", "total"}}.

  Raises:
    BistilError: unreadable dirs or bad shapes.
  """
  model, params = _load(model_dir, sft_dirs)
  config = model.config
  if seq_len is None:
    seq_len = min(DEFAULT_SEQ_LEN, config.max_length)
  if batch_shapes is None:
    batch_shapes = ((DEFAULT_BATCH, seq_len),)
  size = _size_and_macs(model, params, seq_len)
  device = _device(platform)
  lat = []
  if with_latency:
    lat = [
      latency(
        model, params, b, l, device=device, warmup=warmup, repeats=repeats
      )
      for b, l in batch_shapes
    ]
  return {
    "model_dir": str(model_dir),
    "sft": [str(d) for d in sft_dirs],
    "architecture": config.architecture,
    **size,
    "device": str(device),
    "latency": lat,
    "disk_bytes": _disk_bytes(model_dir, sft_dirs),
  }


def format_measure(info: Mapping[str, Any]) -> str:
  """The human-readable form of `measure_dir`'s result."""
  p = info["parameters"]
  m = info["macs_per_sequence"]
  d = info["disk_bytes"]
  name = info["model_dir"] + "".join(f" + {s}" for s in info["sft"])
  lines = [
    f"{name}: {info['architecture']}",
    f"  parameters {p['total']:,} (embeddings {p['embeddings']:,}, "
    f"encoder {p['encoder']:,}, head {p['head']:,})",
    f"  MACs per sequence of {m['seq_len']}: {m['analytic']:,} matmul "
    f"(XLA {m['xla']:,.0f})",
    f"  on disk {d['total'] / 1e6:,.2f} MB",
  ]
  for t in info["latency"]:
    lines.append(
      f"  latency {t['batch_size']}x{t['seq_len']} on {info['device']}: "
      f"median {t['median_ms']:.2f} ms of {t['repeats']} "
      f"(p90 {t['p90_ms']:.2f}, {t['sequences_per_s']:,.0f} seq/s; "
      f"compile {t['compile_ms']:.0f} ms)"
    )
  return "\n".join(lines)
