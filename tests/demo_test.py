"""The demo report: per-model statistics over seeds and the structure check
that CI applies to a real `bistil demo --quick` run."""

import json
import os
import tempfile

from absl.testing import absltest

from bistil_jax import demo
from bistil_jax.errors import BistilError

LANGS = {"source": "a1", "close": "a2", "distant": "b1"}


def fake_seed(seed, shift):
  def model(params, src, tgt_scores):
    return {
      "params": params,
      "macs": 1e6,
      "latency_ms": 2.0 + shift,
      "scores": {"a1": src, **tgt_scores},
    }

  return {
    "seed": seed,
    "languages": LANGS,
    "models": {
      "teacher": model(300e3, 0.9, {"a2": 0.8, "b1": 0.5}),
      "multi": model(180e3, 0.8, {"a2": 0.6 + shift, "b1": 0.4}),
      "bistil_close": model(150e3, 0.85, {"a2": 0.7 + shift}),
      "scratch_close": model(150e3, 0.6, {"a2": 0.3}),
      "bistil_distant": model(155e3, 0.85, {"b1": 0.45}),
      "scratch_distant": model(155e3, 0.6, {"b1": 0.2}),
      "majority": {
        "params": 0,
        "macs": 0,
        "latency_ms": 0.0,
        "scores": {"a1": 0.21, "a2": 0.21, "b1": 0.21},
      },
    },
  }


class ReportTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.out = tmp.name
    self.results = [fake_seed(0, 0.0), fake_seed(1, 0.1)]
    demo.write_report(self.out, self.results, demo.QUICK, quick=True)

  def test_statistics_over_seeds(self):
    table = {
      (r["target"].split()[0], r["model"]): r for r in demo.rows(self.results)
    }
    row = table[("close", "bistil")]
    self.assertAlmostEqual(row["target_score"][0], 0.75)
    self.assertAlmostEqual(row["target_score"][1], 0.0707107, places=6)
    self.assertAlmostEqual(row["vs_teacher"], (0.7 / 0.8 + 0.8 / 0.8) / 2)
    self.assertEqual(row["seeds"], 2)
    self.assertAlmostEqual(table[("distant", "teacher")]["vs_teacher"], 1.0)
    self.assertAlmostEqual(table[("distant", "multi")]["target_score"][0], 0.4)

  def test_report_points_to_each_bistil_run(self):
    runs = {"close": {"pos": "/o/seed0/bistil_close_pos"},
            "distant": {"pos": "/o/seed0/bistil_distant_pos"}}  # fmt: skip
    one = [{**fake_seed(0, 0.0), "runs": runs}]
    demo.write_report(self.out, one, demo.QUICK, quick=True)
    with open(os.path.join(self.out, "report.md")) as f:
      text = f.read()
    for kind in ("close", "distant"):
      self.assertIn(f"seed0/bistil_{kind}_pos/report/report.md", text)

  def test_one_seed_shows_no_spread(self):
    one = [fake_seed(0, 0.0)]
    table = demo.rows(one)
    self.assertTrue(all(r["source"][1] is None for r in table))
    text = demo.format_table(table)
    self.assertNotIn("±", text)
    self.assertIn("± 0.071", demo.format_table(demo.rows(self.results)))

  def test_majority_row_has_no_size_columns(self):
    text = demo.format_table(demo.rows(self.results))
    row = [r for r in text.splitlines() if "majority tag" in r][0]
    self.assertIn("| – | – | – | 0.210 | 0.210 |", row.replace(" ± 0.000", ""))

  def test_claims_are_computed_from_the_numbers(self):
    claims = demo.claims(demo.rows(self.results))
    self.assertLen(claims, 3)
    (keep, ok1, nums1), (multi, ok2, _), (scratch, ok3, _) = claims
    # bistil keeps (0.7/0.8 + 0.8/0.8)/2 = 94% on close: below 95%.
    self.assertFalse(ok1)
    self.assertIn("close 94%", nums1)
    self.assertTrue(ok2)  # 0.75 > 0.65 (close), 0.45 > 0.4 (distant)
    self.assertTrue(ok3)
    better = [fake_seed(0, 0.1), fake_seed(1, 0.1)]
    for r in better:
      r["models"]["multi"]["scores"]["b1"] = 0.5
    _, ok2, nums2 = demo.claims(demo.rows(better))[1]
    self.assertFalse(ok2)
    self.assertIn("distant 0.450 vs 0.500", nums2)
    with open(os.path.join(self.out, "report.md")) as f:
      lines = [ln for ln in f.read().splitlines() if "hold" in ln]
    self.assertLen(lines, 3)
    self.assertTrue(lines[0].startswith("- does NOT hold: BiStil keeps"))

  def test_ablation_table_over_seeds(self):
    rows_ = [
      {"seed": s, "init": "random", "loss": "kl", "source": v, "target": v}
      for s, v in ((0, 0.5), (1, 0.7))
    ]
    text = demo.format_ablation(rows_)
    self.assertIn("| random | kl | 2 | 0.600 ± 0.141 | 0.600 ± 0.141 |", text)
    self.assertIn("| 0.500 | 0.500 |", demo.format_ablation(rows_[:1]))

  def test_check_report_accepts_a_complete_run(self):
    demo.check_report(self.out)
    with open(os.path.join(self.out, "report.md")) as f:
      self.assertIn("| close (a2) | BiStil student |", f.read())

  def test_check_report_rejects_missing_pieces(self):
    os.remove(os.path.join(self.out, "tradeoff.png"))
    with self.assertRaisesRegex(BistilError, "lacks tradeoff.png"):
      demo.check_report(self.out)

  def test_check_report_rejects_a_missing_model(self):
    path = os.path.join(self.out, "results.json")
    with open(path) as f:
      res = json.load(f)
    res["table"] = [r for r in res["table"] if r["model"] != "scratch"]
    with open(path, "w") as f:
      json.dump(res, f)
    with self.assertRaisesRegex(BistilError, "results table rows"):
      demo.check_report(self.out)


