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
