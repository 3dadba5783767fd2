"""Optimiser schedule and config checks."""

import numpy as np
from absl.testing import absltest, parameterized

from bistil_jax.errors import BistilError
from bistil_jax.train import state as state_lib


class ScheduleTest(parameterized.TestCase):
  def test_warmup_then_linear_decay(self):
    cfg = state_lib.OptimConfig(
      learning_rate=1.0, warmup_steps=10, total_steps=110
    )
    lr = state_lib.schedule(cfg)
    np.testing.assert_allclose(
      [lr(0), lr(5), lr(10), lr(60), lr(110)],
      [0.0, 0.5, 1.0, 0.5, 0.0],
      atol=1e-6,
    )

  def test_lr_at_step_follows_accumulation(self):
    cfg = state_lib.OptimConfig(
      learning_rate=1.0, total_steps=10, accumulate_steps=4
    )
    lr = state_lib.lr_at_step(cfg)
    # Steps 0-3 are one optimiser update, 4-7 the next.
    np.testing.assert_allclose([lr(0), lr(3), lr(4), lr(7)], [1, 1, 0.9, 0.9])
    one = state_lib.lr_at_step(cfg.__class__(learning_rate=1.0, total_steps=10))
    np.testing.assert_allclose(one(4), 0.6)

  @parameterized.parameters(
    (dict(total_steps=0), "total_steps"),
    (dict(warmup_steps=5, total_steps=4), "warmup_steps"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(accumulate_steps=0), "accumulate_steps"),
  )
  def test_bad_configs(self, kw, needle):
    with self.assertRaisesRegex(BistilError, needle):
      state_lib.OptimConfig(**kw)


if __name__ == "__main__":
  absltest.main()