def fake_multitask_seed(seed, shift):
  """fake_seed plus DP and QA entries (no majority row; UAS/EM extra)."""
  res = fake_seed(seed, shift)
  res["tasks"] = {"pos": {"metric": "accuracy", "models": res["models"]}}
  for task, other, base in (("dp", "uas", 0.1), ("qa", "exact_match", -0.2)):
    models = {}
    for key, m in res["models"].items():
      if key == "majority":
        continue
      scores = {lang: v - base for lang, v in m["scores"].items()}
      models[key] = {
        **{k: m[k] for k in ("params", "macs", "latency_ms")},
        "scores": scores,
        "metrics": {
          lang: {demo.TASK_METRICS[task][0]: v, other: v + 0.05}
          for lang, v in scores.items()
        },
      }
    res["tasks"][task] = {
      "metric": demo.TASK_METRICS[task][0],
      "models": models,
    }
  return res


class MultiTaskReportTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.out = tmp.name
    self.results = [fake_multitask_seed(0, 0.0), fake_multitask_seed(1, 0.1)]
    self.printed = demo.write_report(
      self.out, self.results, demo.QUICK, quick=True
    )

  def test_per_task_tables(self):
    dp = demo.rows(self.results, "dp")
    self.assertEqual(
      {(r["target"].split()[0], r["model"]) for r in dp},
      {(k, m) for k in ("close", "distant")
       for m in ("teacher", "bistil", "scratch", "multi")},
    )  # fmt: skip
    by = {(r["target"].split()[0], r["model"]): r for r in dp}
    row = by[("close", "bistil")]
    self.assertEqual(row["metric"], "las")
    self.assertAlmostEqual(row["target_score"][0], 0.65)  # (0.6 + 0.7) / 2
    self.assertAlmostEqual(row["target_uas"][0], 0.70)
    self.assertAlmostEqual(row["source_uas"][0], 0.80)
    self.assertAlmostEqual(
      row["vs_teacher"], (0.6 / 0.7 + 0.7 / 0.7) / 2
    )  # fmt: skip
    qa = {(r["target"].split()[0], r["model"]): r for r in demo.rows(
      self.results, "qa")}  # fmt: skip
    self.assertAlmostEqual(qa[("distant", "multi")]["target_score"][0], 0.6)
    self.assertIn("target_exact_match", qa[("distant", "multi")])
    text = demo.format_table(dp)
    self.assertIn("| source LAS | target LAS |", text)
    self.assertNotIn("majority", text)
    self.assertIn("| target F1 |", demo.format_table(demo.rows(
      self.results, "qa")))  # fmt: skip
    # POS keeps its table, majority row included.
    self.assertEqual(demo.rows(self.results), demo.rows(self.results, "pos"))
    self.assertLen(demo.rows(self.results), 10)

  def test_report_has_a_section_per_task(self):
    with open(os.path.join(self.out, "report.md")) as f:
      sections = demo._report_sections(f.read())
    for task in ("pos", "dp", "qa"):
      lines = sections[demo.TASK_TITLES[task]]
      want = 11 if task == "pos" else 9  # the header + a row per model
      self.assertLen([ln for ln in lines if ln.startswith("| ")], want)
      self.assertLen([ln for ln in lines if ln.startswith("- ")], 3)
      self.assertIn(demo.TASK_TITLES[task], self.printed)
    self.assertIn("DP LAS (UAS in results.json)", sections)
    with open(os.path.join(self.out, "results.json")) as f:
      res = json.load(f)
    self.assertEqual(res["task_names"], ["pos", "dp", "qa"])
    self.assertEqual(res["table"], res["tasks"]["pos"]["table"])
    self.assertIn("teacher's target LAS", res["tasks"]["dp"]["claims"][0][
      "claim"])  # fmt: skip

  def test_check_report_accepts_a_complete_multitask_run(self):
    demo.check_report(self.out)
    demo.check_report(self.out, ("pos", "dp", "qa"))

  def test_check_report_rejects_a_missing_task_table(self):
    path = os.path.join(self.out, "results.json")
    with open(path) as f:
      res = json.load(f)
    del res["tasks"]["qa"]
    with open(path, "w") as f:
      json.dump(res, f)
    with self.assertRaisesRegex(BistilError, "results.json lacks the qa table"):
      demo.check_report(self.out)

  def test_check_report_rejects_a_missing_report_section(self):
    path = os.path.join(self.out, "report.md")
    with open(path) as f:
      text = f.read()
    with open(path, "w") as f:
      f.write(text.replace("## DP LAS", "## DP"))
    with self.assertRaisesRegex(BistilError, "report.md lacks the section"):
      demo.check_report(self.out)

  def test_check_report_rejects_a_missing_dp_row(self):
    path = os.path.join(self.out, "results.json")
    with open(path) as f:
      res = json.load(f)
    dp = res["tasks"]["dp"]
    dp["table"] = [r for r in dp["table"] if r["model"] != "multi"]
    with open(path, "w") as f:
      json.dump(res, f)
    with self.assertRaisesRegex(BistilError, r"results table rows \(dp\)"):
      demo.check_report(self.out)

  def test_a_run_without_pos(self):
    for r in self.results:
      del r["models"], r["tasks"]["pos"]
    out = os.path.join(self.out, "dp_only")
    os.makedirs(out)
    printed = demo.write_report(out, self.results, demo.QUICK, quick=True)
    self.assertNotIn("POS", printed)
    demo.check_report(out)
    with self.assertRaisesRegex(BistilError, "lacks the pos table"):
      demo.check_report(out, ("pos", "dp"))


