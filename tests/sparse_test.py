"""LT-SFT: selection, masked updates, SFT files and composable-sft import."""

import functools
import json
import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from absl.testing import absltest, parameterized

from bistil_jax import partitioning, sparse
from bistil_jax.errors import BistilError
from bistil_jax.model.config import preset
from bistil_jax.model.encoder import abstract_params
from bistil_jax.train import state as state_lib
from bistil_jax.train import steps as train_steps

RAN = []


class Payload:
  """A pickle that would run code when loaded unsafely."""

  def __reduce__(self):
    return (RAN.append, ("ran",))


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
  paths, leaves, _ = sparse._flatten(tree)
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
    shardings = partitioning.param_shardings(cfg, mesh)
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


# --------------------------------------------------------------------- SFTs
def perturb(base, mask, seed):
  """base + a change on mask entries for which float32 Δ is exact.

  |p| <= |b| / 2 (Fast2Sum: t - b is exact) or b == 0; tiny |b| left alone.
  """
  rng = np.random.default_rng(seed)

  def one(b, m):
    u = rng.uniform(0.1, 0.5, b.shape) * rng.choice([-1, 1], b.shape)
    p = np.where(np.abs(b) > 1e-5, b * u, 0.0)
    p = np.where(b == 0, 0.01 * rng.standard_normal(b.shape), p)
    return (b + np.where(np.asarray(m), p, 0.0).astype(b.dtype)).astype(b.dtype)

  return jax.tree.map(one, base, mask)


def sft_case(seed=0, k=1500):
  cfg = tiny()
  base = params()
  elig = sparse.eligible_mask(base, vocab_size=cfg.vocab_size)
  sel = jax.device_get(sparse.select_top_k(random_like(base, seed), elig, k))
  trained = perturb(base, sel, seed)
  trained["classifier"] = params(seed=1)["classifier"]  # a new dense head
  return cfg, base, sel, trained


