"""The shared loop: exact metric averages, NaN guard, preemption, events."""

import os
import signal
import struct
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from bistil_jax.checkpoint import manager as ckpt
from bistil_jax.train import loop
from tests import faults


class ReduceTest(absltest.TestCase):
  def test_totals_and_counts_average_exactly(self):
    history = [
      {"kl/total": 6.0, "kl/count": 3.0, "loss": 1.0, "tokens": 10, "lr": 0.1},
      {"kl/total": 1.0, "kl/count": 1.0, "loss": 3.0, "tokens": 5, "lr": 0.2},
    ]
    out = loop.reduce_metrics(history)
    self.assertAlmostEqual(out["kl"], 7.0 / 4.0)  # not (2 + 1) / 2
    self.assertAlmostEqual(out["loss"], 2.0)
    self.assertEqual(out["tokens"], 15.0)
    self.assertEqual(out["lr"], 0.2)
    self.assertNotIn("kl/count", out)

  def test_finite_is_all_or_nothing(self):
    out = loop.reduce_metrics([{"finite": 1.0}] * 9 + [{"finite": 0.0}])
    self.assertEqual(out["finite"], 0.0)  # not 0.9

  def test_progress_line(self):
    line = loop.format_progress(50, 200, {"loss": 0.5, "lr": 1e-4}, 10.0)
    self.assertIn("step 50/200 (25%)", line)
    self.assertIn("loss 0.5", line)
    self.assertIn("ETA 0:00:15", line)
    staged = loop.format_progress(10, 186, {"finite": 1.0}, 1.0, "sparse")
    self.assertTrue(staged.startswith("sparse step 10/186"), staged)
    self.assertNotIn("finite", staged)


def counting_step(nan_at=None, on_step=None, poison_at=None):
  """A step whose loss is NaN at step `nan_at` (flag "finite" 0 there);
  `poison_at`: the loss stays finite but the state's weight becomes NaN."""

  def step_fn(state, batch):
    del batch
    new = state["step"] + 1
    loss = jnp.where(new == (nan_at or -1), jnp.nan, 1.0 / new)
    w = jnp.where(new >= (poison_at or 10**9), jnp.nan, state["w"] + 1.0)
    if on_step is not None:
      on_step(int(new))
    metrics = {"loss": loss, "grad_norm": jnp.float32(1.0)}
    metrics["finite"] = jnp.isfinite(loss).astype(jnp.float32)
    return {"step": new, "w": w}, metrics

  return step_fn


class LoopTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.dir = tmp.name

  def run_loop(
    self, step_fn, num_steps=10, checkpointer=None, log_every=5, hooks=()
  ):
    writer = loop.MetricWriter(os.path.join(self.dir, "metrics"))
    batches = iter(range(1000))
    try:
      return loop.run_loop(
        {"step": jnp.int32(0), "w": jnp.float32(0.0)},
        step_fn=step_fn,
        batches=batches,
        data_state=lambda: {"step": 0},
        start_step=0,
        settings=loop.LoopSettings(num_steps=num_steps, log_every=log_every),
        checkpointer=checkpointer,
        writer=writer,
        hooks=hooks,
      )
    finally:
      writer.close()

  def test_nan_stops_with_the_step_range(self):
    with self.assertRaisesRegex(
      loop.NonFiniteLoss, "non-finite loss at step 8; no checkpoint"
    ):
      self.run_loop(counting_step(nan_at=8))

  def test_no_checkpoint_at_or_after_the_first_nan_step(self):
    # Checkpoints every 3 steps, logs every 10: the NaN at step 5 is seen
    # at the save of step 6, which is not written.
    checkpointer = ckpt.Checkpointer(self.dir, every=3, use_async=False)
    with self.assertRaisesRegex(
      loop.NonFiniteLoss,
      "non-finite loss at step 5; the last finite checkpoint is step 3; "
      "resume with a lower optim.learning_rate",
    ):
      self.run_loop(
        counting_step(nan_at=5), checkpointer=checkpointer, log_every=10
      )
    self.assertEqual(checkpointer.all_steps(), [3])
    checkpointer.close()

  def test_a_non_finite_state_is_never_saved(self):
    checkpointer = ckpt.Checkpointer(self.dir, every=3, use_async=False)
    with self.assertRaisesRegex(
      loop.NonFiniteLoss,
      "non-finite parameters at step 6; the last finite checkpoint is step 3",
    ):
      self.run_loop(
        counting_step(poison_at=5), checkpointer=checkpointer, log_every=10
      )
    self.assertEqual(checkpointer.all_steps(), [3])
    checkpointer.close()

  def test_metrics_land_in_jsonl_and_tensorboard(self):
    state, last = self.run_loop(counting_step(), num_steps=10)
    self.assertEqual(int(state["step"]), 10)
    rows = loop.read_metrics(os.path.join(self.dir, "metrics"))
    self.assertEqual([r["step"] for r in rows], [5, 10])
    self.assertAlmostEqual(
      rows[0]["train/loss"], np.mean([1 / k for k in range(1, 6)]), places=6
    )
    self.assertAlmostEqual(last["loss"], rows[1]["train/loss"])
    events = [
      f
      for f in os.listdir(os.path.join(self.dir, "metrics"))
      if "tfevents" in f
    ]
    self.assertLen(events, 1)
    tags = read_event_tags(os.path.join(self.dir, "metrics", events[0]))
    self.assertIn("train/loss", tags)
    self.assertIn("train/steps_per_s", tags)

  def test_sigterm_saves_and_stops(self):
    checkpointer = ckpt.Checkpointer(self.dir, every=100, use_async=False)

    def on_step(step):
      if step == 3:
        os.kill(os.getpid(), signal.SIGTERM)

    with self.assertRaisesRegex(loop.Preempted, "at train step 3"):
      self.run_loop(counting_step(on_step=on_step), checkpointer=checkpointer)
    self.assertEqual(checkpointer.latest_step(), 3)
    target = {
      "step": jax.ShapeDtypeStruct((), jnp.int32),
      "w": jax.ShapeDtypeStruct((), jnp.float32),
    }
    state, data = checkpointer.restore(3, target)
    self.assertEqual(int(state["step"]), 3)
    self.assertEqual(data, {"step": 0})
    checkpointer.close()

  def test_signal_at_a_random_step_saves_that_step(self):
    at = int(np.random.default_rng().integers(1, 9))
    checkpointer = ckpt.Checkpointer(self.dir, every=100, use_async=False)
    with self.assertRaisesRegex(loop.Preempted, f"at train step {at};"):
      self.run_loop(
        counting_step(),
        checkpointer=checkpointer,
        log_every=50,
        hooks=[faults.sigterm_at_step(at)],
      )
    self.assertEqual(checkpointer.all_steps(), [at])
    checkpointer.close()


def read_event_tags(path):
  """Scalar tags in a TensorBoard event file (TFRecord framing)."""
  from tensorboardX.proto import event_pb2

  tags = set()
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos : pos + 8])
    record = data[pos + 12 : pos + 12 + length]
    pos += 12 + length + 4
    event = event_pb2.Event.FromString(record)
    for value in event.summary.value:
      tags.add(value.tag)
  return tags


if __name__ == "__main__":
  absltest.main()
