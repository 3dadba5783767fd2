"""Encoder structure, masking and config handling."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax.traverse_util import flatten_dict

from bistil_jax.errors import BistilError
from bistil_jax.model import Model, ModelConfig, init_params, preset
from bistil_jax.model.bert import position_ids_for
from bistil_jax.model.encoder import abstract_params

HEADS = ("none", "mlm", "token_classification", "sequence_classification")
KNOWN_AXES = {
    "vocab", "embed", "position", "token_type", "joined_kv", "mlp",
    "embed_out", "classes",
}  # fmt: skip


def cases():
  for name in ("tiny", "tiny-xlmr"):
    for head in HEADS:
      yield name, head


def config_for(name, head, **kw):
  pooler = head in ("none", "sequence_classification")
  return preset(name, head=head, add_pooler=pooler, **kw)


class EncoderTest(parameterized.TestCase):
  @parameterized.parameters(*cases())
  def test_every_param_has_logical_axes(self, name, head):
    boxed = abstract_params(config_for(name, head))
    leaves = flatten_dict(boxed)
    self.assertNotEmpty(leaves)
    for path, leaf in leaves.items():
      self.assertIsInstance(leaf, nn.LogicallyPartitioned, path)
      self.assertLen(leaf.names, len(leaf.value.shape), path)
      self.assertTrue(set(leaf.names) <= KNOWN_AXES, (path, leaf.names))

  @parameterized.parameters(*cases())
  def test_param_names_follow_pytorch_layout(self, name, head):
    cfg = config_for(name, head)
    keys = {"/".join(k) for k in flatten_dict(abstract_params(cfg))}
    for i in range(cfg.num_hidden_layers):
      for sub in (
        "attention/self/query/kernel",
        "attention/self/key/bias",
        "attention/output/dense/kernel",
        "attention/output/LayerNorm/scale",
        "intermediate/dense/kernel",
        "output/dense/kernel",
        "output/LayerNorm/bias",
      ):
        self.assertIn(f"encoder/layer/{i}/{sub}", keys)
    self.assertIn("embeddings/word_embeddings/embedding", keys)

  def test_outputs_shapes_and_attention_masking(self):
    cfg = config_for("tiny", "mlm")
    params = init_params(cfg, jax.random.PRNGKey(0))
    ids = jnp.array([[5, 6, 7, 8, 9], [5, 6, 0, 0, 0]])
    mask = (ids != 0).astype(jnp.int32)
    out = Model(cfg).apply(
      {"params": params}, ids, attention_mask=mask, output_attentions=True
    )
    self.assertLen(out.hidden_states, cfg.num_hidden_layers + 1)
    self.assertEqual(out.logits.shape, (2, 5, cfg.padded_vocab_size))
    self.assertEqual(cfg.padded_vocab_size, 384)
    for probs in out.attentions:
      self.assertEqual(probs.shape, (2, 4, 5, 5))
      np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
      np.testing.assert_array_equal(probs[1, :, :, 2:], 0.0)
    # Changing a padded token does not change the real positions.
    ids2 = ids.at[1, 3].set(42)
    out2 = Model(cfg).apply({"params": params}, ids2, attention_mask=mask)
    np.testing.assert_allclose(
      out.hidden_states[-1][1, :2], out2.hidden_states[-1][1, :2], atol=1e-6
    )
    self.assertIsNone(out2.attentions)

  @parameterized.parameters((0,), (1,), ((1,),), ((0, 1),), (False,))
  def test_selected_attention_layers_match_full_attention(self, layers):
    cfg = config_for("tiny", "mlm")
    params = init_params(cfg, jax.random.PRNGKey(0))
    ids = jnp.array([[5, 6, 7, 8, 9], [5, 6, 0, 0, 0]])
    mask = (ids != 0).astype(jnp.int32)
    model = Model(cfg)
    full = model.apply(
      {"params": params}, ids, attention_mask=mask, output_attentions=True
    )
    if isinstance(layers, int) and not isinstance(layers, bool):
      layers = (layers,)
    part = model.apply(
      {"params": params}, ids, attention_mask=mask, output_attentions=layers
    )
    # Layers without probabilities run the fused attention: same states.
    for a, b in zip(full.hidden_states, part.hidden_states, strict=True):
      np.testing.assert_allclose(a, b, atol=2e-6, rtol=2e-6)
    np.testing.assert_allclose(full.logits, part.logits, atol=2e-5, rtol=1e-5)
    if not layers:
      self.assertIsNone(part.attentions)
      return
    for i in range(cfg.num_hidden_layers):
      if i in layers:
        np.testing.assert_allclose(part.attentions[i], full.attentions[i])
      else:
        self.assertIsNone(part.attentions[i])

  def test_attention_layer_out_of_range_is_refused(self):
    cfg = config_for("tiny", "none")
    params = init_params(cfg, jax.random.PRNGKey(0))
    with self.assertRaisesRegex(ValueError, "output_attentions"):
      Model(cfg).apply(
        {"params": params}, jnp.ones((1, 4), jnp.int32), output_attentions=(2,)
      )

  @parameterized.parameters("mlm", "token_classification")
  def test_logits_positions_gather_per_token_heads(self, head):
    cfg = config_for("tiny", head)
    params = init_params(cfg, jax.random.PRNGKey(0))
    ids = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) + 5
    model = Model(cfg)
    full = model.apply({"params": params}, ids).logits
    pos = jnp.array([[0, 3, 7], [2, 2, 5]])
    part = model.apply({"params": params}, ids, logits_positions=pos).logits
    self.assertEqual(part.shape, (2, 3, full.shape[-1]))
    want = jnp.take_along_axis(full, pos[..., None], axis=1)
    np.testing.assert_allclose(part, want, atol=1e-5)

  def test_roberta_position_ids(self):
    cfg = preset("tiny-xlmr")
    ids = jnp.array([[0, 5, 6, 2, 1, 1], [0, 5, 2, 1, 1, 1]])
    np.testing.assert_array_equal(
      position_ids_for(cfg, ids),
      [[2, 3, 4, 5, 1, 1], [2, 3, 4, 1, 1, 1]],
    )
    np.testing.assert_array_equal(
      position_ids_for(preset("tiny"), ids)[0], np.arange(6)
    )

  def test_dropout_only_when_not_deterministic(self):
    cfg = config_for("tiny", "mlm")
    params = init_params(cfg, jax.random.PRNGKey(0))
    ids = jnp.ones((2, 6), jnp.int32)
    model = Model(cfg)
    a = model.apply({"params": params}, ids).logits
    b = model.apply({"params": params}, ids).logits
    c = model.apply(
      {"params": params},
      ids,
      deterministic=False,
      rngs={"dropout": jax.random.PRNGKey(1)},
    ).logits
    np.testing.assert_array_equal(a, b)
    self.assertGreater(float(jnp.abs(a - c)[..., :300].max()), 1e-4)

  def test_bf16_compute_keeps_fp32_params(self):
    cfg = config_for("tiny", "mlm", dtype="bfloat16")
    params = init_params(cfg, jax.random.PRNGKey(0))
    for leaf in jax.tree.leaves(params):
      self.assertEqual(leaf.dtype, jnp.float32)
    out = Model(cfg).apply({"params": params}, jnp.ones((1, 4), jnp.int32))
    self.assertEqual(out.hidden_states[-1].dtype, jnp.bfloat16)
    self.assertEqual(out.logits.dtype, jnp.float32)
    self.assertTrue(bool(jnp.all(jnp.isfinite(out.logits))))

  def test_compiles_once_per_shape(self):
    cfg = config_for("tiny", "token_classification")
    params = init_params(cfg, jax.random.PRNGKey(0))
    traces = []

    @jax.jit
    def fwd(p, ids):
      traces.append(1)
      return Model(cfg).apply({"params": p}, ids).logits

    for _ in range(3):
      fwd(params, jnp.ones((2, 8), jnp.int32))
    self.assertLen(traces, 1)


class ConfigTest(parameterized.TestCase):
  def test_hf_round_trip(self):
    for name in ("tiny", "tiny-xlmr"):
      for head in HEADS:
        cfg = config_for(name, head, id2label=("A", "B"))
        back = ModelConfig.from_hf_dict(
          cfg.to_hf_dict(), add_pooler=cfg.add_pooler
        )
        self.assertEqual(back, cfg)

  def test_every_architecture_names_its_family_and_head(self):
    from bistil_jax.model import config

    # 5 HF classes per family (the parser shares *Model).
    self.assertLen(config.ARCHITECTURES, 5 * len(config.FAMILIES))
    for arch, (family, head) in config.ARCHITECTURES.items():
      types = {"type_vocab_size": 0} if family == "distilbert" else {}
      cfg = ModelConfig(model_type=family, head=head, num_labels=2, **types)
      self.assertEqual(cfg.architecture, arch)
    # The parser has no HF class: its dir is the bare encoder's.
    parser = ModelConfig(model_type="xlm-roberta", head="biaffine_parser")
    self.assertEqual(
      config.ARCHITECTURES[parser.architecture], ("xlm-roberta", "none")
    )

  def test_padded_vocab(self):
    self.assertEqual(preset("mbert").padded_vocab_size, 119552)
    self.assertEqual(preset("xlmr-base").padded_vocab_size, 250112)
    self.assertEqual(
      preset("tiny", vocab_pad_multiple=1).padded_vocab_size, 300
    )

  @parameterized.parameters(
    ({"architectures": ["T5Model"], "model_type": "t5"}, "unknown arch"),
    ({"model_type": "gpt2"}, "unsupported model_type"),
    (
      {"model_type": "bert", "position_embedding_type": "relative_key"},
      "absolute",
    ),
    ({"model_type": "bert", "is_decoder": True}, "decoder"),
    ({"model_type": "bert", "hidden_act": "swish"}, "hidden_act"),
    ({"model_type": "bert", "hidden_size": 30}, "multiple of"),
  )
  def test_bad_hf_configs(self, d, needle):
    with self.assertRaisesRegex(BistilError, needle):
      ModelConfig.from_hf_dict(d)

  def test_unknown_preset(self):
    with self.assertRaisesRegex(BistilError, "unknown model preset"):
      preset("gigantic")


if __name__ == "__main__":
  absltest.main()