class ParseTasksTest(absltest.TestCase):
  def test_parses_a_comma_list(self):
    self.assertEqual(demo.parse_tasks("pos"), ("pos",))
    self.assertEqual(demo.parse_tasks("dp, qa,dp"), ("dp", "qa"))

  def test_rejects_unknown_and_empty(self):
    with self.assertRaisesRegex(BistilError, "unknown task 'ner'"):
      demo.parse_tasks("pos,ner")
    with self.assertRaisesRegex(BistilError, "at least one"):
      demo.parse_tasks(" , ")

  def test_cli_rejects_an_unknown_task_in_one_line(self):
    import contextlib
    import io

    from bistil_jax import cli

    err = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(err):
      code = cli.main(["demo", "--quick", "--tasks", "pos,xx", "--out", tmp])
      self.assertEqual(os.listdir(tmp), [])
    self.assertEqual(code, 2)
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    self.assertLen(lines, 1)
    self.assertIn("unknown task 'xx'", lines[0])

  def test_epochs_and_workdir_names_per_task(self):
    b = demo.QUICK
    self.assertEqual(
      demo.task_epochs(b, "pos"),
      (b.finetune_epochs, b.dense_epochs, b.sparse_epochs),
    )
    self.assertEqual(
      demo.task_epochs(b, "dp"),
      (b.dp_finetune_epochs, b.dp_dense_epochs, b.dp_sparse_epochs),
    )
    self.assertEqual(demo._suffix("pos"), "")  # the names before --tasks
    self.assertEqual(demo._suffix("qa"), "qa_")


