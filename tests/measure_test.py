"""Parameter counts, FLOPs (XLA vs analytic) and latency structure."""

import contextlib
import io
import json

import jax
import numpy as np
from absl.testing import absltest, parameterized

from bistil_jax import cli, measure
from bistil_jax.data import vocab
from bistil_jax.errors import BistilError
from bistil_jax.model import config as config_lib
from bistil_jax.model import encoder


def _tiny(**kw):
  return config_lib.preset("tiny", **kw)


def _params(config):
  return encoder.init_params(config, jax.random.PRNGKey(0))


class CountParametersTest(parameterized.TestCase):
  def test_hand_count_of_tiny_mlm(self):
    c = _tiny()  # vocab 300 (padded 384), d 32, 2 layers, ff 64, pos 64
    d, f = 32, 64
    embeddings = 300 * d + 64 * d + 2 * d + 2 * d
    layer = 4 * (d * d + d) + 2 * d + (d * f + f) + (f * d + d) + 2 * d
    head = d * d + d + 2 * d + 300  # dense, LayerNorm, bias (tied decoder)
    got = measure.count_parameters(_params(c), c)
    self.assertEqual(
      got,
      {
        "total": embeddings + 2 * layer + head,
        "embeddings": embeddings,
        "body": 2 * layer,
        "head": head,
      },
    )
    self.assertEqual(got["total"], vocab.count_params(_params(c), c))

  @parameterized.named_parameters(
    # (config changes, head count, body count minus the tiny MLM's body)
    ("untied", dict(tie_word_embeddings=False), 1024 + 32 + 64 + 300 * 33, 0),
    ("token", dict(head="token_classification", num_labels=5), 32 * 5 + 5, 0),
    ("pooler_no_head", dict(head="none", add_pooler=True), 0, 1024 + 32),
  )
  def test_variants(self, kw, head, body_delta):
    base = measure.count_parameters(_params(_tiny()), _tiny())
    c = _tiny(**kw)
    got = measure.count_parameters(_params(c), c)
    self.assertEqual(got["embeddings"], base["embeddings"])
    self.assertEqual(got["head"], head)
    self.assertEqual(got["body"], base["body"] + body_delta)
    self.assertEqual(got["total"], vocab.count_params(_params(c), c))

  def test_counts_real_rows_not_padding(self):
    # 300 and 257 real rows are both padded to 384 rows.
    a, b = _tiny(head="none"), _tiny(head="none", vocab_size=257)
    self.assertEqual(a.padded_vocab_size, b.padded_vocab_size)
    pa, pb = _params(a), _params(b)
    got_a = measure.count_parameters(pa, a)
    got_b = measure.count_parameters(pb, b)
    self.assertEqual(got_a["embeddings"] - got_b["embeddings"], 43 * 32)
    self.assertEqual(got_a["body"], got_b["body"])
    leaves = sum(x.size for x in jax.tree.leaves(pa))
    self.assertEqual(leaves - got_a["total"], 84 * 32)
    # Abstract params (shapes only) count the same.
    shapes = jax.eval_shape(lambda: pa)
    self.assertEqual(measure.count_parameters(shapes, a), got_a)

  def test_trimmed_vocab_changes_params(self):
    c = _tiny()
    params = _params(c)
    keep = np.arange(0, 300, 3)  # 100 of 300 ids
    new_params, new_config = vocab.slice_vocab_params(params, c, keep)
    old = measure.count_parameters(params, c)
    new = measure.count_parameters(new_params, new_config)
    self.assertEqual(old["embeddings"] - new["embeddings"], 200 * 32)
    self.assertEqual(old["head"] - new["head"], 200)  # MLM bias rows
    self.assertEqual(old["body"], new["body"])

  def test_unknown_group(self):
    with self.assertRaisesRegex(BistilError, "unknown top-level"):
      measure.count_parameters({"adapter": {"w": np.zeros(3)}}, _tiny())


