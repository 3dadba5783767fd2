r"""Phase 1: general bilingual distillation (METHOD.md section 2).

Variants (the part after ":"):

  tiny                CPU tests and the demo's sizes: 30 steps of 8 x 64
                      tokens. Paths must be given:
    bistil distil --config configs/distil.py:tiny --workdir /tmp/distil \
      --config.teacher.model=TEACHER_DIR \
      --config.data.source=src.txt --config.data.target=tgt.txt

  mbert,SRC,TGT       mBERT teacher trimmed to SRC+TGT, 6-layer student,
  xlmr,SRC,TGT        batch 8 x 256, lr 1e-4, 200k steps, no warmup: the
                      released recipe (METHOD.md 2.6). First trim:
    bistil trim-vocab --model bert-base-multilingual-cased \
      --source corpora/en.txt --target corpora/mt.txt --out models/mbert-en-mt
    bistil distil --config configs/distil.py:mbert,en,mt \
      --workdir runs/distil-mbert-en-mt
  (the default paths are models/{mbert|xlmr}-SRC-TGT and corpora/LANG.txt,
  corpora/LANG.dev.txt; override any of them with --config.a.b=...)

The loss mix defaults to the released one (hidden + attention MSE); the
KL-on-MLM-logits variant is `--config.loss.kl=1 --config.loss.attention=0`.
Defaults chosen by `bistil demo --ablation` (3 seeds, README): student init
teacher_layers 0.801 source / 0.570 close-target POS accuracy vs
svd_embeddings 0.741 / 0.584 and random 0.706 / 0.562 (targets within one
std); kl+hidden ties with hidden+attention (0.803 / 0.574).
"""

import ml_collections

from bistil_jax import configlib

common = configlib.load_sibling(__file__, "common")


def get_config(arg=None):
  a = common.parse_arg(arg, variant="tiny", src="en", tgt="mt")
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.teacher = ml_collections.ConfigDict()
  c.teacher.model = ""  # HF model dir of the (vocabulary-trimmed) teacher
  c.teacher.source_sft = ""  # language SFT (ours or composable-sft) for src
  c.teacher.target_sft = ""  # ... for tgt; "" = the plain teacher
  c.teacher.dtype = "float32"  # teacher compute dtype (bfloat16 on TPU/GPU)

  c.student = ml_collections.ConfigDict()
  c.student.layer_reduction = 2  # r: student layers = teacher layers / r
  c.student.hidden_reduction = 1  # width divisor (1 = teacher width)
  # teacher_layers | svd_embeddings (released code) | random
  c.student.init = "teacher_layers"
  c.student.dtype = "float32"  # compute dtype
  c.student.param_dtype = "float32"  # master weights
  c.student.projection_samples = 2048  # rows sampled for width projections

  c.data = ml_collections.ConfigDict()
  c.data.source = ""  # CORPUS spec: file, or hf:NAME:CONFIG:SPLIT:COLUMN
  c.data.target = ""
  c.data.source_dev = ""  # optional dev corpora for periodic evaluation
  c.data.target_dev = ""
  c.data.tokenizer = ""  # "" = the teacher dir's tokenizer
  c.data.max_seq_len = 256
  c.data.batch_size = 8  # global rows per step
  c.data.mlm_probability = 0.15  # input noise (80/10/10), as released
  c.data.max_lines = 0  # read at most this many lines per corpus (0 = all)
  c.data.balance_block = 64  # steps per exactly 50/50 block
  c.data.prefetch = 2  # host batches prepared ahead

  c.loss = ml_collections.ConfigDict()
  c.loss.hidden = 1.0  # hidden-state MSE, student i <- teacher i*r
  c.loss.attention = 1.0  # attention-prob MSE, student i <- teacher (i+1)r-1
  c.loss.kl = 0.0  # KL on MLM logits at masked positions
  c.loss.mlm = 0.0  # student MLM cross-entropy
  c.loss.temperature = 2.0
  c.loss.mask_padding = True  # False: the released averaging over padding

  c.optim = common.optim(learning_rate=1e-4)
  c.mesh = common.mesh((-1, 1, 1))
  c.train = common.train(
    200_000, log_every=100, eval_every=5000, checkpoint_every=5000
  )

  if a.variant == "tiny":
    c.data.max_seq_len = 64
    c.data.batch_size = 8
    c.data.balance_block = 8
    c.optim.learning_rate = 1e-3
    c.student.projection_samples = 256
    c.train = common.train(
      30,
      log_every=10,
      eval_every=0,
      eval_batches=2,
      checkpoint_every=10,
      async_checkpoints=False,
    )
  elif a.variant in ("mbert", "xlmr"):
    c.teacher.model = f"models/{a.variant}-{a.src}-{a.tgt}"
    for side, lang in (("source", a.src), ("target", a.tgt)):
      c.data[side] = f"corpora/{lang}.txt"
      c.data[f"{side}_dev"] = f"corpora/{lang}.dev.txt"
  else:
    raise ValueError(f"unknown variant {a.variant!r}: tiny, mbert or xlmr")
  return c