class FamilyTest(absltest.TestCase):
  def test_the_default_mmt_covers_a_bigger_family_with_the_same_pair(self):
    from bistil_jax import synthetic

    b = demo.Budget()
    self.assertEqual(demo.family_size(b), b.languages)
    self.assertGreater(b.languages, 8)
    self.assertEqual(demo.family_size(demo.QUICK), 8)  # the default family
    big = synthetic.make_family(0, num_languages=demo.family_size(b))
    small = synthetic.make_family(0)
    self.assertLen(big.codes, b.languages)
    src, close, distant = demo.transfer_languages(big, b)
    for code in (src, close, distant):
      self.assertEqual(big.language(code), small.language(code), code)


class MmtCorpusTest(absltest.TestCase):
  def test_targets_are_cut_to_their_low_resource_share(self):
    import types

    with tempfile.TemporaryDirectory() as tmp:
      corpora = {}
      for lang in ("b1", "b2", "a1"):
        path = os.path.join(tmp, f"{lang}.txt")
        with open(path, "w") as f:
          f.write("".join(f"{lang} {i}\n" for i in range(5)))
        corpora[lang] = {"train": path}
      data = types.SimpleNamespace(corpora=corpora)
      cut = demo.dataclasses.replace(demo.QUICK, mmt_target_sentences=2)
      text = demo.mmt_corpus(data, ["b1", "b2", "a1"], ("b2", "a1"), cut)
      whole = demo.dataclasses.replace(demo.QUICK, mmt_target_sentences=0)
      full = demo.mmt_corpus(data, ["b1", "b2", "a1"], ("b2", "a1"), whole)
    lines = text.splitlines()
    self.assertEqual(sum(ln.startswith("b1 ") for ln in lines), 5)
    self.assertEqual(
      [ln for ln in lines if ln.startswith("b2")], ["b2 0", "b2 1"]
    )
    self.assertEqual(sum(ln.startswith("a1 ") for ln in lines), 2)
    self.assertLen(full.splitlines(), 15)

  def test_phase1_teachers_get_the_language_sfts(self):
    sfts = {"b1": "/s/b1", "b2": "/s/b2"}
    self.assertEqual(
      demo._teacher_sfts(sfts, "b1", "b2"),
      ["--config.teacher.sfts=source=/s/b1,target=/s/b2"],
    )
    self.assertEqual(demo._teacher_sfts({}, "b1", "b2"), [])


class RecipeConfigTest(absltest.TestCase):
  def test_the_bistil_students_run_config_has_the_demos_budget(self):
    import types

    from bistil_jax.recipe import stages

    files = {
      lang: {s: f"/d/pos/{lang}/{s}.conllu" for s in ("train", "dev", "test")}
      for lang in ("b1", "b2")
    }
    corpora = {lang: {"train": f"/d/{lang}.txt"} for lang in ("b1", "b2")}
    d = types.SimpleNamespace(
      data=types.SimpleNamespace(corpora=corpora), files={"dp": files},
      src="b1",
    )  # fmt: skip
    b = demo.Budget()
    sfts = {"b1": "/s/b1", "b2": "/s/b2"}
    c = demo.recipe_config(b, 2, "dp", d, "b2", "/t", "/t_dp", sfts)
    stages.validate(c)  # a valid `bistil run` config
    self.assertEqual(
      (c.source.corpus, c.target.corpus), ("/d/b1.txt", "/d/b2.txt")
    )
    self.assertEqual((c.source.dev, c.distil.train.select_best), ("", ""))
    self.assertEqual(c.task.target_tests, "b2=/d/pos/b2/test.conllu")
    self.assertEqual((c.lang_sft.mode, c.lang_sft.target), ("given", "/s/b2"))
    self.assertEqual(c.distil.train.num_steps, b.distil_steps)
    self.assertEqual(c.distil.student.init, b.student_init)
    self.assertEqual((c.distil.seed, c.sft.seed), (2, 2))
    self.assertEqual(
      (c.sft.train.epochs, c.sft.sparse.epochs),
      demo.task_epochs(b, "dp")[1:],
    )
    self.assertEqual(c.sft.sparse.num_entries, b.sparse_entries)
    self.assertEqual(c.sft.train.select_best, "dev/las")
    self.assertEqual(c.task_teacher.model, "/t_dp")
    self.assertEqual((c.measure.batch, c.measure.seq_len), (8, b.seq_len))
    filled = stages.filled(c, "/run", "distil")
    self.assertEqual(filled.teacher.sfts, "source=/s/b1,target=/s/b2")
    self.assertEqual(filled.eval.sets, "")  # no held-out corpora
    # A later task's run: the first run's student, no phase 1.
    c2 = demo.recipe_config(b, 2, "dp", d, "b2", "/t", "/t_dp", {}, "/st")
    stages.validate(c2)
    self.assertEqual((c2.student, c2.lang_sft.mode), ("/st", "none"))
    self.assertEqual(stages.filled(c2, "/run", "sft").student.model, "/st")


