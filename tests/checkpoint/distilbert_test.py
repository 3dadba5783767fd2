"""DistilBERT on the BERT body: fp32 parity with transformers 4.57, export
that loads back with no missing or unexpected keys, config.json both ways,
and the commands that read a DistilBERT dir (inspect, student init, task
heads, measure, trim-vocab)."""

import json
import os
import shutil
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers as T
from absl.testing import absltest, parameterized
from flax.traverse_util import flatten_dict

from bistil_jax import measure
from bistil_jax.checkpoint import commands, hf, student_init, surgery, trim
from bistil_jax.data import vocab
from bistil_jax.errors import BistilError
from bistil_jax.model.config import ModelConfig
from tests.checkpoint.hf_test import max_diff, run_cli
from tests.data.vocab_test import make_lines, make_wordpiece_dir, write_lines

VOCAB = 100
CLASSES = {
  "none": T.DistilBertModel,
  "mlm": T.DistilBertForMaskedLM,
  "token_classification": T.DistilBertForTokenClassification,
  "sequence_classification": T.DistilBertForSequenceClassification,
  "question_answering": T.DistilBertForQuestionAnswering,
}
HEADS = tuple(CLASSES)


def hf_config(head="mlm", **kw):
  args = dict(
    vocab_size=VOCAB,
    dim=32,
    n_layers=2,
    n_heads=4,
    hidden_dim=64,
    max_position_embeddings=40,
    num_labels=2 if head == "question_answering" else 3,
    attn_implementation="eager",
  )
  args.update(kw)
  return T.DistilBertConfig(**args)


def make_dir(root, head, seed=0, **kw):
  """A random DistilBERT of class CLASSES[head] saved under root."""
  torch.manual_seed(seed)
  model = CLASSES[head](hf_config(head, **kw)).eval()
  with torch.no_grad():  # so a swapped LayerNorm scale/bias cannot pass
    for name, p in model.named_parameters():
      if "norm" in name.lower() or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  path = os.path.join(root, f"{head}-{seed}-{len(kw)}")
  model.save_pretrained(path)
  return path, model