class FlopsTest(parameterized.TestCase):
  def test_analytic_macs_by_hand(self):
    c = _tiny()  # d 32, ff 64, 2 layers, padded vocab 384
    b, l = 3, 16
    layer = 4 * l * 32 * 32 + 2 * l * l * 32 + 2 * l * 32 * 64
    head = l * 32 * 32 + l * 32 * 384
    self.assertEqual(
      measure.analytic_macs(c, b, l),
      {
        "encoder": b * 2 * layer,
        "head": b * head,
        "total": b * (2 * layer + head),
      },
    )
    none = measure.analytic_macs(_tiny(head="none"), b, l)
    self.assertEqual((none["head"], none["total"]), (0, b * 2 * layer))
    seq = _tiny(head="sequence_classification", add_pooler=True, num_labels=3)
    self.assertEqual(measure.analytic_macs(seq, b, l)["head"], b * (1024 + 96))

  def test_xla_agrees_with_analytic_at_width_256(self):
    # Element-wise ops are the only difference; at d=256, l=128 they add
    # about 4.5%, so XLA's MACs must be within [1, 1.1] x analytic.
    c = _tiny(
      head="none",
      hidden_size=256,
      intermediate_size=1024,
      max_position_embeddings=128,
    )
    got = measure.inference_flops(c, _params(c), 1, 128)
    self.assertEqual(got["macs"], got["flops"] / 2)
    self.assertBetween(got["macs"] / got["analytic_macs"], 1.0, 1.1)
    self.assertBetween(got["compiled_flops"] / got["flops"], 0.95, 1.05)
    self.assertEqual(
      set(got),
      {
        "flops",
        "macs",
        "analytic_macs",
        "compiled_flops",
        "backend",
        "batch_size",
        "seq_len",
      },
    )

  def test_flops_linear_in_layers_and_batch(self):
    flops = {}
    for n in (1, 2, 4):
      c = _tiny(num_hidden_layers=n)
      model = encoder.Model(c)
      flops[n] = measure.inference_flops(
        model, _params(c), 2, 32, with_compiled=False
      )
      self.assertIsNone(flops[n]["compiled_flops"])
    per_layer = flops[2]["flops"] - flops[1]["flops"]
    self.assertGreater(per_layer, 0)
    # Exactly linear: the same work per layer (up to float rounding).
    self.assertAlmostEqual(
      flops[4]["flops"] - flops[2]["flops"],
      2 * per_layer,
      delta=1e-6 * per_layer,
    )
    analytic_layer = flops[2]["analytic_macs"] - flops[1]["analytic_macs"]
    # XLA's per-layer MACs: the analytic matmuls plus element-wise work,
    # which at d=32 is a large share (see measure's docstring).
    self.assertBetween(per_layer / 2 / analytic_layer, 1.0, 2.0)
    c = _tiny(num_hidden_layers=2)
    double = measure.inference_flops(c, _params(c), 4, 32, with_compiled=False)
    # Linear in batch up to the batch-free vocab mask (padded_vocab flops).
    self.assertAlmostEqual(
      double["flops"], 2 * flops[2]["flops"], delta=c.padded_vocab_size
    )
    self.assertEqual(double["analytic_macs"], 2 * flops[2]["analytic_macs"])

  def test_trimmed_vocab_keeps_flops_without_head(self):
    c = _tiny(head="none")
    params = _params(c)
    new_params, new_config = vocab.slice_vocab_params(
      params, c, np.arange(0, 300, 3)
    )
    old = measure.inference_flops(c, params, 2, 32)
    new = measure.inference_flops(new_config, new_params, 2, 32)
    self.assertEqual(new["compiled_flops"], old["compiled_flops"])
    self.assertEqual(new["flops"], old["flops"])
    self.assertEqual(new["analytic_macs"], old["analytic_macs"])
    self.assertLess(
      measure.count_parameters(new_params, new_config)["total"],
      measure.count_parameters(params, c)["total"],
    )
    # With the MLM head the (padded) output layer shrinks: 384 -> 128 rows.
    mlm = _tiny()
    mlm_params = _params(mlm)
    t_params, t_config = vocab.slice_vocab_params(
      mlm_params, mlm, np.arange(0, 300, 3)
    )
    full = measure.inference_flops(mlm, mlm_params, 2, 32, with_compiled=False)
    trimmed = measure.inference_flops(
      t_config, t_params, 2, 32, with_compiled=False
    )
    self.assertEqual(
      full["analytic_macs"] - trimmed["analytic_macs"], 2 * 32 * 32 * 256
    )
    self.assertLess(trimmed["flops"], full["flops"])

  def test_bad_shapes(self):
    c = _tiny()
    with self.assertRaisesRegex(BistilError, "max length 64"):
      measure.inference_flops(c, _params(c), 1, 65)
    with self.assertRaisesRegex(BistilError, "batch_size"):
      measure.analytic_macs(c, 0, 8)


