"""SFT dirs: export, save, load, apply, compose, densify, fingerprints."""

import json
import os
import tempfile

import jax
import numpy as np
from absl.testing import absltest, parameterized

from bistil_jax import partitioning, sparse
from bistil_jax.checkpoint import sft as sft_lib
from bistil_jax.errors import BistilError
from bistil_jax.model.encoder import abstract_params
from tests.sparse_test import (
  LABELS,
  assert_trees_equal,
  leaves_with_paths,
  params,
  random_like,
  tiny,
)


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
    sft = sft_lib.sft_from_params(trained, base, sel, kind="task", config=cfg)
    self.assertEqual(
      sft_lib.sft_from_params(trained, base, kind="task").nnz, sft.nnz
    )
    self.assertGreater(sft.nnz, 1000)
    self.assertEqual(
      sorted(sft.dense), ["classifier/bias", "classifier/kernel"]
    )
    path = os.path.join(tempfile.mkdtemp(), "sft")
    sft_lib.save_sft(path, sft)
    self.assertEqual(sorted(os.listdir(path)), ["sft.json", "sft.safetensors"])
    self.assertEqual(os.listdir(os.path.dirname(path)), ["sft"])  # no temp left
    loaded = sft_lib.load_sft(path)
    with open(os.path.join(path, "sft.json")) as f:
      meta = json.load(f)
    self.assertEqual(meta["kind"], "task")
    self.assertEqual(meta["label_names"], list(cfg.label_names))
    self.assertEqual(meta["num_labels"], LABELS)
    self.assertEqual(
      meta["base_fingerprint"],
      sft_lib.params_fingerprint(base, vocab_size=cfg.vocab_size),
    )
    for key, (idx, val) in loaded.diffs.items():
      self.assertEqual(idx.dtype, np.int64)
      self.assertTrue(np.all(np.diff(idx) > 0), key)
      np.testing.assert_array_equal(val, sft.diffs[key][1])
    assert_trees_equal(self, sft_lib.apply_sft(base, loaded), trained, True)

  def test_apply_keeps_shardings(self):
    cfg, base, sel, trained = sft_case()
    sft = sft_lib.sft_from_params(trained, base, sel, kind="task", config=cfg)
    mesh = partitioning.make_mesh((1, 2, 4))
    shardings = partitioning.param_shardings(abstract_params(cfg), mesh)
    out = sft_lib.apply_sft(jax.device_put(base, shardings), sft)
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
      sft = sft_lib.sft_from_params(trained, base, sel, kind="task")
    idx, _ = sft.diffs["encoder/layer/1/output/dense/kernel"]
    np.testing.assert_array_equal(idx, np.flatnonzero(m.reshape(-1)))

  def test_compose_equals_sequential(self):
    cfg, base, sel_a, trained_a = sft_case(seed=0)
    a = sft_lib.sft_from_params(trained_a, base, sel_a, kind="language")
    mid = sft_lib.apply_sft(base, a)
    _, _, sel_b, _ = sft_case(seed=7)
    trained_b = perturb(mid, sel_b, 7)
    trained_b["classifier"] = params(seed=2)["classifier"]
    b = sft_lib.sft_from_params(trained_b, mid, sel_b, kind="task")
    seq = sft_lib.apply_sft(mid, b)
    ab = sft_lib.compose(a, b)
    self.assertEqual(ab.meta["base_fingerprint"], a.meta["base_fingerprint"])
    comp = sft_lib.apply_sft(base, ab)
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

  def test_two_sfts_of_the_bare_base_compose_and_a_stranger_is_refused(self):
    # LT-SFT composition: a language SFT and a task SFT, each made for the
    # bare base, applied one after the other.
    cfg, base, sel_a, trained_a = sft_case(seed=0)
    lang = sft_lib.sft_from_params(trained_a, base, sel_a, kind="language")
    _, _, sel_b, trained_b = sft_case(seed=7)
    task = sft_lib.sft_from_params(trained_b, base, sel_b, kind="task")
    mid = sft_lib.apply_sft(base, lang)
    with self.assertRaisesRegex(BistilError, "SFT was made for base model"):
      sft_lib.apply_sft(mid, task)  # without the base: not its model
    both = sft_lib.apply_sft(mid, task, base=base)
    want = jax.tree.map(
      lambda b, x, y: b + (x - b) + (y - b), base, trained_a, trained_b
    )
    want["classifier"] = trained_b["classifier"]
    for path, x in leaves_with_paths(both).items():
      np.testing.assert_allclose(
        x, leaves_with_paths(want)[path], atol=1e-6, err_msg=path
      )
    stranger = params(seed=4)
    with self.assertRaisesRegex(BistilError, "SFT was made for base model"):
      sft_lib.apply_sft(
        sft_lib.apply_sft(stranger, lang, check_fingerprint=False),
        task,
        base=stranger,
      )

  def test_densify_matches_apply_without_dense(self):
    cfg, base, sel, trained = sft_case()
    sft = sft_lib.sft_from_params(trained, base, sel, kind="language")
    delta = sft_lib.densify(sft, base)
    self.assertFalse(np.any(delta["classifier"]["kernel"]))
    want = sft_lib.apply_sft(base, sft, with_dense=False)
    assert_trees_equal(self, jax.tree.map(np.add, base, delta), want, True)
    assert_trees_equal(self, want["classifier"], base["classifier"])

  def test_fingerprint(self):
    cfg, base, _, _ = sft_case()
    fp = sft_lib.params_fingerprint(base, vocab_size=cfg.vocab_size)
    self.assertTrue(fp.startswith("sha256:"))
    other_head = params()
    other_head["classifier"] = params(seed=3)["classifier"]
    self.assertEqual(
      sft_lib.params_fingerprint(other_head, vocab_size=cfg.vocab_size), fp
    )
    pad = params()
    pad["embeddings"]["word_embeddings"]["embedding"][-1] = 0.0
    self.assertEqual(
      sft_lib.params_fingerprint(pad, vocab_size=cfg.vocab_size), fp
    )
    self.assertNotEqual(
      sft_lib.params_fingerprint(pad), sft_lib.params_fingerprint(base)
    )
    one_ulp = params()
    x = one_ulp["encoder"]["layer"]["1"]["attention"]["self"]["key"]["kernel"]
    x[3, 4] = np.nextafter(x[3, 4], np.float32(1))
    self.assertNotEqual(
      sft_lib.params_fingerprint(one_ulp, vocab_size=cfg.vocab_size), fp
    )
    mesh = partitioning.make_mesh((1, 2, 4))
    on_device = jax.device_put(
      base, partitioning.param_shardings(abstract_params(cfg), mesh)
    )
    self.assertEqual(
      sft_lib.params_fingerprint(on_device, vocab_size=cfg.vocab_size), fp
    )

  def test_apply_errors(self):
    cfg, base, sel, trained = sft_case()
    sft = sft_lib.sft_from_params(trained, base, sel, kind="task", config=cfg)
    other = params(seed=4)
    with self.assertRaisesRegex(
      BistilError, "SFT was made for base model sha256:.*this model is sha256:"
    ):
      sft_lib.apply_sft(other, sft)
    sft_lib.apply_sft(other, sft, check_fingerprint=False)
    bad = sft_lib.SFT(dict(sft.diffs), dict(sft.dense), dict(sft.meta))
    bad.dense["classifier/kernel"] = np.zeros((LABELS + 1, 32), np.float32)
    with self.assertRaisesRegex(BistilError, "classifier/kernel.*shape"):
      sft_lib.apply_sft(base, bad)
    sft_lib.apply_sft(base, bad, with_dense=False)
    bad = sft_lib.SFT({"nope/kernel": (np.array([0]), np.ones(1, np.float32))})
    with self.assertRaisesRegex(BistilError, "nope/kernel"):
      sft_lib.apply_sft(base, bad)
    key = "encoder/layer/0/output/dense/bias"
    bad = sft_lib.SFT({key: (np.array([0, 32]), np.ones(2, np.float32))})
    with self.assertRaisesRegex(BistilError, "out of range"):
      sft_lib.apply_sft(base, bad)
    bad = sft_lib.SFT({key: (np.array([3, 1]), np.ones(2, np.float32))})
    with self.assertRaisesRegex(BistilError, "sorted"):
      sft_lib.apply_sft(base, bad)

  def test_save_refuses_and_overwrites(self):
    cfg, base, sel, trained = sft_case()
    sft = sft_lib.sft_from_params(trained, base, sel, kind="task")
    path = tempfile.mkdtemp()
    with open(os.path.join(path, "keep.txt"), "w") as f:
      f.write("x")
    with self.assertRaisesRegex(BistilError, "not empty"):
      sft_lib.save_sft(path, sft)
    self.assertEqual(os.listdir(path), ["keep.txt"])
    sft_lib.save_sft(path, sft, overwrite=True)
    self.assertEqual(sorted(os.listdir(path)), ["sft.json", "sft.safetensors"])
    bad = sft_lib.SFT(sft.diffs, sft.dense, {"kind": object()})
    with self.assertRaisesRegex(BistilError, "JSON"):
      sft_lib.save_sft(os.path.join(tempfile.mkdtemp(), "x"), bad)

  def test_load_malformed_dirs(self):
    from safetensors.numpy import save_file

    with self.assertRaisesRegex(BistilError, "does not exist"):
      sft_lib.load_sft("/nonexistent/sft")
    empty = tempfile.mkdtemp()
    with self.assertRaisesRegex(BistilError, "no SFT"):
      sft_lib.load_sft(empty)

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
        sft_lib.load_sft(write(tensors, meta))
    d = write({"a.idx": idx, "a.val": val}, good)
    with self.assertRaisesRegex(BistilError, "keep_ids"):
      sft_lib.load_sft(d, keep_ids=np.arange(3))


if __name__ == "__main__":
  absltest.main()
