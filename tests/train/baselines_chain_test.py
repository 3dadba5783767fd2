"""The paper's distilled baselines through the CLI (issue 23).

DistilmBERT (a `distilbert` dir, as transformers writes it): the paper
gives it a language SFT and a task LT-SFT; here `lang-sft` on the target
language, a sparse `finetune` (LT-SFT) on the source's POS data,
`evaluate` with both SFTs, and `export-hf --sft`, whose output loads in
transformers' AutoModelForTokenClassification with the same logits.

Multilingual MiniLM (a BERT body with XLM-R's SentencePiece tokenizer): a
task LT-SFT only (no language adaptation, as in the paper), evaluated and
exported; the export loads in AutoTokenizer and AutoModelForTokenClassification.
"""

import os
import tempfile

import numpy as np
import torch
import transformers
from absl.testing import absltest

from bistil_jax import synthetic
from bistil_jax.checkpoint import hf, surgery
from bistil_jax.checkpoint import sft as sft_lib
from bistil_jax.data import vocab
from tests.data.vocab_test import make_unigram_dir
from tests.train.task_test import must_run, read_json

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIGS = os.path.join(REPO, "configs")
SIZES = {
  "corpus_train": 400,
  "corpus_dev": 60,
  "task_train": 96,
  "task_dev": 24,
  "task_test": 24,
}


def finetune_pos(root, model, data, name):
  """A POS LT-SFT of `model` on the source (a1); its workdir."""
  wd = os.path.join(root, name)
  must_run(
    [
      "finetune",
      "--config",
      os.path.join(CONFIGS, "finetune.py:pos,variant=tiny"),
      "--workdir",
      wd,
      f"--config.student.model={model}",
      f"--config.data.train={data.pos['a1']['train']}",
      f"--config.eval.sets=dev={data.pos['a1']['dev']}",
      "--config.sparse.enabled=true",
      "--config.train.epochs=2",
      "--config.sparse.epochs=2",
      "--config.train.log_every=8",
    ]
  )
  return wd


def same_logits(self, exported, model_dir, sfts, tokenizer_dir):
  """The export's transformers logits equal ours with the SFTs applied."""
  ref = transformers.AutoModelForTokenClassification.from_pretrained(exported)
  tok, _ = vocab.load_tokenizer_dir(tokenizer_dir)
  enc = tok.encode("a short line of words to tag")
  ids = np.asarray([enc.ids], np.int32)
  ours, params = surgery.merged_model(model_dir, sfts)
  mine = np.asarray(ours.apply({"params": params}, ids).logits)
  with torch.no_grad():
    theirs = ref.eval()(input_ids=torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(mine, theirs, atol=1e-4)
  return ref


class BaselinesChainTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.TemporaryDirectory()
    root = cls.root = cls._tmp.name
    family = synthetic.make_family(seed=0, num_languages=4)
    cls.data = synthetic.write_dataset(
      os.path.join(root, "synth"), family, ["a1", "a2"], SIZES
    )
    corpora = [cls.data.corpora[c]["train"] for c in cls.data.corpora]
    tok = os.path.join(root, "tok")
    synthetic.train_wordpiece(corpora, tok, vocab_size=400)
    size, _ = vocab.load_tokenizer_dir(tok)
    config = transformers.DistilBertConfig(
      vocab_size=size.get_vocab_size(),
      dim=32,
      n_layers=2,
      n_heads=4,
      hidden_dim=64,
      max_position_embeddings=64,
    )
    torch.manual_seed(0)
    cls.dmb = os.path.join(root, "distilmbert")
    transformers.DistilBertForMaskedLM(config).save_pretrained(cls.dmb)
    hf.copy_tokenizer(tok, cls.dmb)

  @classmethod
  def tearDownClass(cls):
    cls._tmp.cleanup()
    super().tearDownClass()

  def test_distilmbert_language_and_task_sfts_evaluate_and_export(self):
    lang_wd = os.path.join(self.root, "dmb_lang")
    must_run(
      [
        "lang-sft",
        "--config",
        os.path.join(CONFIGS, "lang_sft.py:tiny"),
        "--workdir",
        lang_wd,
        f"--config.student.model={self.dmb}",
        f"--config.data.corpus={self.data.corpora['a2']['train']}",
        f"--config.eval.sets=dev={self.data.corpora['a2']['dev']}",
      ]
    )
    lang = os.path.join(lang_wd, "export")
    res = read_json(os.path.join(lang_wd, "results.json"))
    self.assertLess(res["trained"]["dev/mlm"], res["base"]["dev/mlm"])
    task_wd = finetune_pos(self.root, self.dmb, self.data, "dmb_pos")
    task = os.path.join(task_wd, "export")
    self.assertEqual(
      sft_lib.load_sft(task).meta["head"], "token_classification"
    )
    out = os.path.join(self.root, "dmb_eval.json")
    must_run(
      ["evaluate", "--model", self.dmb, "--sft", lang, "--sft", task,
       "--task", "pos", "--data", f"a2={self.data.pos['a2']['test']}",
       "--out", out]
    )  # fmt: skip
    acc = read_json(out)["a2"]["accuracy"]
    self.assertGreater(acc, 0.0)
    exported = os.path.join(self.root, "dmb_export")
    must_run(
      ["export-hf", "--model", self.dmb, "--sft", lang, "--sft", task,
       "--out", exported]
    )  # fmt: skip
    ref = same_logits(self, exported, self.dmb, [lang, task], self.dmb)
    self.assertEqual(type(ref).__name__, "DistilBertForTokenClassification")

  def test_bert_body_with_sentencepiece_tokenizer_task_sft_and_export(self):
    tok_dir = os.path.join(self.root, "spm_tok")
    tok = make_unigram_dir(tok_dir)
    config = transformers.BertConfig(
      vocab_size=tok.get_vocab_size(),
      hidden_size=48,
      num_hidden_layers=2,
      num_attention_heads=4,
      intermediate_size=96,
      max_position_embeddings=64,
      pad_token_id=tok.token_to_id("<pad>"),
      tokenizer_class="XLMRobertaTokenizer",
    )
    torch.manual_seed(1)
    minilm = os.path.join(self.root, "minilm")
    transformers.BertForMaskedLM(config).save_pretrained(minilm)
    hf.copy_tokenizer(tok_dir, minilm)
    task_wd = finetune_pos(self.root, minilm, self.data, "minilm_pos")
    task = os.path.join(task_wd, "export")
    exported = os.path.join(self.root, "minilm_export")
    must_run(["export-hf", "--model", minilm, "--sft", task, "--out", exported])
    ref = same_logits(self, exported, minilm, [task], minilm)
    self.assertEqual(type(ref).__name__, "BertForTokenClassification")
    fast = transformers.AutoTokenizer.from_pretrained(exported)
    self.assertEqual(type(fast).__name__, "XLMRobertaTokenizerFast")
    text = "a short line of words to tag"
    self.assertEqual(fast(text)["input_ids"], tok.encode(text).ids)


if __name__ == "__main__":
  absltest.main()
