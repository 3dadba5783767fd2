"""pytorch_model.bin loading: nested state dicts accepted, anything else
refused in one line, unsafe pickles never run and never "fixed" by advice
to load them unsafely (issue 11)."""

import contextlib
import io
import os
import tempfile

import jax
import torch
from absl.testing import absltest

from bistil_jax import cli
from bistil_jax.checkpoint import hf
from bistil_jax.model import init_params, preset

RAN = []


class Payload:
  """A pickle that would run code when loaded unsafely."""

  def __reduce__(self):
    return (RAN.append, ("ran",))


def run_cli(argv):
  err = io.StringIO()
  with (
    contextlib.redirect_stderr(err),
    contextlib.redirect_stdout(io.StringIO()),
  ):
    code = cli.main(argv)
  return code, err.getvalue()


class TorchBinTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.root = tmp.name
    cfg = preset("tiny", head="mlm", vocab_size=40, num_hidden_layers=1)
    params = init_params(cfg, jax.random.PRNGKey(0))
    self.ref = os.path.join(self.root, "ref")
    hf.save_hf(self.ref, cfg, params, overwrite=True, write_flax=False)
    ref_model, self.ref_params = hf.load_hf(self.ref)
    self.state = {
      k: torch.from_numpy(v.copy())
      for k, v in hf.params_to_hf(
        self.ref_params, ref_model.config, "torch"
      ).items()
    }

  def bin_dir(self, name, obj, raw=None):
    d = os.path.join(self.root, name)
    os.makedirs(d)
    with open(os.path.join(self.ref, "config.json")) as f:
      config = f.read()
    with open(os.path.join(d, "config.json"), "w") as f:
      f.write(config)
    path = os.path.join(d, hf.TORCH_BIN)
    if raw is not None:
      with open(path, "wb") as f:
        f.write(raw)
    else:
      torch.save(obj, path)
    return d

  def test_flat_and_nested_state_dicts_load_alike(self):
    for name, obj in [
      ("flat", self.state),
      ("state_dict", {"state_dict": self.state, "epoch": 3}),
      ("model", {"model": self.state, "optimizer": {"lr": 0.1}}),
    ]:
      _, params = hf.load_hf(self.bin_dir(name, obj))
      for a, b in zip(
        jax.tree.leaves(params), jax.tree.leaves(self.ref_params), strict=True
      ):
        self.assertTrue((a == b).all(), name)

  def assert_one_line_refusal(self, d, pattern):
    code, err = run_cli(["inspect", d])
    self.assertEqual(code, 2, err)
    self.assertLen(err.strip().splitlines(), 1, err)
    self.assertRegex(err, pattern)
    self.assertNotIn("weights_only=False", err)
    self.assertNotIn("Traceback", err)
    return err

  def test_non_tensor_dict_is_one_line(self):
    d = self.bin_dir("hparams", {"lr": 0.1, "layers": [1, 2]})
    self.assert_one_line_refusal(d, "not a state dict of tensors")

  def test_a_list_is_one_line(self):
    d = self.bin_dir("list", [torch.zeros(2)])
    self.assert_one_line_refusal(d, "holds a list, not a state dict")

  def test_unsafe_pickle_is_refused_without_running_it(self):
    d = self.bin_dir("evil", {"w": Payload()})
    err = self.assert_one_line_refusal(d, "not a plain tensor checkpoint")
    self.assertIn("weights_only", err)
    self.assertEqual(RAN, [])

  def test_garbage_is_one_line(self):
    d = self.bin_dir("garbage", None, raw=b"\x00not a torch file" * 10)
    self.assert_one_line_refusal(d, "corrupt or unreadable")


if __name__ == "__main__":
  absltest.main()
