"""Per-part timings of the phase-1 step (profile before optimising).

Times, each jitted on its own, at mBERT-base shapes: the teacher forward,
the student forward + backward against fixed teacher outputs, the AdamW
update alone, the whole phase-1 train_step, and a large fp32 matmul (the CPU
peak). Prints one JSON line per part and a table.

  python benchmarks/profile_step.py --seq 128 [--kl] [--dump DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bistil_jax.train import steps  # noqa: E402


def timeit(fn, repeats):
  jax.block_until_ready(fn())
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t)
  return statistics.median(ts), ts


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--vocab", type=int, default=30000)
  p.add_argument("--kl", action="store_true")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  setup = common.jax_phase1(args.batch, args.seq, args.vocab, kl=args.kl)
  rows = []

  def record(name, fn):
    med, ts = timeit(fn, args.repeats)
    row = {"part": name, "median_s": med, "runs": ts}
    print(json.dumps(row), flush=True)
    rows.append(row)

  peak = common.cpu_matmul_peak()
  print(json.dumps({"part": "matmul_peak_tflops", "value": peak}))
  tm, sm = setup["teacher_model"], setup["student_model"]
  batch, teacher = setup["batch"], setup["teacher"]
  loss_cfg = setup["loss_cfg"]
  want_attn = loss_cfg.attention > 0
  pos = batch["masked_lm_positions"] if loss_cfg.needs_logits else None

  @jax.jit
  def t_fwd(tp, batch):
    o = tm.apply(
      {"params": tp},
      batch["input_ids"],
      attention_mask=batch["attention_mask"],
      output_attentions=want_attn,
      logits_positions=pos,
    )
    return o

  record("teacher_fwd", lambda: t_fwd(teacher["params"], batch))
  t_out = t_fwd(teacher["params"], batch)

  def s_loss(params, key):
    fake_t = lambda *a, **k: t_out  # noqa: E731

    class Fake:
      config = tm.config
      apply = staticmethod(fake_t)

    return steps.distil_losses(
      params,
      teacher,
      batch,
      key,
      student_model=sm,
      teacher_model=Fake,
      loss_cfg=loss_cfg,
    )[0]

  grad = jax.jit(jax.value_and_grad(s_loss))
  state = setup["state"]
  key = jax.random.PRNGKey(0)
  record("student_fwd_bwd+loss", lambda: grad(state.params, key))
  g = grad(state.params, key)[1]
  tx = setup["tx"]

  @functools.partial(jax.jit, donate_argnums=(0,))
  def upd(st, g):
    u, o = tx.update(g, st.opt_state, st.params)
    import optax

    return st.replace(params=optax.apply_updates(st.params, u), opt_state=o)

  holder = {"s": jax.tree.map(jnp.copy, state)}

  def run_upd():
    holder["s"] = upd(holder["s"], g)
    return holder["s"].params

  record("adamw_update", run_upd)
  step = setup["step"]
  holder2 = {"s": state}

  def run_step():
    holder2["s"], m = step(holder2["s"], teacher, batch, key)
    return m["loss"]

  record("full_step", run_step)
  print("\n| part | median s |\n|---|---:|")
  for r in rows:
    print(f"| {r['part']} | {r['median_s']:.3f} |")
  print(f"matmul peak {peak:.3f} TFLOP/s")


if __name__ == "__main__":
  main()
