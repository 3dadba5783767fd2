"""A BERT body with XLM-R's SentencePiece (Unigram) tokenizer, as in
multilingual MiniLM: fp32 parity, trim-vocab and export-hf with the trimmed
tokenizer loading in transformers, and dirs that hold only
`sentencepiece.bpe.model` (read here without the sentencepiece package)."""

import json
import os
import shutil
import struct
import tempfile
import types

import jax.numpy as jnp
import numpy as np
import torch
import transformers as T
from absl.testing import absltest
from tokenizers import Tokenizer
from transformers.convert_slow_tokenizer import XLMRobertaConverter
from transformers.utils import sentencepiece_model_pb2_new as spm_pb2

from bistil_jax.checkpoint import hf, trim
from bistil_jax.data import spm, vocab
from bistil_jax.errors import BistilError
from tests.checkpoint.hf_test import max_diff, run_cli
from tests.data.vocab_test import make_lines, make_unigram_dir, write_lines

# A charsmap whose double array (256 zero units) matches nothing: it checks
# that the normaliser bytes pass through, not what a real one maps.
EMPTY_CHARSMAP = struct.pack("<I", 1024) + bytes(1024)


def bert_mlm(vocab_size, seed=0):
  """A random BertForMaskedLM, width 48, naming XLM-R's tokenizer."""
  torch.manual_seed(seed)
  cfg = T.BertConfig(
    vocab_size=vocab_size,
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=96,
    max_position_embeddings=64,
    pad_token_id=1,
    tokenizer_class="XLMRobertaTokenizer",
    attn_implementation="eager",
  )
  model = T.BertForMaskedLM(cfg)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "LayerNorm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def spm_proto(tok_json, charsmap=b""):
  """XLM-R's .model for a Unigram tokenizer.json laid out as fairseq's
  dictionary (<s> <pad> </s> <unk> pieces...): <unk> <s> </s> pieces..."""
  m = spm_pb2.ModelProto()
  pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
  pieces += [(p, s, 1) for p, s in tok_json["model"]["vocab"][4:]]
  for piece, score, kind in pieces:
    q = m.pieces.add()
    q.piece, q.score, q.type = piece, score, kind
  m.trainer_spec.model_type = 1
  m.normalizer_spec.precompiled_charsmap = charsmap
  return m


def reference_tokenizer(model_file):
  """transformers' own conversion (protobuf only, no sentencepiece)."""
  slow = types.SimpleNamespace(
    vocab_file=model_file, convert_tokens_to_ids={"<s>": 0, "</s>": 2}.get
  )
  backend = XLMRobertaConverter(slow).converted()
  return T.XLMRobertaTokenizerFast(tokenizer_object=backend)


def forward(model, enc):
  with torch.no_grad():
    return model(
      torch.tensor(enc["input_ids"]),
      attention_mask=torch.tensor(enc["attention_mask"]),
      output_hidden_states=True,
      output_attentions=True,
    )


class SentencePieceBertTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a busy 2-core machine
    cls.root = tempfile.mkdtemp()
    # A BERT body with a Unigram tokenizer.json (Metaspace, XLM-R's
    # post-processor) and tokenizer_config.json naming XLM-R's class.
    cls.src = os.path.join(cls.root, "minilm")
    tok = make_unigram_dir(cls.src)
    cls.size = tok.get_vocab_size()
    cls.model = bert_mlm(cls.size)
    cls.model.save_pretrained(cls.src)
    cls.tok_json = json.loads(tok.to_str())
    # The same model with only XLM-R's sentencepiece.bpe.model.
    cls.spm_dir = os.path.join(cls.root, "spm-only")
    cls.model.save_pretrained(cls.spm_dir)
    with open(os.path.join(cls.spm_dir, spm.XLMR_MODEL_FILE), "wb") as f:
      f.write(spm_proto(cls.tok_json, EMPTY_CHARSMAP).SerializeToString())
    source, target = make_lines("aa", 400, 2), make_lines("bb", 400, 3)
    cls.corpora = (
      write_lines(os.path.join(cls.root, "s.txt"), source),
      write_lines(os.path.join(cls.root, "t.txt"), target),
    )
    # Lines of the corpora: trimming with min_count=1 keeps all their pieces.
    cls.lines = source[:3] + target[:3]

  @classmethod
  def tearDownClass(cls):
    torch.set_num_threads(cls._threads)
    shutil.rmtree(cls.root, True)
    super().tearDownClass()

  def tmp(self, name):
    return os.path.join(tempfile.mkdtemp(dir=self.root), name)

  def encode(self, tok):
    return tok(self.lines, padding=True, return_tensors="np")

  def test_fp32_parity_with_transformers(self):
    model, params = hf.load_hf(self.src)
    self.assertEqual(model.config.hidden_size, 48)
    self.assertEqual(model.config.tokenizer_class, "XLMRobertaTokenizer")
    enc = self.encode(T.AutoTokenizer.from_pretrained(self.src))
    self.assertEqual(int(enc["input_ids"][0, 0]), 0)  # <s>
    self.assertIn(1, enc["input_ids"])  # <pad>: the batch is padded
    ref = forward(self.model, enc)
    out = model.apply(
      {"params": params},
      jnp.asarray(enc["input_ids"]),
      attention_mask=jnp.asarray(enc["attention_mask"]),
      output_attentions=True,
    )
    for ours, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
      self.assertLess(max_diff(ours, theirs.numpy()), 1e-5)
    for ours, theirs in zip(out.attentions, ref.attentions, strict=True):
      self.assertLess(max_diff(ours, theirs.numpy()), 1e-5)
    logits = np.asarray(out.logits)[..., : self.size]
    self.assertLess(max_diff(logits, ref.logits.numpy()), 1e-5)

  def check_trimmed_export(self, src_dir, old_tok):
    """trim-vocab, then export-hf; the export loads in AutoTokenizer and
    AutoModelForMaskedLM and agrees with the original on kept tokens."""
    out = self.tmp("trimmed")
    report = trim.trim_model_dir(
      src_dir, *self.corpora, out, threshold=None, min_count=1
    )
    self.assertEqual(report["tokenizer_model"], "Unigram")
    self.assertNotIn(spm.XLMR_MODEL_FILE, os.listdir(out))
    keep = vocab.keep_ids_from_vocab_map(
      vocab.read_vocab_map(os.path.join(out, vocab.VOCAB_MAP))
    )
    self.assertLess(keep.size, self.size)
    np.testing.assert_array_equal(keep[:4], [0, 1, 2, 3])  # the specials
    exported = self.tmp("export")
    code, err = run_cli("export-hf", "--model", out, "--out", exported)
    self.assertEqual(code, 0, err)
    with open(os.path.join(exported, hf.CONFIG)) as f:
      conf = json.load(f)
    self.assertEqual(conf["tokenizer_class"], "XLMRobertaTokenizer")
    self.assertEqual((conf["model_type"], conf["pad_token_id"]), ("bert", 1))
    new_tok = T.AutoTokenizer.from_pretrained(exported)
    self.assertIsInstance(new_tok, T.XLMRobertaTokenizerFast)
    self.assertEqual(new_tok.pad_token_id, 1)
    new_model, info = T.AutoModelForMaskedLM.from_pretrained(
      exported, output_loading_info=True, attn_implementation="eager"
    )
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
      self.assertEmpty(info[kind], kind)
    enc_old, enc_new = self.encode(old_tok), self.encode(new_tok)
    np.testing.assert_array_equal(keep[enc_new["input_ids"]],
                                  enc_old["input_ids"])  # fmt: skip
    a, b = forward(self.model, enc_old), forward(new_model.eval(), enc_new)
    mask = enc_old["attention_mask"].astype(bool)
    self.assertLess(
      max_diff(a.hidden_states[-1].numpy(), b.hidden_states[-1].numpy()), 1e-5
    )
    self.assertLess(
      max_diff(a.logits.numpy()[mask][:, keep], b.logits.numpy()[mask]), 1e-5
    )

  def test_trim_and_export_with_tokenizer_json(self):
    self.check_trimmed_export(
      self.src, T.AutoTokenizer.from_pretrained(self.src)
    )

  def test_sentencepiece_model_builds_transformers_tokenizer(self):
    model_file = os.path.join(self.spm_dir, spm.XLMR_MODEL_FILE)
    ref = reference_tokenizer(model_file)
    tok, tok_json = vocab.load_tokenizer_dir(self.spm_dir)
    ref_json = json.loads(ref.backend_tokenizer.to_str())
    self.assertEqual(
      [k for k in ref_json if ref_json[k] != tok_json.get(k)], []
    )
    self.assertEqual(tok.get_vocab(with_added_tokens=True), ref.get_vocab())
    texts = self.lines + ["  Ab  <mask> zz.", "ünïcode 12"]
    for text in texts:
      self.assertEqual(tok.encode(text).ids, ref(text)["input_ids"], text)
    pair = tok.encode(texts[0], texts[1]).ids
    self.assertEqual(pair, ref(texts[0], texts[1])["input_ids"])
    # Without a charsmap, as transformers converts it too.
    with open(os.path.join(self.root, "plain.model"), "wb") as f:
      f.write(spm_proto(self.tok_json).SerializeToString())
    ref = reference_tokenizer(f.name)
    mine = spm.xlmr_tokenizer(spm.read_model_file(f.name))
    # Through JSON once, as transformers' copy (scores may move one ulp).
    mine = Tokenizer.from_str(mine.to_str())
    self.assertEqual(mine.to_str(), ref.backend_tokenizer.to_str())

  def test_wire_format_reader(self):
    proto = spm_proto(self.tok_json, EMPTY_CHARSMAP)
    got = spm.read_model(proto.SerializeToString())
    self.assertEqual(got.model_type, 1)
    self.assertEqual(got.precompiled_charsmap, EMPTY_CHARSMAP)
    self.assertEqual(
      [(p.piece, p.score, p.type) for p in got.pieces],
      [(p.piece, p.score, p.type) for p in proto.pieces],
    )
    with self.assertRaisesRegex(ValueError, "truncated|past the end"):
      spm.read_model(proto.SerializeToString()[:-3])
    proto.trainer_spec.model_type = 2  # BPE
    with self.assertRaisesRegex(BistilError, "not Unigram"):
      spm.xlmr_tokenizer(spm.read_model(proto.SerializeToString()))

  def test_trim_and_export_from_sentencepiece_model(self):
    model_file = os.path.join(self.spm_dir, spm.XLMR_MODEL_FILE)
    self.check_trimmed_export(self.spm_dir, reference_tokenizer(model_file))

  def test_other_sentencepiece_layouts_refused(self):
    d = self.tmp("camembert")
    shutil.copytree(self.spm_dir, d)
    with open(os.path.join(d, vocab.TOKENIZER_CONFIG), "w") as f:
      json.dump({"tokenizer_class": "CamembertTokenizer"}, f)
    with self.assertRaisesRegex(BistilError, "CamembertTokenizer.*not XLM-R"):
      vocab.load_tokenizer_dir(d)


if __name__ == "__main__":
  absltest.main()
