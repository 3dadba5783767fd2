"""train_step with the phase-1 loss: terms fall, meshes agree, one compile, bad pairs."""

import functools

import jax
import numpy as np
from absl.testing import absltest, parameterized

from bistil_jax import partitioning
from bistil_jax.checkpoint import student_init
from bistil_jax.errors import BistilError
from bistil_jax.model import Model, init_params, preset
from bistil_jax.model.encoder import abstract_params
from bistil_jax.train import state as state_lib
from bistil_jax.train import steps

ALL_TERMS = steps.DistilLossConfig(hidden=1.0, attention=1.0, kl=1.0, mlm=0.5)


def setup(init="random", loss_cfg=ALL_TERMS, lr=1e-3):
  tcfg = preset(
    "tiny",
    head="mlm",
    num_hidden_layers=4,
    hidden_size=64,
    num_attention_heads=8,
    intermediate_size=128,
  )
  tparams = init_params(tcfg, jax.random.PRNGKey(0))
  # Sharpen the random teacher's attention (near-uniform at init) so the
  # attention term has something to learn.
  for layer in tparams["encoder"]["layer"].values():
    q = layer["attention"]["self"]["query"]
    q["kernel"] = q["kernel"] * 20.0
  scfg = student_init.student_config(tcfg, layer_reduction=2)
  sparams = student_init.init_student(
    tparams, tcfg, scfg, init, jax.random.PRNGKey(1)
  )
  tx = state_lib.make_optimizer(
    state_lib.OptimConfig(learning_rate=lr, total_steps=100)
  )
  step = functools.partial(
    steps.train_step,
    loss_fn=functools.partial(
      steps.distil_losses,
      student_model=Model(scfg),
      teacher_model=Model(tcfg),
      loss_cfg=loss_cfg,
    ),
    tx=tx,
  )
  state = state_lib.create_state(sparams, tx)
  return step, state, {"params": tparams, "projections": None}, tcfg


def make_batch(vocab, seed=0, b=8, l=16, p=4):
  rng = np.random.RandomState(seed)
  ids = rng.randint(5, vocab, (b, l)).astype(np.int32)
  mask = np.ones((b, l), np.int32)
  mask[1, 10:] = 0
  mask[6, 5:] = 0
  ids[mask == 0] = 0
  positions = np.tile(np.arange(1, 1 + 2 * p, 2), (b, 1)).astype(np.int32)
  weights = np.ones((b, p), np.float32)
  weights[6, 2:] = 0.0  # those positions are padding in row 6
  gold = np.take_along_axis(ids, positions, axis=1)
  ids_masked = ids.copy()
  np.put_along_axis(ids_masked, positions, 4, 1)  # "[MASK]"
  ids_masked[mask == 0] = 0
  return {
    "input_ids": ids_masked,
    "attention_mask": mask,
    "token_type_ids": np.zeros_like(ids),
    "masked_lm_positions": positions,
    "masked_lm_ids": gold,
    "masked_lm_weights": weights,
  }


