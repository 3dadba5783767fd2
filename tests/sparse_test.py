"""LT-SFT: eligibility, top-K selection and masked updates."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

from bistil_jax import partitioning, sparse
from bistil_jax.errors import BistilError
from bistil_jax.model.config import preset
from bistil_jax.model.encoder import abstract_params
from bistil_jax.train import state as state_lib
from bistil_jax.train import steps as train_steps

LABELS = 3


def tiny(head="token_classification"):
  # vocab 300 is padded to 384 rows: 84 padding rows to keep out.
  return preset("tiny", head=head, num_labels=LABELS)


@functools.cache
def _abstract(head):
  return nn.unbox(abstract_params(tiny(head)))


def params(head="token_classification", seed=0):
  """Host params of the tiny model: the real tree, HF-like random values.

  Built from the abstract shapes (no init compile; keeps the tests fast):
  normal(0, 0.02) matrices and tables, LayerNorm scale 1, zero biases.
  """
  rng = np.random.default_rng(seed)

  def one(path, x):
    leaf = path[-1].key
    if leaf == "bias":
      return np.zeros(x.shape, x.dtype)
    if leaf == "scale":
      return np.ones(x.shape, x.dtype)
    return (0.02 * rng.standard_normal(x.shape)).astype(x.dtype)

  return jax.tree_util.tree_map_with_path(one, _abstract(head))


def leaves_with_paths(tree):
  paths, leaves, _ = sparse.flatten(tree)
  return dict(zip(paths, leaves, strict=True))


def random_like(tree, seed, fn=None):
  rng = np.random.default_rng(seed)
  fn = fn or (lambda shape: rng.standard_normal(shape).astype(np.float32))
  return jax.tree.map(lambda x: fn(np.shape(x)), tree)


def reference_top_k(values, eligible, k):
  """NumPy reference: sort by (-|v|, leaf order, flat index), take k."""
  leaves = jax.tree.leaves(values)
  elig = jax.tree.leaves(eligible)
  v_all, leaf_all, idx_all = [], [], []
  for j, (v, e) in enumerate(zip(leaves, elig, strict=True)):
    v = np.abs(np.asarray(v, np.float32))
    e = np.broadcast_to(np.asarray(e), v.shape).reshape(-1)
    v = v.reshape(-1)
    where = np.flatnonzero(e)
    v_all.append(v[where])
    leaf_all.append(np.full(where.size, j))
    idx_all.append(where)
  v_all, leaf_all, idx_all = map(np.concatenate, (v_all, leaf_all, idx_all))
  top = np.lexsort((idx_all, leaf_all, -v_all))[:k]
  masks = [np.zeros(np.size(v), bool) for v in leaves]
  for t in top:
    masks[leaf_all[t]][idx_all[t]] = True
  shaped = [m.reshape(np.shape(v)) for m, v in zip(masks, leaves, strict=True)]
  return jax.tree.unflatten(jax.tree.structure(values), shaped)


def assert_trees_equal(test, a, b, bitwise=False):
  pa, pb = leaves_with_paths(a), leaves_with_paths(b)
  test.assertEqual(sorted(pa), sorted(pb))
  for path in pa:
    x, y = np.asarray(pa[path]), np.asarray(pb[path])
    if bitwise and x.dtype.kind == "f":
      x, y = x.view(np.uint32), y.view(np.uint32)
    np.testing.assert_array_equal(x, y, err_msg=path)


# ----------------------------------------------------------------- selection
# A small tree with awkward shapes: 0-d, 1-d, 3-d, partially eligible.
def _toy(values_fn):
  shapes = {"a": (5, 7), "b": {"c": (13,), "d": (3, 4, 2)}, "s": ()}
  return jax.tree.map(values_fn, shapes, is_leaf=lambda x: isinstance(x, tuple))


def _toy_eligible(seed=0):
  rng = np.random.default_rng(seed)
  return {
    "a": np.broadcast_to(np.bool_(True), (5, 7)),
    "b": {"c": rng.permutation(13) < 8, "d": np.bool_(False)},
    "s": True,
  }


class SelectTest(parameterized.TestCase):
  @parameterized.parameters(1, 7, 20, 44)  # 44 = all eligible
  def test_matches_argsort_without_ties(self, k):
    # Distinct values: the top k is unique; compare with a plain argsort.
    rng = np.random.default_rng(k)
    values = _toy(lambda s: rng.standard_normal(s).astype(np.float32))
    elig = _toy_eligible()
    got = sparse.select_top_k(values, elig, k)
    flat_v = np.concatenate(
      [
        np.abs(v).reshape(-1)[np.broadcast_to(e, np.shape(v)).reshape(-1)]
        for v, e in zip(
          jax.tree.leaves(values), jax.tree.leaves(elig), strict=True
        )
      ]
    )
    kth = np.sort(flat_v)[::-1][k - 1]
    assert_trees_equal(self, got, reference_top_k(values, elig, k))
    sel = np.concatenate(
      [
        np.abs(v).reshape(-1)[np.asarray(m).reshape(-1)]
        for v, m in zip(
          jax.tree.leaves(values), jax.tree.leaves(got), strict=True
        )
      ]
    )
    self.assertLen(sel, k)
    self.assertTrue(np.all(sel >= kth))
    # Ineligible entries are never selected, even when they are the largest.
    self.assertFalse(np.any(np.asarray(got["b"]["d"])))

  @parameterized.parameters(1, 5, 12, 30, 40)
  def test_exact_count_and_tie_order(self, k):
    # Values in {0, 1, 2, 3} (with -0.0 and negatives: |Δ| is used): many
    # ties at the threshold. Exactly k selected, and the ties taken are the
    # first in (leaf order, row-major flat index), as the docstring promises.
    rng = np.random.default_rng(100 + k)
    values = _toy(
      lambda s: (rng.integers(-3, 4, s) * np.float32(1)).astype(np.float32)
    )
    values["a"][0, :3] = -0.0
    elig = _toy_eligible(k)
    got = sparse.select_top_k(values, elig, k)
    n = sum(int(np.sum(np.asarray(m))) for m in jax.tree.leaves(got))
    self.assertEqual(n, k)
    assert_trees_equal(self, got, reference_top_k(values, elig, k))

  def test_all_equal_values_fill_in_leaf_order(self):
    values = {"x": np.ones((4, 4), np.float32), "y": np.ones(6, np.float32)}
    elig = {"x": True, "y": True}
    got = sparse.select_top_k(values, elig, 19)
    self.assertTrue(np.all(np.asarray(got["x"])))
    np.testing.assert_array_equal(np.asarray(got["y"]), [1, 1, 1, 0, 0, 0])

  def test_head_never_selected(self):
    p = params()
    delta = random_like(p, 1)
    for key in sparse.HEAD_KEYS:
      if key in delta:  # the head moved most, but is not eligible
        delta[key] = jax.tree.map(lambda x: x + 1e3, delta[key])
    elig = sparse.eligible_mask(p)
    k = sparse.k_from_density(elig, 0.05)
    got = sparse.select_top_k(delta, elig, k)
    self.assertFalse(np.any(leaves_with_paths(elig)["classifier/kernel"]))
    for path, m in leaves_with_paths(got).items():
      if sparse.is_head(path):
        self.assertFalse(np.any(np.asarray(m)), path)
    n = sum(int(np.sum(np.asarray(m))) for m in jax.tree.leaves(got))
    self.assertEqual(n, k)

  @parameterized.parameters("eligible", "select")
  def test_padded_vocab_rows_never_selected(self, where):
    cfg = tiny()
    p = params()
    delta = random_like(p, 2)
    emb = delta["embeddings"]["word_embeddings"]["embedding"]
    emb[cfg.vocab_size :] = 1e3  # padding rows "moved" the most
    if where == "eligible":
      elig = sparse.eligible_mask(p, vocab_size=cfg.vocab_size)
      got = sparse.select_top_k(delta, elig, 500)
    else:
      elig = sparse.eligible_mask(p)
      got = sparse.select_top_k(delta, elig, 500, vocab_size=cfg.vocab_size)
    rows = np.asarray(got["embeddings"]["word_embeddings"]["embedding"])
    self.assertFalse(np.any(rows[cfg.vocab_size :]))
    self.assertEqual(sum(int(np.sum(m)) for m in jax.tree.leaves(got)), 500)

  def test_eligible_flags_and_counts(self):
    cfg = tiny()
    p = params()
    flat = leaves_with_paths(p)
    body = {k: v for k, v in flat.items() if not sparse.is_head(k)}
    n_body = sum(v.size for v in body.values())
    n_pad = (cfg.padded_vocab_size - cfg.vocab_size) * cfg.hidden_size
    elig = sparse.eligible_mask(p, vocab_size=cfg.vocab_size)
    self.assertEqual(sparse.k_from_density(elig, 1.0), n_body - n_pad)
    self.assertEqual(
      sparse.k_from_density(elig, 0.1), int(0.1 * (n_body - n_pad))
    )
    no_ln = leaves_with_paths(sparse.eligible_mask(p, layer_norm=False))
    no_pos = leaves_with_paths(
      sparse.eligible_mask(p, position_embeddings=False)
    )
    no_emb = leaves_with_paths(sparse.eligible_mask(p, embeddings=False))
    for path in flat:
      ln = "LayerNorm" in path
      table = path.startswith("embeddings/") and not ln
      self.assertEqual(
        bool(np.all(no_ln[path])), not ln and not sparse.is_head(path), path
      )
      self.assertEqual(
        bool(np.all(no_emb[path])), not table and not sparse.is_head(path), path
      )
      self.assertEqual(
        bool(np.all(no_pos[path])),
        "position_embeddings" not in path and not sparse.is_head(path),
        path,
      )
    with self.assertRaisesRegex(BistilError, "density"):
      sparse.k_from_density(elig, 0.0)

  @parameterized.parameters(((8, 1, 1),), ((1, 2, 4),))
  def test_sharded_inputs(self, mesh_shape):
    # Counts run jitted on the sharded leaves; the mask keeps the shardings
    # and equals the host result.
    cfg = tiny()
    mesh = partitioning.make_mesh(mesh_shape)
    shardings = partitioning.param_shardings(abstract_params(cfg), mesh)
    p = params()
    rng = np.random.default_rng(3)
    delta = jax.tree.map(
      lambda x: rng.integers(0, 50, np.shape(x)).astype(np.float32), p
    )  # many ties: exercises the tie cut on sharded leaves too
    elig = sparse.eligible_mask(p, vocab_size=cfg.vocab_size)
    k = 777
    want = sparse.select_top_k(delta, elig, k)
    sharded = jax.device_put(delta, shardings)
    got = sparse.select_top_k(sharded, elig, k)
    assert_trees_equal(self, got, want)
    assert_trees_equal(self, want, reference_top_k(delta, elig, k))
    split = False
    for m, d in zip(
      jax.tree.leaves(got), jax.tree.leaves(sharded), strict=True
    ):
      self.assertTrue(m.sharding.is_equivalent_to(d.sharding, d.ndim))
      split |= not d.sharding.is_fully_replicated
    self.assertEqual(split, mesh_shape != (8, 1, 1))

  @parameterized.parameters(0, -3, 10**6)
  def test_bad_k(self, k):
    values = _toy(lambda s: np.ones(s, np.float32))
    with self.assertRaisesRegex(BistilError, "k"):
      sparse.select_top_k(values, _toy_eligible(), k)

  def test_nan_and_mismatched_tree(self):
    values = _toy(lambda s: np.ones(s, np.float32))
    values["a"][1, 1] = np.nan
    with self.assertRaisesRegex(BistilError, "NaN"):
      sparse.select_top_k(values, _toy_eligible(), 3)
    with self.assertRaisesRegex(BistilError, "does not match"):
      sparse.select_top_k(values, {"a": True}, 3)


# ------------------------------------------------------------ masked updates
def _loss(p, target):
  leaves = zip(jax.tree.leaves(p), jax.tree.leaves(target), strict=True)
  return sum(jnp.sum((x - t) ** 2) for x, t in leaves)


class MaskedUpdateTest(parameterized.TestCase):
  def _setup(self):
    cfg = tiny()
    p0 = params()
    elig = sparse.eligible_mask(p0, vocab_size=cfg.vocab_size)
    sel = sparse.select_top_k(random_like(p0, 4), elig, 2000)
    mask = jax.device_get(sel)
    mask["classifier"] = jax.tree.map(
      lambda x: np.ones(np.shape(x), bool), mask["classifier"]
    )
    # -0.0 parameters must survive too (x + 0.0 would make them +0.0).
    bias = p0["encoder"]["layer"]["0"]["output"]["dense"]["bias"]
    bias[~mask["encoder"]["layer"]["0"]["output"]["dense"]["bias"]] = -0.0
    return p0, mask, random_like(p0, 5), elig

  def _train(self, p0, mask, target, steps=5, gate_updates=True):
    """AdamW with decay through the one update path (steps.apply_gradients
    with the mask in the state), or gradients-only gating."""
    tx = optax.adamw(1e-2, weight_decay=0.1)
    state = state_lib.create_state(p0, tx, mask if gate_updates else None)

    @jax.jit
    def step(state, mask):
      g = jax.grad(_loss)(state.params, target)
      if not gate_updates:
        g = sparse.gate(g, mask)
      zero = jnp.zeros((), jnp.float32)
      new, _ = train_steps.apply_gradients(
        state, g, tx=tx, loss=zero, terms={}, attention_mask=zero
      )
      return new

    for _ in range(steps):
      state = step(state, mask)
    return jax.device_get(state.params)

  def test_masked_adamw_freezes_exactly(self):
    p0, mask, target, elig = self._setup()
    p = self._train(p0, mask, target)
    before, after = leaves_with_paths(p0), leaves_with_paths(p)
    for path, m in leaves_with_paths(mask).items():
      m = np.asarray(m)
      b = before[path].view(np.uint32)
      a = after[path].view(np.uint32)
      np.testing.assert_array_equal(a[~m], b[~m], err_msg=path)
      self.assertTrue(np.all(a[m] != b[m]), path)  # selected entries train
      if sparse.is_head(path):
        self.assertTrue(np.all(m), path)  # the head is dense
    self.assertAlmostEqual(
      sparse.density(mask, elig), 2000 / sparse.k_from_density(elig, 1.0)
    )

  def test_gating_gradients_only_leaks_weight_decay(self):
    # The reason for gating the final update: masking gradients before AdamW
    # lets weight decay move frozen entries. Guards the test above.
    p0, mask, target, _ = self._setup()
    p = self._train(p0, mask, target, gate_updates=False)
    m = np.asarray(
      mask["encoder"]["layer"]["0"]["intermediate"]["dense"]["kernel"]
    )
    b = p0["encoder"]["layer"]["0"]["intermediate"]["dense"]["kernel"]
    a = p["encoder"]["layer"]["0"]["intermediate"]["dense"]["kernel"]
    self.assertTrue(np.any(a[~m] != b[~m]))

  def test_l1_to_origin(self):
    p = {"w": jnp.array([1.0, -2.0, 3.0]), "h": jnp.array([[0.5]])}
    o = {"w": jnp.array([0.0, 0.0, 1.0]), "h": jnp.array([[0.0]])}
    m = {"w": np.array([True, False, True]), "h": True}
    got = sparse.l1_to_origin(p, o, m, 0.3)
    np.testing.assert_allclose(got, 0.3 * (1.0 + 2.0 + 0.5) / 3, rtol=1e-6)
    g = jax.grad(lambda p: sparse.l1_to_origin(p, o, m, 0.3))(p)
    self.assertEqual(float(g["w"][1]), 0.0)  # unselected: no gradient
    m_none = jax.tree.map(lambda x: False, m)
    self.assertEqual(float(sparse.l1_to_origin(p, o, m_none, 0.3)), 0.0)


if __name__ == "__main__":
  absltest.main()
