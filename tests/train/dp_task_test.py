"""`--task dp` from the CLI on synthetic trees (issue 14).

One tiny pipeline, built once: a random 4-layer MMT task-tuned as the
parser teacher (`bistil finetune`, dense, biaffine head) and phase 2 of a
random 2-layer student against it (`bistil sft`). The tests check that each
lowers its loss and beats the untrained (zero-initialised) parser, that the
export (encoder HF dir + parser_head.safetensors) loads in transformers and
back here with the same scores, and that the task SFT applies on the student
in `bistil evaluate` and `bistil export-hf`.
"""

import json
import os
import tempfile

import numpy as np
import pytest
import torch
import transformers
from absl.testing import absltest

from bistil_jax import configlib, synthetic
from bistil_jax import tasks as tasks_lib
from bistil_jax.checkpoint import hf, parser_head
from bistil_jax.checkpoint import manager as ckpt
from bistil_jax.checkpoint import sft as sft_lib
from bistil_jax.data import task_files, vocab
from bistil_jax.model import preset
from bistil_jax.tasks import dp as dp_tasks
from bistil_jax.train import task
from tests.train.task_test import (
  FINETUNE_CONFIG,
  SIZES,
  evaluate,
  flat,
  fresh_head_model,
  must_run,
  read_json,
  tiny,
)

MAX_LEN = 64  # the tiny variant's data.max_seq_len


