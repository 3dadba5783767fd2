"""Phase 2 from the CLI on synthetic data (issue 5).

One tiny pipeline is built once: teacher task-tuning (`bistil finetune`,
dense) of a random 4-layer model on a1 POS, `bistil trim-vocab`, phase 1
(`bistil distil`), phase 2 (`bistil sft`) and `bistil evaluate`. The tests
check its outputs (task SFT, results.json, evaluate, export-hf with an SFT,
the LT-SFT mask through the driver), run the other task paths (LT-SFT
fine-tuning, NER, NLI with a fresh pooler, --overwrite) and bad input, which
must fail with one line and leave no workdir behind.
"""

import contextlib
import functools
import io
import json
import os
import tempfile

import jax
import numpy as np
import torch
import transformers
from absl.testing import absltest
from flax.traverse_util import flatten_dict

from bistil_jax import cli, sparse, synthetic
from bistil_jax import tasks as tasks_lib
from bistil_jax.checkpoint import hf, surgery
from bistil_jax.checkpoint import manager as ckpt
from bistil_jax.checkpoint import sft as sft_lib
from bistil_jax.data import task_files, vocab
from bistil_jax.model import Model, preset
from bistil_jax.train import task

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SFT_CONFIG = os.path.join(REPO, "configs", "sft.py")
FINETUNE_CONFIG = os.path.join(REPO, "configs", "finetune.py")
DISTIL_CONFIG = os.path.join(REPO, "configs", "distil.py:tiny")
SIZES = synthetic.Sizes(
  corpus_train=400, corpus_dev=20, task_train=160, task_dev=64, task_test=64
)
SEED = 0  # configs/sft.py's seed: the fresh head is init with fold_in(., 1)
DENSITY = 0.08  # configs/sft.py's sparse.density


