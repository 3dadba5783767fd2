"""The biaffine parser head: zero init, the released biaffine formulas,
losses, greedy decoding and the encoder + head-file export (BERT, XLM-R)."""

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from absl.testing import absltest, parameterized
from flax.traverse_util import flatten_dict

from bistil_jax import losses, sparse
from bistil_jax.checkpoint import hf, parser_head
from bistil_jax.model import preset
from bistil_jax.model.encoder import Model, init_params
from bistil_jax.model.layers import MASK_VALUE
from bistil_jax.tasks import dp as dp_tasks

RELS = ("det", "nsubj", "punct", "root")


def parser_config(family):
  return preset(
    family, head=dp_tasks.DependencyTask.head, num_labels=4, id2label=RELS
  )


def random_head(params, seed=0):
  """params with a random (non-zero) parser head."""
  rng = np.random.default_rng(seed)
  head = {
    k: rng.normal(size=np.shape(v)).astype(np.float32) * 0.3
    for k, v in params["classifier"].items()
  }
  return {**params, "classifier": head}


def inputs(cfg, b=2, l=7):
  ids = np.random.default_rng(1).integers(5, cfg.vocab_size, (b, l))
  mask = np.ones((b, l), np.int32)
  mask[1, 5:] = 0
  ids = np.where(mask > 0, ids, cfg.pad_token_id).astype(np.int32)
  return ids, mask


