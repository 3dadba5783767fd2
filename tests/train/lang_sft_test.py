"""`bistil lang-sft` on a synthetic language: the SFT lowers that language's
MLM loss of the teacher, applies in `bistil distil`, is refused by another
base model (also through a trimmed teacher), and its sparse stage
resumes to the same SFT."""

import contextlib
import functools
import io
import json
import os
import shutil
import tempfile

import jax
import numpy as np
from absl.testing import absltest

from bistil_jax import cli, sparse, synthetic
from bistil_jax.checkpoint import hf, language, surgery
from bistil_jax.checkpoint import sft as sft_lib
from bistil_jax.data import pipeline, vocab
from bistil_jax.errors import BistilError
from bistil_jax.model import preset
from bistil_jax.model.encoder import Model
from bistil_jax.train import distil, steps

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIG = os.path.join(REPO, "configs", "lang_sft.py:tiny")
SIZES = {
  "corpus_train": 600,
  "corpus_dev": 100,
  "task_train": 10,
  "task_dev": 10,
  "task_test": 10,
}


def run_cli(argv):
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    code = cli.main(argv)
  return code, err.getvalue()


def mlm_loss(model_dir, params, corpus, seed=7):
  """Mean MLM cross-entropy of `params` (a model of `model_dir`'s config)
  on fixed masked batches of `corpus` (same rows and masks every call)."""
  model, _ = hf.load_hf(model_dir)
  tok, _ = vocab.load_tokenizer_dir(model_dir)
  size, mask_id = pipeline.mlm_token_ids(tok)
  stream = pipeline.LanguageStream.from_corpus(
    tok, str(corpus), 64, process_index=0, num_processes=1
  )
  batches = pipeline.eval_batches(
    stream, 0, 8, 4, seed, vocab_size=size, mask_id=mask_id
  )
  sums = jax.jit(
    functools.partial(
      distil.eval_sums,
      student_model=Model(model.config),
      teacher_model=None,
      loss_cfg=steps.DistilLossConfig(
        hidden=0.0, attention=0.0, kl=0.0, mlm=1.0
      ),
    )
  )
  out = [jax.device_get(sums(params, None, b)) for b in batches]
  total = sum(float(o["mlm/total"]) for o in out)
  return total / sum(float(o["mlm/count"]) for o in out)


class LangSftTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.TemporaryDirectory()
    root = cls.root = cls._tmp.name
    family = synthetic.make_family(seed=0, num_languages=4)
    cls.data = synthetic.write_dataset(
      os.path.join(root, "synth"), family, ["a1", "a2"], SIZES
    )
    corpora = cls.data.corpora
    tok = os.path.join(root, "tok")
    synthetic.train_wordpiece(
      [corpora[c]["train"] for c in corpora], tok, vocab_size=600
    )
    cfg = preset(
      "tiny",
      hidden_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      intermediate_size=128,
    )
    cls.mmt = os.path.join(root, "mmt")
    cls.other = os.path.join(root, "other")
    synthetic.init_model_dir(cls.mmt, tok, cfg, seed=0)
    synthetic.init_model_dir(cls.other, tok, cfg, seed=1)
    cls.wd = os.path.join(root, "wd")
    cls.argv = cls.lang_sft_argv(cls.wd)
    code, err = run_cli(cls.argv)
    assert code == 0, err
    cls.sft_dir = os.path.join(cls.wd, "export")

  @classmethod
  def lang_sft_argv(cls, workdir):
    c = cls.data.corpora["a1"]
    return [
      "lang-sft",
      "--config",
      CONFIG,
      "--workdir",
      workdir,
      f"--config.student.model={cls.mmt}",
      f"--config.data.corpus={c['train']}",
      f"--config.eval.sets=dev={c['dev']}",
    ]

  @classmethod
  def tearDownClass(cls):
    cls._tmp.cleanup()
    super().tearDownClass()

  def test_lowers_the_languages_mlm_loss_of_the_teacher(self):
    dev = self.data.corpora["a1"]["dev"]
    _, base = hf.load_hf(self.mmt)
    _, merged = surgery.merged_model(self.mmt, [self.sft_dir])  # whole SFT
    self.assertLess(
      mlm_loss(self.mmt, merged, dev), mlm_loss(self.mmt, base, dev)
    )
    # results.json: the same comparison on the run's dev batches.
    with open(os.path.join(self.wd, "results.json")) as f:
      results = json.load(f)
    self.assertLess(results["trained"]["dev/mlm"], results["base"]["dev/mlm"])
    self.assertIn("base+diffs", results)

  def test_head_frozen_sft_lowers_the_loss_as_phase_1_applies_it(self):
    # Phase 1 adds only the body diffs to its teacher; with the whole MLM
    # head frozen those diffs are the whole SFT.
    wd = os.path.join(self.root, "frozen_head")
    code, err = run_cli(
      [*self.lang_sft_argv(wd), "--config.sparse.freeze_head=true"]
    )
    self.assertEqual(code, 0, err)
    sft = os.path.join(wd, "export")
    self.assertEqual(sft_lib.load_sft(sft).dense, {})
    model, base = hf.load_hf(self.mmt)
    teachers = surgery.language_teachers(
      base, model.config, self.mmt, ([sft], [])
    )
    self.assertIs(teachers[1], base)  # the target has no SFT
    dev = self.data.corpora["a1"]["dev"]
    self.assertLess(
      mlm_loss(self.mmt, teachers[0], dev), mlm_loss(self.mmt, base, dev)
    )

  def test_sft_is_a_sparse_language_diff_of_the_body(self):
    sft = sft_lib.load_sft(self.sft_dir)
    meta = sft.meta
    self.assertEqual(meta["kind"], "language")
    self.assertEqual(meta["base_model"], self.mmt)
    _, base = hf.load_hf(self.mmt)
    cfg = hf.load_hf(self.mmt)[0].config
    self.assertEqual(
      meta["base_fingerprint"],
      sft_lib.params_fingerprint(base, vocab_size=cfg.vocab_size),
    )
    # LayerNorms and the untied decoder frozen: never stored.
    self.assertFalse([k for k in sft.diffs if "LayerNorm" in k])
    self.assertEqual(
      sorted(sft.dense),
      ["lm_head/bias", "lm_head/dense/bias", "lm_head/dense/kernel"],
    )
    eligible = sparse.eligible_mask(
      base, layer_norm=False, vocab_size=cfg.vocab_size
    )
    k = sparse.k_from_density(eligible, meta["density"])
    self.assertLessEqual(sft.nnz, k)
    self.assertGreater(sft.nnz, k // 2)

  def test_applies_in_distil_and_another_base_is_refused(self):
    c = self.data.corpora
    args = [
      "distil",
      "--config",
      os.path.join(REPO, "configs", "distil.py:tiny"),
      f"--config.data.source={c['a1']['train']}",
      f"--config.data.target={c['a2']['train']}",
      "--config.train.num_steps=2",
      "--config.train.export=false",
      f"--config.teacher.sfts=source={self.sft_dir}",
    ]
    wd = os.path.join(self.root, "distil")
    code, err = run_cli(
      [*args, "--workdir", wd, f"--config.teacher.model={self.mmt}"]
    )
    self.assertEqual(code, 0, err)
    bad = os.path.join(self.root, "distil_other")
    code, err = run_cli(
      [*args, "--workdir", bad, f"--config.teacher.model={self.other}"]
    )
    self.assertEqual(code, 2, err)
    self.assertIn("SFT was made for base model sha256:", err)
    self.assertFalse(os.path.exists(bad))  # refused before the workdir
    # The same check wherever SFTs are applied (finetune, sft, evaluate).
    model, params = surgery.merged_model(self.mmt, [self.sft_dir])
    self.assertEqual(model.config.head, "mlm")
    with self.assertRaisesRegex(BistilError, "SFT was made for base model"):
      surgery.merged_model(self.other, [self.sft_dir])

  def test_applies_to_a_trimmed_teacher_of_its_base_only(self):
    model, base = hf.load_hf(self.mmt)
    cfg = model.config
    keep = np.array([0, 1, 2, 3, 4] + list(range(40, cfg.vocab_size, 3)))
    full = sft_lib.apply_sft(
      base, sft_lib.load_sft(self.sft_dir), with_dense=False
    )
    trimmed, tcfg = vocab.slice_vocab_params(base, cfg, keep)
    got = language.apply_language_sft(trimmed, self.sft_dir, tcfg, keep)
    table = "embeddings", "word_embeddings", "embedding"

    def rows(p):
      return np.asarray(p[table[0]][table[1]][table[2]])

    np.testing.assert_array_equal(rows(got)[: keep.size], rows(full)[keep])
    np.testing.assert_array_equal(
      got["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"],
      full["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"],
    )
    _, other = hf.load_hf(self.other)
    other_trimmed, _ = vocab.slice_vocab_params(other, cfg, keep)
    with self.assertRaisesRegex(BistilError, "made for base model layers"):
      language.apply_language_sft(other_trimmed, self.sft_dir, tcfg, keep)

  def test_resumed_sparse_stage_writes_the_same_sft(self):
    wd = os.path.join(self.root, "resumed")
    shutil.copytree(self.wd, wd)
    shutil.rmtree(os.path.join(wd, "export"))
    shutil.rmtree(os.path.join(wd, "sparse", "checkpoints", "40"))
    shutil.rmtree(os.path.join(wd, "dense"))  # never re-run
    code, err = run_cli(self.lang_sft_argv(wd))
    self.assertEqual(code, 0, err)
    self.assertFalse(os.path.exists(os.path.join(wd, "dense")))
    a = sft_lib.load_sft(self.sft_dir)
    b = sft_lib.load_sft(os.path.join(wd, "export"))
    self.assertEqual(sorted(a.diffs), sorted(b.diffs))
    for key, (idx, val) in a.diffs.items():
      np.testing.assert_array_equal(idx, b.diffs[key][0])
      np.testing.assert_array_equal(val, b.diffs[key][1])

  def test_bad_input_one_line(self):
    argv = self.lang_sft_argv(os.path.join(self.root, "bad"))
    code, err = run_cli([*argv, f"--config.student.model={self.root}/nope"])
    self.assertEqual(code, 2)
    code, err = run_cli([*argv, "--config.sparse.density=0"])
    self.assertEqual(code, 2)
    self.assertIn("sparse.density must be in (0, 1]", err)
    self.assertFalse(os.path.exists(os.path.join(self.root, "bad")))
    # Refused before run.json (not after the dense stage trained), so the
    # corrected command is not "another run".
    code, err = run_cli([*argv, "--config.sparse.num_entries=1000000000"])
    self.assertEqual(code, 2)
    self.assertRegex(err, "num_entries=1000000000 exceeds the .* eligible")
    self.assertFalse(os.path.exists(os.path.join(self.root, "bad")))


class ReleasedConfigTest(absltest.TestCase):
  def test_density_gives_the_released_k_on_mbert(self):
    from bistil_jax import configlib
    from bistil_jax.model import init_params

    c = configlib.build_config(os.path.join(REPO, "configs", "lang_sft.py"))
    cfg = preset("mbert")
    shapes = jax.eval_shape(
      lambda k: init_params(cfg, k), jax.random.PRNGKey(0)
    )
    eligible = sparse.eligible_mask(
      shapes, layer_norm=c.sparse.layer_norm, vocab_size=cfg.vocab_size
    )
    self.assertEqual(
      sparse.k_from_density(eligible, c.sparse.density), 7_667_712
    )
    self.assertEqual(
      (c.optim.learning_rate, c.data.batch_size, c.data.max_seq_len),
      (5e-5, 8, 256),
    )
    self.assertEqual(c.loss.l1, 0.1)
    self.assertTrue(c.sparse.freeze_decoder)


if __name__ == "__main__":
  absltest.main()