def run_cli(argv):
  """(exit code, stdout, stderr) of an in-process `bistil` call."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main([str(a) for a in argv])
  return code, out.getvalue(), err.getvalue()


def must_run(argv) -> str:
  code, out, err = run_cli(argv)
  if code != 0:
    raise AssertionError(f"bistil {argv[0]} failed ({code}): {err[-3000:]}")
  return out


def tiny(task_name: str, config: str = SFT_CONFIG) -> list[str]:
  return ["--config", f"{config}:{task_name},variant=tiny"]


def read_json(path):
  with open(path) as f:
    return json.load(f)


def fresh_head_model(model_dir, task_name, labels):
  """The model a run with seed SEED trains from: body + its untrained head."""
  base, params = hf.load_hf(model_dir)
  params, cfg, _ = surgery.with_task_head(
    params,
    base.config,
    tasks_lib.get(task_name).head,
    labels,
    jax.random.fold_in(jax.random.PRNGKey(SEED), 1),
  )
  return Model(cfg), params


def evaluate(model, params, data, batch_size):
  kind = tasks_lib.get(data.task)
  jpredict = jax.jit(functools.partial(task.predict, model=model, task=kind))
  return task.evaluate_data(jpredict, params, data, batch_size, kind)


def add_long_sentence(path, words):
  """Appends one sentence of `words` words (longer than max_seq_len=64
  tokens) built from the file's own lines; returns the file's word count."""
  with open(path, encoding="utf-8") as f:
    rows = [r for r in f.read().splitlines() if r and not r.startswith("#")]
  rows = [r.split("\t") for r in rows if r.split("\t")[0].isdigit()]
  with open(path, "a", encoding="utf-8") as f:
    f.write("\n# sent_id = long\n")
    for i in range(words):
      f.write("\t".join([str(i + 1), *rows[i % len(rows)][1:]]) + "\n")
    f.write("\n")
  return len(rows) + words


def flat(params):
  return {k: np.asarray(v) for k, v in flatten_dict(params, sep="/").items()}


class PhaseTwoCliTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.TemporaryDirectory()
    root = cls.root = cls._tmp.name
    fam = synthetic.make_family(0)
    cls.data = synthetic.write_dataset(
      os.path.join(root, "data"), fam, ["a1", "a2"], SIZES
    )
    corpora = [str(cls.data.corpora[x]["train"]) for x in ("a1", "a2")]
    tok = os.path.join(root, "tok")
    synthetic.train_wordpiece(corpora, tok, vocab_size=600)
    cls.teacher0 = os.path.join(root, "teacher0")
    synthetic.init_model_dir(
      cls.teacher0,
      tok,
      preset(
        "tiny",
        num_hidden_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
      ),
      seed=0,
    )
    cls.pos = {
      x: {s: str(p) for s, p in d.items()} for x, d in cls.data.pos.items()
    }
    cls.num_long = add_long_sentence(cls.pos["a2"]["test"], 80)
    cls.ner = {
      x: {s: str(p) for s, p in d.items()} for x, d in cls.data.ner.items()
    }
    cls.nli = {
      x: {s: str(p) for s, p in d.items()} for x, d in cls.data.nli.items()
    }

    # Teacher task-tuning: dense fine-tuning of the (random) MMT.
    cls.teacher_wd = os.path.join(root, "teacher_pos")
    cls.teacher_out = must_run(
      [
        "finetune",
        *tiny("pos", FINETUNE_CONFIG),
        "--workdir",
        cls.teacher_wd,
        f"--config.student.model={cls.teacher0}",
        f"--config.data.train={cls.pos['a1']['train']}",
        f"--config.eval.sets=dev={cls.pos['a1']['dev']}",
      ]
    )
    cls.teacher = os.path.join(cls.teacher_wd, "export")
    # Phase 1 on the vocabulary-trimmed MMT.
    cls.trimmed = os.path.join(root, "trimmed")
    must_run(
      [
        "trim-vocab",
        "--model",
        cls.teacher0,
        "--source",
        corpora[0],
        "--target",
        corpora[1],
        "--out",
        cls.trimmed,
        "--quiet",
      ]
    )
    dist_wd = os.path.join(root, "dist")
    must_run(
      [
        "distil",
        "--config",
        DISTIL_CONFIG,
        "--workdir",
        dist_wd,
        f"--config.teacher.model={cls.trimmed}",
        f"--config.data.source={corpora[0]}",
        f"--config.data.target={corpora[1]}",
      ]
    )
    cls.student = os.path.join(dist_wd, "export")
    # Phase 2.
    cls.sft_wd = os.path.join(root, "sft")
    cls.sft_out = must_run(
      [
        "sft",
        *tiny("pos"),
        "--workdir",
        cls.sft_wd,
        f"--config.student.model={cls.student}",
        f"--config.teacher.model={cls.teacher}",
        f"--config.data.train={cls.pos['a1']['train']}",
        f"--config.eval.sets=dev={cls.pos['a1']['dev']},a2={cls.pos['a2']['test']}",
        # Decay moves every entry it reaches: the mask gate must come after.
        "--config.optim.weight_decay=0.01",
      ]
    )
    cls.sft = os.path.join(cls.sft_wd, "export")
    cls.results = read_json(os.path.join(cls.sft_wd, "results.json"))
    cls.labels = tuple(cls.results["labels"])
    cls.ev_path = os.path.join(root, "ev", "ev.json")
    cls.ev_stdout = must_run(
      [
        "evaluate",
        "--model",
        cls.student,
        "--sft",
        cls.sft,
        "--task",
        "pos",
        "--data",
        f"a1={cls.pos['a1']['dev']}",
        "--data",
        f"a2={cls.pos['a2']['test']}",
        "--max-seq-len",
        "64",
        "--out",
        cls.ev_path,
      ]
    )
    # The student + SFT as a plain HF dir (read, never written, by tests).
    cls.hf_pos = os.path.join(root, "hf_pos")
    must_run(
      ["export-hf", "--model", cls.student, "--sft", cls.sft, "--out",
       cls.hf_pos]
    )  # fmt: skip

  @classmethod
  def tearDownClass(cls):
    cls._tmp.cleanup()
    super().tearDownClass()

  def path(self, *parts):
    return os.path.join(self.root, *parts)

  def dev_data(self, model_dir, task_name="pos", labels=None, split="dev"):
    tok, _ = vocab.load_tokenizer_dir(model_dir)
    files = {"pos": self.pos, "ner": self.ner, "nli": self.nli}[task_name]
    return task.encode_split(
      tasks_lib.get(task_name),
      files["a1"][split],
      tok,
      labels or self.labels,
      64,
    )

  # ------------------------------------------------------------ pipeline
  def test_teacher_finetune_exports_a_dense_task_model(self):
    self.assertIn(self.teacher, self.teacher_out)
    model, params = hf.load_hf(self.teacher)
    self.assertEqual(model.config.head, "token_classification")
    self.assertEqual(model.config.label_names, task_files.UPOS_LABELS)
    self.assertIn("classifier", params)
    self.assertFalse(os.path.exists(os.path.join(self.teacher, "sft.json")))
    res = read_json(os.path.join(self.teacher_wd, "results.json"))
    self.assertEqual(res["phase"], "finetune")
    # Gold-only fine-tuning of a random model still beats its fresh head.
    fresh, fp = fresh_head_model(self.teacher0, "pos", task_files.UPOS_LABELS)
    before = evaluate(fresh, fp, self.dev_data(self.teacher0), 16)
    self.assertGreater(res["dev"]["accuracy"], before["accuracy"] + 0.1)

  def test_sft_export_is_a_task_sft_of_density_times_eligible(self):
    self.assertIn(self.sft, self.sft_out)
    self.assertEqual(
      sorted(os.listdir(self.sft)), [sft_lib.SFT_META, sft_lib.SFT_WEIGHTS]
    )
    meta = read_json(os.path.join(self.sft, sft_lib.SFT_META))
    sft = sft_lib.load_sft(self.sft)
    self.assertEqual(meta["kind"], "task")
    self.assertEqual(meta["head"], "token_classification")
    self.assertEqual(meta["label_names"], list(task_files.UPOS_LABELS))
    self.assertEqual(meta["nnz"], sft.nnz)
    # The head is stored whole; the body only as a sparse diff.
    self.assertEqual(
      sorted(sft.dense), ["classifier/bias", "classifier/kernel"]
    )
    self.assertTrue(all(not sparse.is_head(p) for p in sft.diffs))
    # nnz ~ density x eligible body entries (real vocabulary rows only).
    model, params0 = fresh_head_model(self.student, "pos", self.labels)
    eligible = sparse.eligible_mask(params0, vocab_size=model.config.vocab_size)
    k = sparse.k_from_density(eligible, DENSITY)
    self.assertBetween(sft.nnz, int(0.95 * k), k)
    # Made for (and fingerprinted as) the phase-1 student.
    _, student = hf.load_hf(self.student)
    self.assertEqual(
      meta["base_fingerprint"],
      sft_lib.params_fingerprint(student, vocab_size=model.config.vocab_size),
    )

  def test_phase_two_improves_on_the_untrained_head(self):
    model, params = fresh_head_model(self.student, "pos", self.labels)
    before = evaluate(model, params, self.dev_data(self.student), 16)
    after = self.results["dev"]["accuracy"]
    self.assertGreater(after, before["accuracy"] + 0.1)
    self.assertEqual(self.results["dev"]["num_tokens"], before["num_tokens"])

  def test_results_list_dev_and_target_test(self):
    res = self.results
    self.assertEqual(res["phase"], "sft")
    self.assertEqual(res["task"], "pos")
    self.assertEqual(
      self.labels, task_files.UPOS_LABELS
    )  # the teacher's labels
    for split, lang in (("dev", "a1"), ("a2", "a2")):
      self.assertBetween(res[split]["accuracy"], 0.0, 1.0)
      # Every word of every example is scored once.
      file = self.pos[lang]["dev" if split == "dev" else "test"]
      words = sum(len(e.words) for e in tasks_lib.get("pos").read(file))
      self.assertEqual(res[split]["num_tokens"], words)

  def test_evaluate_reproduces_results_json(self):
    ev = read_json(self.ev_path)
    self.assertEqual(ev["a1"], self.results["dev"])
    # a2 holds a sentence longer than max_seq_len: both window it and both
    # score every gold word of the file.
    self.assertEqual(ev["a2"], self.results["a2"])
    self.assertEqual(self.results["a2"]["num_tokens"], self.num_long)
    self.assertEqual(ev["task"], "pos")
    lines = self.ev_stdout.strip().splitlines()
    self.assertEqual(
      lines[0].split(), ["split", "accuracy", "sentences", "tokens"]
    )
    for name, key in (("a1", "dev"), ("a2", "a2")):
      row = [x for x in lines if x.split()[0] == name]
      self.assertLen(row, 1)
      self.assertEqual(
        row[0].split()[1:],
        [
          f"{self.results[key]['accuracy']:.4f}",
          str(self.results[key]["num_sentences"]),
          str(self.results[key]["num_tokens"]),
        ],
      )

  def evaluate_logged(self, *argv):
    """(metrics JSON, log text) of `bistil evaluate ARGV --task pos`."""
    out = self.path(f"ev_logged_{len(os.listdir(self.root))}.json")
    with self.assertLogs("bistil_jax.train.commands", "INFO") as logs:
      must_run(["evaluate", *argv, "--task", "pos", "--out", out])
    return read_json(out), "\n".join(logs.output)

  def test_evaluate_without_flags_reproduces_results_json(self):
    # The SFT records the run's data.max_seq_len (64 in the tiny config;
    # evaluate's own fallback is 256): the same windows, the same numbers.
    meta = read_json(os.path.join(self.sft, sft_lib.SFT_META))
    self.assertEqual(meta["max_seq_len"], 64)
    ev, said = self.evaluate_logged(
      "--model", self.student, "--sft", self.sft,
      "--data", f"a1={self.pos['a1']['dev']}",
      "--data", f"a2={self.pos['a2']['test']}",
    )  # fmt: skip
    self.assertIn("evaluating at max_seq_len 64", said)
    self.assertEqual(ev["a1"], self.results["dev"])
    self.assertEqual(ev["a2"], self.results["a2"])
    # An explicit --max-seq-len still wins.
    _, said = self.evaluate_logged(
      "--model", self.student, "--sft", self.sft,
      "--data", f"a1={self.pos['a1']['dev']}", "--max-seq-len", "32",
    )  # fmt: skip
    self.assertIn("evaluating at max_seq_len 32 (--max-seq-len)", said)
    # A dense export records it too.
    rec = read_json(os.path.join(self.teacher, hf.RUN_RECORD))
    self.assertEqual(rec, {"max_seq_len": 64})
    _, said = self.evaluate_logged(
      "--model", self.teacher, "--data", f"a1={self.pos['a1']['dev']}"
    )
    self.assertIn("evaluating at max_seq_len 64", said)
    # A model dir no run of ours wrote: min(256, its max length of 128).
    plain = self.make_head_teacher("plain_pos", "pos", task_files.UPOS_LABELS)
    self.assertFalse(os.path.exists(os.path.join(plain, hf.RUN_RECORD)))
    _, said = self.evaluate_logged(
      "--model", plain, "--data", f"a1={self.pos['a1']['dev']}"
    )
    self.assertIn("evaluating at max_seq_len 128 (no run recorded", said)
    # The student merged with its SFT (export-hf --sft) keeps the record.
    self.assertEqual(
      read_json(os.path.join(self.hf_pos, hf.RUN_RECORD))["max_seq_len"], 64
    )
    ev, said = self.evaluate_logged(
      "--model", self.hf_pos, "--data", f"a1={self.pos['a1']['dev']}"
    )  # fmt: skip
    self.assertIn("evaluating at max_seq_len 64", said)
    self.assertEqual(ev["a1"], self.results["dev"])

  def test_export_hf_with_the_sft_loads_in_transformers(self):
    out = self.hf_pos
    pt = transformers.AutoModelForTokenClassification.from_pretrained(out)
    pt.eval()
    self.assertEqual(
      pt.config.id2label, dict(enumerate(task_files.UPOS_LABELS))
    )
    self.assertEqual(pt.config.num_hidden_layers, 2)
    # The student trained without dropout; transformers users get the
    # teacher's rates (the tiny preset's 0.1).
    for model_dir in (self.student, out):
      cfg = read_json(os.path.join(model_dir, "config.json"))
      self.assertEqual(cfg["hidden_dropout_prob"], 0.1)
      self.assertEqual(cfg["attention_probs_dropout_prob"], 0.1)
      self.assertEqual(hf.load_hf(model_dir)[0].config.hidden_dropout_prob, 0)
    self.assert_logits_match(pt, out, "pos", self.sft)

  def assert_logits_match(self, pt, export, task_name, sft):
    """transformers on the export = our student + SFT, on real inputs."""
    model, params = surgery.merged_model(self.student, [sft])
    data = self.dev_data(export, task_name, list(model.config.label_names))
    n = 6
    arrays = {
      k: getattr(data, k)[:n]
      for k in ("input_ids", "attention_mask", "token_type_ids")
    }
    with torch.no_grad():
      ref = pt(
        **{k: torch.from_numpy(v.astype(np.int64)) for k, v in arrays.items()}
      ).logits.numpy()
    ours = np.asarray(
      model.apply(
        {"params": params},
        arrays["input_ids"],
        attention_mask=arrays["attention_mask"],
        token_type_ids=arrays["token_type_ids"],
      ).logits
    )
    self.assertEqual(ours.shape, ref.shape)
    np.testing.assert_allclose(ours, ref, atol=1e-4)

  def test_export_hf_equals_student_plus_sft(self):
    _, exported = hf.load_hf(self.hf_pos)
    _, merged = surgery.merged_model(self.student, [self.sft])
    a, b = flat(exported), flat(merged)
    self.assertEqual(sorted(a), sorted(b))
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)

  # ------------------------------------------------------------ LT-SFT mask
  def test_sparse_stage_moves_only_the_sft_entries(self):
    _, params0 = fresh_head_model(self.student, "pos", self.labels)
    base = flat(params0)
    _, student = hf.load_hf(self.student)
    student = flat(student)
    for k, v in base.items():  # the body it starts from is the student's
      if not sparse.is_head(k):
        np.testing.assert_array_equal(v, student[k], err_msg=k)
    sft = sft_lib.load_sft(self.sft)
    step, state = ckpt.read_state(os.path.join(self.sft_wd, "sparse"))
    trained = flat(state["params"])
    self.assertEqual(sorted(trained), sorted(base))
    moved_sparse = 0
    for k, x in trained.items():
      if sparse.is_head(k):
        continue
      inside = np.zeros(x.size, bool)
      if k in sft.diffs:
        inside[sft.diffs[k][0]] = True
      x, b = x.reshape(-1), base[k].reshape(-1)
      # Bit-identical outside the SFT's indices, moved inside them.
      np.testing.assert_array_equal(
        x[~inside].view(np.uint32), b[~inside].view(np.uint32), err_msg=k
      )
      self.assertTrue(np.all(x[inside] != b[inside]), k)
      moved_sparse += int(inside.sum())
    self.assertEqual(moved_sparse, sft.nnz)
    # The head trained densely: (nearly) every entry left its init.
    for k in ("classifier/kernel", "classifier/bias"):
      self.assertGreater(np.mean(trained[k] != base[k]), 0.99, k)
      np.testing.assert_array_equal(trained[k], sft.dense[k])
    # apply_sft(base, SFT) is the sparse stage's result.
    applied = flat(sft_lib.apply_sft(params0, sft))
    for k, x in trained.items():
      np.testing.assert_allclose(applied[k], x, rtol=0, atol=1e-6, err_msg=k)
    # The sparse stage restarted from theta0: the dense stage moved far more.
    _, dense = ckpt.read_state(os.path.join(self.sft_wd, "dense"))
    dense = flat(dense["params"])
    moved_dense = sum(
      int(np.sum(dense[k] != base[k])) for k in base if not sparse.is_head(k)
    )
    self.assertGreater(moved_dense, 5 * moved_sparse)
    self.assertGreater(step, 0)

  # ------------------------------------------------------ other task paths
  def test_best_epoch_selection_keeps_the_best_dev_score(self):
    wd = self.path("ft_best")
    must_run(
      [
        "finetune",
        *tiny("pos", FINETUNE_CONFIG),
        "--workdir",
        wd,
        f"--config.student.model={self.student}",
        f"--config.data.train={self.pos['a1']['train']}",
        f"--config.eval.sets=dev={self.pos['a1']['dev']}",
        "--config.train.epochs=3",
        "--config.optim.learning_rate=3e-2",  # noisy epochs: a real choice
        "--config.train.select_best=dev/accuracy",
      ]
    )
    from bistil_jax.train import loop

    evals = [
      (r["step"], r["eval/dev/accuracy"])
      for r in loop.read_metrics(os.path.join(wd, "metrics"))
      if "eval/dev/accuracy" in r
    ]
    self.assertLen(evals, 3)  # once per epoch (the last one at the end)
    best_step, best = max(evals, key=lambda e: (e[1], -e[0]))
    info = read_json(os.path.join(wd, "dense", "best", "best.json"))
    self.assertEqual(info["step"], best_step)
    self.assertAlmostEqual(info["value"], best, places=6)
    res = read_json(os.path.join(wd, "results.json"))
    self.assertAlmostEqual(res["dev"]["accuracy"], best, places=6)
    # The export is the best epoch's model: evaluate agrees with it.
    ev = self.path("ft_best_ev.json")
    must_run(
      [
        "evaluate",
        "--model",
        os.path.join(wd, "export"),
        "--task",
        "pos",
        "--data",
        f"dev={self.pos['a1']['dev']}",
        "--out",
        ev,
      ]
    )
    self.assertAlmostEqual(read_json(ev)["dev"]["accuracy"], best, places=6)

  def test_ner_finetune_reports_entity_f1(self):
    wd = self.path("ft_ner")
    must_run(
      [
        "finetune",
        *tiny("ner", FINETUNE_CONFIG),
        "--workdir",
        wd,
        f"--config.student.model={self.student}",
        f"--config.data.train={self.ner['a1']['train']}",
        f"--config.eval.sets=dev={self.ner['a1']['dev']},a2={self.ner['a2']['test']}",
        "--config.train.epochs=0.5",
      ]
    )
    res = read_json(os.path.join(wd, "results.json"))
    self.assertEqual(tuple(res["labels"]), task_files.NER_LABELS)
    for split in ("dev", "a2"):
      for key in ("f1", "precision", "recall", "num_gold"):
        self.assertIn(key, res[split])
      self.assertBetween(res[split][tasks_lib.get("ner").headline], 0.0, 1.0)
      self.assertGreater(res[split]["num_gold"], 0)
    model, _ = hf.load_hf(os.path.join(wd, "export"))
    self.assertEqual(model.config.head, "token_classification")
    self.assertEqual(model.config.label_names, task_files.NER_LABELS)

  def test_nli_lt_sft_on_a_model_without_pooler(self):
    # LT-SFT fine-tuning (K as a count) exports a task SFT that evaluate
    # and export-hf apply. (LT-SFT of a token task: the sft phase above,
    # multihost_test and lt_sft_resume_test.)
    # The student has no pooler: the sequence-classification head brings a
    # fresh one, which the SFT must carry whole (the base has no values to
    # diff against), or it could not be applied to its own base model.
    _, student = hf.load_hf(self.student)
    self.assertNotIn("pooler", student)
    wd = self.path("ft_nli")
    out = must_run(
      [
        "finetune",
        *tiny("nli", FINETUNE_CONFIG),
        "--workdir",
        wd,
        f"--config.student.model={self.student}",
        f"--config.data.train={self.nli['a1']['train']}",
        f"--config.eval.sets=dev={self.nli['a1']['dev']}",
        "--config.sparse.enabled=true",
        "--config.sparse.num_entries=2000",  # K as a count, not a density
        "--config.train.epochs=0.5",
        "--config.sparse.epochs=0.5",
      ]
    )
    export = os.path.join(wd, "export")
    self.assertIn(export, out)
    self.assertEqual(
      sorted(os.listdir(export)), [sft_lib.SFT_META, sft_lib.SFT_WEIGHTS]
    )
    sft = sft_lib.load_sft(export)
    self.assertEqual((sft.meta["kind"], sft.meta["task"]), ("task", "nli"))
    self.assertEqual(sft.meta["num_entries"], 2000)
    self.assertBetween(sft.nnz, 1900, 2000)
    self.assertEqual(sft.meta["head"], "sequence_classification")
    self.assertTrue(sft.meta["add_pooler"])
    self.assertEqual(tuple(sft.meta["label_names"]), task_files.NLI_LABELS)
    self.assertIn("pooler/dense/kernel", sft.dense)
    self.assertIn("classifier/kernel", sft.dense)
    self.assertFalse(any(p.startswith("pooler/") for p in sft.diffs))
    res = read_json(os.path.join(wd, "results.json"))
    self.assertEqual(res["phase"], "finetune")
    self.assertEqual(set(res["dev"]), {"accuracy", "num_examples"})
    self.assertEqual(res["dev"]["num_examples"], SIZES.task_dev)
    # The pooler the sparse stage ended with is the one the SFT stores.
    _, state = ckpt.read_state(os.path.join(wd, "sparse"))
    trained = flat(state["params"])
    np.testing.assert_array_equal(
      trained["pooler/dense/kernel"], sft.dense["pooler/dense/kernel"]
    )
    ev = self.path("nli_ev.json")
    must_run(
      [
        "evaluate",
        "--model",
        self.student,
        "--sft",
        export,
        "--task",
        "nli",
        "--data",
        f"dev={self.nli['a1']['dev']}",
        "--out",
        ev,
      ]
    )
    self.assertEqual(read_json(ev)["dev"], res["dev"])
    out = self.path("hf_nli")
    must_run(
      ["export-hf", "--model", self.student, "--sft", export, "--out", out]
    )
    pt = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    pt.eval()
    self.assertIsNotNone(pt.bert.pooler)
    self.assertEqual(pt.config.id2label, dict(enumerate(task_files.NLI_LABELS)))
    self.assert_logits_match(pt, out, "nli", export)

  def test_overwrite_starts_afresh_and_a_rerun_resumes(self):
    wd = self.path("ft_overwrite")
    args = [
      "finetune",
      *tiny("pos", FINETUNE_CONFIG),
      "--workdir",
      wd,
      f"--config.student.model={self.student}",
      f"--config.data.train={self.pos['a1']['train']}",
      "--config.train.epochs=0.1",
    ]

    def export_params():
      return flat(hf.load_hf(os.path.join(wd, "export"))[1])

    must_run(args)
    first = export_params()
    with self.assertLogs("bistil_jax.train.driver", "INFO") as logs:
      must_run(args)  # the same run again: resumes, nothing changes
    self.assertIn("resuming", "\n".join(logs.output))
    again = export_params()
    for k in first:
      np.testing.assert_array_equal(first[k], again[k], err_msg=k)
    with self.assertLogs("bistil_jax.train.driver", "INFO") as logs:
      # The seed is no recovery key (a learning rate would resume).
      must_run([*args, "--config.seed=7", "--overwrite"])
    self.assertNotIn("resuming", "\n".join(logs.output))
    self.assertEqual(
      read_json(os.path.join(wd, "run.json"))["config"]["seed"], 7
    )
    other = export_params()
    self.assertFalse(
      np.array_equal(first["classifier/kernel"], other["classifier/kernel"])
    )

  # ------------------------------------------------------------ bad input
  def assert_refused(self, argv, pattern, *must_not_exist):
    code, _, err = run_cli(argv)
    self.assertEqual(code, 2, err)
    last = err.strip().splitlines()[-1]
    self.assertRegex(last, "^error: .*" + pattern)
    for p in must_not_exist:
      self.assertFalse(os.path.exists(p), f"a refused run made {p}")

  def sft_args(self, wd, **overrides):
    over = {
      "student.model": self.student,
      "teacher.model": self.teacher,
      "data.train": self.pos["a1"]["train"],
      "eval.sets": "dev=" + self.pos["a1"]["dev"],
      **overrides,
    }
    return [
      "sft",
      *tiny("pos"),
      "--workdir",
      wd,
      *[f"--config.{k}={v}" for k, v in over.items()],
    ]

  def make_head_teacher(self, name, task_name, labels):
    """The POS teacher's body with another task's (fresh) head."""
    model, params = hf.load_hf(self.teacher)
    params, cfg, _ = surgery.with_task_head(
      params,
      model.config,
      tasks_lib.get(task_name).head,
      labels,
      jax.random.PRNGKey(3),
    )
    out = self.path(name)
    hf.save_hf(out, cfg, params, tokenizer_dir=self.teacher, overwrite=True)
    return out

  def test_teacher_whose_head_does_not_fit_the_data(self):
    wd = self.path("bad_teacher")
    ner = self.make_head_teacher("ner_teacher", "ner", task_files.NER_LABELS)
    self.assert_refused(
      self.sft_args(wd, **{"teacher.model": ner}),
      r"label sets differ.*B-LOC.*unknown pos label",
      wd,
    )
    nli = self.make_head_teacher("nli_teacher", "nli", task_files.NLI_LABELS)
    self.assert_refused(
      self.sft_args(wd, **{"teacher.model": nli}),
      "has a sequence_classification head; task pos needs",
      wd,
    )
    self.assert_refused(  # an MLM model is no task teacher
      self.sft_args(wd, **{"teacher.model": self.trimmed}),
      "has a mlm head; task pos needs",
      wd,
    )
    other_order = ",".join(reversed(task_files.UPOS_LABELS))
    self.assert_refused(
      self.sft_args(wd, **{"data.labels": other_order}),
      r"label sets differ: teacher has \['ADJ'.*the data has \['X'",
      wd,
    )

  def test_evaluate_with_an_sft_of_another_base_model(self):
    model, params = hf.load_hf(self.student)
    params = jax.tree.map(np.array, params)
    params["embeddings"]["LayerNorm"]["scale"][0] += 0.5
    other = self.path("other_student")
    hf.save_hf(
      other, model.config, params, tokenizer_dir=self.student, overwrite=True
    )
    out = self.path("bad_ev", "ev.json")
    self.assert_refused(
      [
        "evaluate",
        "--model",
        other,
        "--sft",
        self.sft,
        "--task",
        "pos",
        "--data",
        self.pos["a2"]["test"],
        "--out",
        out,
      ],
      r"was made for base model sha256:\w+, this model is sha256:\w+",
      out,
      os.path.dirname(out),
    )
    hf_out = self.path("bad_export")
    self.assert_refused(
      ["export-hf", "--model", other, "--sft", self.sft, "--out", hf_out],
      "was made for base model",
      hf_out,
    )

  def test_malformed_task_file(self):
    with open(self.pos["a1"]["train"]) as f:
      lines = f.read().splitlines()
    bad_line = next(i for i, x in enumerate(lines) if x and x[0].isdigit()) + 3
    lines[bad_line - 1] = lines[bad_line - 1].replace("\t", " ", 2)
    bad = self.path("bad_train.conllu")
    with open(bad, "w") as f:
      f.write("\n".join(lines) + "\n")
    wd = self.path("bad_file")
    self.assert_refused(
      self.sft_args(wd, **{"data.train": bad}),
      f"{bad}:{bad_line}: expected 10 tab-separated CoNLL-U columns",
      wd,
    )
    self.assert_refused(  # in a dev split too
      self.sft_args(wd, **{"eval.sets": "dev=" + bad}),
      f"{bad}:{bad_line}: ",
      wd,
    )
    out = self.path("bad_file_ev.json")
    self.assert_refused(
      [
        "evaluate",
        "--model",
        self.student,
        "--sft",
        self.sft,
        "--task",
        "pos",
        "--data",
        f"x={bad}",
        "--out",
        out,
      ],
      f"{bad}:{bad_line}: ",
      out,
    )

  def test_empty_or_too_small_train_split(self):
    wd = self.path("bad_split")
    empty = self.path("empty.conllu")
    with open(empty, "w") as f:
      f.write("\n\n")
    self.assert_refused(
      self.sft_args(wd, **{"data.train": empty}),
      f"{empty} holds no examples",
      wd,
    )
    with open(self.pos["a1"]["train"]) as f:
      blocks = f.read().split("\n\n")
    small = self.path("small.conllu")
    with open(small, "w") as f:
      f.write("\n\n".join(blocks[:3]) + "\n\n")
    self.assert_refused(
      self.sft_args(wd, **{"data.train": small}),
      "training split has 3 examples, fewer than one batch of 16",
      wd,
    )
    self.assert_refused(  # every example dropped as too long
      [*self.sft_args(wd), "--config.data.max_seq_len=4"],
      "all 160 pos examples are longer than max_seq_len=4",
      wd,
    )

  def test_every_phase_two_loss_weight_zero(self):
    wd = self.path("bad_loss")
    self.assert_refused(
      [
        *self.sft_args(wd),
        "--config.loss.gold=0",
        "--config.loss.kl=0",
        "--config.loss.hidden=0",
        "--config.loss.attention=0",
      ],
      "every phase-2 loss weight is 0",
      wd,
    )
    self.assert_refused(
      [
        "finetune",
        *tiny("pos", FINETUNE_CONFIG),
        "--workdir",
        wd,
        f"--config.student.model={self.student}",
        f"--config.data.train={self.pos['a1']['train']}",
        "--config.loss.gold=0",
      ],
      r"finetune needs loss.gold > 0",
      wd,
    )

  def test_bad_config(self):
    wd = self.path("bad_config")
    self.assert_refused(
      [*self.sft_args(wd), "--config.optim.lr=1e-3"],
      r"unknown config key optim.lr \(did you mean optim\.",
      wd,
    )
    self.assert_refused(
      [*self.sft_args(wd), "--config.sparse.density=0"],
      r"sparse.density must be in \(0, 1\]",
      wd,
    )
    self.assert_refused(
      [*self.sft_args(wd), "--config.task=dep"],
      "task must be one of",
      wd,
    )
    self.assert_refused(
      [*self.sft_args(wd), "--config.sparse.num_entries=100000000"],
      r"sparse.num_entries=100000000 exceeds the \d+ eligible body entries",
      wd,
    )
    self.assert_refused(
      [*self.sft_args(wd), "--config.train.select_best=test/accuracy"],
      r"train.select_best='test/accuracy' must be SET/METRIC with SET one "
      "of eval.sets",
      wd,
    )
    self.assert_refused(
      [*self.sft_args(wd, **{"teacher.model": ""})],
      "teacher",
      wd,
    )


if __name__ == "__main__":
  absltest.main()
