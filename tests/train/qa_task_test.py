"""Extractive QA from the CLI (issue 14): finetune, sft, evaluate, export.

Tiny SQuAD v1.1 files are written here: each context says who owns each of
3-5 objects ("The kite belongs to nora."), one context in eight lists 12
(longer than a 64-token window, so it is split), and the question asks for
the owner of one of them, so the answer is selected by the object the
question names, not by its form: every sentence offers an owner.
"""

import functools
import json
import os
import random
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from absl.testing import absltest, parameterized

from bistil_jax import configlib, synthetic
from bistil_jax import tasks as tasks_lib
from bistil_jax.checkpoint import hf, surgery
from bistil_jax.checkpoint import sft as sft_lib
from bistil_jax.data import qa as qa_data
from bistil_jax.data import vocab
from bistil_jax.model import Model, init_params, preset
from bistil_jax.tasks import qa as qa_task
from bistil_jax.train import task
from tests.train.task_test import must_run, read_json, run_cli

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SFT = os.path.join(REPO, "configs", "sft.py")
FINETUNE = os.path.join(REPO, "configs", "finetune.py")
SEED = 0  # configs/sft.py's seed; the fresh head uses fold_in(., 1)
OBJECTS = (
  "lamp boat drum kite vase cart sled harp flute chair bell coat rope desk "
  "mug sail"
).split()
OWNERS = "mara tobin lena oskar priya hugo ines bruno zara felix nora ivan"
OWNERS = OWNERS.split()


