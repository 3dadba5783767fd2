"""Loop overhead: `run_loop` (finite flags, bounded dispatch, signal
check, metrics) against a bare loop of the same jitted step.

  PYTHONPATH=. python benchmarks/loop_overhead.py [--size 512] [--steps 200]
"""

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp

from bistil_jax.train import loop


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", type=int, default=512)
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  n = args.size

  @jax.jit
  def step(state, x):
    w = state["w"]
    h = jnp.tanh(x @ w) @ w.T
    loss = jnp.mean(h * h)
    g = 1e-6 * (x.T @ h)
    gn = jnp.sqrt(jnp.sum(g * g))
    new = {"w": w - g, "step": state["step"] + 1}
    finite = jnp.isfinite(loss + gn).astype(jnp.float32)
    return new, {"loss": loss, "grad_norm": gn, "finite": finite}

  x = jax.random.normal(jax.random.PRNGKey(0), (n, n))
  fresh = lambda: {"w": jnp.eye(n), "step": jnp.int32(0)}  # noqa: E731
  state, _ = step(fresh(), x)
  jax.block_until_ready(state)

  def bare():
    s = fresh()
    t0 = time.perf_counter()
    for _ in range(args.steps):
      s, m = step(s, x)
    jax.block_until_ready((s, m))
    return time.perf_counter() - t0

  def looped():
    with tempfile.TemporaryDirectory() as d:
      writer = loop.MetricWriter(os.path.join(d, "m"))
      t0 = time.perf_counter()
      loop.run_loop(
        fresh(),
        step_fn=lambda s, b: step(s, x),
        batches=iter(range(10**9)),
        data_state=lambda: {},
        start_step=0,
        settings=loop.LoopSettings(num_steps=args.steps, log_every=50),
        checkpointer=None,
        writer=writer,
      )
      dt = time.perf_counter() - t0
      writer.close()
    return dt

  b = min(bare() for _ in range(args.repeats))
  lp = min(looped() for _ in range(args.repeats))
  print(
    f"{jax.devices()[0].platform} size {n}: bare {1e3 * b / args.steps:.3f} "
    f"ms/step, run_loop {1e3 * lp / args.steps:.3f} ms/step, overhead "
    f"{100 * (lp / b - 1):+.1f}%"
  )


if __name__ == "__main__":
  main()