class SFTTest(parameterized.TestCase):
  def test_save_load_apply_roundtrip(self):
    cfg, base, sel, trained = sft_case()
    sft = sparse.sft_from_params(trained, base, sel, kind="task", config=cfg)
    self.assertEqual(
      sparse.sft_from_params(trained, base, kind="task").nnz, sft.nnz
    )
    self.assertGreater(sft.nnz, 1000)
    self.assertEqual(
      sorted(sft.dense), ["classifier/bias", "classifier/kernel"]
    )
    path = os.path.join(tempfile.mkdtemp(), "sft")
    sparse.save_sft(path, sft)
    self.assertEqual(sorted(os.listdir(path)), ["sft.json", "sft.safetensors"])
    self.assertEqual(os.listdir(os.path.dirname(path)), ["sft"])  # no temp left
    loaded = sparse.load_sft(path)
    with open(os.path.join(path, "sft.json")) as f:
      meta = json.load(f)
    self.assertEqual(meta["kind"], "task")
    self.assertEqual(meta["label_names"], list(cfg.label_names))
    self.assertEqual(meta["num_labels"], LABELS)
    self.assertEqual(
      meta["base_fingerprint"],
      sparse.params_fingerprint(base, vocab_size=cfg.vocab_size),
    )
    for key, (idx, val) in loaded.diffs.items():
      self.assertEqual(idx.dtype, np.int64)
      self.assertTrue(np.all(np.diff(idx) > 0), key)
      np.testing.assert_array_equal(val, sft.diffs[key][1])
    assert_trees_equal(self, sparse.apply_sft(base, loaded), trained, True)

  def test_apply_keeps_shardings(self):
    cfg, base, sel, trained = sft_case()
    sft = sparse.sft_from_params(trained, base, sel, kind="task", config=cfg)
    mesh = partitioning.make_mesh((1, 2, 4))
    shardings = partitioning.param_shardings(cfg, mesh)
    out = sparse.apply_sft(jax.device_put(base, shardings), sft)
    for x, s in zip(
      jax.tree.leaves(out), jax.tree.leaves(shardings), strict=True
    ):
      self.assertTrue(x.sharding.is_equivalent_to(s, x.ndim))
    assert_trees_equal(self, jax.device_get(out), trained, True)

  def test_moves_outside_mask_are_dropped(self):
    cfg, base, sel, trained = sft_case()
    kernel = trained["encoder"]["layer"]["1"]["output"]["dense"]["kernel"]
    m = sel["encoder"]["layer"]["1"]["output"]["dense"]["kernel"]
    kernel[~m] += 1.0
    with self.assertLogs(level="WARNING"):
      sft = sparse.sft_from_params(trained, base, sel, kind="task")
    idx, _ = sft.diffs["encoder/layer/1/output/dense/kernel"]
    np.testing.assert_array_equal(idx, np.flatnonzero(m.reshape(-1)))

  def test_compose_equals_sequential(self):
    cfg, base, sel_a, trained_a = sft_case(seed=0)
    a = sparse.sft_from_params(trained_a, base, sel_a, kind="language")
    mid = sparse.apply_sft(base, a)
    _, _, sel_b, _ = sft_case(seed=7)
    trained_b = perturb(mid, sel_b, 7)
    trained_b["classifier"] = params(seed=2)["classifier"]
    b = sparse.sft_from_params(trained_b, mid, sel_b, kind="task")
    seq = sparse.apply_sft(mid, b)
    ab = sparse.compose(a, b)
    self.assertEqual(ab.meta["base_fingerprint"], a.meta["base_fingerprint"])
    comp = sparse.apply_sft(base, ab)
    both = jax.tree.map(
      lambda x, y: np.asarray(x) & np.asarray(y), sel_a, sel_b
    )
    self.assertTrue(any(np.any(x) for x in jax.tree.leaves(both)))
    for path, x in leaves_with_paths(comp).items():
      y = leaves_with_paths(seq)[path]
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9, err_msg=path)
      if not sparse.is_head(path):  # exact wherever only one SFT touches
        one = ~leaves_with_paths(both)[path]
        np.testing.assert_array_equal(x[one], y[one], err_msg=path)
    assert_trees_equal(self, comp["classifier"], trained_b["classifier"])

  def test_densify_matches_apply_without_dense(self):
    cfg, base, sel, trained = sft_case()
    sft = sparse.sft_from_params(trained, base, sel, kind="language")
    delta = sparse.densify(sft, base)
    self.assertFalse(np.any(delta["classifier"]["kernel"]))
    want = sparse.apply_sft(base, sft, with_dense=False)
    assert_trees_equal(self, jax.tree.map(np.add, base, delta), want, True)
    assert_trees_equal(self, want["classifier"], base["classifier"])

  def test_fingerprint(self):
    cfg, base, _, _ = sft_case()
    fp = sparse.params_fingerprint(base, vocab_size=cfg.vocab_size)
    self.assertTrue(fp.startswith("sha256:"))
    other_head = params()
    other_head["classifier"] = params(seed=3)["classifier"]
    self.assertEqual(
      sparse.params_fingerprint(other_head, vocab_size=cfg.vocab_size), fp
    )
    pad = params()
    pad["embeddings"]["word_embeddings"]["embedding"][-1] = 0.0
    self.assertEqual(
      sparse.params_fingerprint(pad, vocab_size=cfg.vocab_size), fp
    )
    self.assertNotEqual(
      sparse.params_fingerprint(pad), sparse.params_fingerprint(base)
    )
    one_ulp = params()
    x = one_ulp["encoder"]["layer"]["1"]["attention"]["self"]["key"]["kernel"]
    x[3, 4] = np.nextafter(x[3, 4], np.float32(1))
    self.assertNotEqual(
      sparse.params_fingerprint(one_ulp, vocab_size=cfg.vocab_size), fp
    )
    mesh = partitioning.make_mesh((1, 2, 4))
    on_device = jax.device_put(base, partitioning.param_shardings(cfg, mesh))
    self.assertEqual(
      sparse.params_fingerprint(on_device, vocab_size=cfg.vocab_size), fp
    )

  def test_apply_errors(self):
    cfg, base, sel, trained = sft_case()
    sft = sparse.sft_from_params(trained, base, sel, kind="task", config=cfg)
    other = params(seed=4)
    with self.assertRaisesRegex(
      BistilError, "SFT was made for base model sha256:.*this model is sha256:"
    ):
      sparse.apply_sft(other, sft)
    sparse.apply_sft(other, sft, check_fingerprint=False)
    bad = sparse.SFT(dict(sft.diffs), dict(sft.dense), dict(sft.meta))
    bad.dense["classifier/kernel"] = np.zeros((LABELS + 1, 32), np.float32)
    with self.assertRaisesRegex(BistilError, "classifier/kernel.*shape"):
      sparse.apply_sft(base, bad)
    sparse.apply_sft(base, bad, with_dense=False)
    bad = sparse.SFT({"nope/kernel": (np.array([0]), np.ones(1, np.float32))})
    with self.assertRaisesRegex(BistilError, "nope/kernel"):
      sparse.apply_sft(base, bad)
    key = "encoder/layer/0/output/dense/bias"
    bad = sparse.SFT({key: (np.array([0, 32]), np.ones(2, np.float32))})
    with self.assertRaisesRegex(BistilError, "out of range"):
      sparse.apply_sft(base, bad)
    bad = sparse.SFT({key: (np.array([3, 1]), np.ones(2, np.float32))})
    with self.assertRaisesRegex(BistilError, "sorted"):
      sparse.apply_sft(base, bad)

  def test_save_refuses_and_overwrites(self):
    cfg, base, sel, trained = sft_case()
    sft = sparse.sft_from_params(trained, base, sel, kind="task")
    path = tempfile.mkdtemp()
    with open(os.path.join(path, "keep.txt"), "w") as f:
      f.write("x")
    with self.assertRaisesRegex(BistilError, "not empty"):
      sparse.save_sft(path, sft)
    self.assertEqual(os.listdir(path), ["keep.txt"])
    sparse.save_sft(path, sft, overwrite=True)
    self.assertEqual(sorted(os.listdir(path)), ["sft.json", "sft.safetensors"])
    bad = sparse.SFT(sft.diffs, sft.dense, {"kind": object()})
    with self.assertRaisesRegex(BistilError, "JSON"):
      sparse.save_sft(os.path.join(tempfile.mkdtemp(), "x"), bad)

  def test_load_malformed_dirs(self):
    from safetensors.numpy import save_file

    with self.assertRaisesRegex(BistilError, "does not exist"):
      sparse.load_sft("/nonexistent/sft")
    empty = tempfile.mkdtemp()
    with self.assertRaisesRegex(BistilError, "no SFT"):
      sparse.load_sft(empty)

    def write(tensors, meta):
      d = tempfile.mkdtemp()
      save_file(tensors, os.path.join(d, "sft.safetensors"))
      with open(os.path.join(d, "sft.json"), "w") as f:
        f.write(meta)
      return d

    good = json.dumps({"format": "bistil-sft", "version": 1})
    idx, val = np.array([0, 2], np.int64), np.ones(2, np.float32)
    cases = [
      ({"a.idx": idx, "a.val": val}, "{not json", "cannot read"),
      ({"a.idx": idx, "a.val": val}, json.dumps({"kind": "x"}), "sidecar"),
      ({"a.idx": idx}, good, "lacks"),
      ({"a.idx": idx[::-1].copy(), "a.val": val}, good, "sorted"),
      ({"a.idx": idx.astype(np.int32), "a.val": val}, good, "dtype"),
      ({"a.weird": val}, good, "unexpected"),
    ]
    for tensors, meta, needle in cases:
      with self.assertRaisesRegex(BistilError, needle):
        sparse.load_sft(write(tensors, meta))
    d = write({"a.idx": idx, "a.val": val}, good)
    with self.assertRaisesRegex(BistilError, "keep_ids"):
      sparse.load_sft(d, keep_ids=np.arange(3))


