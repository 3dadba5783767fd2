"""Where the phase-1 step's time goes: a jax.profiler trace, summarised.

Runs the jitted phase-1 train_step a few times under jax.profiler.trace with a
Perfetto trace, then sums event durations by XLA op name (fusions, dots,
custom calls) and prints the top ops as JSON lines and a table, with the
share of the step each one takes. Fused element-wise work shows as
`*fusion*`, matmuls as `dot*` / oneDNN / custom calls.

  python benchmarks/trace_step.py --seq 128 [--kl] [--top 30]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402


def summarise(trace_file, steps):
  with gzip.open(trace_file) as f:
    events = json.load(f)
  events = events.get("traceEvents", events)
  by = collections.Counter()
  count = collections.Counter()
  for e in events:
    if e.get("ph") != "X" or "dur" not in e:
      continue
    name = e.get("name", "")
    by[name] += e["dur"] / 1e6 / steps
    count[name] += 1
  return by, count


def kind(name):
  n = name.lower()
  if "dot" in n or "matmul" in n or "onednn" in n or "gemm" in n:
    return "matmul"
  if "fusion" in n:
    return "fusion"
  return re.sub(r"[.\d]+$", "", n)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--vocab", type=int, default=30000)
  p.add_argument("--kl", action="store_true")
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--dump-all", default="", help="write all op sums here")
  args = p.parse_args()
  setup = common.jax_phase1(args.batch, args.seq, args.vocab, kl=args.kl)
  run = common.jax_runner(setup)
  common.sync(run())
  common.sync(run())
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(args.steps):
        common.sync(run())
    files = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
    by, count = summarise(files[0], args.steps)
  # Top-level (the whole program) events contain the op events; drop the
  # longest event names that are program-level (the jit name).
  step_s = max(by.values())
  rows = []
  for name, s in by.most_common():
    rows.append(
      {
        "op": name[:60],
        "s_per_step": s,
        "calls": count[name],
        "share": s / step_s,
        "kind": kind(name),
      }
    )
  kinds = collections.Counter()
  for r in rows[1:]:
    kinds[r["kind"]] += r["s_per_step"]
  for r in rows[: args.top]:
    common.emit({"what": "trace_op", **r})
  if args.dump_all:
    with open(args.dump_all, "w") as f:
      json.dump(rows, f)
  print(common.table(rows[: args.top], ["op", "calls", "s_per_step", "share"]))
  print(
    common.table(
      [
        {"kind": k, "s_per_step": v, "share": v / step_s}
        for k, v in kinds.most_common(12)
      ],
      ["kind", "s_per_step", "share"],
    )
  )


if __name__ == "__main__":
  main()
