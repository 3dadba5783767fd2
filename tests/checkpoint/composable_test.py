"""composable-sft `pytorch_diff.bin` files, read through `load_sft`."""

import os
import tempfile

import numpy as np
import torch
from absl.testing import absltest, parameterized

from bistil_jax.checkpoint import sft as sft_lib
from bistil_jax.errors import BistilError
from tests.sparse_test import LABELS, assert_trees_equal, params, tiny

RAN = []


class Payload:
  """A pickle that would run code when loaded unsafely."""

  def __reduce__(self):
    return (RAN.append, ("ran",))


OLD_VOCAB = 400


def encode(dense):
  """composable-sft's (bistil's) encode_tensor, column-major flat indices."""
  t = dense.to_sparse().coalesce()
  multipliers = np.cumprod([1] + list(t.size())[:-1], dtype=np.int64)
  coords = t.indices().numpy().astype(np.int64)
  flat = multipliers @ coords
  perm = np.argsort(flat, kind="stable")
  flat = flat[perm]
  steps = [flat[0]] + (flat[1:] - flat[:-1]).tolist()  # np.int64 first
  return {"size": t.size(), "index_steps": steps, "values": t.values()[perm]}


def sparse_tensor(shape, seed, density=0.2):
  g = torch.Generator().manual_seed(seed)
  x = torch.randn(*shape, generator=g)
  return x * (torch.rand(*shape, generator=g) < density)


def default_tensors():
  """A language-SFT-like set of diffs plus task-SFT-like abs tensors."""
  diffs = {
    # Non-square, transposed: a row/column-major mix-up cannot pass.
    "bert.encoder.layer.0.intermediate.dense.weight": sparse_tensor(
      (64, 32), 0
    ),
    # Untrimmed vocabulary: trimmed with keep_ids on load.
    "bert.embeddings.word_embeddings.weight": sparse_tensor((OLD_VOCAB, 32), 1),
    "encoder.layer.1.output.LayerNorm.bias": sparse_tensor((32,), 2, 0.5),
    "bert.encoder.layer.1.attention.output.LayerNorm.gamma": sparse_tensor(
      (32,), 3, 0.5
    ),  # legacy leaf name
  }
  g = torch.Generator().manual_seed(9)
  absolute = {
    "classifier.weight": torch.randn(LABELS, 32, generator=g),
    "classifier.bias": torch.randn(LABELS, generator=g),
    # MLM head of a language SFT: skipped with a log line.
    "cls.predictions.transform.dense.weight": torch.randn(32, 32, generator=g),
  }
  return diffs, absolute


def write_composable(diffs, absolute, fmt="diffs", **extra):
  enc = {k: encode(v) for k, v in diffs.items()}
  if fmt == "diffs":
    blob = {"diffs": enc, "abs": absolute, "block_sparses": {}, **extra}
  else:  # older composable-sft layout
    blob = {"body": enc, "head": absolute}
  d = tempfile.mkdtemp()
  torch.save(blob, os.path.join(d, "pytorch_diff.bin"))
  return d


