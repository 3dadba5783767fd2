"""A/B of phase-1 step variants in one process, alternating rounds.

Variants: "base" (threefry dropout key), "rbg" (the same step with an
`rbg` PRNG key for dropout), "nodrop" (dropout 0: the ceiling of what any
dropout RNG change can buy), "teacher_fwd" and "student_fwd_bwd" (parts).

  python benchmarks/ab_step.py --variants base rbg nodrop --rounds 4
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402


def build(name, b, l, vocab, kl):
  if name == "nodrop":
    s = common.jax_phase1(b, l, vocab, kl=kl, dropout=0.0)
  else:
    s = common.jax_phase1(b, l, vocab, kl=kl)
  key = jax.random.PRNGKey(0)
  if name == "rbg":
    key = jax.random.key(0, impl="rbg")
  holder = {"state": s["state"]}

  def run():
    holder["state"], m = s["step"](
      holder["state"], s["teacher"], s["batch"], key
    )
    return m["loss"]

  return run


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--variants", nargs="+", default=["base", "rbg", "nodrop"])
  p.add_argument("--rounds", type=int, default=4)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--vocab", type=int, default=30000)
  p.add_argument("--kl", action="store_true")
  args = p.parse_args()
  runs = {}
  for v in args.variants:
    runs[v] = build(v, args.batch, args.seq, args.vocab, args.kl)
    common.sync(runs[v]())
    common.sync(runs[v]())
  times = {v: [] for v in runs}
  for r in range(args.rounds):
    order = list(runs) if r % 2 == 0 else list(reversed(list(runs)))
    for v in order:
      t = time.perf_counter()
      common.sync(runs[v]())
      times[v].append(time.perf_counter() - t)
  rows = []
  for v, ts in times.items():
    row = {
      "what": "ab_step",
      "variant": v,
      "seq": args.seq,
      "kl": args.kl,
      **common.spread(ts),
    }
    common.emit(row)
    rows.append(row)
  print(common.table(rows, ["variant", "median_s", "min_s", "max_s"]))


if __name__ == "__main__":
  main()
