"""DeBERTa-v2/v3: fp32 parity with transformers, export, sharding, config."""

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers as T
from absl.testing import absltest, parameterized
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file, save_file
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf_deberta

from bistil_jax import measure
from bistil_jax.checkpoint import commands, hf, student_init
from bistil_jax.errors import BistilError
from bistil_jax.model import Model, ModelConfig, deberta, preset
from bistil_jax.model.encoder import init_params
from tests.partitioning_test import sharded_and_single

VOCAB = 99
HF_CLASSES = {
  "none": T.DebertaV2Model,
  "mlm": T.DebertaV2ForMaskedLM,
  "token_classification": T.DebertaV2ForTokenClassification,
  "sequence_classification": T.DebertaV2ForSequenceClassification,
  "question_answering": T.DebertaV2ForQuestionAnswering,
}
# v3 (mDeBERTa-v3): shared keys, log buckets from distance 8, no absolute
# positions; v2: own position projections, absolute positions, no buckets.
STYLES = {
  "v3": dict(
    relative_attention=True,
    position_biased_input=False,
    pos_att_type=["p2c", "c2p"],
    share_att_key=True,
    position_buckets=16,
    norm_rel_ebd="layer_norm",
    max_relative_positions=-1,
  ),
  "v2": dict(
    relative_attention=True,
    position_biased_input=True,
    pos_att_type=["c2p", "p2c"],
    share_att_key=False,
    position_buckets=-1,
    max_relative_positions=24,  # distances beyond it clip
    type_vocab_size=2,
  ),
}
LENGTH = 48  # > 8: the v3 style's log buckets apply


def hf_config(style, **kw):
  common = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    num_labels=3,
    pooler_hidden_act="gelu",
  )
  common.update(STYLES[style])
  common.update(kw)
  return T.DebertaV2Config(**common)


def make_hf_dir(style, head, seed=0, **kw):
  """A random transformers DeBERTa saved to a temp dir, and the model."""
  torch.manual_seed(seed)
  if head == "question_answering":
    kw.setdefault("num_labels", 2)
  model = HF_CLASSES[head](hf_config(style, **kw)).eval()
  # Perturb LayerNorms and biases so a swapped scale/bias cannot pass.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "LayerNorm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  path = tempfile.mkdtemp()
  model.save_pretrained(path)
  return path, model


