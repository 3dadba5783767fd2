"""Tests for bistil_jax.losses against NumPy references and hand values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from bistil_jax import losses
from bistil_jax.errors import BistilError

MASK_VALUE = -1e9  # what the encoder writes into padded vocabulary columns


# ----------------------------------------------------------------------------
# NumPy references (float64, loops kept obvious).
# ----------------------------------------------------------------------------


def np_log_softmax(x, cols=None):
  """log_softmax over the last axis restricted to `cols` (bool [c])."""
  x = np.asarray(x, np.float64)
  if cols is not None:
    x = x[..., cols]
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_soft_ce(s, t, temp, rows=None, cols=None, kl=False):
  ls = np_log_softmax(np.asarray(s, np.float64) / temp, cols)
  lt = np_log_softmax(np.asarray(t, np.float64) / temp, cols)
  pt = np.exp(lt)
  per_row = (pt * (lt - ls)).sum(-1) if kl else -(pt * ls).sum(-1)
  if rows is None:
    return per_row.mean(), per_row.size
  return per_row[rows].mean(), int(rows.sum())


def np_hidden_mse(hs, ht, mask=None, proj=None):
  hs = np.asarray(hs, np.float64)
  ht = np.asarray(ht, np.float64)
  if proj is not None:
    ht = ht @ np.asarray(proj, np.float64)
  total, count = 0.0, 0
  for b in range(hs.shape[0]):
    for i in range(hs.shape[1]):
      if mask is None or mask[b, i]:
        total += ((hs[b, i] - ht[b, i]) ** 2).sum()
        count += hs.shape[2]
  return total / count, count


def np_attention_mse(a_s, a_t, key_mask, query_mask=None):
  a_s = np.asarray(a_s, np.float64)
  a_t = np.asarray(a_t, np.float64)
  bsz, heads, q, k = a_s.shape
  total, count = 0.0, 0
  for b in range(bsz):
    for h in range(heads):
      for i in range(q):
        if query_mask is not None and not query_mask[b, i]:
          continue
        for j in range(k):
          if key_mask[b, j]:
            total += (a_s[b, h, i, j] - a_t[b, h, i, j]) ** 2
            count += 1
  return total / count, count


def np_token_ce(logits, labels, ignore=-100):
  lp = np_log_softmax(logits)
  vals = [-lp[idx][lab] for idx, lab in np.ndenumerate(labels) if lab != ignore]
  return (float(np.mean(vals)) if vals else 0.0), len(vals)


def jit_grad(fn, **kw):
  # Jitted: one compile is faster than eager dispatch of every op.
  return jax.jit(jax.grad(fn, **kw))


def jit_value_and_grad(fn, **kw):
  return jax.jit(jax.value_and_grad(fn, **kw))


def random_probs(rng, shape):
  x = rng.normal(size=shape) * 2
  e = np.exp(x - x.max(-1, keepdims=True))
  return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def padding_mask(lengths, length):
  return np.arange(length)[None, :] < np.asarray(lengths)[:, None]


# ----------------------------------------------------------------------------
# Tests.
# ----------------------------------------------------------------------------


class LayerMapsTest(parameterized.TestCase):
  @parameterized.parameters(
    (
      12,
      6,
      ((0, 0), (1, 2), (2, 4), (3, 6), (4, 8), (5, 10), (6, 12)),
      ((0, 1), (1, 3), (2, 5), (3, 7), (4, 9), (5, 11)),
    ),
    (
      12,
      4,
      ((0, 0), (1, 3), (2, 6), (3, 9), (4, 12)),
      ((0, 2), (1, 5), (2, 8), (3, 11)),
    ),
    (
      12,
      12,
      tuple((i, i) for i in range(13)),
      tuple((i, i) for i in range(12)),
    ),
  )
  def test_maps(self, lt, ls, hidden, attention):
    self.assertEqual(losses.layer_maps(lt, ls), (hidden, attention))

  @parameterized.parameters((12, 5), (12, 0), (0, 3), (6, 12))
  def test_bad_counts(self, lt, ls):
    with self.assertRaises(BistilError):
      losses.layer_maps(lt, ls)


class MaskedSumTest(absltest.TestCase):
  def test_leading_mask_broadcast(self):
    v = np.arange(12, dtype=np.float32).reshape(2, 3, 2)
    m = np.array([[True, False, True], [False, False, True]])
    term = losses.masked_sum(v, m)
    self.assertEqual(float(term.total), 0 + 1 + 4 + 5 + 10 + 11)
    self.assertEqual(float(term.count), 6)
    self.assertAlmostEqual(float(losses.masked_mean(v, m)), 31 / 6, 5)

  def test_float32_sum_of_bfloat16(self):
    # 1 + 1 + ... stalls at 256 in bfloat16.
    term = losses.masked_sum(jnp.ones((1000,), jnp.bfloat16))
    self.assertEqual(term.total.dtype, jnp.float32)
    self.assertEqual((float(term.total), float(term.count)), (1000.0, 1000.0))

  def test_empty_is_zero(self):
    term = losses.masked_sum(jnp.full((3,), jnp.nan), jnp.zeros(3, bool))
    self.assertEqual((float(term.total), float(term.count)), (0.0, 0.0))
    self.assertEqual(float(term.mean), 0.0)

  def test_bad_mask_shape(self):
    with self.assertRaises(BistilError):
      losses.masked_sum(jnp.zeros((2, 3)), jnp.ones((3,), bool))


class SoftCrossEntropyTest(parameterized.TestCase):
  def test_by_hand(self):
    # T=2: teacher [0, 2 ln 3] -> p_T = [1/4, 3/4].
    # Row 0: student [0, 0] -> p_S = [1/2, 1/2]; CE = ln 2.
    # Row 1: student [2 ln 3, 0] -> p_S = [3/4, 1/4];
    #   CE = -(1/4 ln 3/4 + 3/4 ln 1/4).
    # Row 2 is masked out and holds garbage; column 2 is padded vocab.
    l3 = 2 * math.log(3)
    t = np.array([[0, l3, MASK_VALUE], [0, l3, MASK_VALUE], [9, 0, 5]])
    s = np.array([[0, 0, MASK_VALUE], [l3, 0, MASK_VALUE], [0, 9, -5]])
    rows = np.array([True, True, False])
    ce1 = -(0.25 * math.log(0.75) + 0.75 * math.log(0.25))
    want = (math.log(2) + ce1) / 2
    kl0 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    kl1 = 0.25 * math.log(0.25 / 0.75) + 0.75 * math.log(0.75 / 0.25)
    kl_want = (kl0 + kl1) / 2
    cols = np.array([True, True, False])
    for lm in (None, cols):
      term = losses.soft_cross_entropy(
        s, t, temperature=2.0, mask=rows, logits_mask=lm
      )
      self.assertAlmostEqual(float(term.mean), want, places=6)
      self.assertEqual(float(term.count), 2)
      kl = losses.kl_divergence(s, t, 2.0, mask=rows, logits_mask=lm)
      self.assertAlmostEqual(float(kl.mean), kl_want, places=6)
    t2 = losses.soft_cross_entropy(
      s, t, 2.0, mask=rows, logits_mask=cols, scale_by_t2=True
    )
    self.assertAlmostEqual(float(t2.mean), 4 * want, places=5)

  @parameterized.product(
    temperature=[1.0, 2.0, 4.5],
    kl=[False, True],
    masked=[False, True],
  )
  def test_against_numpy(self, temperature, kl, masked):
    rng = np.random.default_rng(0)
    b, l, c, pad = 3, 5, 11, 3
    s = rng.normal(size=(b, l, c)).astype(np.float32) * 3
    t = rng.normal(size=(b, l, c)).astype(np.float32) * 3
    rows = rng.random((b, l)) < 0.6 if masked else None
    cols = np.arange(c) < c - pad
    # Garbage in the padded vocabulary columns must not matter.
    s[..., ~cols] = rng.normal(size=(b, l, pad)) * 50
    t[..., ~cols] = rng.normal(size=(b, l, pad)) * 50
    fn = losses.kl_divergence if kl else losses.soft_cross_entropy
    term = fn(s, t, temperature, mask=rows, logits_mask=cols)
    want, count = np_soft_ce(s, t, temperature, rows, cols, kl=kl)
    np.testing.assert_allclose(float(term.mean), want, rtol=1e-5, atol=1e-6)
    self.assertEqual(float(term.count), count)
    # Without a column mask, every column counts.
    term = fn(s, t, temperature, mask=rows)
    want, _ = np_soft_ce(s, t, temperature, rows, None, kl=kl)
    np.testing.assert_allclose(float(term.mean), want, rtol=1e-5, atol=1e-6)

  def test_kl_is_ce_minus_entropy_and_zero_at_match(self):
    rng = np.random.default_rng(1)
    s = rng.normal(size=(4, 7)).astype(np.float32)
    t = rng.normal(size=(4, 7)).astype(np.float32)
    ce = losses.soft_cross_entropy(s, t, 2.0).mean
    ent = losses.soft_cross_entropy(t, t, 2.0).mean
    kl = losses.kl_divergence(s, t, 2.0).mean
    np.testing.assert_allclose(float(kl), float(ce - ent), atol=1e-6)
    self.assertAlmostEqual(float(losses.kl_divergence(t, t).mean), 0, 6)

  @parameterized.parameters(MASK_VALUE, float(np.finfo(np.float32).min))
  def test_no_nan_with_large_negative_padding(self, pad_value):
    rng = np.random.default_rng(2)
    s = rng.normal(size=(2, 3, 8)).astype(np.float32)
    t = rng.normal(size=(2, 3, 8)).astype(np.float32)
    s[..., 5:] = pad_value
    t[..., 5:] = pad_value
    cols = np.arange(8) < 5
    for fn in (losses.soft_cross_entropy, losses.kl_divergence):
      for lm in (None, cols):
        val, grads = jit_value_and_grad(
          lambda a, b, fn=fn, lm=lm: fn(a, b, 2.0, logits_mask=lm).mean,
          argnums=(0, 1),
        )(s, t)
        self.assertTrue(np.isfinite(float(val)))
        for g in grads:
          self.assertTrue(np.all(np.isfinite(g)))
        want, _ = np_soft_ce(
          s, t, 2.0, None, cols, kl=fn is losses.kl_divergence
        )
        np.testing.assert_allclose(float(val), want, rtol=1e-5, atol=1e-6)

  def test_no_nan_with_inf_padding_when_masked(self):
    rng = np.random.default_rng(3)
    s = rng.normal(size=(4, 6)).astype(np.float32)
    t = rng.normal(size=(4, 6)).astype(np.float32)
    s[:, 4:] = -np.inf
    t[:, 4:] = np.nan
    cols = np.arange(6) < 4
    val, (gs, gt) = jit_value_and_grad(
      lambda a, b: losses.soft_cross_entropy(a, b, logits_mask=cols).mean,
      argnums=(0, 1),
    )(s, t)
    np.testing.assert_allclose(
      float(val), np_soft_ce(s, t, 2.0, None, cols)[0], rtol=1e-5
    )
    self.assertTrue(np.all(np.isfinite(gs)) and np.all(np.isfinite(gt)))
    np.testing.assert_array_equal(gs[:, 4:], 0)
    np.testing.assert_array_equal(gt[:, 4:], 0)

  def test_gradient_zero_on_masked_rows_and_columns(self):
    rng = np.random.default_rng(4)
    s = rng.normal(size=(3, 4, 9)).astype(np.float32)
    t = rng.normal(size=(3, 4, 9)).astype(np.float32)
    rows = rng.random((3, 4)) < 0.5
    rows[0, 0] = True
    cols = np.arange(9) < 7
    s[~rows] = np.nan  # garbage in masked rows must not leak
    t[~rows] = np.inf
    g = jit_grad(
      lambda a: (
        losses.soft_cross_entropy(a, t, mask=rows, logits_mask=cols).mean
      )
    )(s)
    self.assertTrue(np.all(np.isfinite(g)))
    np.testing.assert_array_equal(g[~rows], 0)
    np.testing.assert_array_equal(g[..., ~cols], 0)
    self.assertGreater(np.abs(g[rows][:, cols]).min(), 0)

  def test_per_row_column_mask(self):
    # DP arc scores: each row has its own set of candidate heads.
    rng = np.random.default_rng(5)
    s = rng.normal(size=(3, 5)).astype(np.float32)
    t = rng.normal(size=(3, 5)).astype(np.float32)
    cols = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], bool)
    term = losses.soft_cross_entropy(s, t, 2.0, logits_mask=cols)
    want = np.mean(
      [np_soft_ce(s[i], t[i], 2.0, None, cols[i])[0] for i in range(3)]
    )
    np.testing.assert_allclose(float(term.mean), want, rtol=1e-5)

  def test_bfloat16_inputs(self):
    rng = np.random.default_rng(6)
    s = jnp.asarray(rng.normal(size=(4, 16)) * 4, jnp.bfloat16)
    t = jnp.asarray(rng.normal(size=(4, 16)) * 4, jnp.bfloat16)
    term = losses.soft_cross_entropy(s, t, 2.0)
    self.assertEqual(term.total.dtype, jnp.float32)
    self.assertEqual(term.mean.dtype, jnp.float32)
    want, _ = np_soft_ce(
      np.asarray(s, np.float32), np.asarray(t, np.float32), 2.0
    )
    np.testing.assert_allclose(float(term.mean), want, rtol=1e-5)

  def test_jit(self):
    rng = np.random.default_rng(7)
    s = rng.normal(size=(2, 3, 6)).astype(np.float32)
    t = rng.normal(size=(2, 3, 6)).astype(np.float32)
    rows = np.array([[1, 1, 0], [1, 0, 0]], bool)
    cols = np.arange(6) < 5
    f = jax.jit(losses.soft_cross_entropy, static_argnames="scale_by_t2")
    got = f(s, t, 3.0, rows, cols)
    want = losses.soft_cross_entropy(s, t, 3.0, rows, cols)
    np.testing.assert_allclose(got.total, want.total, rtol=1e-6)
    self.assertEqual(float(got.count), 3)

  def test_bad_input(self):
    with self.assertRaises(BistilError):
      losses.soft_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
    with self.assertRaises(BistilError):
      losses.soft_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2, 3)), 0.0)


class TokenCrossEntropyTest(parameterized.TestCase):
  def test_by_hand(self):
    # Logits [0, ln 3] -> p = [1/4, 3/4]; label 1 -> ln(4/3), label 0 -> ln 4.
    l3 = math.log(3)
    logits = np.array([[[0, l3], [0, l3], [5, 5]]], np.float32)
    labels = np.array([[1, 0, -100]])
    term = losses.token_cross_entropy(logits, labels)
    self.assertEqual(float(term.count), 2)
    self.assertAlmostEqual(
      float(term.mean), (math.log(4 / 3) + math.log(4)) / 2, places=6
    )

  def test_against_numpy(self):
    rng = np.random.default_rng(8)
    logits = rng.normal(size=(3, 7, 10)).astype(np.float32) * 3
    labels = rng.integers(0, 10, size=(3, 7))
    labels[rng.random((3, 7)) < 0.4] = -100
    term = losses.token_cross_entropy(logits, labels)
    want, count = np_token_ce(logits, labels)
    np.testing.assert_allclose(float(term.mean), want, rtol=1e-5)
    self.assertEqual(float(term.count), count)
    # Other ignore index; padded vocabulary masked.
    labels2 = np.where(labels == -100, -1, labels) % 8
    labels2[0, 0] = -1
    cols = np.arange(10) < 8
    term = losses.token_cross_entropy(logits, labels2, -1, cols)
    lp = np_log_softmax(logits, cols)
    sel = labels2 != -1
    idx = np.where(sel, labels2, 0)[..., None]
    want = -np.take_along_axis(lp, idx, -1)[..., 0][sel].mean()
    np.testing.assert_allclose(float(term.mean), want, rtol=1e-5)

  def test_nothing_selected(self):
    logits = jnp.ones((2, 3, 4))
    labels = jnp.full((2, 3), -100)
    val, g = jit_value_and_grad(
      lambda x: losses.token_cross_entropy(x, labels).mean
    )(logits)
    term = losses.token_cross_entropy(logits, labels)
    self.assertEqual((float(term.total), float(term.count)), (0.0, 0.0))
    self.assertEqual(float(val), 0.0)
    np.testing.assert_array_equal(g, 0)

  def test_gradient_zero_on_ignored_and_bf16_and_jit(self):
    rng = np.random.default_rng(9)
    logits = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.bfloat16)
    labels = np.array([[1, -100, 2, -100, 0], [-100, 3, 3, 5, -100]])
    logits = logits.at[0, 1].set(jnp.nan)
    term = jax.jit(losses.token_cross_entropy)(logits, labels)
    self.assertEqual(term.total.dtype, jnp.float32)
    want, _ = np_token_ce(np.asarray(logits, np.float32), labels)
    np.testing.assert_allclose(float(term.mean), want, rtol=1e-5)
    g = jit_grad(lambda x: losses.token_cross_entropy(x, labels).mean)(
      logits.astype(jnp.float32)
    )
    np.testing.assert_array_equal(np.asarray(g)[labels == -100], 0)
    self.assertTrue(np.all(np.isfinite(g)))


class HiddenMseTest(parameterized.TestCase):
  @parameterized.product(masked=[False, True], project=[False, True])
  def test_against_numpy(self, masked, project):
    rng = np.random.default_rng(10)
    b, l, dt = 3, 6, 8
    ds = 4 if project else dt
    hs = rng.normal(size=(b, l, ds)).astype(np.float32)
    ht = rng.normal(size=(b, l, dt)).astype(np.float32)
    mask = padding_mask([6, 2, 4], l) if masked else None
    proj = rng.normal(size=(dt, ds)).astype(np.float32) if project else None
    term = losses.hidden_mse(hs, ht, mask, proj)
    want, count = np_hidden_mse(hs, ht, mask, proj)
    np.testing.assert_allclose(float(term.mean), want, rtol=1e-5)
    self.assertEqual(float(term.count), count)

  def test_none_mask_includes_padding(self):
    # Released averaging: padding positions count (4 values, 1 differs).
    hs = np.zeros((1, 2, 2), np.float32)
    ht = np.zeros((1, 2, 2), np.float32)
    ht[0, 1, 0] = 2.0  # a padded position
    self.assertAlmostEqual(float(losses.hidden_mse(hs, ht).mean), 1.0)
    masked = losses.hidden_mse(hs, ht, np.array([[True, False]]))
    self.assertEqual(float(masked.mean), 0.0)
    self.assertEqual(float(masked.count), 2)

  def test_gradient_zero_on_padding(self):
    rng = np.random.default_rng(11)
    hs = rng.normal(size=(2, 5, 4)).astype(np.float32)
    ht = rng.normal(size=(2, 5, 4)).astype(np.float32)
    ht[1, 3:] = np.nan  # garbage in padding must not leak
    mask = padding_mask([5, 3], 5)
    g = jit_grad(lambda x: losses.hidden_mse(x, ht, mask).mean)(hs)
    self.assertTrue(np.all(np.isfinite(g)))
    np.testing.assert_array_equal(np.asarray(g)[~mask], 0)
    np.testing.assert_allclose(
      np.asarray(g)[mask], 2 * (hs - ht)[mask] / (mask.sum() * 4), rtol=1e-5
    )

  def test_bfloat16_and_jit(self):
    rng = np.random.default_rng(12)
    hs = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.bfloat16)
    ht = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.bfloat16)
    mask = padding_mask([3, 1], 3)
    term = jax.jit(losses.hidden_mse)(hs, ht, mask)
    self.assertEqual(term.total.dtype, jnp.float32)
    want, _ = np_hidden_mse(
      np.asarray(hs, np.float32), np.asarray(ht, np.float32), mask
    )
    np.testing.assert_allclose(float(term.mean), want, rtol=1e-5)

  def test_width_mismatch_needs_projection(self):
    with self.assertRaises(BistilError):
      losses.hidden_mse(jnp.zeros((1, 2, 4)), jnp.zeros((1, 2, 8)))

  @parameterized.parameters((12, 6, False), (12, 4, True), (4, 4, False))
  def test_layers(self, lt, ls, project):
    rng = np.random.default_rng(13)
    b, l, dt = 2, 4, 6
    ds = 3 if project else dt
    student = [
      rng.normal(size=(b, l, ds)).astype(np.float32) for _ in range(ls + 1)
    ]
    teacher = [
      rng.normal(size=(b, l, dt)).astype(np.float32) for _ in range(lt + 1)
    ]
    projs = (
      rng.normal(size=(lt + 1, dt, ds)).astype(np.float32) if project else None
    )
    mask = padding_mask([4, 2], l)
    pairs, _ = losses.layer_maps(lt, ls)
    r = lt // ls
    want = np.mean(
      [
        np_hidden_mse(
          student[i],
          teacher[i * r],
          mask,
          None if projs is None else projs[i * r],
        )[0]
        for i in range(ls + 1)
      ]
    )
    fn = jax.jit(losses.hidden_mse_layers, static_argnums=2)
    term = fn(student, teacher, pairs, mask, projs)
    np.testing.assert_allclose(float(term.mean), want, rtol=1e-5)
    self.assertEqual(float(term.count), (ls + 1) * 6 * ds)

  def test_layers_bad_pairs(self):
    states = [jnp.zeros((1, 2, 3))] * 3
    with self.assertRaises(BistilError):
      losses.hidden_mse_layers(states, states, ((0, 3),))
    with self.assertRaises(BistilError):
      losses.hidden_mse_layers(states, states, ())


class AttentionMseTest(parameterized.TestCase):
  def test_by_hand(self):
    # One head, 2 queries, 3 keys; key 2 is padding and holds garbage that
    # would change the result if it were included.
    a_s = np.array([[[[0.5, 0.5, 0.7], [1.0, 0.0, 0.3]]]], np.float32)
    a_t = np.array([[[[1.0, 0.0, 0.1], [0.5, 0.5, 0.9]]]], np.float32)
    key_mask = np.array([[True, True, False]])
    term = losses.attention_mse(a_s, a_t, key_mask)
    self.assertAlmostEqual(float(term.mean), 0.25, places=7)  # 4 x 0.25
    self.assertEqual(float(term.count), 4)
    # Excluding query row 1 as well leaves (0.5-1)^2, (0.5-0)^2.
    term = losses.attention_mse(a_s, a_t, key_mask, np.array([[True, False]]))
    self.assertAlmostEqual(float(term.mean), 0.25, places=7)
    self.assertEqual(float(term.count), 2)
    a_t[0, 0, 1, 0] = 1.0  # row 1: (1-1)^2 + (0-0.5)^2
    term = losses.attention_mse(a_s, a_t, key_mask)
    self.assertAlmostEqual(float(term.mean), (0.25 * 3) / 4, places=7)

  @parameterized.parameters(False, True)
  def test_against_numpy(self, use_query_mask):
    rng = np.random.default_rng(14)
    b, h, l = 3, 2, 5
    lengths = [5, 2, 3]
    key_mask = padding_mask(lengths, l)
    a_s = random_probs(rng, (b, h, l, l))
    a_t = random_probs(rng, (b, h, l, l))
    qm = key_mask if use_query_mask else None
    term = losses.attention_mse(a_s, a_t, key_mask, qm)
    want, count = np_attention_mse(a_s, a_t, key_mask, qm)
    np.testing.assert_allclose(float(term.mean), want, rtol=1e-5)
    self.assertEqual(float(term.count), count)

  def test_does_not_use_zero_probability_trick(self):
    # A real key with teacher probability exactly 0 is still counted.
    a_s = np.array([[[[0.5, 0.5]]]], np.float32)
    a_t = np.array([[[[1.0, 0.0]]]], np.float32)
    term = losses.attention_mse(a_s, a_t, np.array([[True, True]]))
    self.assertEqual(float(term.count), 2)
    self.assertAlmostEqual(float(term.mean), 0.25, places=7)

  def test_gradient_zero_on_padding(self):
    rng = np.random.default_rng(15)
    b, h, l = 2, 2, 4
    key_mask = padding_mask([4, 2], l)
    a_s = random_probs(rng, (b, h, l, l))
    a_t = random_probs(rng, (b, h, l, l))
    a_t[1, :, :, 2:] = np.nan
    g = jit_grad(
      lambda x: losses.attention_mse(x, a_t, key_mask, key_mask).mean
    )(a_s)
    g = np.asarray(g)
    self.assertTrue(np.all(np.isfinite(g)))
    np.testing.assert_array_equal(g[1, :, :, 2:], 0)  # padded keys
    np.testing.assert_array_equal(g[1, :, 2:, :], 0)  # padded queries
    self.assertGreater(np.abs(g[1, :, :2, :2]).min(), 0)

  def test_bfloat16_and_jit(self):
    rng = np.random.default_rng(16)
    key_mask = padding_mask([3, 2], 3)
    a_s = jnp.asarray(random_probs(rng, (2, 2, 3, 3)), jnp.bfloat16)
    a_t = jnp.asarray(random_probs(rng, (2, 2, 3, 3)), jnp.bfloat16)
    term = jax.jit(losses.attention_mse)(a_s, a_t, key_mask)
    self.assertEqual(term.total.dtype, jnp.float32)
    want, _ = np_attention_mse(
      np.asarray(a_s, np.float32), np.asarray(a_t, np.float32), key_mask
    )
    np.testing.assert_allclose(float(term.mean), want, rtol=1e-5)

  @parameterized.parameters((12, 6), (12, 4), (6, 6))
  def test_layers(self, lt, ls):
    rng = np.random.default_rng(17)
    b, h, l = 2, 2, 4
    key_mask = padding_mask([4, 3], l)
    student = [random_probs(rng, (b, h, l, l)) for _ in range(ls)]
    teacher = [random_probs(rng, (b, h, l, l)) for _ in range(lt)]
    _, pairs = losses.layer_maps(lt, ls)
    r = lt // ls
    want = np.mean(
      [
        np_attention_mse(student[i], teacher[(i + 1) * r - 1], key_mask)[0]
        for i in range(ls)
      ]
    )
    fn = jax.jit(losses.attention_mse_layers, static_argnums=2)
    term = fn(student, teacher, pairs, key_mask)
    np.testing.assert_allclose(float(term.mean), want, rtol=1e-5)
    self.assertEqual(float(term.count), ls * h * (4 * 4 + 4 * 3))


if __name__ == "__main__":
  absltest.main()