class MeasureColumnsTest(absltest.TestCase):
  def test_size_and_latency_columns_come_from_bistil_measure(self):
    import jax

    from bistil_jax import measure
    from bistil_jax.checkpoint import hf
    from bistil_jax.model import init_params, preset

    with tempfile.TemporaryDirectory() as tmp:
      model_dir = os.path.join(tmp, "m")
      cfg = preset("tiny", head="mlm")
      params = init_params(cfg, jax.random.PRNGKey(0))
      hf.save_hf(model_dir, cfg, params)
      budget = demo.Budget(seq_len=16)
      out = os.path.join(tmp, "m.measure.json")
      cols = demo._measure(model_dir, None, budget, out)
      with open(out) as f:
        info = json.load(f)  # the file `bistil measure --out` wrote
    self.assertEqual(cols["params"], info["parameters"]["total"])
    self.assertEqual(
      cols["params"], measure.count_parameters(params, cfg)["total"]
    )
    self.assertEqual(cols["macs"], measure.analytic_macs(cfg, 1, 16)["total"])
    (lat,) = info["latency"]
    self.assertEqual((lat["batch_size"], lat["seq_len"]), (8, 16))
    self.assertEqual(cols["latency_ms"], lat["median_ms"])


if __name__ == "__main__":
  absltest.main()


# ------------------------------------------------------------ gs:// output
def test_report_written_and_checked_on_gcs(gcs_root):
  """write_report / check_report / plots go through the path layer: a
  `--out gs://...` run's report lands in the bucket (STYLE 16)."""
  from bistil_jax import paths

  out = f"{gcs_root}/demo"
  demo.write_report(
    out, [fake_seed(0, 0.0), fake_seed(1, 0.1)], demo.QUICK, quick=True
  )
  demo.check_report(out)
  names = {p.name for p in paths.list_files(out)}
  assert {"report.md", "results.json", "tradeoff.png"} <= names
  png = paths.path(f"{out}/tradeoff.png").read_bytes()
  assert png.startswith(b"\x89PNG")
  paths.path(f"{out}/tradeoff.png").unlink()
  try:
    demo.check_report(out)
  except BistilError as e:
    assert "lacks tradeoff.png" in str(e)
  else:
    raise AssertionError("check_report accepted a run without tradeoff.png")


def test_run_seed_data_stage_on_gcs(gcs_root, monkeypatch):
  """The demo's data stage (synth, the all-languages corpus, the teacher's
  init) writes under a gs:// --out; the run is stopped at pre-training."""
  from bistil_jax import paths, synthetic

  seen = []
  real = demo._run

  def run(argv):
    seen.append(argv[0])
    if argv[0] == "pretrain":
      raise BistilError("stop: the data stage is done")
    real(argv)

  monkeypatch.setattr(demo, "_run", run)
  b = demo.dataclasses.replace(
    demo.QUICK, corpus=200, task_train=40, task_eval=20, vocab=300
  )
  out = f"{gcs_root}/demo"
  try:
    demo.run_seed(out, 0, b)
  except BistilError as e:
    assert "stop" in str(e)
  assert seen == ["synth", "init", "pretrain"]
  root = paths.path(f"{out}/seed0")
  data = synthetic.read_dataset(str(root / "data"))
  want = "".join(
    paths.read_text(data.corpora[lang]["train"]) for lang in ("b1", "b2", "a1")
  )
  assert paths.read_text(root / "all_languages.txt") == want
  assert (root / "teacher_init" / "config.json").is_file()