def logged(workdir, key):
  """The values of one metric in a run's metrics.jsonl, in step order."""
  out = []
  with open(os.path.join(workdir, "metrics", "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if key in row:
        out.append(row[key])
  return out


class DpCliTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.TemporaryDirectory()
    root = cls.root = cls._tmp.name
    fam = synthetic.make_family(0)
    data = synthetic.write_dataset(
      os.path.join(root, "data"), fam, ["a1", "a2"], SIZES
    )
    # The synthetic CoNLL-U files carry heads and relations.
    cls.files = {
      x: {s: str(p) for s, p in d.items()} for x, d in data.pos.items()
    }
    corpora = [str(data.corpora[x]["train"]) for x in ("a1", "a2")]
    tok = os.path.join(root, "tok")
    synthetic.train_wordpiece(corpora, tok, vocab_size=600)
    size = dict(hidden_size=64, intermediate_size=128)
    size.update(num_attention_heads=4, max_position_embeddings=128)
    cls.teacher0 = os.path.join(root, "teacher0")
    synthetic.init_model_dir(
      cls.teacher0, tok, preset("tiny", num_hidden_layers=4, **size), seed=0
    )
    cls.student = os.path.join(root, "student")
    synthetic.init_model_dir(
      cls.student, tok, preset("tiny", num_hidden_layers=2, **size), seed=1
    )
    cls.teacher_wd = os.path.join(root, "teacher_dp")
    must_run(
      [
        "finetune",
        *tiny("dp", FINETUNE_CONFIG),
        "--workdir",
        cls.teacher_wd,
        f"--config.student.model={cls.teacher0}",
        f"--config.data.train={cls.files['a1']['train']}",
        f"--config.eval.sets=dev={cls.files['a1']['dev']}",
      ]
    )
    cls.teacher = os.path.join(cls.teacher_wd, "export")
    cls.teacher_res = read_json(os.path.join(cls.teacher_wd, "results.json"))
    cls.sft_wd = os.path.join(root, "sft_dp")
    must_run(
      [
        "sft",
        *tiny("dp"),
        "--workdir",
        cls.sft_wd,
        f"--config.student.model={cls.student}",
        f"--config.teacher.model={cls.teacher}",
        f"--config.data.train={cls.files['a1']['train']}",
        f"--config.eval.sets=dev={cls.files['a1']['dev']},"
        f"a2={cls.files['a2']['test']}",
      ]
    )
    cls.sft = os.path.join(cls.sft_wd, "export")
    cls.sft_res = read_json(os.path.join(cls.sft_wd, "results.json"))

  @classmethod
  def tearDownClass(cls):
    cls._tmp.cleanup()
    super().tearDownClass()

  def path(self, *parts):
    return os.path.join(self.root, *parts)

  def untrained(self, model_dir):
    """Dev scores of `model_dir` + the zero-initialised parser."""
    labels = task_files.DP_RELATIONS
    model, params = fresh_head_model(model_dir, "dp", labels)
    self.assertEqual(model.config.head, dp_tasks.DependencyTask.head)
    for k, v in flat(params).items():
      if k.startswith("classifier/"):
        np.testing.assert_array_equal(v, 0, err_msg=k)
    tok, _ = vocab.load_tokenizer_dir(model_dir)
    data = task.encode_split(
      tasks_lib.get("dp"), self.files["a1"]["dev"], tok, labels, MAX_LEN
    )
    return evaluate(model, params, data, 16)

  def evaluate_cli(self, name, *args, split=("a1", "dev")):
    out = self.path(f"{name}.json")
    must_run(
      [
        "evaluate",
        *args,
        "--task",
        "dp",
        "--data",
        f"dev={self.files[split[0]][split[1]]}",
        "--max-seq-len",
        MAX_LEN,
        "--out",
        out,
      ]
    )
    return read_json(out)["dev"]

  # ------------------------------------------------------------ finetune
  def test_finetune_lowers_its_loss_and_beats_the_untrained_parser(self):
    gold = logged(self.teacher_wd, "dense/gold")
    self.assertGreater(len(gold), 2)
    self.assertLess(gold[-1], 0.7 * gold[0])
    res = self.teacher_res["dev"]
    before = self.untrained(self.teacher0)
    self.assertEqual(before["num_words"], res["num_words"])
    self.assertGreater(res["las"], before["las"] + 0.2)
    self.assertGreater(res["uas"], before["uas"] + 0.2)
    self.assertEqual(self.teacher_res["labels"], list(task_files.DP_RELATIONS))
    # Every word of the file counted (CoNLL 2018: punctuation included).
    words = sum(
      len(e.words) for e in tasks_lib.get("dp").read(self.files["a1"]["dev"])
    )
    self.assertEqual(res["num_words"], words)

  def test_export_is_an_encoder_dir_and_a_head_file(self):
    export = self.teacher
    self.assertTrue(os.path.isfile(os.path.join(export, parser_head.HEAD_FILE)))
    pt = transformers.AutoModel.from_pretrained(export)
    pt.eval()
    self.assertEqual(type(pt).__name__, "BertModel")
    model, params = hf.load_hf(export)
    self.assertEqual(model.config.head, dp_tasks.DependencyTask.head)
    self.assertEqual(model.config.label_names, task_files.DP_RELATIONS)
    # The head read back is the one the run ended with.
    _, state = ckpt.read_state(os.path.join(self.teacher_wd, "dense"))
    trained = flat(state["params"])
    for k, v in flat(params).items():
      np.testing.assert_allclose(v, trained[k], atol=0, err_msg=k)
    # transformers' encoder = ours on real inputs.
    tok, _ = vocab.load_tokenizer_dir(export)
    data = task.encode_split(
      tasks_lib.get("dp"),
      self.files["a1"]["dev"],
      tok,
      task_files.DP_RELATIONS,
      MAX_LEN,
    )
    ids, mask = data.input_ids[:4], data.attention_mask[:4]
    with torch.no_grad():
      ref = pt(
        input_ids=torch.from_numpy(ids.astype(np.int64)),
        attention_mask=torch.from_numpy(mask.astype(np.int64)),
      ).last_hidden_state.numpy()
    ours = model.apply({"params": params}, ids, attention_mask=mask)
    real = mask > 0
    np.testing.assert_allclose(
      np.asarray(ours.last_hidden_state)[real], ref[real], atol=1e-4
    )
    # And `bistil evaluate` on the export reproduces results.json.
    self.assertEqual(
      self.evaluate_cli("teacher", "--model", export), self.teacher_res["dev"]
    )

  @pytest.mark.slow  # the same stage code as task_test's LT-SFT finetune
  def test_lt_sft_finetune_exports_an_sft_that_evaluate_applies(self):
    wd = self.path("ft_sparse")
    must_run(
      [
        "finetune",
        *tiny("dp", FINETUNE_CONFIG),
        "--workdir",
        wd,
        f"--config.student.model={self.student}",
        f"--config.data.train={self.files['a1']['train']}",
        f"--config.eval.sets=dev={self.files['a1']['dev']}",
        "--config.sparse.enabled=true",
        "--config.train.epochs=1",
        "--config.sparse.epochs=1",
      ]
    )
    sft = sft_lib.load_sft(os.path.join(wd, "export"))
    self.assertEqual(
      (sft.meta["task"], sft.meta["head"]), ("dp", dp_tasks.DependencyTask.head)
    )
    self.assertEqual(
      sorted(sft.dense),
      sorted(f"classifier/{k}" for k in parser_head._leaves(sft_head(sft))),
    )
    res = read_json(os.path.join(wd, "results.json"))["dev"]
    got = self.evaluate_cli(
      "ft_sparse", "--model", self.student, "--sft", os.path.join(wd, "export")
    )
    self.assertEqual(got, res)

  # ------------------------------------------------------------ phase 2
  def test_sft_lowers_its_loss_and_beats_the_untrained_parser(self):
    for stage in ("dense", "sparse"):
      kl = logged(self.sft_wd, f"{stage}/kl")
      self.assertGreater(len(kl), 2, stage)
      self.assertLess(kl[-1], kl[0], stage)
      self.assertNotEmpty(logged(self.sft_wd, f"{stage}/hidden"))
    res = self.sft_res["dev"]
    before = self.untrained(self.student)
    self.assertGreater(res["las"], before["las"] + 0.1)
    self.assertEqual(self.sft_res["phase"], "sft")
    self.assertIn("las", self.sft_res["a2"])

  def test_task_sft_applies_in_evaluate_and_export_hf(self):
    meta = read_json(os.path.join(self.sft, sft_lib.SFT_META))
    self.assertEqual(
      (meta["kind"], meta["head"]), ("task", dp_tasks.DependencyTask.head)
    )
    self.assertEqual(meta["label_names"], list(task_files.DP_RELATIONS))
    got = self.evaluate_cli("sft", "--model", self.student, "--sft", self.sft)
    self.assertEqual(got, self.sft_res["dev"])
    out = self.path("hf_dp")
    must_run(
      ["export-hf", "--model", self.student, "--sft", self.sft, "--out", out]
    )
    self.assertTrue(os.path.isfile(os.path.join(out, parser_head.HEAD_FILE)))
    self.assertEqual(
      self.evaluate_cli("hf_dp", "--model", out), self.sft_res["dev"]
    )


class DpConfigTest(absltest.TestCase):
  def test_released_values_and_tiny(self):
    for name in ("finetune", "sft"):
      c = configlib.build_config(f"configs/{name}.py:dp", {})
      self.assertEqual(c.task, "dp")
      # docs/method.md 4.4: DP 10 dense + 10 sparse epochs, density 0.08, bs 8,
      # lr 5e-5.
      self.assertEqual((c.train.epochs, c.sparse.epochs), (10.0, 10.0))
      self.assertEqual((c.sparse.density, c.data.batch_size), (0.08, 8))
      self.assertEqual(c.optim.learning_rate, 5e-5)
      self.assertEqual(c.sparse.enabled, name == "sft")
      t = configlib.build_config(f"configs/{name}.py:dp,variant=tiny", {})
      self.assertLess(t.data.max_seq_len, c.data.max_seq_len)
    pos = configlib.build_config("configs/sft.py:pos", {})
    self.assertEqual(pos.train.epochs, 3.0)  # unchanged for the others


def sft_head(sft):
  """The SFT's dense head as a params tree {"classifier": {...}}."""
  return {
    "classifier": {
      k.split("/", 1)[1]: v
      for k, v in sft.dense.items()
      if k.startswith("classifier/")
    }
  }


if __name__ == "__main__":
  absltest.main()
