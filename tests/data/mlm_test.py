"""MLM masking: statistics, specials, seeding, masked-position gathers."""

import numpy as np
from absl.testing import absltest, parameterized

from bistil_jax.data import mlm
from bistil_jax.errors import BistilError

VOCAB = 1000
MASK_ID = 4


def random_batch(shape=(256, 512), special_rate=0.1, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, VOCAB, size=shape).astype(np.int32)
  special = rng.random(shape) < special_rate
  ids[special] = 2  # a [CLS]-like id
  return ids, special


class MaskTokensTest(parameterized.TestCase):
  def test_statistics(self):
    ids, special = random_batch()
    masked, labels, selected = mlm.mask_tokens(
      ids, special, mlm.mask_rng(3, 0), VOCAB, MASK_ID
    )
    self.assertEqual(masked.dtype, np.int32)
    self.assertEqual(labels.dtype, np.int32)
    n_candidates = np.count_nonzero(~special)  # ~118k
    n_sel = np.count_nonzero(selected)
    # Binomial std of the rate is ~0.001.
    self.assertAlmostEqual(n_sel / n_candidates, 0.15, delta=0.005)
    to_mask = selected & (masked == MASK_ID)
    kept = selected & (masked == ids)
    replaced = selected & (masked != MASK_ID) & (masked != ids)
    self.assertAlmostEqual(np.count_nonzero(to_mask) / n_sel, 0.8, delta=0.02)
    # A random replacement equals the original with probability 1/VOCAB.
    self.assertAlmostEqual(np.count_nonzero(kept) / n_sel, 0.1, delta=0.015)
    self.assertAlmostEqual(np.count_nonzero(replaced) / n_sel, 0.1, delta=0.015)
    # Random ids spread over the whole vocabulary.
    rand = masked[replaced]
    self.assertTrue(((rand >= 0) & (rand < VOCAB)).all())
    self.assertLess(rand.min(), 50)
    self.assertGreater(rand.max(), VOCAB - 50)

  def test_labels_and_unselected_untouched(self):
    ids, special = random_batch((16, 64))
    masked, labels, selected = mlm.mask_tokens(ids, special, 0, VOCAB, MASK_ID)
    np.testing.assert_array_equal(labels[selected], ids[selected])
    self.assertTrue((labels[~selected] == mlm.IGNORE_LABEL).all())
    np.testing.assert_array_equal(masked[~selected], ids[~selected])

  def test_specials_never_masked(self):
    ids, special = random_batch((64, 128), special_rate=0.5)
    masked, labels, selected = mlm.mask_tokens(
      ids, special, 1, VOCAB, MASK_ID, mlm_probability=1.0
    )
    self.assertFalse(selected[special].any())
    self.assertTrue((labels[special] == mlm.IGNORE_LABEL).all())
    np.testing.assert_array_equal(masked[special], ids[special])
    # p = 1 selects every other token.
    self.assertTrue(selected[~special].all())

  def test_zero_probability(self):
    ids, special = random_batch((8, 32))
    masked, labels, selected = mlm.mask_tokens(
      ids, special, 1, VOCAB, MASK_ID, mlm_probability=0.0
    )
    self.assertFalse(selected.any())
    np.testing.assert_array_equal(masked, ids)

  def test_deterministic_per_seed_step_host(self):
    ids, special = random_batch((32, 64))

    def run(*key):
      return mlm.mask_tokens(ids, special, mlm.mask_rng(*key), VOCAB, MASK_ID)

    for a, b in zip(run(7, 3, 0, 1), run(7, 3, 0, 1), strict=True):
      np.testing.assert_array_equal(a, b)
    base = run(7, 3, 0, 1)[2]
    for other in ((8, 3, 0, 1), (7, 4, 0, 1), (7, 3, 1, 1), (7, 3, 0, 0)):
      self.assertFalse(
        np.array_equal(base, run(*other)[2]), f"same mask for {other}"
      )

  def test_int_seed_and_generator(self):
    ids, special = random_batch((4, 16))
    a = mlm.mask_tokens(ids, special, 5, VOCAB, MASK_ID)
    b = mlm.mask_tokens(ids, special, np.random.default_rng(5), VOCAB, MASK_ID)
    for x, y in zip(a, b, strict=True):
      np.testing.assert_array_equal(x, y)

  @parameterized.parameters(
    dict(p=1.5, needle="mlm_probability"),
    dict(p=-0.1, needle="mlm_probability"),
    dict(mask_id=VOCAB, needle="mask id"),
    dict(vocab=0, needle="vocab_size"),
    dict(shape=(4, 3), needle="shape"),
  )
  def test_bad_input(
    self, needle, p=0.15, mask_id=MASK_ID, vocab=VOCAB, shape=(4, 4)
  ):
    ids = np.zeros((4, 4), np.int32)
    special = np.zeros(shape, bool)
    with self.assertRaisesRegex(BistilError, needle):
      mlm.mask_tokens(ids, special, 0, vocab, mask_id, p)


