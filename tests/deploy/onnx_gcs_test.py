"""`bistil export-onnx` to a `gs://` dir (the offline emulator) and
`bistil predict` from it: the same labels as the Flax model's."""

import json
import os

import jax

from bistil_jax import paths
from bistil_jax.checkpoint import hf
from bistil_jax.data import task_files
from bistil_jax.deploy import onnx
from bistil_jax.model import init_params, preset
from tests.data.vocab_test import make_lines, make_wordpiece_dir
from tests.deploy.onnx_test import SIZE, run_cli


def test_export_to_gcs_and_predict_from_it(tmp_path, gcs_root):
  tok_dir = os.path.join(tmp_path, "tokenizer")
  vocab = make_wordpiece_dir(tok_dir).get_vocab_size()
  labels = tuple(task_files.UPOS_LABELS)
  cfg = preset(
    "tiny", vocab_size=vocab, head="token_classification",
    num_labels=len(labels), id2label=labels, **SIZE,
  )  # fmt: skip
  model_dir = os.path.join(tmp_path, "model")
  hf.save_hf(model_dir, cfg, init_params(cfg, jax.random.PRNGKey(0)),
             tokenizer_dir=tok_dir)  # fmt: skip
  out = f"{gcs_root}/deploy/pos"
  code, _, err = run_cli("export-onnx", "--model", model_dir, "--out", out)
  assert code == 0, err
  names = {p.name for p in paths.list_files(out)}
  assert {onnx.ONNX_FILE, onnx.META_FILE, "tokenizer.json"} <= names
  # Nothing but the dir itself under its parent (no temporary sibling).
  assert [p.name for p in paths.path(f"{gcs_root}/deploy").iterdir()] == ["pos"]
  text = os.path.join(tmp_path, "in.txt")
  with open(text, "w", encoding="utf-8") as f:
    f.write("\n".join(make_lines("aa", 10, seed=2)) + "\n")
  got = []
  for model in (model_dir, out):
    code, stdout, err = run_cli("predict", "--model", model, "--task", "pos",
                                text)  # fmt: skip
    assert code == 0, err
    got.append([json.loads(x) for x in stdout.splitlines()])
  assert got[0] == got[1] and len(got[0]) == 10
