"""Phase-1 step time at mBERT-base scale: distil_step vs a teacher forward.

Builds an mBERT-base-shaped teacher (12 layers, width 768, a trimmed
vocabulary of --vocab rows, random weights: speed does not depend on the
values) and a 6-layer student initialised from it, then times in the same
run:

- reference: the jitted teacher forward pass (hidden states + attention
  probabilities) on the batch, i.e. the part of a step that cannot be
  avoided;
- distil_step: teacher forward + student forward/backward + AdamW update
  (hidden + attention MSE, the released loss mix; --kl adds the MLM-logit
  KL at masked positions).

It prints seconds per step, tokens/s, the ratio step / reference, and the
model FLOP rate: 2 x analytic MACs of (teacher forward + 3 x student
forward), with MFU against --peak-tflops where given (the device's dense
peak for the dtype; CPU has no meaningful figure, so none by default).

  python benchmarks/distil_step.py                      # 8 x 128, fp32
  python benchmarks/distil_step.py --batch 32 --seq 256 --dtype bfloat16 \
      --peak-tflops 989                                 # e.g. H100 bf16
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import numpy as np

from bistil_jax import measure
from bistil_jax.checkpoint import student_init
from bistil_jax.model import Model, init_params, preset
from bistil_jax.train import state as state_lib
from bistil_jax.train import steps


def timed(fn, repeats):
  out = fn()  # compile + warm up
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times), times


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--reduction", type=int, default=2)
  p.add_argument("--vocab", type=int, default=30000)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--kl", action="store_true", help="add the MLM-logit KL")
  p.add_argument("--peak-tflops", type=float, default=0.0)
  args = p.parse_args()

  tcfg = preset(
    "mbert",
    vocab_size=args.vocab,
    num_hidden_layers=args.layers,
    head="mlm",
    dtype=args.dtype,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
  )
  scfg = student_init.student_config(tcfg, args.reduction)
  tparams = jax.tree.map(np.asarray, init_params(tcfg, jax.random.PRNGKey(0)))
  sparams = student_init.init_student(
    tparams, tcfg, scfg, "teacher_layers", jax.random.PRNGKey(1)
  )
  loss_cfg = steps.DistilLossConfig(kl=1.0 if args.kl else 0.0)
  tx = state_lib.make_optimizer(state_lib.OptimConfig(total_steps=1000))
  state = jax.jit(state_lib.create_state, static_argnums=1)(sparams, tx)
  teacher = {"params": jax.device_put(tparams), "projections": None}

  rng = np.random.default_rng(0)
  b, l = args.batch, args.seq
  p_slots = max(1, int(0.15 * l))
  batch = {
    "input_ids": rng.integers(5, args.vocab, (b, l)).astype(np.int32),
    "attention_mask": np.ones((b, l), np.int32),
    "token_type_ids": np.zeros((b, l), np.int32),
    "masked_lm_positions": np.tile(np.arange(p_slots, dtype=np.int32), (b, 1)),
    "masked_lm_ids": rng.integers(5, args.vocab, (b, p_slots)).astype(np.int32),
    "masked_lm_weights": np.ones((b, p_slots), np.float32),
  }
  batch = jax.device_put(batch)
  key = jax.random.PRNGKey(0)

  tmodel, smodel = Model(tcfg), Model(scfg)
  fwd = jax.jit(
    lambda prm, ids: tmodel.apply(
      {"params": prm}, ids, output_attentions=True
    ).hidden_states[-1]
  )
  ref_s, _ = timed(
    lambda: fwd(teacher["params"], batch["input_ids"]), args.repeats
  )

  step = jax.jit(
    functools.partial(
      steps.distil_step,
      student_model=smodel,
      teacher_model=tmodel,
      tx=tx,
      loss_cfg=loss_cfg,
    )
  )
  holder = {"state": state}

  def one():
    holder["state"], metrics = step(holder["state"], teacher, batch, key)
    return metrics["loss"]

  step_s, all_s = timed(one, args.repeats)

  t_macs = measure.analytic_macs(tcfg.replace(head="none"), b, l)["total"]
  s_macs = measure.analytic_macs(scfg.replace(head="none"), b, l)["total"]
  flops = 2 * (t_macs + 3 * s_macs)
  tokens = b * l
  print(
    f"device {jax.devices()[0].device_kind} x{jax.device_count()}, "
    f"{args.dtype}, teacher {args.layers}L/768 vocab {args.vocab}, student "
    f"{scfg.num_hidden_layers}L, batch {b} x {l}"
  )
  print(f"teacher forward (reference): {ref_s:.3f} s")
  print(
    f"distil_step: {step_s:.3f} s/step (runs {', '.join(f'{t:.3f}' for t in all_s)}), "
    f"{tokens / step_s:.0f} tokens/s, {step_s / ref_s:.2f} x the reference"
  )
  rate = flops / step_s / 1e12
  line = f"model FLOPs/step {flops / 1e12:.3f} T, {rate:.3f} TFLOP/s"
  if args.peak_tflops:
    line += f", MFU {100 * rate / args.peak_tflops:.1f}%"
  print(line)


if __name__ == "__main__":
  main()
