"""The real loop: `bistil distil` tokens/s against the isolated step.

Writes, in a temporary dir, a synthetic mBERT-shaped teacher (12L/768,
random weights, a WordPiece tokenizer of --vocab pieces, one piece per
synthetic word) and two corpora of long lines, runs `bistil distil` on it
(configs/distil.py:tiny with mBERT shapes: batch --batch x --seq, --steps
steps, logging every --log-every, no evaluation, one checkpoint at the
end) and reads its tokens/s from the metrics it writes (the first log
window, which holds compilation, is dropped). Then times the isolated
jitted phase-1 train_step at the same shapes in this process (common.jax_phase1)
and prints loop / step.

  python benchmarks/loop.py --quick      # 8 x 128, 9 steps
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tokenizer(path: str, vocab: int) -> list[str]:
  """A WordPiece tokenizer dir whose words are single pieces."""
  from tokenizers import (
    Tokenizer,
    models,
    normalizers,
    pre_tokenizers,
    processors,
  )

  letters = "abcdefghijklmnopqrstuvwxyz"
  words = []
  for n in itertools.count(2):
    for t in itertools.product(letters, repeat=n):
      words.append("".join(t))
      if len(words) + len(SPECIALS) >= vocab:
        break
    if len(words) + len(SPECIALS) >= vocab:
      break
  pieces = SPECIALS + words
  tok = Tokenizer(
    models.WordPiece({t: i for i, t in enumerate(pieces)}, unk_token="[UNK]")
  )
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.add_special_tokens(SPECIALS)
  tok.post_processor = processors.TemplateProcessing(
    single="[CLS] $A [SEP]",
    pair="[CLS] $A [SEP] $B:1 [SEP]:1",
    special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
  )
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "vocab.txt"), "w", encoding="utf-8") as f:
    f.writelines(p + "\n" for p in pieces)
  specials = dict(
    unk_token="[UNK]",
    sep_token="[SEP]",
    pad_token="[PAD]",
    cls_token="[CLS]",
    mask_token="[MASK]",
  )
  with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
    json.dump(specials, f)
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(
      dict(
        specials,
        tokenizer_class="BertTokenizer",
        do_lower_case=True,
        model_max_length=512,
      ),
      f,
    )
  return words


def write_corpus(path, words, lines, words_per_line, seed):
  rng = random.Random(seed)
  with open(path, "w", encoding="utf-8") as f:
    for _ in range(lines):
      f.write(" ".join(rng.choices(words, k=words_per_line)) + "\n")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--vocab", type=int, default=30000)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--steps", type=int, default=24)
  p.add_argument("--log-every", type=int, default=4)
  p.add_argument("--quick", action="store_true", help="9 steps, log every 3")
  p.add_argument("--keep", default="", help="copy the run log here")
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.log_every = 9, 3
  import common
  import jax

  from bistil_jax.checkpoint import hf
  from bistil_jax.model import init_params

  with tempfile.TemporaryDirectory() as d:
    tok_dir = os.path.join(d, "tokenizer")
    words = make_tokenizer(tok_dir, args.vocab)
    tcfg, _ = common.configs(args.vocab)
    params = init_params(tcfg, jax.random.PRNGKey(0))
    teacher = os.path.join(d, "teacher")
    hf.save_hf(teacher, tcfg, params, tokenizer_dir=tok_dir, write_flax=False)
    del params
    src, tgt = os.path.join(d, "src.txt"), os.path.join(d, "tgt.txt")
    n_lines = args.batch * args.steps + 64
    write_corpus(src, words, n_lines, args.seq + 16, 0)
    write_corpus(tgt, words, n_lines, args.seq + 16, 1)
    workdir = os.path.join(d, "run")
    over = {
      "teacher.model": teacher,
      "data.source": src,
      "data.target": tgt,
      "data.max_seq_len": args.seq,
      "data.batch_size": args.batch,
      "optim.learning_rate": 1e-4,
      "train.num_steps": args.steps,
      "train.log_every": args.log_every,
      "train.eval_every": 0,
      "train.checkpoint_every": args.steps,
    }
    cmd = [
      os.path.join(os.path.dirname(sys.executable), "bistil"),
      "distil",
      "--config",
      os.path.join(REPO, "configs", "distil.py:tiny"),
      "--workdir",
      workdir,
    ]
    cmd += [f"--config.{k}={v}" for k, v in over.items()]
    env = dict(
      os.environ,
      PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = res.stdout + res.stderr
    if args.keep:
      with open(args.keep, "w") as f:
        f.write(log)
    if res.returncode:
      print(log[-3000:])
      raise SystemExit(f"bistil distil failed (rc {res.returncode})")
    rows = []
    for root, _, files in os.walk(workdir):
      if "metrics.jsonl" in files:
        with open(os.path.join(root, "metrics.jsonl")) as f:
          rows += [json.loads(x) for x in f if x.strip()]
    tps = [
      r["train/tokens_per_s"]
      if "train/tokens_per_s" in r
      else r.get("tokens_per_s")
      for r in rows
    ]
    tps = [x for x in tps if x]
  if len(tps) < 2:
    print(log[-3000:])
    raise SystemExit(f"no tokens/s in the run's metrics: {rows[:2]}")
  loop_tps = statistics.median(tps[1:])
  common.emit(
    {
      "what": "loop",
      "tokens_per_s": loop_tps,
      "windows": tps,
      "wall_s": wall,
      "steps": args.steps,
    }
  )
  s = common.jax_phase1(args.batch, args.seq, args.vocab)
  run = common.jax_runner(s)
  common.sync(run())
  ts = []
  for _ in range(max(3, args.steps // 3)):
    t = time.perf_counter()
    common.sync(run())
    ts.append(time.perf_counter() - t)
  step_tps = args.batch * args.seq / statistics.median(ts)
  common.emit(
    {"what": "isolated_step", "tokens_per_s": step_tps, **common.spread(ts)}
  )
  print(
    common.table(
      [
        {"what": "bistil distil loop", "tokens_per_s": loop_tps},
        {"what": "isolated step", "tokens_per_s": step_tps},
        {"what": "loop / step", "tokens_per_s": loop_tps / step_tps},
      ],
      ["what", "tokens_per_s"],
    )
  )


if __name__ == "__main__":
  main()