class ParserTest(parameterized.TestCase):
  @parameterized.parameters("tiny", "tiny-xlmr")
  def test_zero_init_under_classifier(self, family):
    cfg = parser_config(family)
    params = init_params(cfg, jax.random.PRNGKey(0))
    head = flatten_dict(params["classifier"], sep="/")
    self.assertEqual(
      sorted(head),
      sorted(
        ["arc_kernel", "arc_bias", "rel_kernel", "rel_dep", "rel_head"]
        + ["rel_bias"]
      ),
    )
    for k, v in head.items():
      np.testing.assert_array_equal(v, 0, err_msg=k)
    self.assertTrue(sparse.is_head("classifier/rel_kernel"))
    self.assertEqual(cfg.architecture, "XLMRobertaModel" if "x" in family
                     else "BertModel")  # fmt: skip
    ids, mask = inputs(cfg)
    arc, rel = (
      Model(cfg).apply({"params": params}, ids, attention_mask=mask).logits
    )
    self.assertEqual(arc.shape, (2, 7, 7))
    self.assertEqual(rel.shape, (2, 7, 4))
    np.testing.assert_array_equal(arc[1, :, 5:], MASK_VALUE)  # padded keys
    np.testing.assert_array_equal(arc[0], 0)  # untrained: all heads tie

  @parameterized.parameters("tiny", "tiny-xlmr")
  def test_scores_are_the_released_biaffine_of_the_export_layout(self, fam):
    cfg = parser_config(fam)
    params = random_head(init_params(cfg, jax.random.PRNGKey(0)))
    ids, mask = inputs(cfg)
    heads = np.array([[0, 2, 0, 1, 6, 3, 2], [3, 0, 1, 1, 2, 0, 0]])
    out = Model(cfg).apply(
      {"params": params}, ids, attention_mask=mask, heads=heads
    )
    x = np.asarray(out.last_hidden_state, np.float64)  # [b, l, d]
    arc, rel = (np.asarray(a, np.float64) for a in out.logits)
    torch_head = parser_head.head_to_torch(params)
    w_arc = torch_head[parser_head.ARC_KEY].astype(np.float64)  # [1, d+1, d]
    w_rel = torch_head[parser_head.REL_KEY].astype(np.float64)  # [R, d+1, d+1]
    one = np.ones(x.shape[:2] + (1,))
    xb = np.concatenate([x, one], -1)
    # Released Biaffine: s = einsum("bxi,oij,byj->boxy"); arcs: bias_x.
    ref_arc = np.einsum("bxi,oij,byj->boxy", xb, w_arc, x)[:, 0]
    ref_all = np.einsum("bxi,oij,byj->boxy", xb, w_rel, xb)  # [b, R, l, l]
    ref_rel = np.take_along_axis(
      ref_all.transpose(0, 2, 3, 1), heads[:, :, None, None], axis=2
    )[:, :, 0]  # [b, l, R]
    real = mask[:, None, :] > 0
    np.testing.assert_allclose(arc[np.broadcast_to(real, arc.shape)],
                               ref_arc[np.broadcast_to(real, arc.shape)],
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    np.testing.assert_allclose(rel, ref_rel, rtol=1e-4, atol=1e-4)
    back = parser_head.head_from_torch(torch_head, cfg.hidden_size, 4, "x")
    for k, v in back.items():
      np.testing.assert_array_equal(v, params["classifier"][k], err_msg=k)
    # Without heads, rel is taken at the argmax heads; predict reads both.
    free = Model(cfg).apply({"params": params}, ids, attention_mask=mask)
    pred = np.asarray(dp_tasks.predict(free.logits))
    np.testing.assert_array_equal(pred[..., 0], np.argmax(arc, -1))
    at = Model(cfg).apply(
      {"params": params}, ids, attention_mask=mask, heads=pred[..., 0]
    )
    np.testing.assert_array_equal(
      pred[..., 1], np.argmax(np.asarray(at.logits[1]), -1)
    )

  def test_losses_by_hand(self):
    arc = jnp.array([[[0.0, 1.0, MASK_VALUE], [2.0, 0.0, MASK_VALUE]]])
    rel = jnp.array([[[1.0, 0.0], [0.0, 3.0]]])
    batch = {"heads": jnp.array([[1, -100]]), "labels": jnp.array([[0, -100]])}
    words = batch["labels"] != -100
    got = dp_tasks.gold_loss((arc, rel), batch, words)
    want = -np.log(np.exp(1) / (1 + np.exp(1))) - np.log(
      np.exp(1) / (1 + np.exp(1))
    )
    self.assertAlmostEqual(float(got.mean), want, places=5)
    self.assertEqual(float(got.count), 1.0)
    keys = jnp.array([[True, True, False]])
    t_arc = jnp.array([[[1.0, 0.0, 5.0], [0.0, 0.0, 0.0]]])
    t_rel = jnp.array([[[0.0, 2.0], [9.0, 9.0]]])
    soft = dp_tasks.soft_loss((arc, rel), (t_arc, t_rel), 2.0, words, keys)
    a = losses.soft_cross_entropy(
      arc[:, :1, :2], t_arc[:, :1, :2], 2.0
    ).mean  # the padded key has probability 0 for both
    r = losses.soft_cross_entropy(rel[:, :1], t_rel[:, :1], 2.0).mean
    self.assertAlmostEqual(float(soft.mean), float(a + r), places=5)

  @parameterized.parameters(("tiny", "BertModel"), ("tiny-xlmr",
                             "XLMRobertaModel"))  # fmt: skip
  def test_export_round_trip(self, family, hf_class):
    cfg = parser_config(family)
    params = random_head(init_params(cfg, jax.random.PRNGKey(0)))
    with tempfile.TemporaryDirectory() as d:
      out = os.path.join(d, "export")
      hf.save_hf(out, cfg, params)
      self.assertTrue(os.path.isfile(os.path.join(out, parser_head.HEAD_FILE)))
      pt = transformers.AutoModel.from_pretrained(out)
      self.assertEqual(type(pt).__name__, hf_class)
      model, back = hf.load_hf(out)
    self.assertEqual(model.config.head, dp_tasks.DependencyTask.head)
    self.assertEqual(model.config.label_names, RELS)
    a, b = (flatten_dict(p, sep="/") for p in (params, back))
    self.assertEqual(sorted(a), sorted(b))
    n = cfg.vocab_size  # padded embedding rows are not exported
    for k in a:
      np.testing.assert_array_equal(a[k][:n], b[k][:n], err_msg=k)


if __name__ == "__main__":
  absltest.main()
