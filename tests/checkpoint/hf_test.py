"""HF conversion: parity with transformers, export, round trip, bad input."""

import contextlib
import io
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

from bistil_jax import cli
from bistil_jax.checkpoint import hf
from bistil_jax.errors import BistilError
from bistil_jax.model.encoder import init_params

VOCAB = 99
HF_CLASSES = {
  ("bert", "none"): T.BertModel,
  ("bert", "mlm"): T.BertForMaskedLM,
  ("bert", "token_classification"): T.BertForTokenClassification,
  ("bert", "sequence_classification"): T.BertForSequenceClassification,
  ("xlmr", "none"): T.XLMRobertaModel,
  ("xlmr", "mlm"): T.XLMRobertaForMaskedLM,
  ("xlmr", "token_classification"): T.XLMRobertaForTokenClassification,
  ("xlmr", "sequence_classification"): T.XLMRobertaForSequenceClassification,
}
ALL = [(f, h) for f, h in HF_CLASSES]


def hf_config(family, **kw):
  common = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    num_labels=3,
    attn_implementation="eager",
  )
  common.update(kw)
  if family == "bert":
    return T.BertConfig(max_position_embeddings=40, **common)
  return T.XLMRobertaConfig(max_position_embeddings=42, **common)


def make_hf_dir(family, head, seed=0, safe=True, **kw):
  """A randomly initialised transformers model saved to a temp dir."""
  torch.manual_seed(seed)
  model = HF_CLASSES[(family, head)](hf_config(family, **kw)).eval()
  # Perturb LayerNorms and biases so a swapped scale/bias cannot pass.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "LayerNorm" in name or "layer_norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  path = tempfile.mkdtemp()
  model.save_pretrained(path, safe_serialization=safe)
  return path, model


def batch(family, seed=0):
  rng = np.random.RandomState(seed)
  pad = 0 if family == "bert" else 1
  ids = rng.randint(3, VOCAB, (3, 9))
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  mask[2, 3:] = 0
  ids[mask == 0] = pad
  types = np.zeros_like(ids)
  if family == "bert":
    types[0, 4:] = 1
  return ids, mask, types


def torch_forward(model, ids, mask, types):
  with torch.no_grad():
    kw = dict(
      attention_mask=torch.tensor(mask),
      token_type_ids=torch.tensor(types),
      output_hidden_states=True,
      output_attentions=True,
    )
    return model(torch.tensor(ids), **kw)


def ours_forward(model, params, ids, mask, types):
  return model.apply(
    {"params": params},
    jnp.asarray(ids),
    attention_mask=jnp.asarray(mask),
    token_type_ids=jnp.asarray(types),
    output_attentions=True,
  )


def torch_logits(out):
  return getattr(out, "logits", None)


def max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b))))


class ParityTest(parameterized.TestCase):
  @parameterized.parameters(*ALL)
  def test_fp32_parity_with_transformers(self, family, head):
    path, ref_model = make_hf_dir(family, head)
    model, params = hf.load_hf(path)
    ids, mask, types = batch(family)
    ref = torch_forward(ref_model, ids, mask, types)
    out = ours_forward(model, params, ids, mask, types)
    self.assertLen(out.hidden_states, 3)
    for ours, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
      self.assertLess(max_diff(ours, theirs.numpy()), 1e-5)
    for ours, theirs in zip(out.attentions, ref.attentions, strict=True):
      self.assertLess(max_diff(ours, theirs.numpy()), 1e-5)
    if head == "none":
      self.assertIsNone(out.logits)
      if out.pooled is not None:
        self.assertLess(max_diff(out.pooled, ref.pooler_output.numpy()), 1e-5)
      return
    logits = np.asarray(out.logits)
    if head == "mlm":
      # Padded vocabulary columns are masked, the real ones match.
      self.assertEqual(logits.shape[-1], model.config.padded_vocab_size)
      self.assertTrue(np.all(logits[..., VOCAB:] < -1e8))
      logits = logits[..., :VOCAB]
    self.assertLess(max_diff(logits, torch_logits(ref).numpy()), 1e-5)

  @parameterized.parameters("bert", "xlmr")
  def test_bf16_compute_within_stated_tolerance(self, family):
    """bf16 compute vs the fp32 reference: |diff| <= 0.05 * (1 + |ref|)."""
    path, ref_model = make_hf_dir(family, "mlm")
    model, params = hf.load_hf(path, dtype="bfloat16")
    ids, mask, types = batch(family)
    ref = torch_forward(ref_model, ids, mask, types)
    out = ours_forward(model, params, ids, mask, types)
    self.assertEqual(out.hidden_states[-1].dtype, jnp.bfloat16)
    for ours, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
      theirs = theirs.numpy()
      err = np.abs(np.asarray(ours, np.float32) - theirs)
      self.assertTrue(np.all(err <= 0.05 * (1 + np.abs(theirs))), err.max())
    logits = np.asarray(out.logits, np.float32)[..., :VOCAB]
    theirs = ref.logits.numpy()
    self.assertTrue(
      np.all(np.abs(logits - theirs) <= 0.05 * (1 + np.abs(theirs)))
    )
    # The bf16 model agrees with fp32 on the argmax almost everywhere.
    agree = np.mean(logits.argmax(-1) == theirs.argmax(-1))
    self.assertGreater(agree, 0.9)


