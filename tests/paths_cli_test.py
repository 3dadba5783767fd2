"""The file commands on `gs://` (an emulator) give what they give locally.

Each command runs once with local inputs and outputs and once with them on
the Cloud Storage emulator (tests/gcs.py); the output files must be
byte-identical (JSON reports compared without the fields that name paths).
Corpora stay local for `trim-vocab`: `data/corpus.py` is converted with the
training drivers.
"""

import contextlib
import io
import json
import os

import jax
import numpy as np
import pytest

from bistil_jax import cli, paths, synthetic
from bistil_jax.checkpoint import hf
from bistil_jax.checkpoint import sft as sft_lib
from bistil_jax.model import init_params, preset
from bistil_jax.synthetic import tasks as synth_tasks

SMALL = [
    "--corpus-sentences", "60", "--corpus-dev-sentences", "5",
    "--task-sentences", "9", "--task-eval-sentences", "6",
]  # fmt: skip


def run(*argv) -> str:
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main([os.fspath(a) for a in argv])
  assert code == 0, f"bistil {argv[0]} failed ({code}): {err.getvalue()}"
  return out.getvalue()


def tree(root) -> dict[str, bytes]:
  """{relative name: bytes} of every file under root."""
  root = os.fspath(paths.path(root))
  return {
    os.fspath(f)[len(root) + 1 :]: f.read_bytes()
    for f in paths.list_files(root)
  }


def _load(b: bytes):
  return json.loads(b.decode())


@pytest.fixture(scope="module")
def local(tmp_path_factory):
  """Local inputs: a synthetic dataset + tokenizer, an MLM model, a POS
  model and a task SFT of it."""
  root = tmp_path_factory.mktemp("local")
  synth = root / "synth"
  run(
    "synth", "--out", synth, "--languages", "a1", "a2",
    "--tokenizer-vocab", "160", *SMALL,
  )  # fmt: skip
  mlm = root / "mlm"
  synthetic.init_model_dir(mlm, synth / "tokenizer", preset("tiny"), seed=0)
  cfg = hf.load_hf(mlm)[0].config.replace(
    head="token_classification",
    num_labels=len(synth_tasks.UPOS_TAGS),
    id2label=tuple(synth_tasks.UPOS_TAGS),
  )
  base = init_params(cfg, jax.random.PRNGKey(1))
  pos = root / "pos"
  hf.save_hf(pos, cfg, base, tokenizer_dir=synth / "tokenizer")
  trained = jax.tree.map(
    lambda x: np.asarray(x) + 0.01 * np.sign(np.asarray(x)), base
  )
  sft = root / "sft"
  sft_lib.save_sft(
    sft, sft_lib.sft_from_params(trained, base, kind="task", config=cfg)
  )
  return {"root": root, "synth": synth, "mlm": mlm, "pos": pos, "sft": sft}


@pytest.fixture(scope="module")
def remote(local, gcs_emulator):
  """The same inputs copied to the emulator."""
  root = gcs_emulator.root("cli-inputs")
  for name in ("synth", "mlm", "pos", "sft"):
    paths.copy_tree(local[name], f"{root}/{name}")
  yield {"root": root, **{n: f"{root}/{n}" for n in local if n != "root"}}
  paths.rmtree(root)


def test_synth_on_gcs_equals_local(local, gcs_root):
  run(
    "synth", "--out", f"{gcs_root}/synth", "--languages", "a1", "a2",
    "--tokenizer-vocab", "160", *SMALL,
  )  # fmt: skip
  got, want = tree(f"{gcs_root}/synth"), tree(local["synth"])
  assert sorted(got) == sorted(want)
  assert got == want
  # The dataset reads back from gs:// through its manifest.
  ds = synthetic.read_dataset(f"{gcs_root}/synth")
  assert os.fspath(ds.root) == f"{gcs_root}/synth"