class DistilStepTest(parameterized.TestCase):
  def run_steps(self, loss_cfg, n=25):
    step, state, teacher, tcfg = setup(loss_cfg=loss_cfg)
    jstep = jax.jit(step, donate_argnums=(0,))
    batch = make_batch(tcfg.vocab_size)
    history = []
    for _ in range(n):
      state, metrics = jstep(state, teacher, batch, jax.random.PRNGKey(0))
      history.append(jax.device_get(metrics))
    self.assertEqual(int(state.step), n)
    self.assertTrue(all(np.isfinite(h["loss"]) for h in history))
    return history

  def test_combined_loss_falls(self):
    history = self.run_steps(ALL_TERMS)
    self.assertLess(history[-1]["loss"], 0.7 * history[0]["loss"])
    # Row 6 has 2 selected mlm positions: 8 * 4 - 2 counted rows.
    self.assertEqual(history[0]["kl/count"], 30.0)
    self.assertEqual(history[0]["mlm/count"], 30.0)

  @parameterized.parameters("hidden", "attention", "kl", "mlm")
  def test_each_term_falls_alone(self, term):
    weights = {name: 0.0 for name in steps.DISTIL_TERMS}
    weights[term] = 1.0
    history = self.run_steps(steps.DistilLossConfig(**weights))
    self.assertEqual(
      {k.split("/")[0] for k in history[0] if k.endswith("/total")}, {term}
    )
    first = history[0][f"{term}/total"] / history[0][f"{term}/count"]
    last = history[-1][f"{term}/total"] / history[-1][f"{term}/count"]
    self.assertLess(last, 0.8 * first)

  def test_teacher_is_not_modified(self):
    step, state, teacher, tcfg = setup()
    before = jax.tree.map(np.array, teacher["params"])
    state, _ = jax.jit(step)(
      state, teacher, make_batch(tcfg.vocab_size), jax.random.PRNGKey(0)
    )
    for a, b in zip(
      jax.tree.leaves(before), jax.tree.leaves(teacher["params"]), strict=True
    ):
      np.testing.assert_array_equal(a, np.asarray(b))

  def test_compiles_once(self):
    step, state, teacher, tcfg = setup()
    traces = []

    def counted(*args):
      traces.append(1)
      return step(*args)

    jstep = jax.jit(counted, donate_argnums=(0,))
    for i in range(3):
      state, _ = jstep(
        state,
        teacher,
        make_batch(tcfg.vocab_size, seed=i),
        jax.random.PRNGKey(0),
      )
    self.assertLen(traces, 1)

  def test_same_step_on_every_mesh(self):
    step, state0, teacher, tcfg = setup()
    batch = make_batch(tcfg.vocab_size)
    key = jax.random.PRNGKey(3)
    ref_state, ref_metrics = jax.jit(step)(state0, teacher, batch, key)
    for shape in ((1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 2, 4)):
      n = int(np.prod(shape))
      mesh = partitioning.make_mesh(shape, devices=jax.devices()[:n])
      pshard = partitioning.param_shardings(abstract_params(tcfg), mesh)
      scfg = student_init.student_config(tcfg, layer_reduction=2)
      student_shard = partitioning.param_shardings(abstract_params(scfg), mesh)
      dshard = partitioning.data_sharding(mesh)
      with partitioning.activate(mesh):
        params = partitioning.shard(state0.params, student_shard)
        tx = state_lib.make_optimizer(
          state_lib.OptimConfig(learning_rate=1e-3, total_steps=100)
        )
        state = jax.jit(state_lib.create_state, static_argnums=1)(params, tx)
        state_shard = jax.tree.map(lambda x: x.sharding, state)
        batch_shard = {
          k: dshard if np.ndim(v) == 2 else partitioning.replicated(mesh)
          for k, v in batch.items()
        }
        teacher_sh = {"params": pshard, "projections": None}
        jstep = jax.jit(
          step,
          in_shardings=(state_shard, teacher_sh, batch_shard, None),
          out_shardings=(state_shard, None),
        )
        new_state, metrics = jstep(
          state,
          {
            "params": partitioning.shard(teacher["params"], pshard),
            "projections": None,
          },
          partitioning.shard(batch, batch_shard),
          key,
        )
      np.testing.assert_allclose(
        metrics["loss"], ref_metrics["loss"], rtol=1e-5, err_msg=str(shape)
      )
      for a, b in zip(
        jax.tree.leaves(new_state.params),
        jax.tree.leaves(ref_state.params),
        strict=True,
      ):
        np.testing.assert_allclose(
          np.asarray(a), np.asarray(b), atol=1e-5, err_msg=str(shape)
        )

  def test_bad_pairs_and_configs(self):
    tcfg = preset("tiny", head="mlm", num_hidden_layers=4)
    scfg = student_init.student_config(tcfg, 2)
    with self.assertRaisesRegex(BistilError, "vocab"):
      steps.check_pair(
        Model(scfg.replace(vocab_size=10)), Model(tcfg), ALL_TERMS
      )
    with self.assertRaisesRegex(BistilError, "MLM heads"):
      steps.check_pair(Model(scfg.replace(head="none")), Model(tcfg), ALL_TERMS)
    with self.assertRaisesRegex(BistilError, "must divide"):
      steps.check_pair(
        Model(scfg.replace(num_hidden_layers=3)), Model(tcfg), ALL_TERMS
      )
    with self.assertRaisesRegex(BistilError, "every distillation loss"):
      steps.DistilLossConfig(hidden=0, attention=0)
    with self.assertRaisesRegex(BistilError, ">= 0"):
      steps.DistilLossConfig(kl=-1)


if __name__ == "__main__":
  absltest.main()
