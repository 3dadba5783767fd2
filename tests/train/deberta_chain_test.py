"""A tiny DeBERTa-v3 teacher through the whole chain from the CLI (issue 23).

The paper's QA teacher is mDeBERTa-v3-base. Here a 6-layer DeBERTa-v3-style
MLM (relative attention with log buckets, shared keys, no absolute
positions), written by transformers with an mDeBERTa-like Unigram
tokenizer, is trimmed to two corpora, distilled at layer reductions 2 and 3,
task-tuned on SQuAD-format QA, and its 3-layer student is LT-SFT'd against
that teacher, evaluated (F1/EM) and exported; the export loads in
transformers' AutoModelForQuestionAnswering with the same logits.
"""

import json
import os
import tempfile

import numpy as np
import torch
import transformers
from absl.testing import absltest
from tokenizers import (
  AddedToken,
  Tokenizer,
  models,
  normalizers,
  pre_tokenizers,
  processors,
  trainers,
)

from bistil_jax import tasks as tasks_lib
from bistil_jax.checkpoint import hf, surgery
from bistil_jax.data import qa as qa_data
from bistil_jax.data import vocab
from bistil_jax.train import loop
from tests.train.qa_task_test import make_squad
from tests.train.task_test import must_run, read_json

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIGS = os.path.join(REPO, "configs")
# mDeBERTa-v3's special tokens and their ids ([MASK] after the pieces).
SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]


def write_deberta_tokenizer(lines, out: str) -> Tokenizer:
  """A Unigram tokenizer dir laid out as mDeBERTa-v3's."""
  tok = Tokenizer(models.Unigram())
  tok.normalizer = normalizers.NFKC()
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = None
  tok.train_from_iterator(
    lines,
    trainers.UnigramTrainer(
      vocab_size=300, special_tokens=SPECIALS, unk_token="[UNK]"
    ),
  )
  tok.add_special_tokens([AddedToken("[MASK]", special=True)])
  cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
  tok.post_processor = processors.TemplateProcessing(
    single="[CLS] $A [SEP]",
    pair="[CLS] $A [SEP] $B:1 [SEP]:1",
    special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
  )
  os.makedirs(out, exist_ok=True)
  tok.save(os.path.join(out, "tokenizer.json"))
  with open(os.path.join(out, "spm.model"), "wb") as f:
    f.write(b"\x0a\x05stale")  # stands for the untrimmed protobuf
  specials = dict(
    bos_token="[CLS]",
    eos_token="[SEP]",
    unk_token="[UNK]",
    sep_token="[SEP]",
    pad_token="[PAD]",
    cls_token="[CLS]",
    mask_token="[MASK]",
  )
  with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
    json.dump(specials, f)
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump(
      dict(specials, tokenizer_class="DebertaV2Tokenizer", do_lower_case=False),
      f,
    )
  return tok


def write_deberta_teacher(tok_dir: str, out: str, layers: int = 6) -> str:
  tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
  config = transformers.DebertaV2Config(
    vocab_size=tok.get_vocab_size(),
    hidden_size=64,
    num_hidden_layers=layers,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=128,
    type_vocab_size=0,
    relative_attention=True,
    position_biased_input=False,
    pos_att_type=["p2c", "c2p"],
    share_att_key=True,
    position_buckets=32,
    max_relative_positions=-1,
    norm_rel_ebd="layer_norm",
    pad_token_id=0,
    hidden_act="gelu",
  )
  torch.manual_seed(0)
  model = transformers.DebertaV2ForMaskedLM(config)
  model.save_pretrained(out)
  for name in os.listdir(tok_dir):
    with open(os.path.join(tok_dir, name), "rb") as src:
      with open(os.path.join(out, name), "wb") as dst:
        dst.write(src.read())
  return out


class DebertaChainTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.TemporaryDirectory()
    root = cls.root = cls._tmp.name
    cls.train = os.path.join(root, "train.json")
    cls.dev = os.path.join(root, "dev.json")
    docs = {cls.train: make_squad(96, 1), cls.dev: make_squad(32, 2)}
    lines = []
    for path, doc in docs.items():
      with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f)
      for p in doc["data"][0]["paragraphs"]:
        lines += [p["context"], p["qas"][0]["question"]]
    cls.src = os.path.join(root, "src.txt")
    cls.tgt = os.path.join(root, "tgt.txt")
    half = len(lines) // 2
    for path, part in ((cls.src, lines[:half]), (cls.tgt, lines[half:])):
      with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(part) + "\n")
    tok_dir = os.path.join(root, "tok")
    write_deberta_tokenizer(lines, tok_dir)
    cls.mmt = write_deberta_teacher(tok_dir, os.path.join(root, "mmt"))
    cls.trimmed = os.path.join(root, "trimmed")
    must_run(
      ["trim-vocab", "--model", cls.mmt, "--source", cls.src, "--target",
       cls.tgt, "--out", cls.trimmed, "--quiet"]
    )  # fmt: skip
    cls.students = {}
    for r in (2, 3):
      wd = os.path.join(root, f"distil_r{r}")
      must_run(
        [
          "distil",
          "--config",
          os.path.join(CONFIGS, "distil.py:tiny"),
          "--workdir",
          wd,
          f"--config.teacher.model={cls.trimmed}",
          f"--config.data.source={cls.src}",
          f"--config.data.target={cls.tgt}",
          f"--config.student.layer_reduction={r}",
          "--config.train.num_steps=3",
          "--config.train.log_every=1",
          "--config.data.max_seq_len=32",
        ]
      )
      cls.students[r] = os.path.join(wd, "export")
    cls.teacher_wd = os.path.join(root, "teacher")
    must_run(
      [
        "finetune",
        "--config",
        os.path.join(CONFIGS, "finetune.py:qa,variant=tiny"),
        "--workdir",
        cls.teacher_wd,
        f"--config.student.model={cls.trimmed}",
        f"--config.data.train={cls.train}",
        f"--config.eval.sets=dev={cls.dev}",
        "--config.train.epochs=3",
        "--config.train.log_every=8",
      ]
    )
    cls.teacher = os.path.join(cls.teacher_wd, "export")
    cls.sft_wd = os.path.join(root, "sft")
    must_run(
      [
        "sft",
        "--config",
        os.path.join(CONFIGS, "sft.py:qa,variant=tiny"),
        "--workdir",
        cls.sft_wd,
        f"--config.student.model={cls.students[2]}",
        f"--config.teacher.model={cls.teacher}",
        f"--config.data.train={cls.train}",
        f"--config.eval.sets=dev={cls.dev}",
        "--config.train.log_every=8",
      ]
    )
    cls.sft = os.path.join(cls.sft_wd, "export")

  @classmethod
  def tearDownClass(cls):
    cls._tmp.cleanup()
    super().tearDownClass()

  def test_trim_keeps_the_deberta_layout_and_exact_ids(self):
    model, _ = hf.load_hf(self.trimmed)
    self.assertEqual(model.config.model_type, "deberta-v2")
    self.assertFalse(model.config.position_biased_input)
    report = read_json(os.path.join(self.trimmed, "trim_report.json"))
    self.assertLess(report["vocab_size_after"], report["vocab_size_before"])
    # The SentencePiece file would still hold the untrimmed vocabulary.
    self.assertTrue(os.path.exists(os.path.join(self.mmt, "spm.model")))
    self.assertFalse(os.path.exists(os.path.join(self.trimmed, "spm.model")))
    self.assertEqual(model.config.vocab_size, report["vocab_size_after"])
    old, _ = vocab.load_tokenizer_dir(self.mmt)
    new, _ = vocab.load_tokenizer_dir(self.trimmed)
    vmap = vocab.read_vocab_map(os.path.join(self.trimmed, "vocab_map.json"))
    with open(self.src, encoding="utf-8") as f:
      line = f.readline().strip()
    ids_old = old.encode(line).ids
    ids_new = new.encode(line).ids
    self.assertEqual([vmap[i] for i in ids_old], ids_new)

  def test_students_keep_the_relative_embeddings_at_both_reductions(self):
    _, tparams = hf.load_hf(self.trimmed)
    for r, layers in ((2, 3), (3, 2)):
      model, params = hf.load_hf(self.students[r])
      self.assertEqual(model.config.num_hidden_layers, layers)
      self.assertEqual(model.config.model_type, "deberta-v2")
      self.assertIn("rel_embeddings", params["encoder"])
      self.assertEqual(
        params["encoder"]["rel_embeddings"]["embedding"].shape,
        tparams["encoder"]["rel_embeddings"]["embedding"].shape,
      )
      # Phase 1 read the disentangled attention's probabilities and the
      # hidden states of both models.
      wd = os.path.dirname(self.students[r])
      rows = [
        row
        for row in loop.read_metrics(os.path.join(wd, "metrics"))
        if "train/loss" in row
      ]
      self.assertNotEmpty(rows)
      for term in ("loss", "hidden", "attention"):
        values = [row[f"train/{term}"] for row in rows]
        self.assertTrue(np.all(np.isfinite(values)), term)
        self.assertGreater(values[0], 0.0, term)

  def test_evaluate_and_export_load_in_transformers(self):
    out = os.path.join(self.root, "eval.json")
    must_run(
      ["evaluate", "--model", self.students[2], "--sft", self.sft, "--task",
       "qa", "--data", f"dev={self.dev}", "--out", out]
    )  # fmt: skip
    res = read_json(out)["dev"]
    self.assertContainsSubset({"f1", "exact_match"}, res)
    teacher = read_json(os.path.join(self.teacher_wd, "results.json"))["dev"]
    self.assertGreater(teacher["f1"], 0.0)
    exported = os.path.join(self.root, "student_qa")
    must_run(
      ["export-hf", "--model", self.students[2], "--sft", self.sft, "--out",
       exported]
    )  # fmt: skip
    ref = transformers.AutoModelForQuestionAnswering.from_pretrained(exported)
    self.assertEqual(type(ref).__name__, "DebertaV2ForQuestionAnswering")
    ours, params = surgery.merged_model(self.students[2], [self.sft])
    tokenizer, _ = vocab.load_tokenizer_dir(self.trimmed)
    examples = tasks_lib.get("qa").read(self.dev)
    data = qa_data.encode_qa(
      examples, tokenizer, 64, train=False, doc_stride=16
    )
    b = {k: getattr(data, k)[:8] for k in ("input_ids", "attention_mask")}
    mine = np.asarray(ours.apply({"params": params}, **b).logits)
    with torch.no_grad():
      theirs = ref.eval()(**{k: torch.tensor(v) for k, v in b.items()})
    real = b["attention_mask"] > 0
    np.testing.assert_allclose(
      mine[..., 0][real], theirs.start_logits.numpy()[real], atol=1e-4
    )


if __name__ == "__main__":
  absltest.main()