def test_inspect_on_gcs(local, remote):
  got = json.loads(run("inspect", "--json", remote["mlm"]))
  want = json.loads(run("inspect", "--json", local["mlm"]))
  assert got.pop("path") == remote["mlm"]
  want.pop("path")
  assert got == want


def _trim(model, out, counts, tmp, **kw):
  src = local_corpus(tmp, "a1")
  tgt = local_corpus(tmp, "a2")
  argv = ["trim-vocab", "--model", model, "--out", out, "--quiet"]
  if counts.get("out"):
    argv += ["--source", src, "--target", tgt, "--counts-out", counts["out"]]
  if counts.get("in"):
    argv += ["--counts-in", counts["in"]]
  run(*argv)


def local_corpus(root, lang):
  return os.fspath(
    synthetic.read_dataset(root / "synth").corpora[lang]["train"]
  )


def _report(b: bytes):
  r = _load(b)
  for k in ("model_dir", "out_dir", "counts_in", "counts_out"):
    r.pop(k)
  for c in r["corpora"].values():
    c.pop("spec")
  return r


def test_trim_vocab_on_gcs_equals_local(local, remote, tmp_path):
  root = local["root"]
  _trim(local["mlm"], tmp_path / "trim", {"out": tmp_path / "c.npz"}, root)
  g = remote["root"]
  _trim(remote["mlm"], f"{g}/trim", {"out": f"{g}/c.npz"}, root)
  got, want = tree(f"{g}/trim"), tree(tmp_path / "trim")
  assert sorted(got) == sorted(want)
  assert _report(got.pop("trim_report.json")) == _report(
    want.pop("trim_report.json")
  )
  assert got == want
  # Counts written to gs:// are read back from there.
  _trim(remote["mlm"], f"{g}/trim2", {"in": f"{g}/c.npz"}, root)
  again = tree(f"{g}/trim2")
  again.pop("trim_report.json")
  assert again == got


def test_export_hf_on_gcs_equals_local(local, remote, tmp_path):
  run("export-hf", "--model", local["mlm"], "--out", tmp_path / "e")
  g = remote["root"]
  run("export-hf", "--model", remote["mlm"], "--out", f"{g}/e")
  assert tree(f"{g}/e") == tree(tmp_path / "e")
  # With a task SFT merged in.
  run(
    "export-hf", "--model", local["pos"], "--sft", local["sft"],
    "--out", tmp_path / "es",
  )  # fmt: skip
  run(
    "export-hf", "--model", remote["pos"], "--sft", remote["sft"],
    "--out", f"{g}/es",
  )  # fmt: skip
  got, want = tree(f"{g}/es"), tree(tmp_path / "es")
  assert got == want
  assert got["model.safetensors"] != tree(local["pos"])["model.safetensors"]
  # Overwriting a gs:// export replaces it whole.
  run("export-hf", "--model", remote["mlm"], "--out", f"{g}/es", "--overwrite")
  assert tree(f"{g}/es") == tree(f"{g}/e")


def test_evaluate_on_gcs_equals_local(local, remote, tmp_path):
  def evaluate(model, sft, data, out):
    test = synthetic.read_dataset(data).pos["a1"]["test"]
    assert os.fspath(test).startswith(os.fspath(data))
    return run(
      "evaluate", "--model", model, "--sft", sft, "--task", "pos",
      "--data", f"a1={test}", "--out", out,
    )  # fmt: skip

  want_out = evaluate(
    local["pos"], local["sft"], local["synth"], tmp_path / "ev.json"
  )
  g = remote["root"]
  got_out = evaluate(
    remote["pos"], remote["sft"], remote["synth"], f"{g}/ev.json"
  )
  assert got_out == want_out
  got = _load(paths.path(f"{g}/ev.json").read_bytes())
  want = _load((tmp_path / "ev.json").read_bytes())
  for r in (got, want):
    r.pop("model")
    r.pop("sfts")
  assert got == want
