"""XLA CPU flag sweep: matmul shapes of the step and a teacher forward.

Each flag set runs in its own process (XLA_FLAGS is read at start-up) and
times: a 2048^2 fp32 matmul, the step's dot shapes (FFN forward
[b*l, 768] x [768, 3072], its weight gradient x^T dy, the attention
scores batch matmul) and a jitted mBERT-base teacher forward (8 x 128).

  python benchmarks/xla_flags.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

FLAG_SETS = {
  "default": "",
  "no_ynn": "--xla_cpu_experimental_ynn_fusion_type=",
  "xnnpack": "--xla_cpu_use_xnnpack=true",
  "onednn": "--xla_cpu_use_onednn=true",
  "onednn_cc": "--xla_cpu_experimental_onednn_custom_call=true",
  "concurrency_sched": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
  "vec512": "--xla_cpu_prefer_vector_width=512",
}

CHILD = r"""
import json, time, statistics, sys
sys.path.insert(0, "benchmarks")
import jax, jax.numpy as jnp, numpy as np
import common
def t(f, *a, n=5):
  jax.block_until_ready(f(*a))
  ts = []
  for _ in range(n):
    s = time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter() - s)
  return min(ts)
r = np.random.default_rng(0)
x = jnp.asarray(r.standard_normal((1024, 768)), jnp.float32)
w = jnp.asarray(r.standard_normal((768, 3072)), jnp.float32)
dy = jnp.asarray(r.standard_normal((1024, 3072)), jnp.float32)
q = jnp.asarray(r.standard_normal((8, 128, 12, 64)), jnp.float32)
out = {"peak": common.cpu_matmul_peak()}
f = 2 * 1024 * 768 * 3072
out["ffn_fwd"] = f / t(jax.jit(lambda x, w: x @ w), x, w) / 1e12
out["ffn_dw"] = f / t(jax.jit(lambda x, dy: x.T @ dy), x, dy) / 1e12
out["ffn_dx"] = f / t(jax.jit(lambda dy, w: dy @ w.T), dy, w) / 1e12
fa = 2 * 8 * 12 * 128 * 128 * 64
out["scores"] = fa / t(jax.jit(lambda q: jnp.einsum("bqhd,bkhd->bhqk", q, q)), q) / 1e12
s = common.jax_phase1(8, 128, 30000)
tm = s["teacher_model"]
fwd = jax.jit(lambda p, ids: tm.apply({"params": p}, ids, output_attentions=True).hidden_states[-1])
out["teacher_fwd_s"] = t(fwd, s["teacher"]["params"], s["batch"]["input_ids"], n=3)
print("RESULT " + json.dumps(out))
"""


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sets", nargs="+", default=list(FLAG_SETS))
  args = p.parse_args()
  rows = []
  for name in args.sets:
    env = dict(os.environ, XLA_FLAGS=FLAG_SETS[name])
    res = subprocess.run(
      [sys.executable, "-c", CHILD],
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
    )
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
      row = {"set": name, "error": res.stderr.strip().splitlines()[-1:]}
    else:
      row = {"set": name, "flags": FLAG_SETS[name], **json.loads(line[0][7:])}
    print(json.dumps(row), flush=True)
    rows.append(row)
  cols = [
    "set",
    "peak",
    "ffn_fwd",
    "ffn_dw",
    "ffn_dx",
    "scores",
    "teacher_fwd_s",
  ]
  print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
  for r in rows:
    print(
      "| "
      + " | ".join(
        f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, ""))
        for c in cols
      )
      + " |"
    )


if __name__ == "__main__":
  main()
