"""Synthetic related languages with corpora and labelled tasks.

A CPU-sized stand-in for real multilingual data, so the whole BiStil method
runs, and its claims can be checked, without downloads:

  from bistil_jax import synthetic
  family = synthetic.make_family(seed=0, num_languages=8)
  print(family.describe())           # groups, word orders, close/distant pairs
  paths = synthetic.write_dataset("/tmp/synth", family, ["a1", "a2", "b1"])
  paths.corpora["a1"]["train"], paths.pos["a2"]["test"], paths.nli["b1"]["dev"]
  # qa=True adds extractive QA (SQuAD v1.1): paths.qa["a1"]["train"]

  synthetic.train_wordpiece(                 # mBERT-style tokenizer
    [p["train"] for p in paths.corpora.values()], "/tmp/synth/tokenizer")

Command line: `bistil synth --out DIR [--seed 0] [--languages a1 a2 b1]
[--tokenizer-vocab 4000] [--qa]`.
"""

from bistil_jax.synthetic.languages import (
  Family,
  Language,
  load_family,
  make_family,
)
from bistil_jax.synthetic.tasks import DEPRELS, NER_TAGS, NLI_LABELS, UPOS_TAGS
from bistil_jax.synthetic.tokenizer import init_model_dir, train_wordpiece
from bistil_jax.synthetic.writer import (
  DatasetPaths,
  Sizes,
  read_dataset,
  write_dataset,
)

__all__ = [
  "DEPRELS",
  "DatasetPaths",
  "Family",
  "Language",
  "NER_TAGS",
  "NLI_LABELS",
  "Sizes",
  "UPOS_TAGS",
  "init_model_dir",
  "load_family",
  "make_family",
  "read_dataset",
  "train_wordpiece",
  "write_dataset",
]
