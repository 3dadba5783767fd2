"""Step tokens/s, JAX against a PyTorch reference: phase 1 and phase 2.

mBERT-base-shaped teacher (12L/768/12 heads, vocabulary --vocab), 6-layer
student, batch --batch, at each --seq; two loss mixes: the released one
(hidden + attention MSE) and KL + hidden; and the phase-2 LT-SFT
sparse-stage step (token classification teacher + student, soft CE +
hidden + attention MSE, masked update; `--mix phase2`). The PyTorch reference step
(transformers BertModel / BertForMaskedLM, same losses, AdamW, clip 1.0,
dropout) lives in benchmarks/common.py. Rounds alternate JAX and PyTorch
so both see the same machine load; the figures are medians over rounds,
with min/max as the spread. MFU: analytic training FLOPs per token (see
common.train_flops_per_token) x tokens/s / the peak (on CPU a jitted fp32
2048^2 matmul measured in every round, median over the rounds, so it sees
the same load as the steps; on GPU --peak-tflops).

With `--family deberta` the teacher is mDeBERTa-v3-shaped (relative
attention over 256 log buckets, shared position keys, p2c + c2p, no
absolute positions; --layers/--hidden/--heads, FFN 4 x width, default
6 x 384 x 6 so that it runs in minutes on 2 CPU cores) and the student its
LRF-2 teacher_layers copy; released mix only. The PyTorch reference is
transformers' DebertaV2Model (eager attention, hidden states and attention
probabilities) loaded from the JAX step's own initial weights
(common.torch_phase1_deberta), so the first losses of the two are
compared too; FLOPs count DeBERTa's relative terms
(measure.analytic_macs).

  python benchmarks/phase1.py --quick          # seq 128, 3 rounds
  python benchmarks/phase1.py                  # seq 128 and 256, 5 rounds
  python benchmarks/phase1.py --family deberta --quick
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, nargs="+", default=[128, 256])
  p.add_argument("--vocab", type=int, default=30000)
  p.add_argument(
    "--mix",
    nargs="+",
    default=["released", "kl_hidden", "phase2"],
    help="released, kl_hidden (phase 1), phase2 (LT-SFT sparse "
    "stage, token classification)",
  )
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--dropout", type=float, default=0.1)
  p.add_argument(
    "--peak-tflops",
    type=float,
    default=0.0,
    help="device peak; default: measured matmul (CPU)",
  )
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--quick", action="store_true", help="seq 128 only, 3 rounds")
  p.add_argument(
    "--family",
    choices=("bert", "deberta"),
    default="bert",
    help="bert: the mBERT-base pair; deberta: an mDeBERTa-v3-shaped pair "
    "(--layers/--hidden/--heads), released mix",
  )
  p.add_argument("--layers", type=int, default=6, help="DeBERTa teacher")
  p.add_argument("--hidden", type=int, default=384, help="DeBERTa teacher")
  p.add_argument("--heads", type=int, default=6, help="DeBERTa teacher")
  args = p.parse_args(argv)
  if args.quick:
    args.seq, args.rounds = [128], 3
  if args.family == "deberta":
    if "--mix" not in (argv if argv is not None else sys.argv[1:]):
      args.mix = ["released"]
    if args.mix != ["released"]:
      p.error("--family deberta runs the released mix only")
  import torch

  common.emit_load("start")
  if jax.default_backend() == "cpu":
    torch.set_num_threads(common.cpu_threads())
  device = "cuda" if jax.default_backend() == "gpu" else "cpu"
  peak = args.peak_tflops or common.cpu_matmul_peak(dtype=args.dtype)
  peak_src = "given" if args.peak_tflops else "measured_matmul"
  peaks = [] if args.peak_tflops else [peak]
  common.emit(
    {
      "what": "peak_tflops",
      "value": peak,
      "source": peak_src,
      "device": jax.devices()[0].device_kind,
    }
  )
  rows = []
  for l in args.seq:
    for mix in args.mix:
      kl = mix == "kl_hidden"
      b = args.batch
      if mix == "phase2":
        js = common.jax_phase2(
          b, l, args.vocab, dtype=args.dtype, dropout=args.dropout
        )
        jrun = js["run"]
        fpt = fpt_ref = common.train_flops_per_token(
          js["tcfg"], js["scfg"], b, l, l
        )
      else:
        cfgs = None
        if args.family == "deberta":
          cfgs = common.deberta_configs(
            args.vocab,
            args.layers,
            args.hidden,
            args.heads,
            dtype=args.dtype,
            dropout=args.dropout,
          )
        js = common.jax_phase1(
          b,
          l,
          args.vocab,
          kl=kl,
          dtype=args.dtype,
          dropout=args.dropout,
          cfgs=cfgs,
        )
        jrun = common.jax_runner(js)
        fpt = common.train_flops_per_token(
          js["tcfg"], js["scfg"], b, l, js["logits_rows"]
        )
        fpt_ref = common.train_flops_per_token(
          js["tcfg"], js["scfg"], b, l, l if kl else None
        )
      t0 = time.perf_counter()
      first_jax = float(common.sync(jrun()))  # compile
      compile_s = time.perf_counter() - t0
      common.sync(jrun())
      trun = None
      if not args.no_torch and args.family == "deberta":
        trun = common.torch_phase1_deberta(
          js, b, l, device=device, dtype=args.dtype
        )["step"]
        first_torch = trun()
        common.emit(
          {
            "what": "phase1_first_loss",
            "family": args.family,
            "seq": l,
            "jax": first_jax,
            "torch": first_torch,
            "rel_diff": abs(first_jax - first_torch) / abs(first_torch),
          }
        )
      elif not args.no_torch:
        make = (
          common.torch_phase2
          if mix == "phase2"
          else functools.partial(common.torch_phase1, kl=kl)
        )
        trun = make(
          b,
          l,
          args.vocab,
          dropout=args.dropout,
          device=device,
          dtype=args.dtype,
        )["step"]
        trun()
      jt, tt = [], []
      for r in range(args.rounds):
        if not args.peak_tflops:  # the peak under this round's load
          peaks.append(common.cpu_matmul_peak(repeats=2, dtype=args.dtype))
          peak = statistics.median(peaks)
        for who in ("jax", "torch") if r % 2 == 0 else ("torch", "jax"):
          if who == "torch" and trun is None:
            continue
          t = time.perf_counter()
          if who == "jax":
            common.sync(jrun())
            jt.append(time.perf_counter() - t)
          else:
            trun()
            tt.append(time.perf_counter() - t)
      tokens = b * l
      for who, times, f in (("jax", jt, fpt), ("torch", tt, fpt_ref)):
        if not times:
          continue
        s = common.spread(times)
        tps = tokens / s["median_s"]
        row = {
          "what": "phase1_step",
          "family": args.family,
          "impl": who,
          "mix": mix,
          "seq": l,
          "batch": b,
          "dtype": args.dtype,
          "tokens_per_s": tps,
          "tokens_per_s_min": tokens / s["max_s"],
          "tokens_per_s_max": tokens / s["min_s"],
          "flops_per_token": f,
          "tflops": f * tps / 1e12,
          "mfu": f * tps / 1e12 / peak,
          **s,
        }
        if who == "jax":
          row["compile_s"] = compile_s
        common.emit(row)
        rows.append(row)
      if tt:
        ratio = statistics.median(tt) / statistics.median(jt)
        common.emit(
          {
            "what": "phase1_ratio",
            "mix": mix,
            "seq": l,
            "jax_over_torch": ratio,
            "peak_tflops": peak,
          }
        )
        rows.append(
          {
            "what": "ratio",
            "mix": mix,
            "seq": l,
            "impl": "ratio",
            "tokens_per_s": ratio,
          }
        )
      del js, jrun, trun
      gc.collect()
  load = common.emit_load("end")
  print()
  shape = "mBERT-base pair"
  if args.family == "deberta":
    shape = (
      f"DeBERTa teacher {args.layers} x {args.hidden} x {args.heads} heads, "
      f"student {args.layers // 2} layers, vocab {args.vocab}"
    )
  print(
    f"device {jax.devices()[0].device_kind}, peak {peak:.3f} TFLOP/s "
    f"({peak_src}), batch {args.batch}, {args.dtype}, {shape}, "
    f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"
  )
  print(
    common.table(
      [r for r in rows if r["what"] != "ratio"],
      [
        "mix",
        "seq",
        "impl",
        "tokens_per_s",
        "tokens_per_s_min",
        "tokens_per_s_max",
        "tflops",
        "mfu",
      ],
    )
  )
  for r in rows:
    if r["what"] == "ratio":
      print(
        f"ratio jax/torch {r['mix']} seq {r['seq']}: {r['tokens_per_s']:.2f}x"
      )
  return rows


if __name__ == "__main__":
  main()