class MaskedPositionsTest(parameterized.TestCase):
  def test_hand_example(self):
    x = mlm.IGNORE_LABEL
    labels = np.array(
      [
        [x, 11, x, 12, x, x],
        [x, x, x, x, x, x],
        [21, 22, 23, 24, 25, x],
      ],
      np.int32,
    )
    positions, weights = mlm.masked_positions(labels, 3)
    np.testing.assert_array_equal(positions, [[1, 3, 0], [0, 0, 0], [0, 1, 2]])
    np.testing.assert_array_equal(weights, [[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    self.assertEqual(positions.dtype, np.int32)
    self.assertEqual(weights.dtype, np.float32)
    ids = mlm.gather_labels(labels, positions, weights)
    np.testing.assert_array_equal(ids, [[11, 12, 0], [0, 0, 0], [21, 22, 23]])

  def test_more_slots_than_length(self):
    labels = np.array([[5, -100, 7]], np.int32)
    positions, weights = mlm.masked_positions(labels, 5)
    np.testing.assert_array_equal(positions, [[0, 2, 0, 0, 0]])
    np.testing.assert_array_equal(weights, [[1, 1, 0, 0, 0]])

  def test_gather_matches_labels_on_random_masks(self):
    ids, special = random_batch((32, 128))
    _, labels, selected = mlm.mask_tokens(ids, special, 2, VOCAB, MASK_ID)
    p = mlm.default_max_predictions(128, 0.15)
    positions, weights = mlm.masked_positions(labels, p)
    # Every masked position is gathered exactly once (none overflow here).
    self.assertTrue((selected.sum(1) <= p).all())
    np.testing.assert_array_equal(weights.sum(1), selected.sum(1))
    gathered = np.take_along_axis(selected, positions, axis=1)
    self.assertTrue(gathered[weights > 0].all())
    # Distinct positions per row: sorted real slots strictly increase.
    real = np.where(weights > 0, positions, np.iinfo(np.int32).max)
    self.assertTrue((np.diff(real, axis=1)[weights[:, 1:] > 0] > 0).all())
    np.testing.assert_array_equal(
      mlm.gather_labels(labels, positions, weights)[weights > 0],
      labels[selected],
    )

  def test_default_max_predictions(self):
    self.assertEqual(mlm.default_max_predictions(128, 0.15), 36)
    self.assertEqual(mlm.default_max_predictions(4, 1.0), 4)
    self.assertEqual(mlm.default_max_predictions(8, 0.0), 1)

  def test_bad_input(self):
    with self.assertRaisesRegex(BistilError, "max_predictions"):
      mlm.masked_positions(np.zeros((2, 3), np.int32), 0)
    with self.assertRaisesRegex(BistilError, "batch, length"):
      mlm.masked_positions(np.zeros(3, np.int32), 2)


if __name__ == "__main__":
  absltest.main()