class LatencyTest(absltest.TestCase):
  def test_structure(self):
    c = _tiny()
    got = measure.cpu_latency(
      encoder.Model(c), _params(c), 2, 16, warmup=1, repeats=3
    )
    for key in ("median_ms", "p90_ms", "mean_ms", "min_ms", "max_ms"):
      self.assertGreater(got[key], 0, key)
    self.assertLessEqual(got["min_ms"], got["median_ms"])
    self.assertLessEqual(got["median_ms"], got["p90_ms"])
    self.assertLessEqual(got["p90_ms"], got["max_ms"])
    self.assertGreater(got["sequences_per_s"], 0)
    self.assertGreater(got["compile_ms"], 0)
    self.assertEqual(
      (got["repeats"], got["batch_size"], got["seq_len"]), (3, 2, 16)
    )
    self.assertIn("cpu", got["device"].lower())
    with self.assertRaisesRegex(BistilError, "repeats"):
      measure.cpu_latency(c, _params(c), 1, 8, repeats=0)


class MeasureDirTest(absltest.TestCase):
  """`measure_dir` (what `bistil measure` prints) on a saved model dir."""

  def setUp(self):
    super().setUp()
    import tempfile

    from bistil_jax.checkpoint import hf

    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.dir = tmp.name + "/m"
    self.config = _tiny(head="mlm")
    self.params = _params(self.config)
    hf.save_hf(self.dir, self.config, self.params)

  def test_parts_add_up_and_match_the_functions(self):
    info = measure.measure_dir(
      self.dir, seq_len=16, batch_shapes=[(2, 16), (1, 32)], repeats=2
    )
    counts = measure.count_parameters(self.params, self.config)
    p = info["parameters"]
    self.assertEqual(p["total"], counts["total"])
    self.assertEqual(p["encoder"], counts["body"])
    self.assertEqual(p["embeddings"] + p["encoder"] + p["head"], p["total"])
    self.assertEqual(
      info["macs_per_sequence"]["analytic"],
      measure.analytic_macs(self.config, 1, 16)["total"],
    )
    shapes = [(t["batch_size"], t["seq_len"]) for t in info["latency"]]
    self.assertEqual(shapes, [(2, 16), (1, 32)])
    self.assertEqual(info["latency"][0]["device"], info["device"])
    sizes = measure.disk_size(self.dir)
    self.assertEqual(info["disk_bytes"]["total"], sizes["total"])
    self.assertEqual(
      sizes["total"], sum(v for k, v in sizes.items() if k != "total")
    )
    self.assertIn("model.safetensors", sizes)
    text = measure.format_measure(info)
    self.assertIn(f"parameters {p['total']:,}", text)
    self.assertIn("latency 1x32", text)

  def test_defaults_fit_the_model(self):
    # A tiny model has 64 positions: the defaults (128 tokens, 8x128) are
    # shortened to it, by the function and by `bistil measure`.
    self.assertEqual(self.config.max_length, 64)
    info = measure.measure_dir(self.dir, warmup=0, repeats=1)
    self.assertEqual(info["macs_per_sequence"]["seq_len"], 64)
    shapes = [(t["batch_size"], t["seq_len"]) for t in info["latency"]]
    self.assertEqual(shapes, [(8, 64)])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      code = cli.main(["measure", self.dir, "--repeats", "1", "--json"])
    self.assertEqual(code, 0)
    printed = json.loads(out.getvalue())
    self.assertEqual(printed["macs_per_sequence"]["seq_len"], 64)
    self.assertEqual(printed["latency"][0]["seq_len"], 64)
    with self.assertRaisesRegex(BistilError, "exceeds"):  # asked for: kept
      measure.measure_dir(self.dir, seq_len=128, with_latency=False)

  def test_without_latency(self):
    info = measure.measure_dir(self.dir, seq_len=8, with_latency=False)
    self.assertEqual(info["latency"], [])

  def test_on_the_cpu_platform(self):
    info = measure.measure_dir(
      self.dir, seq_len=8, batch_shapes=[(1, 8)], repeats=1, platform="cpu"
    )
    self.assertEqual(info["device"], str(jax.devices("cpu")[0]))
    self.assertEqual(info["latency"][0]["device"], info["device"])

  def test_bad_input(self):
    with self.assertRaisesRegex(BistilError, "does not exist"):
      measure.disk_size(self.dir + "/nope")
    with self.assertRaisesRegex(BistilError, "no nosuch device"):
      measure.measure_dir(self.dir, seq_len=8, platform="nosuch")
    with self.assertRaisesRegex(BistilError, "exceeds"):
      measure.measure_dir(self.dir, seq_len=10_000, with_latency=False)
    self.assertEqual(
      measure.parse_batch_shapes("8x64, 1X128"), [(8, 64), (1, 128)]
    )
    for bad in ("8", "x64", "8x", ""):
      with self.assertRaises(BistilError):
        measure.parse_batch_shapes(bad)


if __name__ == "__main__":
  absltest.main()
