"""checkpoint.trim: trimmed HF model dirs against the original models."""

import argparse
import contextlib
import io
import json
import os
import shutil
import tempfile

import numpy as np
from absl.testing import absltest, parameterized

from bistil_jax.checkpoint import trim
from bistil_jax.data import trim_cli, vocab
from bistil_jax.errors import BistilError
from tests.data.vocab_test import MAKERS, TmpDirTest, make_lines, write_lines


def _torch_mlm(kind, vocab_size, seed=0):
  import torch  # noqa: PLC0415
  import transformers as T  # noqa: PLC0415

  torch.manual_seed(seed)
  common = dict(
    vocab_size=vocab_size,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    attn_implementation="eager",
  )
  if kind == "wordpiece":
    model = T.BertForMaskedLM(
      T.BertConfig(max_position_embeddings=64, **common)
    )
  else:  # XLM-R-like, with an untied decoder to cover that leaf too.
    model = T.XLMRobertaForMaskedLM(
      T.XLMRobertaConfig(
        max_position_embeddings=66,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
        tie_word_embeddings=False,
        **common,
      )
    )
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias"):
        p.add_(0.5 * torch.randn_like(p))
  return model.eval()


class TrimModelDirTest(TmpDirTest):
  @classmethod
  def setUpClass(cls):
    import torch  # noqa: PLC0415

    super().setUpClass()
    # Tiny models: one torch thread avoids OpenMP barrier stalls on a busy
    # 2-core machine (seconds per forward once JAX's threads exist).
    cls._torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cls._dir = tempfile.mkdtemp()
    cls.models = {}
    for kind, maker in MAKERS.items():
      d = os.path.join(cls._dir, kind)
      tok = maker(d)
      model = _torch_mlm(kind, tok.get_vocab_size())
      model.save_pretrained(d, safe_serialization=True)
      cls.models[kind] = (d, tok, model)
    cls.src = write_lines(
      os.path.join(cls._dir, "src.txt.gz"), make_lines("aa", 800, 2), gz=True
    )
    cls.tgt = write_lines(
      os.path.join(cls._dir, "tgt.txt"), make_lines("bb", 800, 3)
    )
    cls.test_lines = make_lines("aa", 30, 9) + make_lines("bb", 30, 9)

  @classmethod
  def tearDownClass(cls):
    import torch  # noqa: PLC0415

    torch.set_num_threads(cls._torch_threads)
    shutil.rmtree(cls._dir)
    super().tearDownClass()

  @parameterized.parameters("wordpiece", "unigram")
  def test_trimmed_model_matches_original(self, kind):
    import torch  # noqa: PLC0415
    import transformers as T  # noqa: PLC0415

    src_dir, old_tok, old_model = self.models[kind]
    out = self.path("trimmed")
    report = trim.trim_model_dir(
      src_dir, self.src, self.tgt, out, threshold=1e-3, num_threads=2
    )
    vmap = vocab.read_vocab_map(os.path.join(out, "vocab_map.json"))
    keep = vocab.keep_ids_from_vocab_map(vmap)
    self.assertEqual(report["vocab_size_after"], keep.size)
    self.assertLess(keep.size, 0.8 * old_tok.get_vocab_size())
    with open(os.path.join(out, "trim_report.json")) as f:
      on_disk = json.load(f)
    self.assertEqual(on_disk["vocab_size_before"], old_tok.get_vocab_size())
    self.assertEqual(on_disk["corpora"]["source"]["lines"], 800)
    self.assertLess(on_disk["parameters_after"], on_disk["parameters_before"])
    hidden = 32 * (1 if kind == "wordpiece" else 2) + 1  # emb (+dec) + bias
    self.assertEqual(
      on_disk["parameters_before"] - on_disk["parameters_after"],
      (old_tok.get_vocab_size() - keep.size) * hidden,
    )
    self.assertIn("vocab", report["summary"])
    self.assertEqual(
      sorted(os.listdir(self.tmp)), ["trimmed"]
    )  # no staging leftovers

    new_tok = T.AutoTokenizer.from_pretrained(out)
    new_model = T.AutoModelForMaskedLM.from_pretrained(out).eval()
    self.assertEqual(new_model.config.vocab_size, keep.size)
    self.assertEqual(len(new_tok), keep.size)
    old2new = vocab.old2new_array(keep, old_tok.get_vocab_size())
    checked = 0
    for line in self.test_lines:
      old_ids = old_tok.encode(line).ids
      if (old2new[old_ids] < 0).any():
        continue
      checked += 1
      new_ids = new_tok(line)["input_ids"]
      self.assertEqual(new_ids, old2new[old_ids].tolist())
      with torch.no_grad():
        want = old_model(torch.tensor([old_ids])).logits[0][:, keep]
        got = new_model(torch.tensor([new_ids])).logits[0]
      np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)
    self.assertGreater(checked, 40)
    self.assertEqual(
      new_tok.mask_token_id, old2new[old_tok.token_to_id(new_tok.mask_token)]
    )
    if kind == "unigram":
      self.assertEqual(
        report["removed_tokenizer_files"], ["sentencepiece.bpe.model"]
      )
      self.assertNotIn("sentencepiece.bpe.model", os.listdir(out))
      self.assertEqual(new_model.config.pad_token_id, 1)

  def test_counts_out_then_in_and_cli(self):
    src_dir = self.models["unigram"][0]
    counts = self.path("counts.npz")
    parser = argparse.ArgumentParser()
    trim_cli.register(parser.add_subparsers())
    args = parser.parse_args(
      [
        "trim-vocab",
        "--model",
        src_dir,
        "--source",
        self.src,
        "--target",
        self.tgt,
        "--out",
        self.path("a"),
        "--counts-out",
        counts,
        "--max-lines",
        "500",
        "--min-count",
        "2",
        "--quiet",
      ]
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      self.assertEqual(args.func(args), 0)
    self.assertIn("vocab", out.getvalue())
    # Reuse the counts: no corpora needed, same selection.
    report = trim.trim_model_dir(
      src_dir, None, None, self.path("b"), min_count=2, counts_in=counts
    )
    self.assertEqual(report["corpora"]["source"]["lines"], 500)
    self.assertEqual(report["selection"]["threshold"], 1e-6)
    a = vocab.read_vocab_map(self.path("a", "vocab_map.json"))
    b = vocab.read_vocab_map(self.path("b", "vocab_map.json"))
    self.assertEqual(a, b)
    # Counts of the other tokenizer are refused.
    with self.assertRaisesRegex(BistilError, "different tokenizer"):
      trim.trim_model_dir(
        self.models["wordpiece"][0],
        None,
        None,
        self.path("c"),
        counts_in=counts,
      )
    # Coverage alone through the CLI switches the default threshold off.
    args = parser.parse_args(
      [
        "trim-vocab",
        "--model",
        src_dir,
        "--counts-in",
        counts,
        "--out",
        self.path("d"),
        "--coverage",
        "0.9",
        "--quiet",
      ]
    )
    with contextlib.redirect_stdout(io.StringIO()):
      args.func(args)
    with open(self.path("d", "trim_report.json")) as f:
      sel = json.load(f)["selection"]
    self.assertEqual((sel["threshold"], sel["coverage"]), (None, 0.9))

  def test_out_dir_is_never_destroyed(self):
    src_dir = self.models["wordpiece"][0]
    out = self.path("out")
    os.makedirs(out)
    with open(os.path.join(out, "keep.txt"), "w") as f:
      f.write("precious")
    with self.assertRaisesRegex(BistilError, "exists and is not empty"):
      trim.trim_model_dir(src_dir, self.src, self.tgt, out)
    # A failure after the checks (empty target) leaves it untouched too.
    empty = write_lines(self.path("empty.txt"), ["", " "])
    with self.assertRaisesRegex(BistilError, "empty"):
      trim.trim_model_dir(src_dir, self.src, empty, out, overwrite=True)
    # As does a selection that keeps nothing.
    with self.assertRaisesRegex(BistilError, "keeps no token"):
      trim.trim_model_dir(
        src_dir, self.src, self.tgt, out, threshold=0.9, overwrite=True
      )
    self.assertEqual(os.listdir(out), ["keep.txt"])
    self.assertEqual(sorted(os.listdir(self.tmp)), ["empty.txt", "out"])
    trim.trim_model_dir(
      src_dir, self.src, self.tgt, out, overwrite=True, max_lines=100
    )
    self.assertNotIn("keep.txt", os.listdir(out))
    self.assertIn("vocab_map.json", os.listdir(out))
    with self.assertRaisesRegex(BistilError, "is the input model dir"):
      trim.trim_model_dir(src_dir, self.src, self.tgt, src_dir, overwrite=True)

  def test_bad_inputs(self):
    src_dir = self.models["wordpiece"][0]
    out = self.path("o")
    with self.assertRaisesRegex(BistilError, "corpus file not found: .*nope"):
      trim.trim_model_dir(src_dir, self.src, self.path("nope.txt"), out)
    with self.assertRaisesRegex(BistilError, "give both source and target"):
      trim.trim_model_dir(src_dir, self.src, None, out)
    with self.assertRaisesRegex(BistilError, "threshold must be in"):
      trim.trim_model_dir(src_dir, self.src, self.tgt, out, threshold=-1)
    with self.assertRaisesRegex(
      BistilError, "has no tokenizer.json .*save_pretrained"
    ):
      trim.trim_model_dir(self.tmp, self.src, self.tgt, out)
    with self.assertRaisesRegex(BistilError, "counts file not found"):
      trim.trim_model_dir(
        src_dir, None, None, out, counts_in=self.path("x.npz")
      )
    self.assertFalse(os.path.exists(out))

  def test_warns_when_original_tokenizer_misses_a_corpus(self):
    src_dir = self.models["unigram"][0]
    greek = write_lines(self.path("gr.txt"), make_lines("gr", 100))
    with self.assertLogs("bistil_jax.checkpoint.trim", "WARNING") as logs:
      report = trim.trim_model_dir(src_dir, self.src, greek, self.path("o"))
    msg = "\n".join(logs.output)
    self.assertRegex(msg, r"target corpus .*gr\.txt: \d+\.\d% of its tokens")
    self.assertIn("sentencepiece.bpe.model", msg)
    self.assertGreater(report["corpora"]["target"]["unk_rate_original"], 0.05)
    self.assertLess(report["corpora"]["source"]["unk_rate_original"], 0.05)


if __name__ == "__main__":
  absltest.main()
