"""Student construction: config, layer map, init strategies, projections."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax.traverse_util import flatten_dict

from bistil_jax.checkpoint import student_init as si
from bistil_jax.errors import BistilError
from bistil_jax.model import Model, init_params, preset


def teacher():
  cfg = preset("tiny", num_hidden_layers=4, head="mlm")
  return cfg, jax.tree.map(np.asarray, init_params(cfg, jax.random.PRNGKey(0)))


class StudentInitTest(parameterized.TestCase):
  @parameterized.parameters(
    (12, 6, [1, 3, 5, 7, 9, 11]),
    (12, 4, [2, 5, 8, 11]),
    (12, 3, [3, 7, 11]),
    (12, 12, list(range(12))),
    (4, 2, [1, 3]),
  )
  def test_layer_map(self, lt, ls, want):
    self.assertEqual(si.layer_map(lt, ls), want)

  def test_layer_map_rejects_non_divisors(self):
    with self.assertRaisesRegex(BistilError, "do not divide"):
      si.layer_map(12, 5)

  def test_student_config(self):
    t = preset("mbert")
    s = si.student_config(t, layer_reduction=2, hidden_reduction=2)
    self.assertEqual(s.num_hidden_layers, 6)
    self.assertEqual((s.hidden_size, s.intermediate_size), (384, 1536))
    self.assertEqual(s.num_attention_heads, 12)
    self.assertEqual(s.head_dim, 32)
    self.assertEqual(s.hidden_dropout_prob, 0.0)
    self.assertEqual(s.attention_probs_dropout_prob, 0.0)
    # Trained without dropout, exported with the teacher's.
    self.assertEqual(s.export_dropout, (0.1, 0.1))
    self.assertEqual(s.to_hf_dict()["hidden_dropout_prob"], 0.1)
    self.assertEqual(s.vocab_size, t.vocab_size)
    with self.assertRaisesRegex(BistilError, "does not divide the teacher"):
      si.student_config(t, layer_reduction=5)
    with self.assertRaisesRegex(BistilError, "attention heads"):
      si.student_config(t, hidden_reduction=128)

  def test_teacher_layers_copies_mapped_layers(self):
    tcfg, tparams = teacher()
    scfg = si.student_config(tcfg, 2)
    with self.assertLogs(si.log, "INFO") as logs:
      params = si.init_student(
        tparams, tcfg, scfg, "teacher_layers", jax.random.PRNGKey(1)
      )
    self.assertIn("0<-1, 1<-3", logs.output[0])
    t, s = flatten_dict(tparams, sep="/"), flatten_dict(params, sep="/")
    for key, value in s.items():
      if key.startswith("encoder/layer/"):
        i = int(key.split("/")[2])
        src = key.replace(f"layer/{i}/", f"layer/{2 * i + 1}/", 1)
        np.testing.assert_array_equal(value, t[src], key)
      else:
        np.testing.assert_array_equal(value, t[key], key)
    # The student runs, and its embeddings output equals the teacher's.
    ids = jnp.array([[5, 6, 7, 8]])
    so = Model(scfg).apply({"params": params}, ids)
    to = Model(tcfg).apply({"params": tparams}, ids)
    np.testing.assert_allclose(so.hidden_states[0], to.hidden_states[0])
    self.assertEqual(so.logits.shape, to.logits.shape)

  def test_svd_embeddings(self):
    tcfg, tparams = teacher()
    scfg = si.student_config(tcfg, 2, hidden_reduction=2)
    params = si.init_student(
      tparams, tcfg, scfg, "svd_embeddings", jax.random.PRNGKey(1)
    )
    table = params["embeddings"]["word_embeddings"]["embedding"]
    self.assertEqual(table.shape, (tcfg.padded_vocab_size, 16))
    u = table[: tcfg.vocab_size]
    # Orthonormal columns spanning the teacher embeddings' top subspace.
    np.testing.assert_allclose(u.T @ u, np.eye(16), atol=1e-5)
    np.testing.assert_array_equal(table[tcfg.vocab_size :], 0.0)
    e = tparams["embeddings"]["word_embeddings"]["embedding"][: tcfg.vocab_size]
    uu, _, _ = np.linalg.svd(e, full_matrices=False)
    proj = uu[:, :16] @ uu[:, :16].T
    np.testing.assert_allclose(proj @ u, u, atol=1e-4)

  def test_random_differs_from_teacher(self):
    tcfg, tparams = teacher()
    scfg = si.student_config(tcfg, 2)
    params = si.init_student(
      tparams, tcfg, scfg, "random", jax.random.PRNGKey(1)
    )
    a = params["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"]
    b = tparams["encoder"]["layer"]["1"]["attention"]["self"]["query"]["kernel"]
    self.assertFalse(np.allclose(a, b))

  def test_errors(self):
    tcfg, tparams = teacher()
    narrow = si.student_config(tcfg, 2, hidden_reduction=2)
    with self.assertRaisesRegex(BistilError, "needs the teacher's width"):
      si.init_student(
        tparams, tcfg, narrow, "teacher_layers", jax.random.PRNGKey(0)
      )
    with self.assertRaisesRegex(BistilError, "unknown student init"):
      si.init_student(tparams, tcfg, narrow, "copy", jax.random.PRNGKey(0))
    other = si.student_config(tcfg, 2).replace(vocab_size=100)
    with self.assertRaisesRegex(BistilError, "trim the teacher"):
      si.init_student(tparams, tcfg, other, "random", jax.random.PRNGKey(0))

  def test_hidden_projections(self):
    rng = np.random.RandomState(0)
    basis = np.linalg.qr(rng.randn(32, 4))[0]  # states live in 4 dims
    states = [rng.randn(50, 4) @ basis.T for _ in range(3)]
    projs = si.hidden_projections(states, 4)
    self.assertLen(projs, 3)
    for h, p in zip(states, projs, strict=True):
      self.assertEqual(p.shape, (32, 4))
      np.testing.assert_allclose(p.T @ p, np.eye(4), atol=1e-5)
      # Projection keeps all the energy of states in a 4-dim subspace.
      np.testing.assert_allclose(
        np.linalg.norm(h @ p), np.linalg.norm(h), rtol=1e-5
      )
    with self.assertRaisesRegex(BistilError, "sample more"):
      si.hidden_projections([rng.randn(3, 32)], 4)


if __name__ == "__main__":
  absltest.main()