# ------------------------------------------------------------ composable-sft
OLD_VOCAB = 400


def encode(dense):
  """composable-sft's (bistil's) encode_tensor, column-major flat indices."""
  t = dense.to_sparse().coalesce()
  multipliers = np.cumprod([1] + list(t.size())[:-1], dtype=np.int64)
  coords = t.indices().numpy().astype(np.int64)
  flat = multipliers @ coords
  perm = np.argsort(flat, kind="stable")
  flat = flat[perm]
  steps = [flat[0]] + (flat[1:] - flat[:-1]).tolist()  # np.int64 first
  return {"size": t.size(), "index_steps": steps, "values": t.values()[perm]}


def sparse_tensor(shape, seed, density=0.2):
  g = torch.Generator().manual_seed(seed)
  x = torch.randn(*shape, generator=g)
  return x * (torch.rand(*shape, generator=g) < density)


def default_tensors():
  """A language-SFT-like set of diffs plus task-SFT-like abs tensors."""
  diffs = {
    # Non-square, transposed: a row/column-major mix-up cannot pass.
    "bert.encoder.layer.0.intermediate.dense.weight": sparse_tensor(
      (64, 32), 0
    ),
    # Untrimmed vocabulary: trimmed with keep_ids on load.
    "bert.embeddings.word_embeddings.weight": sparse_tensor((OLD_VOCAB, 32), 1),
    "encoder.layer.1.output.LayerNorm.bias": sparse_tensor((32,), 2, 0.5),
    "bert.encoder.layer.1.attention.output.LayerNorm.gamma": sparse_tensor(
      (32,), 3, 0.5
    ),  # legacy leaf name
  }
  g = torch.Generator().manual_seed(9)
  absolute = {
    "classifier.weight": torch.randn(LABELS, 32, generator=g),
    "classifier.bias": torch.randn(LABELS, generator=g),
    # MLM head of a language SFT: skipped with a log line.
    "cls.predictions.transform.dense.weight": torch.randn(32, 32, generator=g),
  }
  return diffs, absolute


