"""Deployed inference: the Flax model against its ONNX export, fp32 and int8.

Teacher: mBERT-base shapes (12 layers, width 768, 12 heads, FFN 3072) with
the vocabulary trimmed to --vocab rows and a token-classification head;
student: its 6-layer version (`student_init.student_config`, every other
layer). Random weights (speed does not depend on the values). Each model is
exported with `deploy.onnx.export` (HF dir -> torch.onnx -> ONNX Runtime,
int8 by dynamic quantisation) and timed, at each batch size and --seq
tokens, as: JAX fp32 (jitted forward, logits to the host), ONNX Runtime
fp32 and ONNX Runtime int8, all on the CPU with every core. Rounds
alternate the backends and models so all see the same machine load; after
--warmup untimed passes each figure is the median of --rounds passes (min
and max beside it). The speed-up column is the fp32 JAX teacher's median
over the row's median at the same batch size (the paper's "speed-up").

  PYTHONPATH=. python benchmarks/onnx_latency.py            # 5 rounds
  PYTHONPATH=. python benchmarks/onnx_latency.py --quick    # 2 rounds

Measured: see benchmarks/README.md, "Deployed inference (ONNX Runtime)".
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from bistil_jax.deploy import onnx, predict  # noqa: E402
from bistil_jax.model import Model, init_params  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--vocab", type=int, default=30000)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--quick", action="store_true", help="2 rounds")
  args = p.parse_args(argv)
  if args.quick:
    args.rounds = 2
  teacher, student = common.configs(
    args.vocab, head="token_classification", dropout=0.0
  )
  run = {}  # (model, backend) -> batch arrays -> logits
  sizes = {}
  with tempfile.TemporaryDirectory(prefix="onnx-bench-") as tmp:
    for name, cfg in (("teacher", teacher), ("student", student)):
      params = jax.device_get(init_params(cfg, jax.random.PRNGKey(0)))
      model = Model(cfg)
      run[name, "jax fp32"] = predict.jax_logits(model, params)
      out = os.path.join(tmp, name)
      start = time.perf_counter()
      onnx.export(
        out, model, params, tokenizer_dir=None, max_seq_len=args.seq, int8=True
      )
      secs = time.perf_counter() - start
      sizes[name] = onnx.model_bytes(out)
      common.emit(
        {"what": "export", "model": name, "seconds": secs, **sizes[name]}
      )
      for precision in ("fp32", "int8"):
        sess, _ = onnx.dir_session(out, precision)
        run[name, f"onnx {precision}"] = lambda a, s=sess: onnx.run(s, a)
    # Parity at these shapes: max |logits - Flax fp32 logits| on one batch.
    check = onnx.synthetic_inputs(2, args.seq, args.vocab, seed=1)
    for name in ("teacher", "student"):
      want = run[name, "jax fp32"](check)
      for precision in ("fp32", "int8"):
        diff = float(
          np.max(np.abs(run[name, f"onnx {precision}"](check) - want))
        )
        common.emit(
          {"what": "parity", "model": name, "precision": precision,
           "max_abs_diff": diff}
        )  # fmt: skip
    rows = []
    for b in args.batches:
      arrays = onnx.synthetic_inputs(b, args.seq, args.vocab)
      for f in run.values():
        for _ in range(args.warmup):
          f(arrays)
      times = {k: [] for k in run}
      for r in range(args.rounds):
        order = list(run) if r % 2 == 0 else list(reversed(list(run)))
        for k in order:
          start = time.perf_counter()
          run[k](arrays)
          times[k].append(1e3 * (time.perf_counter() - start))
      base = statistics.median(times["teacher", "jax fp32"])
      for (name, backend), ts in times.items():
        med = statistics.median(ts)
        row = {
          "what": "latency",
          "model": name,
          "backend": backend,
          "batch": b,
          "seq": args.seq,
          "median_ms": med,
          "min_ms": min(ts),
          "max_ms": max(ts),
          "sequences_per_s": b / (med / 1e3),
          "speedup": base / med,
        }
        common.emit(row)
        rows.append(row)
  print()
  print(
    f"{os.cpu_count()} CPUs, vocab {args.vocab}, seq {args.seq}, "
    f"rounds {args.rounds}, warm-up {args.warmup}, load average "
    f"{os.getloadavg()[0]:.1f}"
  )
  print(
    common.table(
      [
        {"model": n, **{k: v / 2**20 for k, v in s.items()}}
        for n, s in sizes.items()
      ],
      ["model", "fp32", "int8"],
    )
  )
  print()
  print(
    common.table(
      rows,
      [
        "model",
        "backend",
        "batch",
        "median_ms",
        "min_ms",
        "max_ms",
        "sequences_per_s",
        "speedup",
      ],
    )
  )


if __name__ == "__main__":
  main()
