"""DeBERTa-v3 body forward: Flax (bistil_jax) against transformers PyTorch.

One mDeBERTa-v3-shaped body (default the base body: 12 layers, width
768, 12 heads, FFN 3072; position buckets 256, max_relative_positions -1,
shared position keys, p2c + c2p, LayerNormed relative table, no absolute
positions; common.deberta_config), vocabulary --vocab rows (the forward's
cost does not depend on it: the embedding is a lookup), random weights
written once by bistil_jax and loaded by both (so the outputs are compared
too), batch 8 x 128 real tokens, fp32, no dropout, no head. JAX: a jitted
forward returning the last hidden state (the disentangled scores are
always materialised, no fused attention). PyTorch: `DebertaV2Model`
(eager attention) in eval mode under `torch.no_grad`, with
`torch.set_num_threads` = the cores JAX's CPU thread pool uses (this
process's CPU affinity; --threads to override). Both warmed up (3 calls);
rounds alternate the two, the order swapping every round, so they see the
same machine load; figures are medians of the rounds (min/max spread),
each round the mean of --iters calls. The load average is emitted at the
start and the end.

  PYTHONPATH=. python benchmarks/deberta_forward.py --quick
  PYTHONPATH=. python benchmarks/deberta_forward.py --rounds 7
  PYTHONPATH=. python benchmarks/deberta_forward.py --layers 6 --hidden 384 \
    --heads 6                                    # the small body
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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bistil_jax import measure  # noqa: E402
from bistil_jax.checkpoint import hf  # noqa: E402
from bistil_jax.model import Model, init_params  # noqa: E402


def config(args):
  return common.deberta_config(
    args.vocab, args.layers, args.hidden, args.heads, head="none"
  )


def timed_mean(fn, iters: int) -> float:
  t0 = time.perf_counter()
  for _ in range(iters):
    fn()
  return (time.perf_counter() - t0) / iters


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--hidden", type=int, default=768)
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--vocab", type=int, default=30000)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument(
    "--threads",
    type=int,
    default=0,
    help="PyTorch threads; default: JAX's (this process's cores)",
  )
  p.add_argument("--quick", action="store_true", help="3 rounds of 3")
  args = p.parse_args(argv)
  if args.quick:
    args.rounds, args.iters = 3, 3

  import torch
  import transformers as T

  threads = args.threads or common.cpu_threads()
  torch.set_num_threads(threads)
  common.emit_load("start")
  cfg = config(args)
  params = init_params(cfg, jax.random.PRNGKey(0))
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "m")
    hf.save_hf(path, cfg, params)
    ref = T.DebertaV2Model.from_pretrained(path).eval()
  ids = common.synthetic_batch(args.batch, args.seq, args.vocab)["input_ids"]
  ids = np.asarray(ids, np.int32)
  mask = np.ones_like(ids)

  model = Model(cfg)
  jparams = jax.device_put(params)
  fwd = jax.jit(
    lambda p, i, m: model.apply(
      {"params": p}, i, attention_mask=m
    ).hidden_states[-1]
  )
  ji, jm = jnp.asarray(ids), jnp.asarray(mask)
  ti, tm = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)

  def run_jax():
    return common.sync(fwd(jparams, ji, jm))

  def run_torch():
    with torch.no_grad():
      return ref(ti, attention_mask=tm).last_hidden_state

  ours, theirs = np.asarray(run_jax()), run_torch().numpy()  # warm-up
  diff = float(np.max(np.abs(ours - theirs)))
  for _ in range(2):
    run_jax(), run_torch()
  times = {"jax": [], "torch": []}
  runs = {"jax": run_jax, "torch": run_torch}
  for r in range(args.rounds):
    for name in ("jax", "torch") if r % 2 == 0 else ("torch", "jax"):
      times[name].append(timed_mean(runs[name], args.iters))
  load = common.emit_load("end")
  macs = measure.analytic_macs(cfg, args.batch, args.seq)["total"]
  rows = []
  for name, ts in times.items():
    s = common.spread(ts)
    row = {
      "what": "deberta_forward",
      "impl": name,
      "batch": args.batch,
      "seq": args.seq,
      "layers": args.layers,
      "hidden": args.hidden,
      "heads": args.heads,
      "threads": threads if name == "torch" else common.cpu_threads(),
      "ms_median": 1e3 * s["median_s"],
      "ms_min": 1e3 * s["min_s"],
      "ms_max": 1e3 * s["max_s"],
      "gmacs_per_s": macs / s["median_s"] / 1e9,
      "rounds": s["n"],
    }
    common.emit(row)
    rows.append(row)
  ratio = rows[1]["ms_median"] / rows[0]["ms_median"]
  common.emit(
    {
      "what": "deberta_forward_ratio",
      "torch_over_jax": ratio,
      "max_diff": diff,
      "load_end": [round(x, 2) for x in load],
    }
  )
  print()
  print(
    f"DeBERTa body {args.layers} layers x {args.hidden} x {args.heads} heads, "
    f"batch {args.batch} x {args.seq}, fp32, {threads} threads, "
    f"{macs / 1e9:.1f} GMACs; load average at the end "
    f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"
  )
  print(
    common.table(
      rows, ["impl", "ms_median", "ms_min", "ms_max", "gmacs_per_s", "rounds"]
    )
  )
  print(f"PyTorch / JAX median time: {ratio:.2f}; max |diff| {diff:.2e}")


if __name__ == "__main__":
  main()