def write_composable(diffs, absolute, fmt="diffs", **extra):
  enc = {k: encode(v) for k, v in diffs.items()}
  if fmt == "diffs":
    blob = {"diffs": enc, "abs": absolute, "block_sparses": {}, **extra}
  else:  # older composable-sft layout
    blob = {"body": enc, "head": absolute}
  d = tempfile.mkdtemp()
  torch.save(blob, os.path.join(d, "pytorch_diff.bin"))
  return d


class ComposableTest(parameterized.TestCase):
  @parameterized.parameters("diffs", "body")
  def test_loads_and_applies(self, fmt):
    cfg = tiny()
    base = params()
    keep_ids = np.random.default_rng(0).permutation(OLD_VOCAB)[: cfg.vocab_size]
    diffs, absolute = default_tensors()
    d = write_composable(diffs, absolute, fmt)
    with self.assertLogs(level="INFO") as logs:
      sft = sparse.load_sft(d, config=cfg, keep_ids=keep_ids)
    self.assertTrue(any("cls.predictions" in m for m in logs.output))
    out = sparse.apply_sft(base, sft)

    # Expected values, computed densely and independently.
    want = params()
    layer = want["encoder"]["layer"]
    layer["0"]["intermediate"]["dense"]["kernel"] += (
      diffs["bert.encoder.layer.0.intermediate.dense.weight"].numpy().T
    )
    emb = want["embeddings"]["word_embeddings"]["embedding"]
    old = diffs["bert.embeddings.word_embeddings.weight"].numpy()
    emb[: cfg.vocab_size] += old[keep_ids]
    layer["1"]["output"]["LayerNorm"]["bias"] += diffs[
      "encoder.layer.1.output.LayerNorm.bias"
    ].numpy()
    layer["1"]["attention"]["output"]["LayerNorm"]["scale"] += diffs[
      "bert.encoder.layer.1.attention.output.LayerNorm.gamma"
    ].numpy()
    want["classifier"]["kernel"] = absolute["classifier.weight"].numpy().T
    want["classifier"]["bias"] = absolute["classifier.bias"].numpy()
    assert_trees_equal(self, out, want, True)
    # Language-SFT style: body only.
    body_only = sparse.apply_sft(base, sft, with_dense=False)
    assert_trees_equal(self, body_only["classifier"], base["classifier"])
    # The file path itself works too.
    again = sparse.load_sft(
      os.path.join(d, "pytorch_diff.bin"), config=cfg, keep_ids=keep_ids
    )
    self.assertEqual(again.nnz, sft.nnz)

  def test_untrimmed_vocab_and_prefix_free(self):
    cfg = tiny(head="none")  # bare model: our names carry no "bert." prefix
    base = params("none")
    diffs, absolute = default_tensors()
    diffs["bert.embeddings.word_embeddings.weight"] = sparse_tensor(
      (cfg.vocab_size, 32), 5
    )
    with self.assertRaisesRegex(BistilError, "classifier.weight"):
      sparse.load_sft(write_composable(diffs, absolute), config=cfg)
    sft = sparse.load_sft(write_composable(diffs, {}), config=cfg)
    out = sparse.apply_sft(base, sft)
    emb = base["embeddings"]["word_embeddings"]["embedding"]
    np.testing.assert_array_equal(
      out["embeddings"]["word_embeddings"]["embedding"][: cfg.vocab_size],
      emb[: cfg.vocab_size]
      + diffs["bert.embeddings.word_embeddings.weight"].numpy(),
    )

  def test_malformed(self):
    cfg = tiny()
    keep = np.arange(cfg.vocab_size)
    diffs, absolute = default_tensors()
    d = write_composable(diffs, absolute)
    with self.assertRaisesRegex(BistilError, "needs the model config"):
      sparse.load_sft(d)
    with self.assertRaisesRegex(BistilError, "word_embeddings.*shape"):
      sparse.load_sft(d, config=cfg)  # 400 rows and no keep_ids
    with self.assertRaisesRegex(BistilError, "keep_ids has"):
      sparse.load_sft(d, config=cfg, keep_ids=np.arange(10))
    with self.assertRaisesRegex(BistilError, "distinct"):
      sparse.load_sft(d, config=cfg, keep_ids=np.zeros(cfg.vocab_size, int))

    def bad(needle, new_diffs=None, new_abs=None, **extra):
      diffs, absolute = default_tensors()
      diffs.update(new_diffs or {})
      absolute.update(new_abs or {})
      with self.assertRaisesRegex(BistilError, needle):
        sparse.load_sft(
          write_composable(diffs, absolute, **extra), config=cfg, keep_ids=keep
        )

    name = "bert.encoder.layer.7.output.dense.weight"  # only 2 layers
    bad(name, {name: sparse_tensor((32, 64), 1)})
    bad("bert.foo.weight", {"bert.foo.weight": sparse_tensor((4,), 1, 1.0)})
    name = "bert.encoder.layer.0.output.dense.weight"  # [32, 64] in torch
    bad(f"{name}.*shape", {name: sparse_tensor((64, 32), 1)})
    bad("block-sparse", block_sparses={"x": {}})
    bad(
      "classifier.weight.*shape",
      new_abs={"classifier.weight": torch.ones(5, 32)},
    )
    # Out-of-range and unsorted index steps.
    name = "bert.encoder.layer.0.output.dense.bias"
    for steps in ([3, 40], [5, -2]):
      diffs, absolute = default_tensors()
      blob = {
        "diffs": {k: encode(v) for k, v in diffs.items()},
        "abs": absolute,
      }
      blob["diffs"][name] = {
        "size": torch.Size([32]),
        "index_steps": steps,
        "values": torch.ones(2),
      }
      path = tempfile.mkdtemp()
      torch.save(blob, os.path.join(path, "pytorch_diff.bin"))
      with self.assertRaisesRegex(BistilError, name):
        sparse.load_sft(path, config=cfg, keep_ids=keep)
    garbage = tempfile.mkdtemp()
    with open(os.path.join(garbage, "pytorch_diff.bin"), "wb") as f:
      f.write(b"not a pickle")
    with self.assertRaisesRegex(BistilError, "corrupt or unreadable"):
      sparse.load_sft(garbage, config=cfg)

  def test_a_pickle_with_code_is_refused_for_safety(self):
    d = tempfile.mkdtemp()
    diffs, absolute = default_tensors()
    blob = {"diffs": {k: encode(v) for k, v in diffs.items()}, "abs": absolute}
    blob["abs"]["evil"] = Payload()
    torch.save(blob, os.path.join(d, "pytorch_diff.bin"))
    with self.assertRaises(BistilError) as cm:
      sparse.load_sft(d, config=tiny())
    text = str(cm.exception)
    self.assertRegex(
      text,
      "pytorch_diff.bin holds Python objects other than tensors and "
      "numbers; it is refused for safety",
    )
    self.assertNotIn("weights_only", text)
    self.assertNotIn("corrupt", text)
    self.assertLen(text.splitlines(), 1)
    self.assertEqual(RAN, [])


if __name__ == "__main__":
  absltest.main()
