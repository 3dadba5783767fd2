"""Small on-disk artefacts shared by the driver tests (built, not shipped)."""

import os
import random

import jax

from bistil_jax.checkpoint import hf
from bistil_jax.data import task_files
from bistil_jax.model import init_params, preset
from tests.data.vocab_test import make_lines, make_wordpiece_dir


def make_teacher_dir(root: str, layers: int = 4, seed: int = 0) -> str:
  """A random 4-layer BERT MLM teacher with an mBERT-like tokenizer.

  The query kernels are scaled up so attention is far from uniform and the
  attention loss has something to learn.
  """
  tok_dir = os.path.join(root, "tokenizer")
  tok = make_wordpiece_dir(tok_dir)
  cfg = preset(
    "tiny",
    head="mlm",
    vocab_size=tok.get_vocab_size(),
    num_hidden_layers=layers,
    hidden_size=64,
    num_attention_heads=4,
    intermediate_size=128,
  )
  params = init_params(cfg, jax.random.PRNGKey(seed))
  for layer in params["encoder"]["layer"].values():
    q = layer["attention"]["self"]["query"]
    q["kernel"] = q["kernel"] * 20.0
  out = os.path.join(root, "teacher")
  hf.save_hf(out, cfg, params, tokenizer_dir=tok_dir, overwrite=True)
  return out


def write_corpus(path: str, lang: str, n: int, seed: int = 0) -> str:
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(make_lines(lang, n, seed)) + "\n")
  return path


def distil_args(root: str, teacher: str, **overrides) -> list[str]:
  """CLI args of a tiny phase-1 run on the fixture corpora."""
  src = write_corpus(os.path.join(root, "src.txt"), "aa", 300)
  tgt = write_corpus(os.path.join(root, "tgt.txt"), "bb", 300)
  args = [
    "--config",
    os.path.join(os.path.dirname(__file__), "..", "configs", "distil.py:tiny"),
    f"--config.teacher.model={teacher}",
    f"--config.data.source={src}",
    f"--config.data.target={tgt}",
  ]
  args += [f"--config.{k}={v}" for k, v in overrides.items()]
  return args


def write_conllu(path: str, n: int, seed: int) -> str:
  """n POS-tagged sentences of the fixture language (tag by word hash)."""
  rng = random.Random(seed)
  with open(path, "w", encoding="utf-8") as f:
    for k, line in enumerate(make_lines("aa", n, seed)):
      f.write(f"# sent_id = {k}\n")
      for i, w in enumerate(line.split(), 1):
        tag = task_files.UPOS_LABELS[
          sum(map(ord, w)) % 5 if rng.random() < 0.9 else 7
        ]
        f.write(f"{i}\t{w}\t{w}\t{tag}\t_\t_\t0\t_\t_\t_\n")
      f.write("\n")
  return path
