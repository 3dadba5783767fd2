"""Token-classification inference: teacher, trimmed teacher, student.

Three models, random weights: the mBERT-base teacher with its full
vocabulary (--full-vocab rows), the same teacher with the vocabulary
trimmed to --vocab rows, and the 6-layer student over the trimmed
vocabulary. Each is a jitted deterministic forward pass returning the
logits (fused attention, no probabilities). Rounds alternate the models so
all see the same machine load; figures are medians (min/max spread).
Also: parameter counts (measure.count_parameters), on-disk size of the
fp32 params (written with numpy to a temporary dir), analytic MACs and the
student's speed-up over each teacher against their FLOP ratio.

  python benchmarks/inference.py --quick        # batch 1 and 32, 2 rounds
  python benchmarks/inference.py --rounds 5
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax.traverse_util import flatten_dict  # noqa: E402

from bistil_jax import measure  # noqa: E402
from bistil_jax.model import Model, init_params  # noqa: E402


def disk_bytes(params) -> int:
  flat = {"/".join(k): np.asarray(v) for k, v in flatten_dict(params).items()}
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "params.npz")
    np.savez(path, **flat)
    return os.path.getsize(path)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--vocab", type=int, default=30000)
  p.add_argument("--full-vocab", type=int, default=119547)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--quick", action="store_true", help="2 rounds")
  args = p.parse_args(argv)
  if args.quick:
    args.rounds = 2
  full_t, _ = common.configs(
    args.full_vocab, args.dtype, head="token_classification"
  )
  trim_t, student = common.configs(
    args.vocab, args.dtype, head="token_classification"
  )
  models = {"teacher": full_t, "teacher_trimmed": trim_t, "student": student}
  params, info = {}, {}
  for name, cfg in models.items():
    params[name] = jax.device_put(init_params(cfg, jax.random.PRNGKey(0)))
    counts = measure.count_parameters(params[name], cfg)
    info[name] = {
      "params": counts["total"],
      "params_embeddings": counts["embeddings"],
      "disk_mb": disk_bytes(params[name]) / 2**20,
    }
    common.emit({"what": "model_size", "model": name, **info[name]})
  rows = []
  for b in args.batches:
    ids = jax.device_put(
      common.synthetic_batch(b, args.seq, args.vocab)["input_ids"]
    )
    fwd = {}
    for name, cfg in models.items():
      model = Model(cfg)
      f = jax.jit(lambda p, x, m=model: m.apply({"params": p}, x).logits)
      common.sync(f(params[name], ids))
      fwd[name] = f
    times = {n: [] for n in fwd}
    for r in range(args.rounds):
      order = list(fwd) if r % 2 == 0 else list(reversed(list(fwd)))
      for n in order:
        t = time.perf_counter()
        common.sync(fwd[n](params[n], ids))
        times[n].append(time.perf_counter() - t)
    macs = {
      n: measure.analytic_macs(cfg, b, args.seq)["total"]
      for n, cfg in models.items()
    }
    for n, ts in times.items():
      s = common.spread(ts)
      row = {
        "what": "inference",
        "model": n,
        "batch": b,
        "seq": args.seq,
        "dtype": args.dtype,
        "latency_ms": 1e3 * s["median_s"],
        "latency_ms_min": 1e3 * s["min_s"],
        "latency_ms_max": 1e3 * s["max_s"],
        "sequences_per_s": b / s["median_s"],
        "tokens_per_s": b * args.seq / s["median_s"],
        "gmacs": macs[n] / 1e9,
        **info[n],
      }
      if n != "student":
        row["student_speedup"] = s["median_s"] / statistics_median(
          times["student"]
        )
        row["flop_ratio"] = macs[n] / macs["student"]
        row["speedup_over_flop_ratio"] = (
          row["student_speedup"] / row["flop_ratio"]
        )
      common.emit(row)
      rows.append(row)
  print()
  print(
    f"device {jax.devices()[0].device_kind}, {args.dtype}, seq "
    f"{args.seq}, rounds {args.rounds}"
  )
  print(
    common.table(
      [{"model": n, **i} for n, i in info.items()],
      ["model", "params", "params_embeddings", "disk_mb"],
    )
  )
  print()
  print(
    common.table(
      rows,
      [
        "model",
        "batch",
        "latency_ms",
        "latency_ms_min",
        "latency_ms_max",
        "sequences_per_s",
        "gmacs",
        "student_speedup",
        "flop_ratio",
        "speedup_over_flop_ratio",
      ],
    )
  )
  return rows


def statistics_median(ts):
  return float(np.median(ts))


if __name__ == "__main__":
  main()
