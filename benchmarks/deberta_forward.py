"""DeBERTa-v3 body forward: Flax (bistil_jax) against transformers PyTorch.

One mDeBERTa-v3-shaped body at a small size (default 6 layers, width 384,
6 heads, FFN 1536; position buckets 256, shared position keys, p2c + c2p,
no absolute positions), random weights written once by bistil_jax and
loaded by both (so the outputs are compared too), batch 8 x 128 real
tokens, fp32, no dropout, no head. JAX: a jitted forward returning the last
hidden state (the disentangled scores are always materialised, no fused
attention). PyTorch: `DebertaV2Model` in eval mode under `torch.no_grad`,
`torch.set_num_threads(--threads)`. Both warmed up; rounds alternate the
two so they see the same machine load; figures are medians of the rounds
(min/max spread), each round the mean of --iters calls.

  PYTHONPATH=. python benchmarks/deberta_forward.py --quick
  PYTHONPATH=. python benchmarks/deberta_forward.py --rounds 7
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
from bistil_jax.model import Model, init_params, preset  # noqa: E402


def config(args):
  return preset(
    "tiny-deberta",
    head="none",
    vocab_size=args.vocab,
    hidden_size=args.hidden,
    num_hidden_layers=args.layers,
    num_attention_heads=args.heads,
    intermediate_size=4 * args.hidden,
    max_position_embeddings=512,
    position_buckets=256,
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
  p.add_argument("--layers", type=int, default=6)
  p.add_argument("--hidden", type=int, default=384)
  p.add_argument("--heads", type=int, default=6)
  p.add_argument("--vocab", type=int, default=30000)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--quick", action="store_true", help="3 rounds of 3")
  args = p.parse_args(argv)
  if args.quick:
    args.rounds, args.iters = 3, 3

  import torch
  import transformers as T

  torch.set_num_threads(args.threads)
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
  run_jax(), run_torch()
  times = {"jax": [], "torch": []}
  for _ in range(args.rounds):
    times["jax"].append(timed_mean(run_jax, args.iters))
    times["torch"].append(timed_mean(run_torch, args.iters))
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
    {"what": "deberta_forward_ratio", "torch_over_jax": ratio, "max_diff": diff}
  )
  print(
    common.table(
      rows, ["impl", "ms_median", "ms_min", "ms_max", "gmacs_per_s", "rounds"]
    )
  )
  print(f"PyTorch / JAX median time: {ratio:.2f}; max |diff| {diff:.2e}")


if __name__ == "__main__":
  main()