class ExportTest(parameterized.TestCase):
  @parameterized.parameters(*ALL)
  def test_export_loads_into_transformers_torch(self, family, head):
    path, ref_model = make_hf_dir(family, head)
    model, params = hf.load_hf(path)
    out_dir = os.path.join(tempfile.mkdtemp(), "export")
    hf.save_hf(out_dir, model, params)
    loaded, info = HF_CLASSES[(family, head)].from_pretrained(
      out_dir, output_loading_info=True, attn_implementation="eager"
    )
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
      self.assertEmpty(info[kind], kind)
    ids, mask, types = batch(family, seed=1)
    a = torch_forward(ref_model, ids, mask, types)
    b = torch_forward(loaded.eval(), ids, mask, types)
    self.assertLess(
      max_diff(a.hidden_states[-1].numpy(), b.hidden_states[-1].numpy()), 1e-6
    )
    if head != "none":
      self.assertLess(max_diff(a.logits.numpy(), b.logits.numpy()), 1e-6)

  @parameterized.parameters(
    ("bert", T.FlaxBertForMaskedLM, "mlm"),
    ("xlmr", T.FlaxXLMRobertaForMaskedLM, "mlm"),
    ("bert", T.FlaxBertForSequenceClassification, "sequence_classification"),
    ("xlmr", T.FlaxXLMRobertaForTokenClassification, "token_classification"),
  )
  def test_export_loads_into_transformers_flax(self, family, flax_cls, head):
    path, ref_model = make_hf_dir(family, head)
    model, params = hf.load_hf(path)
    out_dir = os.path.join(tempfile.mkdtemp(), "export")
    hf.save_hf(out_dir, model, params)
    os.remove(os.path.join(out_dir, hf.SAFETENSORS))  # force the msgpack
    flax_model = flax_cls.from_pretrained(out_dir)
    # Same tree as the class builds: no key missing or extra.
    want = set(flatten_dict(flax_cls(flax_model.config, seed=1).params))
    self.assertEqual(set(flatten_dict(flax_model.params)), want)
    ids, mask, types = batch(family, seed=2)
    ref = torch_forward(ref_model, ids, mask, types)
    got = flax_model(
      ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True
    )
    self.assertLess(max_diff(got.logits, ref.logits.numpy()), 1e-5)

  @parameterized.parameters(*ALL)
  def test_load_save_load_is_bit_identical(self, family, head):
    path, _ = make_hf_dir(family, head)
    model, params = hf.load_hf(path)
    out_dir = os.path.join(tempfile.mkdtemp(), "a")
    hf.save_hf(out_dir, model, params)
    model2, params2 = hf.load_hf(out_dir)
    self.assertEqual(model.config, model2.config)
    a, b = flatten_dict(params), flatten_dict(params2)
    self.assertEqual(set(a), set(b))
    for k in a:
      self.assertTrue(np.array_equal(a[k], b[k]), k)
    # The msgpack written beside it holds the same values.
    os.remove(os.path.join(out_dir, hf.SAFETENSORS))
    _, params3 = hf.load_hf(out_dir)
    for k, v in flatten_dict(params3).items():
      self.assertTrue(np.array_equal(a[k], v), k)

  @parameterized.parameters(None, 0.2)
  def test_student_export_states_the_teachers_dropout(self, classifier):
    # A student trains without dropout (docs/method.md 2.2) but its
    # config.json keeps the teacher's rates for transformers users; our
    # loader still trains it without dropout.
    from bistil_jax.checkpoint import student_init
    from bistil_jax.model import preset

    teacher = preset(
      "tiny",
      hidden_dropout_prob=0.1,
      attention_probs_dropout_prob=0.15,
      classifier_dropout=classifier,
    )
    student = student_init.student_config(teacher, layer_reduction=2)
    params = init_params(student, jax.random.PRNGKey(0))
    out = os.path.join(tempfile.mkdtemp(), "student")
    hf.save_hf(out, student, params)
    pt = T.AutoConfig.from_pretrained(out)
    self.assertEqual(pt.hidden_dropout_prob, 0.1)
    self.assertEqual(pt.attention_probs_dropout_prob, 0.15)
    self.assertEqual(pt.classifier_dropout, classifier)
    model, _ = hf.load_hf(out)
    cfg = model.config
    self.assertEqual(cfg, student)
    self.assertEqual(
      (cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob), (0.0, 0.0)
    )
    # Saved again (a task export of the student): still the teacher's.
    again = os.path.join(tempfile.mkdtemp(), "again")
    task_cfg = cfg.replace(head="token_classification", num_labels=3)
    hf.save_hf(again, task_cfg, init_params(task_cfg, jax.random.PRNGKey(1)))
    pt = T.AutoConfig.from_pretrained(again)
    self.assertEqual(pt.hidden_dropout_prob, 0.1)
    self.assertEqual(pt.classifier_dropout, classifier)
    self.assertEqual(hf.load_hf(again)[0].config.hidden_dropout_prob, 0.0)
    # A student of the student states the first teacher's rates too.
    grand = student_init.student_config(cfg, layer_reduction=1)
    self.assertEqual(grand.to_hf_dict()["attention_probs_dropout_prob"], 0.15)

  def test_a_pooler_the_class_cannot_hold_is_dropped_with_one_log_line(self):
    from bistil_jax.model import preset

    cfg = preset("tiny", head="token_classification", add_pooler=True)
    params = init_params(cfg, jax.random.PRNGKey(0))
    out = os.path.join(tempfile.mkdtemp(), "no_pooler")
    with self.assertLogs("bistil_jax.checkpoint.hf", "INFO") as logs:
      hf.save_hf(out, cfg, params)  # safetensors and msgpack
    said = [x for x in logs.output if "has no pooler" in x]
    self.assertLen(said, 1)
    self.assertIn("pooler/dense/bias, pooler/dense/kernel", said[0])
    _, back = hf.load_hf(out)
    self.assertNotIn("pooler", back)

  def test_reads_pytorch_model_bin(self):
    path, _ = make_hf_dir("bert", "mlm", safe=False)
    self.assertTrue(os.path.isfile(os.path.join(path, hf.TORCH_BIN)))
    ref_path, _ = make_hf_dir("bert", "mlm")
    _, a = hf.load_hf(path)
    _, b = hf.load_hf(ref_path)
    for k, v in flatten_dict(a).items():
      self.assertTrue(np.array_equal(v, flatten_dict(b)[k]), k)

  def test_untied_decoder_round_trips(self):
    path, ref_model = make_hf_dir("bert", "mlm", tie_word_embeddings=False)
    model, params = hf.load_hf(path)
    self.assertFalse(model.config.tie_word_embeddings)
    self.assertIn("decoder", params["lm_head"])
    ids, mask, types = batch("bert")
    ref = torch_forward(ref_model, ids, mask, types)
    out = ours_forward(model, params, ids, mask, types)
    self.assertLess(max_diff(out.logits[..., :VOCAB], ref.logits.numpy()), 1e-5)
    out_dir = os.path.join(tempfile.mkdtemp(), "u")
    hf.save_hf(out_dir, model, params)
    _, info = T.BertForMaskedLM.from_pretrained(
      out_dir, output_loading_info=True
    )
    self.assertEmpty(info["missing_keys"] + info["unexpected_keys"])

  def test_legacy_names_nsp_head_and_pooler(self):
    """Original mBERT-style files: gamma/beta, NSP head, a pooler."""
    path, ref_model = make_hf_dir("bert", "mlm")
    from safetensors.numpy import load_file, save_file

    file = os.path.join(path, hf.SAFETENSORS)
    state = load_file(file)
    legacy = {}
    for k, v in state.items():
      if "LayerNorm.weight" in k:
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma")
      elif "LayerNorm.bias" in k:
        k = k.replace("LayerNorm.bias", "LayerNorm.beta")
      legacy[k] = v
    legacy["cls.seq_relationship.weight"] = np.zeros((2, 32), np.float32)
    legacy["cls.seq_relationship.bias"] = np.zeros((2,), np.float32)
    legacy["bert.pooler.dense.weight"] = np.eye(32, dtype=np.float32)
    legacy["bert.pooler.dense.bias"] = np.zeros((32,), np.float32)
    legacy["bert.embeddings.position_ids"] = np.arange(40)[None]
    save_file(legacy, file, metadata={"format": "pt"})
    model, params = hf.load_hf(path)
    self.assertTrue(model.config.add_pooler)
    np.testing.assert_array_equal(
      params["pooler"]["dense"]["kernel"], np.eye(32)
    )
    ids, mask, types = batch("bert")
    ref = torch_forward(ref_model, ids, mask, types)
    out = ours_forward(model, params, ids, mask, types)
    self.assertLess(max_diff(out.logits[..., :VOCAB], ref.logits.numpy()), 1e-5)