def batch(seed=0, vocab_size=VOCAB):
  """[3, 9] ids with padding in two rows."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, vocab_size, (3, 9))
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  mask[2, 3:] = 0
  ids[mask == 0] = 0
  return ids, mask


def torch_forward(model, ids, mask):
  with torch.no_grad():
    return model(
      torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      output_hidden_states=True,
      output_attentions=True,
    )


def torch_logits(out, head):
  if head == "question_answering":
    return torch.stack([out.start_logits, out.end_logits], -1).numpy()
  return out.logits.numpy()


def ours_forward(model, params, ids, mask, **kw):
  return model.apply(
    {"params": params},
    jnp.asarray(ids),
    attention_mask=jnp.asarray(mask),
    output_attentions=True,
    **kw,
  )


class DistilBertTest(parameterized.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a busy 2-core machine
    cls.root = tempfile.mkdtemp()
    cls.dirs = {h: make_dir(cls.root, h) for h in HEADS}

  @classmethod
  def tearDownClass(cls):
    torch.set_num_threads(cls._threads)
    shutil.rmtree(cls.root, True)
    super().tearDownClass()

  def tmp(self, name):
    root = tempfile.mkdtemp(dir=self.root)
    return os.path.join(root, name)

  @parameterized.parameters(*HEADS)
  def test_fp32_parity_with_transformers(self, head):
    path, ref_model = self.dirs[head]
    model, params = hf.load_hf(path)
    cfg = model.config
    self.assertEqual(cfg.model_type, "distilbert")
    self.assertEqual(cfg.type_vocab_size, 0)
    self.assertFalse(cfg.add_pooler)
    self.assertNotIn("token_type_embeddings", params["embeddings"])
    ids, mask = batch()
    ref = torch_forward(ref_model, ids, mask)
    # Token types are ignored: DistilBERT has none.
    out = ours_forward(
      model, params, ids, mask, token_type_ids=jnp.ones_like(ids)
    )
    self.assertLen(out.hidden_states, 3)
    for ours, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
      self.assertLess(max_diff(ours, theirs.numpy()), 1e-5)
    for ours, theirs in zip(out.attentions, ref.attentions, strict=True):
      self.assertLess(max_diff(ours, theirs.numpy()), 1e-5)
    if head == "none":
      self.assertIsNone(out.logits)
      return
    logits = np.asarray(out.logits)
    if head == "mlm":
      self.assertTrue(np.all(logits[..., VOCAB:] < -1e8))
      logits = logits[..., :VOCAB]
    self.assertLess(max_diff(logits, torch_logits(ref, head)), 1e-5)

  @parameterized.parameters(*HEADS)
  def test_export_reloads_in_transformers(self, head):
    path, ref_model = self.dirs[head]
    model, params = hf.load_hf(path)
    out_dir = self.tmp("export")
    hf.save_hf(out_dir, model, params)
    loaded, info = CLASSES[head].from_pretrained(
      out_dir, output_loading_info=True, attn_implementation="eager"
    )
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
      self.assertEmpty(info[kind], kind)
    ids, mask = batch(seed=1)
    a = torch_forward(ref_model, ids, mask)
    b = torch_forward(loaded.eval(), ids, mask)
    self.assertLess(
      max_diff(a.hidden_states[-1].numpy(), b.hidden_states[-1].numpy()), 1e-6
    )
    if head != "none":
      self.assertLess(
        max_diff(torch_logits(a, head), torch_logits(b, head)), 1e-6
      )
    # And back: the same parameters, bit for bit.
    _, again = hf.load_hf(out_dir)
    flat_a, flat_b = flatten_dict(params), flatten_dict(again)
    self.assertEqual(set(flat_a), set(flat_b))
    for k, v in flat_a.items():
      np.testing.assert_array_equal(v, flat_b[k])

  def test_config_json_both_ways(self):
    path, _ = self.dirs["sequence_classification"]
    with open(os.path.join(path, hf.CONFIG)) as f:
      theirs = json.load(f)
    cfg = ModelConfig.from_hf_dict(theirs)
    self.assertEqual(
      (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads),
      (32, 2, 4),
    )
    self.assertEqual((cfg.intermediate_size, cfg.hidden_act), (64, "gelu"))
    self.assertEqual((cfg.layer_norm_eps, cfg.pad_token_id), (1e-12, 0))
    self.assertEqual((cfg.seq_classif_dropout, cfg.qa_dropout), (0.2, 0.1))
    ours = cfg.to_hf_dict()
    for key in ("dim", "n_layers", "n_heads", "hidden_dim", "activation"):
      self.assertEqual(ours[key], theirs[key], key)
    for key in ("dropout", "attention_dropout", "seq_classif_dropout"):
      self.assertEqual(ours[key], theirs[key], key)
    self.assertFalse(ours["sinusoidal_pos_embds"])
    for key in ("hidden_size", "type_vocab_size", "layer_norm_eps"):
      self.assertNotIn(key, ours)
    self.assertEqual(ModelConfig.from_hf_dict(ours), cfg)
    # A student states the teacher's dropout in DistilBERT's keys and
    # reads its own training rates back.
    student = student_init.student_config(cfg)
    d = student.to_hf_dict()
    self.assertEqual((d["dropout"], d["attention_dropout"]), (0.1, 0.1))
    self.assertEqual(ModelConfig.from_hf_dict(d), student)
    self.assertEqual(student.hidden_dropout_prob, 0.0)

  def test_distilmbert_preset_has_the_papers_size(self):
    from bistil_jax.model import preset  # noqa: PLC0415
    from bistil_jax.model.encoder import abstract_params  # noqa: PLC0415

    cfg = preset("distilmbert", head="none")
    sizes = measure.count_parameters(nn.unbox(abstract_params(cfg)), cfg)
    self.assertEqual(round(sizes["total"] / 1e6), 135)
    self.assertEqual(cfg.architecture, "DistilBertModel")

  def test_refusals(self):
    with self.assertRaisesRegex(BistilError, "sinusoidal_pos_embds"):
      ModelConfig.from_hf_dict(
        {"model_type": "distilbert", "sinusoidal_pos_embds": True}
      )
    with self.assertRaisesRegex(BistilError, "DistilBERT options"):
      ModelConfig(qa_dropout=0.1)
    distil = dict(model_type="distilbert", type_vocab_size=0)
    with self.assertRaisesRegex(BistilError, "no classifier_dropout"):
      ModelConfig(**distil, classifier_dropout=0.3)
    with self.assertRaisesRegex(BistilError, "no token types"):
      ModelConfig(model_type="distilbert")
    cfg = ModelConfig(**distil)  # HF's defaults for its own dropouts
    self.assertEqual((cfg.seq_classif_dropout, cfg.qa_dropout), (0.2, 0.1))

  def test_untied_decoder_and_flax_export(self):
    path, ref_model = make_dir(self.root, "mlm", seed=3, tie_word_embeddings=0)
    model, params = hf.load_hf(path)
    self.assertFalse(model.config.tie_word_embeddings)
    self.assertIn("decoder", params["lm_head"])
    ids, mask = batch(seed=2)
    ref = torch_forward(ref_model, ids, mask)
    out = ours_forward(model, params, ids, mask)
    self.assertLess(max_diff(out.logits[..., :VOCAB], ref.logits.numpy()), 1e-5)
    for tied in (False, True):
      if tied:
        path, ref_model = self.dirs["mlm"]
        model, params = hf.load_hf(path)
      out_dir = self.tmp(f"flax-{tied}")
      hf.save_hf(out_dir, model, params)
      os.remove(os.path.join(out_dir, hf.SAFETENSORS))  # force the msgpack
      flax_model = T.FlaxDistilBertForMaskedLM.from_pretrained(out_dir)
      want = T.FlaxDistilBertForMaskedLM(flax_model.config, seed=1).params
      self.assertEqual(
        set(flatten_dict(flax_model.params)), set(flatten_dict(want))
      )
      got = flax_model(ids, attention_mask=mask).logits
      ref = torch_forward(ref_model, ids, mask)
      self.assertLess(max_diff(got, ref.logits.numpy()), 1e-5)

  def test_inspect_task_head_student_and_measure(self):
    path, ref_model = self.dirs["mlm"]
    info = commands.inspect_dir(path)
    self.assertEqual(info["architecture"], "DistilBertForMaskedLM")
    n_torch = sum(p.numel() for p in ref_model.parameters())
    self.assertEqual(info["parameters"]["total"], n_torch)
    self.assertEqual(run_cli("inspect", path, "--json")[0], 0)
    model, params = hf.load_hf(path)
    # A sequence head on DistilBERT takes no pooler.
    p2, cfg2, fresh = surgery.with_task_head(
      params, model.config, "sequence_classification", ("a", "b"),
      jax.random.PRNGKey(0),
    )  # fmt: skip
    self.assertFalse(cfg2.add_pooler)
    self.assertEqual(fresh, ["classifier"])
    self.assertEqual(set(p2["classifier"]), {"dense", "out_proj"})
    # Student: every other layer of the teacher.
    scfg = student_init.student_config(model.config, layer_reduction=2)
    sp = student_init.init_student(
      params, model.config, scfg, "teacher_layers", jax.random.PRNGKey(0)
    )
    np.testing.assert_array_equal(
      sp["encoder"]["layer"]["0"]["output"]["dense"]["kernel"],
      params["encoder"]["layer"]["1"]["output"]["dense"]["kernel"],
    )
    out_dir = self.tmp("student")
    hf.save_hf(out_dir, scfg, sp)
    self.assertEqual(T.AutoConfig.from_pretrained(out_dir).n_layers, 1)
    # MACs: the layers and the sequence head; no pooler anywhere.
    cfg = cfg2.replace(num_labels=2)
    macs = measure.analytic_macs(cfg, 1, 8)
    d, f, l = 32, 64, 8
    self.assertEqual(
      macs["encoder"], 2 * (4 * l * d * d + 2 * l * l * d + 2 * l * d * f)
    )
    self.assertEqual(macs["head"], d * d + d * 2)
    sizes = measure.count_parameters(p2, cfg2)
    self.assertEqual(sizes["head"], d * d + d + d * 2 + 2)
    self.assertEqual(sizes["embeddings"], (VOCAB + 40) * d + 2 * d)

  def test_onnx_export_without_token_types(self):
    from bistil_jax.deploy import onnx  # noqa: PLC0415

    path, ref_model = self.dirs["sequence_classification"]
    model, params = hf.load_hf(path)
    out = self.tmp("onnx")
    onnx.export(out, model, params, tokenizer_dir=None, max_seq_len=16)
    sess, _ = onnx.dir_session(out)
    self.assertEqual(
      [i.name for i in sess.get_inputs()], ["input_ids", "attention_mask"]
    )
    ids, mask = batch()
    types = np.zeros_like(ids)  # a task batch has them: not fed
    got = onnx.run(
      sess, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    )
    want = torch_forward(ref_model, ids, mask).logits.numpy()
    self.assertLess(max_diff(got, want), 1e-5)

  def test_trim_vocab_of_a_distilbert_dir(self):
    src = self.tmp("src")
    tok = make_wordpiece_dir(src)
    torch.manual_seed(0)
    ref = T.DistilBertForMaskedLM(hf_config(vocab_size=tok.get_vocab_size()))
    ref.eval().save_pretrained(src)
    root = os.path.dirname(src)
    lines = make_lines("aa", 300, 2)
    s = write_lines(os.path.join(root, "s.txt"), lines)
    t = write_lines(os.path.join(root, "t.txt"), make_lines("bb", 300, 3))
    out = self.tmp("trimmed")
    # min_count=1 keeps every token of the corpora (test lines among them).
    report = trim.trim_model_dir(src, s, t, out, threshold=None, min_count=1)
    keep = vocab.keep_ids_from_vocab_map(
      vocab.read_vocab_map(os.path.join(out, vocab.VOCAB_MAP))
    )
    self.assertEqual(report["vocab_size_after"], keep.size)
    new = T.AutoModelForMaskedLM.from_pretrained(out).eval()
    self.assertIsInstance(new, T.DistilBertForMaskedLM)
    new_tok = T.AutoTokenizer.from_pretrained(out)
    old_tok = T.AutoTokenizer.from_pretrained(src)
    enc_new = new_tok(lines[:4], padding=True, return_tensors="np")
    enc_old = old_tok(lines[:4], padding=True, return_tensors="np")
    np.testing.assert_array_equal(keep[enc_new["input_ids"]],
                                  enc_old["input_ids"])  # fmt: skip
    a = torch_forward(ref, enc_old["input_ids"], enc_old["attention_mask"])
    b = torch_forward(new, enc_new["input_ids"], enc_new["attention_mask"])
    m = enc_old["attention_mask"].astype(bool)
    self.assertLess(
      max_diff(a.logits.numpy()[m][:, keep], b.logits.numpy()[m]), 1e-5
    )


if __name__ == "__main__":
  absltest.main()
