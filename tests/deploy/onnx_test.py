"""`bistil export-onnx` and `bistil predict` on small random models: ONNX
fp32 logits within 1e-4 of the Flax model for each exportable head at
shapes other than the traced one (dynamic axes), the int8 model beside it,
the dir's files and metadata, refusals, and identical predicted labels from
the Flax model and its ONNX export."""

import contextlib
import io
import json
import os
import tempfile

import jax
import numpy as np
from absl.testing import absltest, parameterized

from bistil_jax import cli
from bistil_jax.checkpoint import hf
from bistil_jax.data import task_files
from bistil_jax.deploy import onnx
from bistil_jax.errors import BistilError
from bistil_jax.model import Model, init_params, preset
from tests.data.vocab_test import make_lines, make_wordpiece_dir
from tests.fixtures import write_conllu

SIZE = dict(
  num_hidden_layers=2,
  hidden_size=64,
  num_attention_heads=4,
  intermediate_size=128,
  max_position_embeddings=128,
)
HEADS = {
  "token": dict(
    head="token_classification",
    num_labels=len(task_files.UPOS_LABELS),
    id2label=tuple(task_files.UPOS_LABELS),
  ),
  "sequence": dict(
    head="sequence_classification",
    num_labels=2,
    id2label=("negative", "positive"),
    add_pooler=True,
  ),
  "qa": dict(
    head="question_answering", num_labels=2, id2label=("start", "end")
  ),
  # XLM-R: its own sequence head (dense + tanh on <s>, out_proj), positions
  # counted from the pad id, one token type.
  "xlmr-sequence": dict(
    model_type="xlm-roberta",
    pad_token_id=1,
    type_vocab_size=1,
    head="sequence_classification",
    num_labels=3,
    id2label=("entailment", "neutral", "contradiction"),
    max_position_embeddings=130,
  ),
}


def run_cli(*argv, stdin: str | None = None):
  out, err = io.StringIO(), io.StringIO()
  old = os.sys.stdin
  if stdin is not None:
    os.sys.stdin = io.StringIO(stdin)
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      code = cli.main([str(a) for a in argv])
  finally:
    os.sys.stdin = old
  return code, out.getvalue(), err.getvalue()