class ComposableTest(parameterized.TestCase):
  @parameterized.parameters("diffs", "body")
  def test_loads_and_applies(self, fmt):
    cfg = tiny()
    base = params()
    keep_ids = np.random.default_rng(0).permutation(OLD_VOCAB)[: cfg.vocab_size]
    diffs, absolute = default_tensors()
    d = write_composable(diffs, absolute, fmt)
    with self.assertLogs(level="INFO") as logs:
      sft = sft_lib.load_sft(d, config=cfg, keep_ids=keep_ids)
    self.assertTrue(any("cls.predictions" in m for m in logs.output))
    out = sft_lib.apply_sft(base, sft)

    # Expected values, computed densely and independently.
    want = params()
    layer = want["encoder"]["layer"]
    layer["0"]["intermediate"]["dense"]["kernel"] += (
      diffs["bert.encoder.layer.0.intermediate.dense.weight"].numpy().T
    )
    emb = want["embeddings"]["word_embeddings"]["embedding"]
    old = diffs["bert.embeddings.word_embeddings.weight"].numpy()
    emb[: cfg.vocab_size] += old[keep_ids]
    layer["1"]["output"]["LayerNorm"]["bias"] += diffs[
      "encoder.layer.1.output.LayerNorm.bias"
    ].numpy()
    layer["1"]["attention"]["output"]["LayerNorm"]["scale"] += diffs[
      "bert.encoder.layer.1.attention.output.LayerNorm.gamma"
    ].numpy()
    want["classifier"]["kernel"] = absolute["classifier.weight"].numpy().T
    want["classifier"]["bias"] = absolute["classifier.bias"].numpy()
    assert_trees_equal(self, out, want, True)
    # Language-SFT style: body only.
    body_only = sft_lib.apply_sft(base, sft, with_dense=False)
    assert_trees_equal(self, body_only["classifier"], base["classifier"])
    # The file path itself works too.
    again = sft_lib.load_sft(
      os.path.join(d, "pytorch_diff.bin"), config=cfg, keep_ids=keep_ids
    )
    self.assertEqual(again.nnz, sft.nnz)

  def test_untrimmed_vocab_and_prefix_free(self):
    cfg = tiny(head="none")  # bare model: our names carry no "bert." prefix
    base = params("none")
    diffs, absolute = default_tensors()
    diffs["bert.embeddings.word_embeddings.weight"] = sparse_tensor(
      (cfg.vocab_size, 32), 5
    )
    with self.assertRaisesRegex(BistilError, "classifier.weight"):
      sft_lib.load_sft(write_composable(diffs, absolute), config=cfg)
    sft = sft_lib.load_sft(write_composable(diffs, {}), config=cfg)
    out = sft_lib.apply_sft(base, sft)
    emb = base["embeddings"]["word_embeddings"]["embedding"]
    np.testing.assert_array_equal(
      out["embeddings"]["word_embeddings"]["embedding"][: cfg.vocab_size],
      emb[: cfg.vocab_size]
      + diffs["bert.embeddings.word_embeddings.weight"].numpy(),
    )

  def test_malformed(self):
    cfg = tiny()
    keep = np.arange(cfg.vocab_size)
    diffs, absolute = default_tensors()
    d = write_composable(diffs, absolute)
    with self.assertRaisesRegex(BistilError, "needs the model config"):
      sft_lib.load_sft(d)
    with self.assertRaisesRegex(BistilError, "word_embeddings.*shape"):
      sft_lib.load_sft(d, config=cfg)  # 400 rows and no keep_ids
    with self.assertRaisesRegex(BistilError, "keep_ids has"):
      sft_lib.load_sft(d, config=cfg, keep_ids=np.arange(10))
    with self.assertRaisesRegex(BistilError, "distinct"):
      sft_lib.load_sft(d, config=cfg, keep_ids=np.zeros(cfg.vocab_size, int))

    def bad(needle, new_diffs=None, new_abs=None, **extra):
      diffs, absolute = default_tensors()
      diffs.update(new_diffs or {})
      absolute.update(new_abs or {})
      with self.assertRaisesRegex(BistilError, needle):
        sft_lib.load_sft(
          write_composable(diffs, absolute, **extra), config=cfg, keep_ids=keep
        )

    name = "bert.encoder.layer.7.output.dense.weight"  # only 2 layers
    bad(name, {name: sparse_tensor((32, 64), 1)})
    bad("bert.foo.weight", {"bert.foo.weight": sparse_tensor((4,), 1, 1.0)})
    name = "bert.encoder.layer.0.output.dense.weight"  # [32, 64] in torch
    bad(f"{name}.*shape", {name: sparse_tensor((64, 32), 1)})
    bad("block-sparse", block_sparses={"x": {}})
    bad(
      "classifier.weight.*shape",
      new_abs={"classifier.weight": torch.ones(5, 32)},
    )
    # Out-of-range and unsorted index steps.
    name = "bert.encoder.layer.0.output.dense.bias"
    for steps in ([3, 40], [5, -2]):
      diffs, absolute = default_tensors()
      blob = {
        "diffs": {k: encode(v) for k, v in diffs.items()},
        "abs": absolute,
      }
      blob["diffs"][name] = {
        "size": torch.Size([32]),
        "index_steps": steps,
        "values": torch.ones(2),
      }
      path = tempfile.mkdtemp()
      torch.save(blob, os.path.join(path, "pytorch_diff.bin"))
      with self.assertRaisesRegex(BistilError, name):
        sft_lib.load_sft(path, config=cfg, keep_ids=keep)
    garbage = tempfile.mkdtemp()
    with open(os.path.join(garbage, "pytorch_diff.bin"), "wb") as f:
      f.write(b"not a pickle")
    with self.assertRaisesRegex(BistilError, "corrupt or unreadable"):
      sft_lib.load_sft(garbage, config=cfg)

  def test_a_pickle_with_code_is_refused_for_safety(self):
    d = tempfile.mkdtemp()
    diffs, absolute = default_tensors()
    blob = {"diffs": {k: encode(v) for k, v in diffs.items()}, "abs": absolute}
    blob["abs"]["evil"] = Payload()
    torch.save(blob, os.path.join(d, "pytorch_diff.bin"))
    with self.assertRaises(BistilError) as cm:
      sft_lib.load_sft(d, config=tiny())
    text = str(cm.exception)
    self.assertRegex(
      text,
      "pytorch_diff.bin holds Python objects other than tensors and "
      "numbers; it is refused for safety",
    )
    self.assertNotIn("weights_only", text)
    self.assertNotIn("corrupt", text)
    self.assertLen(text.splitlines(), 1)
    self.assertEqual(RAN, [])


if __name__ == "__main__":
  absltest.main()
