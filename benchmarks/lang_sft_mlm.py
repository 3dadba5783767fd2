"""MLM loss of a teacher before and after a language SFT (synthetic, CPU).

A tiny multilingual teacher is MLM-pretrained on a1 + a2 + b1 of the
synthetic family, then `bistil lang-sft` trains an a1 language SFT on it
(configs/lang_sft.py:tiny, STEPS per stage), once with the released head
handling (decoder untied + frozen, LayerNorms frozen, the rest of the MLM
head trained densely) and once with the whole head frozen. Printed: the
MLM loss on each language's dev corpus (fixed rows and masks) of the base,
the base + the whole SFT (as `--config.student.sfts` / `evaluate --sft`
apply it) and the base + body diffs only (as phase 1 builds its teacher).

  PYTHONPATH=. python benchmarks/lang_sft_mlm.py --out /tmp/lsft --steps 200
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import jax

from bistil_jax import cli, synthetic
from bistil_jax.checkpoint import hf, surgery
from bistil_jax.data import pipeline, vocab
from bistil_jax.model import preset
from bistil_jax.model.encoder import Model
from bistil_jax.train import distil, steps

LANGS = ("a1", "a2", "b1")


def mlm_loss(model_dir, params, corpus, seed=7, batches=4):
  """Mean MLM loss on fixed masked batches (8 rows x 64 tokens)."""
  model, _ = hf.load_hf(model_dir)
  tok, _ = vocab.load_tokenizer_dir(model_dir)
  size, mask_id = pipeline.mlm_token_ids(tok)
  stream = pipeline.LanguageStream.from_corpus(
    tok, str(corpus), 64, process_index=0, num_processes=1
  )
  fixed = pipeline.eval_batches(
    stream, 0, 8, batches, seed, vocab_size=size, mask_id=mask_id
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
  out = [jax.device_get(sums(params, None, b)) for b in fixed]
  total = sum(float(o["mlm/total"]) for o in out)
  return total / sum(float(o["mlm/count"]) for o in out)


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--pretrain-steps", type=int, default=600)
  args = ap.parse_args(argv)
  root = args.out
  family = synthetic.make_family(seed=0, num_languages=8)
  sizes = {
    "corpus_train": 3000,
    "corpus_dev": 200,
    "task_train": 10,
    "task_dev": 10,
    "task_test": 10,
  }
  data = synthetic.write_dataset(f"{root}/synth", family, LANGS, sizes)
  synthetic.train_wordpiece(
    [data.corpora[c]["train"] for c in LANGS], f"{root}/tok", vocab_size=1500
  )
  synthetic.init_model_dir(
    f"{root}/init",
    f"{root}/tok",
    preset(
      "tiny",
      hidden_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      intermediate_size=128,
    ),
  )
  mix = os.path.join(root, "mix.txt")
  with open(mix, "w", encoding="utf-8") as f:
    for c in LANGS:
      with open(data.corpora[c]["train"], encoding="utf-8") as g:
        f.write(g.read())
  cfg = os.path.join(os.path.dirname(__file__), "..", "configs")
  code = cli.main([
    "pretrain", "--config", f"{cfg}/pretrain.py:tiny",
    "--workdir", f"{root}/pre", f"--config.student.model={root}/init",
    f"--config.data.source={mix}", f"--config.data.target={mix}",
    f"--config.train.num_steps={args.pretrain_steps}",
    f"--config.train.checkpoint_every={args.pretrain_steps}",
  ])  # fmt: skip
  assert code == 0
  mmt = f"{root}/pre/export"
  model, base = hf.load_hf(mmt)
  before = {c: mlm_loss(mmt, base, data.corpora[c]["dev"]) for c in LANGS}
  rows = []
  for name, extra in (("released", []), ("head frozen", ["true"])):
    wd = f"{root}/lsft-{name.replace(' ', '-')}"
    code = cli.main([
      "lang-sft", "--config", f"{cfg}/lang_sft.py:tiny", "--workdir", wd,
      f"--config.student.model={mmt}",
      f"--config.data.corpus={data.corpora['a1']['train']}",
      f"--config.train.num_steps={args.steps}",
      f"--config.sparse.num_steps={args.steps}",
      f"--config.train.checkpoint_every={args.steps}",
      *[f"--config.sparse.freeze_head={x}" for x in extra],
    ])  # fmt: skip
    assert code == 0
    sft = f"{wd}/export"
    _, whole = surgery.merged_model(mmt, [sft])
    diffs = surgery.language_teachers(base, model.config, mmt, ([sft], []))[0]
    for c in LANGS:
      dev = data.corpora[c]["dev"]
      rows.append({
        "sft": name, "lang": c, "base": before[c],
        "base+sft": mlm_loss(mmt, whole, dev),
        "base+diffs": mlm_loss(mmt, diffs, dev),
      })  # fmt: skip
  print(f"a1 language SFT, {args.steps} + {args.steps} steps; MLM loss")
  print(
    f"{'sft':<12} {'dev':<4} {'base':>7} {'base+sft':>9} {'base+diffs':>10}"
  )
  for r in rows:
    print(
      f"{r['sft']:<12} {r['lang']:<4} {r['base']:>7.4f} "
      f"{r['base+sft']:>9.4f} {r['base+diffs']:>10.4f}"
    )
  with open(f"{root}/lang_sft_mlm.json", "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