def batch(vocab: int, b: int, l: int, seed: int, type_ids: bool):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, vocab, (b, l)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[0, l // 2 :] = 0  # one padded row
  ids[0, l // 2 :] = 0
  types = np.zeros_like(ids)
  if type_ids:
    types[:, l // 3 :] = 1
  return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


class ExportOnnxTest(parameterized.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.TemporaryDirectory()
    cls.root = cls._tmp.name
    cls.tok_dir = os.path.join(cls.root, "tokenizer")
    cls.vocab = make_wordpiece_dir(cls.tok_dir).get_vocab_size()
    cls.models = {}
    for seed, (name, head) in enumerate(HEADS.items()):
      cfg = preset("tiny", vocab_size=cls.vocab, **{**SIZE, **head})
      params = init_params(cfg, jax.random.PRNGKey(seed))
      d = os.path.join(cls.root, name)
      hf.save_hf(d, cfg, params, tokenizer_dir=cls.tok_dir)
      cls.models[name] = (d, cfg, params)

  @classmethod
  def tearDownClass(cls):
    cls._tmp.cleanup()
    super().tearDownClass()

  def exported(self, name: str, *extra) -> str:
    out = os.path.join(self.root, f"{name}-onnx")
    if not os.path.isdir(out):
      d = self.models[name][0]
      code, _, err = run_cli(
        "export-onnx", "--model", d, "--out", out, "--int8", *extra
      )
      self.assertEqual(code, 0, err)
    return out

  @parameterized.parameters("token", "sequence", "qa", "xlmr-sequence")
  def test_fp32_logits_match_flax_within_1e_4(self, name):
    _, cfg, params = self.models[name]
    out = self.exported(name)
    sess, meta = onnx.dir_session(out, "fp32")
    model = Model(cfg)
    worst = 0.0
    # Neither shape is the traced (2, 8): the axes are dynamic.
    for b, l in ((3, 13), (1, 40), (5, 128)):
      types = name in ("sequence", "qa")
      arrays = batch(self.vocab, b, l, b, type_ids=types)
      want = np.asarray(
        model.apply(
          {"params": params},
          arrays["input_ids"],
          attention_mask=arrays["attention_mask"],
          token_type_ids=arrays["token_type_ids"],
        ).logits
      )
      got = onnx.run(sess, arrays)
      self.assertEqual(got.shape, want.shape)
      worst = max(worst, float(np.max(np.abs(got - want))))
    print(f"{name}: max |onnx fp32 - flax| = {worst:.2e}")
    self.assertLess(worst, 1e-4)
    # The int8 model runs on the same inputs and stays near fp32.
    sess8, _ = onnx.dir_session(out, "int8")
    got8 = onnx.run(sess8, arrays)
    self.assertEqual(got8.shape, want.shape)
    self.assertLess(float(np.max(np.abs(got8 - want))), 0.5)
    self.assertEqual(meta["head"], cfg.head)
    self.assertEqual(meta["labels"], list(cfg.label_names))

  def test_dir_holds_models_tokenizer_and_metadata(self):
    out = self.exported("token")
    names = set(os.listdir(out))
    self.assertLessEqual(
      {onnx.ONNX_FILE, onnx.INT8_FILE, onnx.META_FILE, "tokenizer.json"},
      names,
    )
    meta = json.loads(open(os.path.join(out, onnx.META_FILE)).read())
    self.assertEqual(meta["max_seq_len"], 128)
    self.assertEqual(meta["inputs"], list(onnx.INPUTS))
    sizes = onnx.model_bytes(out)
    self.assertLess(sizes["int8"], sizes["fp32"] / 2)
    # Nothing but the output dir is left beside it.
    self.assertEqual(
      sorted(n for n in os.listdir(self.root) if n.startswith("token-onnx")),
      ["token-onnx"],
    )

  def test_refusals_are_one_line(self):
    out = self.exported("token")
    d = self.models["token"][0]
    code, _, err = run_cli("export-onnx", "--model", d, "--out", out)
    self.assertEqual(code, 2)
    self.assertRegex(err.strip().splitlines()[-1], r"^error: .*not empty")
    mlm = os.path.join(self.root, "mlm")
    cfg = preset("tiny", vocab_size=self.vocab, **SIZE)
    hf.save_hf(mlm, cfg, init_params(cfg, jax.random.PRNGKey(0)))
    code, _, err = run_cli(
      "export-onnx", "--model", mlm, "--out", os.path.join(self.root, "x")
    )
    self.assertEqual(code, 2)
    self.assertEqual(
      err.strip().splitlines()[-1],
      "error: cannot export a 'mlm' head to ONNX; exportable heads: "
      "token_classification, sequence_classification, question_answering",
    )
    self.assertFalse(os.path.exists(os.path.join(self.root, "x")))
    code, _, err = run_cli(
      "predict", "--model", d, "--task", "pos", "--int8", os.devnull
    )
    self.assertEqual(code, 2)
    self.assertIn("error: --int8 needs an ONNX dir", err)
    for model in (d, out):
      code, _, err = run_cli(
        "predict", "--model", model, "--task", "nli", os.devnull
      )
      self.assertEqual(code, 2)
      self.assertRegex(err, r"error: .* a token_classification head; nli ")
    code, _, err = run_cli("predict", "--model", d, "--task", "dp", os.devnull)
    self.assertEqual(code, 2)
    self.assertIn("error: bistil predict does not handle dp", err)

  def predict_both(self, name, task, text, *extra):
    d = self.models[name][0]
    out = self.exported(name)
    path = os.path.join(self.root, f"{name}-{task}.txt")
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)
    results = []
    for model, flags in ((d, ()), (out, ()), (out, ("--int8",))):
      code, stdout, err = run_cli(
        "predict", "--model", model, "--task", task, *flags, *extra, path
      )
      self.assertEqual(code, 0, err)
      results.append([json.loads(ln) for ln in stdout.splitlines()])
    return results

  def test_predict_pos_labels_are_identical_on_jax_and_onnx(self):
    sents = make_lines("aa", 40, seed=5) + ["", "x" * 300]
    jax_out, onnx_out, int8_out = self.predict_both(
      "token", "pos", "\n".join(sents) + "\n"
    )
    self.assertEqual(jax_out, onnx_out)
    self.assertLen(jax_out, len(sents))
    for sent, rec in zip(sents, jax_out, strict=True):
      self.assertEqual(rec["words"], sent.split())
      self.assertLen(rec["labels"], len(sent.split()))
      self.assertLessEqual(set(rec["labels"]), set(task_files.UPOS_LABELS))
    self.assertLen(int8_out, len(sents))
    # stdin works too, with the same answers.
    code, stdout, err = run_cli(
      "predict",
      "--model",
      self.exported("token"),
      "--task",
      "pos",
      stdin="\n".join(sents[:3]),
    )
    self.assertEqual(code, 0, err)
    self.assertEqual([json.loads(x) for x in stdout.splitlines()], jax_out[:3])

  def test_predict_sentiment_nli_and_qa_agree(self):
    texts = make_lines("bb", 30, seed=1)
    jax_out, onnx_out, _ = self.predict_both(
      "sequence", "sentiment", "\n".join(texts) + "\n"
    )
    self.assertEqual(jax_out, onnx_out)
    self.assertTrue(
      all(r["label"] in ("negative", "positive") for r in jax_out)
    )
    pairs = [f"{a}\t{b}" for a, b in zip(texts, texts[1:], strict=False)]
    jax_out, onnx_out, _ = self.predict_both(
      "sequence", "nli", "\n".join(pairs)
    )
    self.assertEqual(jax_out, onnx_out)
    self.assertLen(jax_out, len(pairs))
    code, _, err = run_cli(
      "predict", "--model", self.exported("sequence"), "--task", "nli",
      stdin="no tab here\n",
    )  # fmt: skip
    self.assertEqual(code, 2)
    self.assertEqual(
      err.strip(),
      "error: line 1: a premise<TAB>hypothesis line is 2 tab-separated "
      "fields, got 1",
    )
    lines = [
      f"{a}?\t{b} {a} {c}"
      for a, b, c in zip(texts, texts[1:], texts[2:], strict=False)
    ]
    jax_out, onnx_out, _ = self.predict_both("qa", "qa", "\n".join(lines))
    self.assertEqual(jax_out, onnx_out)
    self.assertLen(jax_out, len(lines))
    self.assertTrue(all(isinstance(r["answer"], str) for r in jax_out))

  def test_eval_reports_each_precision(self):
    test = write_conllu(os.path.join(self.root, "test.conllu"), 40, seed=3)
    d = self.models["token"][0]
    out = os.path.join(self.root, "eval-onnx")
    scores = os.path.join(self.root, "scores.json")
    code, stdout, err = run_cli(
      "export-onnx", "--model", d, "--out", out, "--int8", "--task", "pos",
      "--eval", test, "--eval-out", scores,
    )  # fmt: skip
    self.assertEqual(code, 0, err)
    results = json.loads(open(scores).read())
    self.assertEqual(sorted(results), ["jax", "onnx-fp32", "onnx-int8"])
    self.assertEqual(results["jax"], results["onnx-fp32"])
    self.assertIn("onnx-int8  accuracy", stdout)
    self.assertEqual(
      json.load(open(os.path.join(out, onnx.META_FILE)))["task"], "pos"
    )

  def test_measure_of_an_onnx_dir_times_each_precision(self):
    out = self.exported("sequence")
    code, stdout, err = run_cli(
      "measure", out, "--batch-shapes", "1x16,2x8", "--repeats", 2,
      "--warmup", 1, "--json",
    )  # fmt: skip
    self.assertEqual(code, 0, err)
    info = json.loads(stdout)
    self.assertEqual(
      [
        (r["precision"], r["batch_size"], r["seq_len"]) for r in info["latency"]
      ],
      [("fp32", 1, 16), ("fp32", 2, 8), ("int8", 1, 16), ("int8", 2, 8)],
    )
    self.assertTrue(all(r["median_ms"] > 0 for r in info["latency"]))
    self.assertEqual(sorted(info["bytes"]), ["fp32", "int8"])
    # With a teacher (an HF dir: its Flax model; an ONNX dir: ONNX
    # Runtime), every row gets its speed-up over the teacher's fp32.
    for teacher, backend in ((self.models["qa"][0], "jax fp32"), (
      self.exported("qa"), "onnx fp32"
    )):  # fmt: skip
      code, stdout, err = run_cli(
        "measure", out, "--batch-shapes", "1x16", "--repeats", 2,
        "--warmup", 1, "--teacher", teacher,
      )  # fmt: skip
      self.assertEqual(code, 0, err)
      self.assertRegex(stdout, rf"teacher {backend} 1x16: .* speed-up 1\.00x\n")
      self.assertRegex(stdout, r"student onnx int8 1x16: .* speed-up [\d.]+x")
    code, _, err = run_cli("measure", out, "--batch-shapes", "1y16")
    self.assertEqual(code, 2)
    self.assertIn("is not BATCHxLENGTH", err)

  def test_measure_of_an_onnx_dir_is_the_onnx_runtime_backend(self):
    out = self.exported("sequence")
    teacher = self.models["qa"][0]
    saved = os.path.join(self.root, "measure_onnx.json")
    code, stdout, err = run_cli(
      "measure", out, "--batch-shapes", "1x16", "--repeats", 2, "--warmup",
      1, "--teacher", teacher, "--out", saved,
    )  # fmt: skip
    self.assertEqual(code, 0, err)
    self.assertRegex(stdout, r"teacher jax fp32 1x16: .* speed-up 1\.00x\n")
    self.assertRegex(stdout, r"student onnx fp32 1x16: .* speed-up [\d.]+x")
    self.assertRegex(stdout, r"student onnx int8 1x16: .* speed-up [\d.]+x")
    with open(saved) as f:
      rows = json.load(f)["latency"]
    self.assertEqual(
      [(r["model"], r["backend"]) for r in rows],
      [("teacher", "jax fp32"), ("student", "onnx fp32"),
       ("student", "onnx int8")],
    )  # fmt: skip
    # An HF dir keeps the Flax measurement; --teacher and --sft are refused
    # where they do not apply, with one line.
    code, _, err = run_cli("measure", teacher, "--teacher", out)
    self.assertEqual(code, 2)
    self.assertIn("--teacher is for an ONNX dir", err)
    code, _, err = run_cli("measure", out, "--sft", teacher)
    self.assertEqual(code, 2)
    self.assertIn("--sft: an ONNX dir has its SFTs merged already", err)


class RequireTest(absltest.TestCase):
  def test_a_missing_extra_is_one_line_naming_it(self):
    with self.assertRaisesRegex(
      BistilError,
      r"^ONNX export and inference need no_such_pkg: pip install "
      r"'bistil_jax\[onnx\]'$",
    ):
      onnx.require("no_such_pkg.sub")


if __name__ == "__main__":
  absltest.main()