def batch(style, seed=0):
  """ids, mask, token types [3, LENGTH]: one full row, two padded ones."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, VOCAB, (3, LENGTH))
  mask = np.ones_like(ids)
  mask[1, 30:] = 0
  mask[2, 5:] = 0
  ids[mask == 0] = 0
  types = np.zeros_like(ids)
  if style == "v2":
    types[0, 20:] = 1
  return ids, mask, types


def torch_forward(model, ids, mask, types):
  with torch.no_grad():
    return model(
      torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      token_type_ids=torch.tensor(types),
      output_hidden_states=True,
      output_attentions=True,
    )


def torch_logits(out):
  if hasattr(out, "start_logits"):
    return torch.stack([out.start_logits, out.end_logits], -1).numpy()
  return out.logits.numpy()


def ours_forward(model, params, ids, mask, types):
  return model.apply(
    {"params": params},
    jnp.asarray(ids),
    attention_mask=jnp.asarray(mask),
    token_type_ids=jnp.asarray(types),
    output_attentions=True,
  )


def max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b))))


CASES = [(s, h) for s in STYLES for h in HF_CLASSES]


class ParityTest(parameterized.TestCase):
  @parameterized.parameters(*CASES)
  def test_fp32_parity_with_transformers(self, style, head):
    path, ref_model = make_hf_dir(style, head)
    model, params = hf.load_hf(path)
    self.assertEqual(model.config.architecture, HF_CLASSES[head].__name__)
    ids, mask, types = batch(style)
    ref = torch_forward(ref_model, ids, mask, types)
    out = ours_forward(model, params, ids, mask, types)
    self.assertLen(out.hidden_states, 4)
    for ours, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
      self.assertLess(max_diff(ours, theirs.numpy()), 1e-5)
    for ours, theirs in zip(out.attentions, ref.attentions, strict=True):
      self.assertLess(max_diff(ours, theirs.numpy()), 1e-5)
    if head == "none":
      self.assertIsNone(out.logits)
      self.assertIsNone(out.pooled)  # DebertaV2Model has no pooler
      return
    logits = np.asarray(out.logits)
    if head == "mlm":
      self.assertTrue(np.all(logits[..., VOCAB:] < -1e8))
      logits = logits[..., :VOCAB]
    self.assertLess(max_diff(logits, torch_logits(ref)), 1e-5)

  @parameterized.parameters(
    ("v3", {"pos_att_type": ["c2p"]}),
    ("v2", {"pos_att_type": ["p2c"]}),
    ("v2", {"relative_attention": False, "pos_att_type": None}),
    ("v3", {"norm_rel_ebd": "none", "hidden_act": "gelu_new"}),
    # Exact offsets (no bucket or clip within 48 tokens): the skew path.
    ("v3", {"position_buckets": 128}),
    ("v2", {"max_relative_positions": 64}),
    ("v2", {"max_relative_positions": 64, "pos_att_type": ["p2c"]}),
  )
  def test_variants(self, style, kw):
    path, ref_model = make_hf_dir(style, "sequence_classification", **kw)
    model, params = hf.load_hf(path)
    ids, mask, types = batch(style, seed=2)
    ref = torch_forward(ref_model, ids, mask, types)
    out = ours_forward(model, params, ids, mask, types)
    for ours, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
      self.assertLess(max_diff(ours, theirs.numpy()), 1e-5)
    self.assertLess(max_diff(out.logits, ref.logits.numpy()), 1e-5)
    self.assert_exports_into_transformers(
      model, params, ref_model, "sequence_classification"
    )

  def test_both_paths_of_the_relative_scores_are_exercised(self):
    def linear(style, **kw):
      cfg = ModelConfig.from_hf_dict(hf_config(style, **kw).to_dict())
      return deberta.is_linear(deberta.used_rows(cfg, LENGTH)[1])

    self.assertFalse(linear("v3"))  # 16 buckets: gathers
    self.assertFalse(linear("v2"))  # clipped at 24: gathers
    self.assertTrue(linear("v3", position_buckets=128))  # skew
    self.assertTrue(linear("v2", max_relative_positions=64))  # skew

  def test_skew_is_the_gather_of_plain_offsets(self):
    l = 7
    x = np.random.default_rng(0).normal(size=(2, 3, l, 2 * l - 1))
    x = x.astype(np.float32)
    offsets = np.arange(l)[:, None] - np.arange(l)[None, :] + l - 1
    want = np.take_along_axis(
      x, np.broadcast_to(offsets.T, x.shape[:-1] + (l,)), -1
    )
    np.testing.assert_array_equal(
      np.asarray(deberta.skew(jnp.asarray(x))), want
    )

  def test_v3_mlm_head_with_lm_predictions_names(self):
    """legacy=false (mDeBERTa-v3 files): lm_predictions.lm_head, tied."""
    # transformers 4.57 runs this layout only untied (tied, it makes the
    # word embeddings its lm_head.dense); it decodes with them either way.
    path, ref_model = make_hf_dir(
      "v3", "mlm", legacy=False, tie_word_embeddings=False
    )
    model, params = hf.load_hf(path)
    self.assertFalse(model.config.legacy)
    ids, mask, types = batch("v3", seed=3)
    ref = torch_forward(ref_model, ids, mask, types)
    out = ours_forward(model, params, ids, mask, types)
    self.assertLess(max_diff(out.logits[..., :VOCAB], ref.logits.numpy()), 1e-5)
    # Read back as legacy=false from the names alone (no "legacy" key), and
    # with DeBERTa-v3's replaced-token-detection head left out.
    cfg_file = os.path.join(path, hf.CONFIG)
    d = json.load(open(cfg_file))
    del d["legacy"]
    json.dump(d, open(cfg_file, "w"))
    weights = os.path.join(path, hf.SAFETENSORS)
    state = load_file(weights)
    state["mask_predictions.classifier.weight"] = np.zeros((1, 32), np.float32)
    save_file(state, weights, metadata={"format": "pt"})
    model2, _ = hf.load_hf(path)
    self.assertFalse(model2.config.legacy)
    self.assert_exports_into_transformers(model, params, ref_model, "mlm")

  def test_bf16_compute_within_stated_tolerance(self):
    """bf16 compute vs the fp32 reference: |diff| <= 0.05 * (1 + |ref|)."""
    path, ref_model = make_hf_dir("v3", "token_classification")
    model, params = hf.load_hf(path, dtype="bfloat16")
    ids, mask, types = batch("v3")
    ref = torch_forward(ref_model, ids, mask, types)
    out = model.apply(
      {"params": params},
      jnp.asarray(ids),
      attention_mask=jnp.asarray(mask),
      output_attentions=[1],
    )
    self.assertEqual(out.hidden_states[-1].dtype, jnp.bfloat16)
    self.assertIsNone(out.attentions[0])  # only the requested layer
    self.assertLess(max_diff(out.attentions[1], ref.attentions[1]), 0.05)
    got, want = np.asarray(out.logits, np.float32), ref.logits.numpy()
    self.assertTrue(np.all(np.abs(got - want) <= 0.05 * (1 + np.abs(want))))

  def test_relative_buckets_match_transformers(self):
    for buckets, max_pos in ((16, 64), (256, 512), (8, 24), (32, 100)):
      ids = np.arange(2 * max_pos)
      rel = ids[:, None] - ids[None, :]
      want = hf_deberta.make_log_bucket_position(
        torch.tensor(rel), buckets, max_pos
      )
      got = deberta.log_bucket_positions(rel, buckets, max_pos)
      np.testing.assert_array_equal(got, want.long().numpy())

  def assert_exports_into_transformers(self, model, params, ref_model, head):
    out_dir = os.path.join(tempfile.mkdtemp(), "export")
    hf.save_hf(out_dir, model, params)
    self.assertNotIn(hf.FLAX_MSGPACK, os.listdir(out_dir))  # no Flax class
    loaded, info = HF_CLASSES[head].from_pretrained(
      out_dir, output_loading_info=True
    )
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
      self.assertEmpty(info[kind], kind)
    ids, mask, types = batch("v3" if model.config.share_att_key else "v2", 1)
    a = torch_forward(ref_model, ids, mask, types)
    b = torch_forward(loaded.eval(), ids, mask, types)
    self.assertLess(
      max_diff(a.hidden_states[-1].numpy(), b.hidden_states[-1].numpy()), 1e-6
    )
    if head != "none":
      self.assertLess(max_diff(torch_logits(a), torch_logits(b)), 1e-6)
    return out_dir

  @parameterized.parameters(*CASES)
  def test_export_loads_into_transformers(self, style, head):
    path, ref_model = make_hf_dir(style, head)
    model, params = hf.load_hf(path)
    out_dir = self.assert_exports_into_transformers(
      model, params, ref_model, head
    )
    model2, params2 = hf.load_hf(out_dir)
    self.assertEqual(model2.config, model.config)
    a, b = flatten_dict(params), flatten_dict(params2)
    self.assertEqual(set(a), set(b))
    for k in a:
      self.assertTrue(np.array_equal(a[k], b[k]), k)


class ConfigTest(parameterized.TestCase):
  def test_hf_round_trip_and_bert_keys_unchanged(self):
    d = hf_config("v3", num_labels=2).to_dict()
    cfg = ModelConfig.from_hf_dict(d, head="question_answering")
    self.assertEqual(cfg.pos_att_type, ("p2c", "c2p"))
    self.assertEqual(cfg.layer_norm_eps, 1e-7)
    self.assertEqual(cfg.type_vocab_size, 0)
    self.assertEqual(cfg.rel_span, 16)
    self.assertEqual(ModelConfig.from_hf_dict(cfg.to_hf_dict()), cfg)
    out = cfg.to_hf_dict()
    self.assertEqual(out["architectures"], ["DebertaV2ForQuestionAnswering"])
    self.assertNotIn("position_embedding_type", out)
    # DeBERTa's keys are neither read nor written for BERT.
    bert = ModelConfig.from_hf_dict({"model_type": "bert", **STYLES["v3"]})
    self.assertEqual(bert.pos_att_type, ())
    self.assertNotIn("pos_att_type", bert.to_hf_dict())

  def test_string_pos_att_type_and_cls_dropout(self):
    cfg = ModelConfig.from_hf_dict(
      {"model_type": "deberta-v2", "relative_attention": True,
       "pos_att_type": "p2c|c2p", "cls_dropout": 0.2}
    )  # fmt: skip
    self.assertEqual(cfg.pos_att_type, ("p2c", "c2p"))
    self.assertEqual(cfg.classifier_dropout, 0.2)
    self.assertEqual(cfg.to_hf_dict()["cls_dropout"], 0.2)

  @parameterized.parameters(
    ({"conv_kernel_size": 3}, "ConvLayer"),
    ({"embedding_size": 16}, "embedding_size"),
    ({"pos_att_type": ["c2p"]}, "relative_attention"),
    ({"relative_attention": True, "pos_att_type": ["p2p"]}, "pos_att_type"),
    ({"norm_rel_ebd": "batch_norm"}, "norm_rel_ebd"),
    ({"pooler_hidden_act": "swish"}, "pooler_hidden_act"),
  )
  def test_refused(self, extra, needle):
    with self.assertRaisesRegex(BistilError, needle):
      ModelConfig.from_hf_dict({"model_type": "deberta-v2", **extra})

  def test_analytic_macs_include_relative_terms(self):
    cfg = ModelConfig.from_hf_dict(
      hf_config("v3", hidden_size=256, intermediate_size=512).to_dict(),
      head="none",
    )
    b, l, d, s2 = 2, 48, 256, 32
    plain = cfg.replace(relative_attention=False, pos_att_type=())
    extra = (
      measure.analytic_macs(cfg, b, l)["encoder"]
      - measure.analytic_macs(plain, b, l)["encoder"]
    )
    # Only the table rows these positions read are projected and scored.
    rows, _ = deberta.used_rows(cfg, l)
    r = len(rows)
    self.assertLessEqual(r, s2)
    self.assertEqual(extra, 3 * 2 * (r * d * d + b * l * r * d))
    # A short sequence reads 2l - 1 rows of the table.
    self.assertLen(deberta.used_rows(cfg, 5)[0], 9)
    params = init_params(cfg, jax.random.PRNGKey(0))
    got = measure.inference_flops(cfg, params, b, l, with_compiled=False)
    # XLA counts the same matmuls plus element-wise work (a few %).
    self.assertBetween(got["macs"] / got["analytic_macs"], 1.0, 1.1)


class ShardingTest(parameterized.TestCase):
  @parameterized.product(
    mesh_shape=((1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 1, 8), (1, 2, 4)),
    case=(("v3", "mlm"), ("v2", "sequence_classification")),
  )
  def test_sharded_forward_equals_single_device(self, mesh_shape, case):
    style, head = case
    cfg = ModelConfig.from_hf_dict(
      hf_config(style, intermediate_size=64).to_dict(),  # shards evenly
      head=head,
      add_pooler=head != "mlm",
    )
    sharded, single, _, _ = sharded_and_single(cfg, mesh_shape, 40, 30)
    for a, b in zip(
      jax.tree.leaves(sharded), jax.tree.leaves(single), strict=True
    ):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


class PresetTest(absltest.TestCase):
  def test_tiny_deberta_exports_and_matches_transformers(self):
    cfg = preset("tiny-deberta", vocab_size=VOCAB)
    params = init_params(cfg, jax.random.PRNGKey(0))
    out_dir = os.path.join(tempfile.mkdtemp(), "tiny")
    hf.save_hf(out_dir, cfg, params)
    ref, info = T.DebertaV2ForMaskedLM.from_pretrained(
      out_dir, output_loading_info=True
    )
    self.assertEmpty(info["missing_keys"] + info["unexpected_keys"])
    ids, mask, types = batch("v3")
    theirs = torch_forward(ref.eval(), ids, mask, types).logits.numpy()
    ours = ours_forward(Model(cfg), params, ids, mask, types).logits
    self.assertLess(max_diff(ours[..., :VOCAB], theirs), 1e-5)

  def test_student_from_teacher_layers_keeps_the_relative_table(self):
    teacher = preset("tiny-deberta", num_hidden_layers=4)
    params = init_params(teacher, jax.random.PRNGKey(0))
    student = student_init.student_config(teacher, layer_reduction=2)
    got = student_init.init_student(
      params, teacher, student, "teacher_layers", jax.random.PRNGKey(1)
    )
    for name in ("rel_embeddings", "LayerNorm"):
      a, b = (
        flatten_dict(got["encoder"][name]),
        flatten_dict(params["encoder"][name]),
      )
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_array_equal(
      got["encoder"]["layer"]["0"]["attention"]["self"]["query_proj"]["kernel"],
      params["encoder"]["layer"]["1"]["attention"]["self"]["query_proj"][
        "kernel"
      ],
    )


class InspectTest(absltest.TestCase):
  def test_inspect_counts_match_transformers(self):
    path, ref_model = make_hf_dir("v3", "question_answering")
    info = commands.inspect_dir(path)
    self.assertEqual(info["architecture"], "DebertaV2ForQuestionAnswering")
    self.assertEqual(info["model_type"], "deberta-v2")
    n_torch = sum(p.numel() for p in ref_model.parameters())
    self.assertEqual(info["parameters"]["total"], n_torch)
    groups = info["parameters"]["groups"]
    self.assertEqual(groups["encoder.rel_embeddings"], 2 * 16 * 32)
    self.assertIn("head.qa_outputs", groups)
    self.assertIn("embeddings.word_embeddings", groups)
    self.assertIn("rel_embeddings", commands.format_inspect(info))


if __name__ == "__main__":
  absltest.main()