def make_squad(n: int, seed: int, long_every: int = 8) -> dict:
  """A SQuAD v1.1 document of n owner questions."""
  rng = random.Random(seed)
  paragraphs = []
  for i in range(n):
    k = 12 if i % long_every == 0 else rng.randint(3, 5)
    objects = rng.sample(OBJECTS, k)
    owners = [rng.choice(OWNERS) for _ in objects]
    sentences, starts, pos = [], [], 0
    for obj, owner in zip(objects, owners, strict=True):
      s = f"The {obj} belongs to "
      starts.append(pos + len(s))
      sentences.append(f"{s}{owner}.")
      pos += len(sentences[-1]) + 1
    j = rng.randrange(k)
    paragraphs.append(
      {
        "context": " ".join(sentences),
        "qas": [
          {
            "id": f"{seed}-{i}",
            "question": f"Who owns the {objects[j]}?",
            "answers": [{"text": owners[j], "answer_start": starts[j]}],
          }
        ],
      }
    )
  return {"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}


def logged(workdir, key):
  """Values of a metric in the run's metrics.jsonl, in step order."""
  with open(os.path.join(workdir, "metrics", "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r[key] for r in rows if key in r]


def dev_f1(model, params, data):
  kind = tasks_lib.get("qa")
  jpredict = jax.jit(functools.partial(task.predict, model=model, task=kind))
  return task.evaluate_data(jpredict, params, data, 16, kind)["f1"]


class QATaskCliTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.TemporaryDirectory()
    root = cls.root = cls._tmp.name
    cls.train = os.path.join(root, "train.json")
    cls.dev = os.path.join(root, "dev.json")
    docs = {cls.train: make_squad(192, 1), cls.dev: make_squad(64, 2)}
    lines = []
    for path, doc in docs.items():
      with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f)
      for p in doc["data"][0]["paragraphs"]:
        lines += [p["context"], p["qas"][0]["question"]]
    corpus = os.path.join(root, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")
    tok = os.path.join(root, "tok")
    synthetic.train_wordpiece([corpus], tok, vocab_size=200)
    size = dict(
      hidden_size=64,
      num_attention_heads=4,
      intermediate_size=128,
      max_position_embeddings=128,
    )
    cls.mmt = os.path.join(root, "mmt")
    synthetic.init_model_dir(
      cls.mmt, tok, preset("tiny", num_hidden_layers=4, **size), seed=0
    )
    cls.student = os.path.join(root, "student")
    synthetic.init_model_dir(
      cls.student, tok, preset("tiny", num_hidden_layers=2, **size), seed=1
    )
    # The teacher: dense task-tuning of the MMT on gold spans.
    cls.teacher_wd = os.path.join(root, "teacher")
    must_run(
      [
        "finetune",
        "--config",
        f"{FINETUNE}:qa,variant=tiny",
        "--workdir",
        cls.teacher_wd,
        f"--config.student.model={cls.mmt}",
        f"--config.data.train={cls.train}",
        f"--config.eval.sets=dev={cls.dev}",
        "--config.train.epochs=8",
        "--config.train.log_every=4",
      ]
    )
    cls.teacher = os.path.join(cls.teacher_wd, "export")
    # Phase 2: LT-SFT of the 2-layer student against it.
    cls.sft_wd = os.path.join(root, "sft")
    must_run(
      [
        "sft",
        "--config",
        f"{SFT}:qa,variant=tiny",
        "--workdir",
        cls.sft_wd,
        f"--config.student.model={cls.student}",
        f"--config.teacher.model={cls.teacher}",
        f"--config.data.train={cls.train}",
        f"--config.eval.sets=dev={cls.dev}",
        "--config.train.log_every=4",
      ]
    )
    cls.sft = os.path.join(cls.sft_wd, "export")
    tokenizer, _ = vocab.load_tokenizer_dir(cls.mmt)
    examples = tasks_lib.get("qa").read(cls.dev)
    tiny = configlib.load_config(f"{SFT}:qa,variant=tiny").data
    cls.dev_data = qa_data.encode_qa(
      examples,
      tokenizer,
      tiny.max_seq_len,
      train=False,
      doc_stride=tiny.doc_stride,
      max_answer_length=tiny.max_answer_length,
    )

  @classmethod
  def tearDownClass(cls):
    cls._tmp.cleanup()
    super().tearDownClass()

  def fresh(self, model_dir):
    base, params = hf.load_hf(model_dir)
    params, cfg, _ = surgery.with_task_head(
      params,
      base.config,
      "question_answering",
      qa_data.SPAN_LABELS,
      jax.random.fold_in(jax.random.PRNGKey(SEED), 1),
    )
    return Model(cfg), params

  def test_finetune_lowers_its_loss_and_beats_an_untrained_head(self):
    gold = logged(self.teacher_wd, "dense/gold")
    self.assertLess(np.mean(gold[-3:]), 0.8 * np.mean(gold[:2]))
    res = read_json(os.path.join(self.teacher_wd, "results.json"))
    self.assertEqual(res["task"], "qa")
    self.assertContainsSubset({"f1", "exact_match", "num_features"}, res["dev"])
    self.assertGreater(res["dev"]["num_features"], 64)  # long contexts split
    untrained = dev_f1(*self.fresh(self.mmt), self.dev_data)
    model, params = hf.load_hf(self.teacher)
    self.assertEqual(model.config.head, "question_answering")
    trained = dev_f1(model, params, self.dev_data)
    self.assertAlmostEqual(trained, res["dev"]["f1"], places=5)
    self.assertGreater(trained, untrained + 0.05)

  def test_sft_student_lowers_its_loss_and_beats_an_untrained_head(self):
    for stage in ("dense", "sparse"):
      kl = logged(self.sft_wd, f"{stage}/kl")
      self.assertLess(np.mean(kl[-2:]), np.mean(kl[:2]), stage)
    res = read_json(os.path.join(self.sft_wd, "results.json"))
    sft = sft_lib.load_sft(self.sft)
    self.assertEqual(sft.meta["head"], "question_answering")
    self.assertEqual(sft.meta["task"], "qa")
    model, params = surgery.merged_model(self.student, [self.sft])
    trained = dev_f1(model, params, self.dev_data)
    self.assertAlmostEqual(trained, res["dev"]["f1"], places=5)
    untrained = dev_f1(*self.fresh(self.student), self.dev_data)
    self.assertGreater(trained, untrained)

  def test_evaluate_without_flags_reproduces_results_json(self):
    # The SFT records the run's windows (64 tokens, stride 16) and decoding;
    # evaluate's own fallbacks (256, 128) would not even fit the model.
    meta = sft_lib.load_sft(self.sft).meta
    self.assertEqual(
      [meta[k] for k in ("max_seq_len", "doc_stride", "n_best_size")],
      [64, 16, 20],
    )
    out = os.path.join(self.root, "eval_no_flags.json")
    argv = ["evaluate", "--model", self.student, "--sft", self.sft,
            "--task", "qa", "--data", f"dev={self.dev}", "--out", out]  # fmt: skip
    with self.assertLogs("bistil_jax.train.commands", "INFO") as logs:
      must_run(argv)
    said = "\n".join(logs.output)
    self.assertIn("evaluating at max_seq_len 64", said)
    self.assertIn("doc_stride 16", said)
    res = read_json(os.path.join(self.sft_wd, "results.json"))
    self.assertEqual(read_json(out)["dev"], res["dev"])

  def test_evaluate_and_export_hf_of_the_student(self):
    out = os.path.join(self.root, "eval.json")
    stdout = must_run(
      [
        "evaluate",
        "--model",
        self.student,
        "--sft",
        self.sft,
        "--task",
        "qa",
        "--data",
        f"dev={self.dev}",
        "--max-seq-len",
        "64",
        "--doc-stride",
        "16",
        "--out",
        out,
      ]
    )
    self.assertIn("f1", stdout)
    res = read_json(out)
    self.assertEqual(
      res["dev"]["f1"],
      read_json(os.path.join(self.sft_wd, "results.json"))["dev"]["f1"],
    )
    code, _, err = run_cli(
      ["evaluate", "--model", self.student, "--sft", self.sft, "--task", "qa",
       "--data", self.dev, "--max-seq-len", "64", "--doc-stride", "128"]
    )  # fmt: skip
    self.assertEqual(code, 2)
    self.assertIn("doc_stride=128 must be smaller", err)
    exported = os.path.join(self.root, "student_qa")
    must_run(
      ["export-hf", "--model", self.student, "--sft", self.sft, "--out",
       exported]
    )  # fmt: skip
    ours, params = surgery.merged_model(self.student, [self.sft])
    ref = transformers.AutoModelForQuestionAnswering.from_pretrained(exported)
    self.assertEqual(type(ref).__name__, "BertForQuestionAnswering")
    b = {k: getattr(self.dev_data, k)[:8] for k in tasks_lib.base.INPUT_KEYS}
    mine = np.asarray(
      ours.apply(
        {"params": params},
        b["input_ids"],
        attention_mask=b["attention_mask"],
        token_type_ids=b["token_type_ids"],
      ).logits
    )
    with torch.no_grad():
      theirs = ref.eval()(**{k: torch.tensor(v) for k, v in b.items()})
    real = b["attention_mask"] > 0
    np.testing.assert_allclose(
      mine[..., 0][real], theirs.start_logits.numpy()[real], atol=1e-4
    )
    np.testing.assert_allclose(
      mine[..., 1][real], theirs.end_logits.numpy()[real], atol=1e-4
    )

  @pytest.mark.slow  # the same stage code as task_test's LT-SFT finetune
  def test_lt_sft_finetune_exports_a_task_sft_with_the_span_head(self):
    wd = os.path.join(self.root, "teacher_ltsft")
    must_run(
      [
        "finetune",
        "--config",
        f"{FINETUNE}:qa,variant=tiny",
        "--workdir",
        wd,
        f"--config.student.model={self.mmt}",
        f"--config.data.train={self.train}",
        f"--config.eval.sets=dev={self.dev}",
        "--config.sparse.enabled=true",
        "--config.train.epochs=1",
        "--config.sparse.epochs=1",
      ]
    )
    sft = sft_lib.load_sft(os.path.join(wd, "export"))
    self.assertEqual(sft.meta["head"], "question_answering")
    self.assertContainsSubset(
      {"classifier/kernel", "classifier/bias"}, sft.dense
    )
    model, params = surgery.merged_model(self.mmt, [os.path.join(wd, "export")])
    res = read_json(os.path.join(wd, "results.json"))
    self.assertAlmostEqual(
      dev_f1(model, params, self.dev_data), res["dev"]["f1"], places=5
    )

  def test_bad_input_fails_with_one_line_and_no_workdir(self):
    bad = os.path.join(self.root, "bad.json")
    doc = make_squad(20, 5)
    doc["data"][0]["paragraphs"][3]["qas"][0]["answers"][0]["answer_start"] += 1
    with open(bad, "w") as f:
      json.dump(doc, f)
    for extra, message in (
      ([f"--config.data.train={bad}"], "question '5-3'.*does not match"),
      (
        [f"--config.data.train={self.train}", "--config.data.doc_stride=60"],
        "doc_stride=60 must be smaller",
      ),
    ):
      wd = os.path.join(self.root, "bad_wd")
      code, _, err = run_cli(
        ["finetune", "--config", f"{FINETUNE}:qa,variant=tiny", "--workdir",
         wd, f"--config.student.model={self.mmt}", *extra]
      )  # fmt: skip
      self.assertEqual(code, 2, err)
      self.assertRegex(err, message)
      self.assertFalse(os.path.exists(wd))


def _log_softmax(x):
  x = x - x.max()
  return x - np.log(np.exp(x).sum())


class SpanLossTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    rng = np.random.RandomState(0)
    self.logits = rng.normal(size=(3, 6, 2)).astype(np.float32)
    self.teacher = rng.normal(size=(3, 6, 2)).astype(np.float32)
    mask = np.ones((3, 6), np.int32)
    mask[1, 4:] = 0
    self.batch = {
      "attention_mask": mask,
      "labels": np.array([[2, 3], [0, 0], [-100, -100]], np.int32),
      "example_mask": np.array([1, 1, 0], np.int32),  # row 2: filler
    }

  def test_gold_is_the_mean_of_start_and_end_cross_entropy(self):
    got = qa_task.gold_loss(jnp.asarray(self.logits), self.batch)
    want = 0.0
    for r in range(2):
      real = self.batch["attention_mask"][r] > 0
      for k in range(2):
        lp = _log_softmax(self.logits[r, real, k])
        want -= lp[self.batch["labels"][r, k]] / 2
    self.assertAlmostEqual(float(got.count), 2.0)
    self.assertAlmostEqual(float(got.total), want, places=5)

  def test_soft_loss_sums_start_and_end_over_real_positions(self):
    t = 2.0
    got = qa_task.soft_loss(
      jnp.asarray(self.logits), jnp.asarray(self.teacher), self.batch, t
    )
    want = 0.0
    for r in range(2):
      real = self.batch["attention_mask"][r] > 0
      for k in range(2):
        p = np.exp(_log_softmax(self.teacher[r, real, k] / t))
        want -= np.sum(p * _log_softmax(self.logits[r, real, k] / t))
    self.assertAlmostEqual(float(got.count), 2.0)
    self.assertAlmostEqual(float(got.total), want, places=5)
    # Padding logits do not count.
    moved = self.logits.copy()
    moved[1, 4:] += 50.0
    again = qa_task.soft_loss(
      jnp.asarray(moved), jnp.asarray(self.teacher), self.batch, t
    )
    self.assertAlmostEqual(float(again.total), float(got.total), places=5)


class ExportParityTest(parameterized.TestCase):
  @parameterized.parameters("tiny", "tiny-xlmr")
  def test_auto_model_for_qa_logits_and_import_back(self, name):
    cfg = preset(name, head="question_answering", id2label=("start", "end"))
    params = init_params(cfg, jax.random.PRNGKey(3))
    rng = np.random.RandomState(0)
    params["classifier"]["bias"] = rng.normal(size=2).astype(np.float32)
    ids = rng.randint(5, cfg.vocab_size, (3, 11))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    ids[mask == 0] = cfg.pad_token_id
    types = np.zeros_like(ids)
    if not cfg.is_roberta:
      types[:, 5:] = 1
    with tempfile.TemporaryDirectory() as d:
      hf.save_hf(d, cfg, params)
      ref = transformers.AutoModelForQuestionAnswering.from_pretrained(d)
      with torch.no_grad():
        out = ref.eval()(
          input_ids=torch.tensor(ids),
          attention_mask=torch.tensor(mask),
          token_type_ids=torch.tensor(types),
        )
      back, back_params = hf.load_hf(d)
      # A QA dir that transformers wrote itself imports too.
      with tempfile.TemporaryDirectory() as d2:
        ref.save_pretrained(d2)
        theirs, theirs_params = hf.load_hf(d2)
      flax_cls = getattr(
        transformers,
        "FlaxXLMRobertaForQuestionAnswering"
        if cfg.is_roberta
        else "FlaxBertForQuestionAnswering",
      )
      flax_out = flax_cls.from_pretrained(d)(
        input_ids=ids, attention_mask=mask, token_type_ids=types
      )
    self.assertEqual(back.config.head, "question_answering")
    real = mask > 0
    np.testing.assert_allclose(  # flax_model.msgpack (transformers 4.57)
      np.asarray(flax_out.start_logits)[real],
      out.start_logits.numpy()[real],
      atol=1e-4,
    )
    models = (Model(cfg), params), (back, back_params), (theirs, theirs_params)
    for model, p in models:
      logits = np.asarray(
        model.apply(
          {"params": p}, ids, attention_mask=mask, token_type_ids=types
        ).logits
      )  # [b, l, 2]
      real = mask > 0
      np.testing.assert_allclose(
        logits[..., 0][real], out.start_logits.numpy()[real], atol=1e-4
      )
      np.testing.assert_allclose(
        logits[..., 1][real], out.end_logits.numpy()[real], atol=1e-4
      )


if __name__ == "__main__":
  absltest.main()