def run_cli(*argv):
  err = io.StringIO()
  with (
    contextlib.redirect_stderr(err),
    contextlib.redirect_stdout(io.StringIO()),
  ):
    code = cli.main(list(argv))
  return code, err.getvalue()


class BadInputTest(parameterized.TestCase):
  def assert_one_line_error(self, path, needle):
    with self.assertRaisesRegex(BistilError, needle):
      hf.load_hf(path)
    code, err = run_cli("inspect", path)
    self.assertEqual(code, 2)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    self.assertLen(lines, 1)
    self.assertIn(needle.split("[")[0].split("(")[0].split(".")[0], lines[0])

  @parameterized.product(
    family=("tiny", "tiny-xlmr"),
    head=("none", "mlm", "question_answering", "token_classification"),
    weights=(hf.SAFETENSORS, hf.FLAX_MSGPACK),
  )
  def test_head_read_from_keys_without_architectures(
    self, family, head, weights
  ):
    from bistil_jax.model import preset

    cfg = preset(family, head=head, num_labels=2)
    out = os.path.join(tempfile.mkdtemp(), "m")
    hf.save_hf(out, cfg, init_params(cfg, jax.random.PRNGKey(0)))
    cfg_file = os.path.join(out, hf.CONFIG)
    d = json.load(open(cfg_file))
    del d["architectures"]
    json.dump(d, open(cfg_file, "w"))
    if weights == hf.FLAX_MSGPACK:
      os.remove(os.path.join(out, hf.SAFETENSORS))
    if head == "token_classification":  # sequence classification's key too
      self.assert_one_line_error(out, "cannot tell")
    else:
      self.assertEqual(hf.load_hf(out)[0].config.head, head)

  def test_head_tables_name_the_same_heads(self):
    from bistil_jax.model import config, heads

    self.assertEqual(list(hf.HF_HEADS), list(config.HEADS))
    self.assertEqual(list(heads.HEADS), list(config.HEADS))

  def test_dir_without_weights(self):
    path, _ = make_hf_dir("bert", "mlm")
    os.remove(os.path.join(path, hf.SAFETENSORS))
    self.assert_one_line_error(path, "no weights in")

  def test_missing_dir(self):
    self.assert_one_line_error("/nonexistent/model", "does not exist")

  def test_unknown_architecture(self):
    path, _ = make_hf_dir("bert", "mlm")
    cfg_file = os.path.join(path, hf.CONFIG)
    cfg = json.load(open(cfg_file))
    cfg["architectures"] = ["GPT2LMHeadModel"]
    json.dump(cfg, open(cfg_file, "w"))
    self.assert_one_line_error(path, "unknown architecture")

  def test_vocab_size_disagrees_with_embeddings(self):
    path, _ = make_hf_dir("xlmr", "mlm")
    cfg_file = os.path.join(path, hf.CONFIG)
    cfg = json.load(open(cfg_file))
    cfg["vocab_size"] = VOCAB + 5
    json.dump(cfg, open(cfg_file, "w"))
    self.assert_one_line_error(path, "vocab size mismatch")

  def test_truncated_safetensors(self):
    path, _ = make_hf_dir("bert", "mlm")
    file = os.path.join(path, hf.SAFETENSORS)
    data = open(file, "rb").read()
    open(file, "wb").write(data[: len(data) // 2])
    self.assert_one_line_error(path, "corrupt or unreadable")

  def test_unexpected_key(self):
    path, _ = make_hf_dir("bert", "token_classification")
    from safetensors.numpy import load_file, save_file

    file = os.path.join(path, hf.SAFETENSORS)
    state = load_file(file)
    state["bert.encoder.layer.0.attention.self.rotary.weight"] = np.ones(3)
    save_file(state, file, metadata={"format": "pt"})
    self.assert_one_line_error(path, "does not use")

  def test_fewer_layers_than_config(self):
    path, _ = make_hf_dir("bert", "none")
    cfg_file = os.path.join(path, hf.CONFIG)
    cfg = json.load(open(cfg_file))
    cfg["num_hidden_layers"] = 3
    json.dump(cfg, open(cfg_file, "w"))
    self.assert_one_line_error(path, "lacks")

  def test_save_refuses_non_empty_dir_and_keeps_it(self):
    path, _ = make_hf_dir("bert", "mlm")
    model, params = hf.load_hf(path)
    out = tempfile.mkdtemp()
    open(os.path.join(out, "precious.txt"), "w").write("keep")
    with self.assertRaisesRegex(BistilError, "not empty"):
      hf.save_hf(out, model, params)
    self.assertEqual(os.listdir(out), ["precious.txt"])
    code, err = run_cli("export-hf", "--model", path, "--out", out)
    self.assertEqual(code, 2)
    self.assertEqual(os.listdir(out), ["precious.txt"])
    code, _ = run_cli("export-hf", "--model", path, "--out", out, "--overwrite")
    self.assertEqual(code, 0)
    self.assertNotIn("precious.txt", os.listdir(out))
    self.assertEmpty(
      [n for n in os.listdir(os.path.dirname(out)) if ".tmp-" in n]
    )


class CliTest(absltest.TestCase):
  def test_inspect_counts_match_transformers(self):
    path, ref_model = make_hf_dir("bert", "mlm")
    from bistil_jax.checkpoint import commands

    info = commands.inspect_dir(path)
    self.assertEqual(info["architecture"], "BertForMaskedLM")
    self.assertEqual(info["vocab_size"], VOCAB)
    n_torch = sum(p.numel() for p in ref_model.parameters())
    self.assertEqual(info["parameters"]["total"], n_torch)
    code, _ = run_cli("inspect", path, "--json")
    self.assertEqual(code, 0)

  def test_export_converts_bin_to_safetensors_and_copies_tokenizer(self):
    path, _ = make_hf_dir("xlmr", "mlm", safe=False)
    tok = tempfile.mkdtemp()
    open(os.path.join(tok, "tokenizer.json"), "w").write("{}")
    out = os.path.join(tempfile.mkdtemp(), "x")
    code, err = run_cli(
      "export-hf", "--model", path, "--tokenizer", tok, "--out", out
    )
    self.assertEqual(code, 0, err)
    self.assertCountEqual(
        os.listdir(out),
        ["config.json", "model.safetensors", "flax_model.msgpack",
         "tokenizer.json"],
    )  # fmt: skip


if __name__ == "__main__":
  absltest.main()
