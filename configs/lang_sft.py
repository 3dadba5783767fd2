r"""Language SFTs: LT-SFT of an MMT with the MLM objective on one language's
corpus (docs/method.md 4.1, last paragraph; 4.4-4.6). ARG = variant (base|tiny).

The released language SFTs (composable-sft train_mlm.sh): K = 7,667,712 of
mBERT's body (density below), LayerNorms frozen, the output decoder untied
from the word embeddings and frozen (the rest of the MLM head trained
densely), L1 = 0.1 toward the pre-trained values in both stages, lr 5e-5,
batch 4 x 2 (gradient accumulation; here one batch of 8, the same mean),
rows of 256 tokens, 10k-100k steps per stage. The export is an SFT dir of
kind "language" that phase 1 applies per language:

  bistil lang-sft --config configs/lang_sft.py --workdir runs/lang-sft-mt \
    --config.student.model=models/mbert \
    --config.data.corpus=corpora/mt.txt \
    --config.eval.sets=dev=corpora/mt.dev.txt
  bistil distil --config configs/distil.py:mbert,en,mt \
    --workdir runs/distil-mbert-en-mt \
    --config.teacher.sfts=source=runs/lang-sft-en/export,target=runs/lang-sft-mt/export

A language SFT made on the full MMT also applies to a vocabulary-trimmed
copy of it (trim-vocab's vocab_map.json maps the embedding rows); one made
for another base model is refused.

CPU sizes (tests, the synthetic languages):
  bistil lang-sft --config configs/lang_sft.py:tiny --workdir /tmp/lsft \
    --config.student.model=TEACHER_DIR --config.data.corpus=a1.txt
"""

import ml_collections

from bistil_jax import configlib

common = configlib.load_sibling(__file__, "common")

# mBERT's LT-SFT-eligible body with LayerNorms frozen: word (119,547 real
# rows), position and type embeddings and the 12 layers' matrices and
# biases = 177,224,448 entries; the released K = 7,667,712 of them.
MBERT_BODY = 177_224_448
RELEASED_K = 7_667_712


def get_config(arg=None):
  a = common.parse_arg(arg, variant="base")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.student = ml_collections.ConfigDict()
  c.student.model = ""  # HF dir of the MMT (MLM head) the SFT is made for
  c.student.dtype = "float32"  # compute dtype
  c.student.param_dtype = "float32"  # master weights

  c.data = ml_collections.ConfigDict()
  c.data.corpus = ""  # CORPUS spec of the language: file or hf:...
  c.data.tokenizer = ""  # "" = the model dir's tokenizer
  c.data.max_seq_len = 256  # packed rows
  c.data.batch_size = 8  # global rows per step (released 4 x 2 accum.)
  c.data.mlm_probability = 0.15  # 80/10/10 input noise
  c.data.max_lines = 0  # read at most this many corpus lines (0 = all)
  c.data.prefetch = 2  # host batches prepared ahead

  # Dev corpora of the language, "name=SPEC,...": masked-LM loss and
  # accuracy every train.eval_every steps and at the end (results.json).
  c.eval = common.eval_block(batches=8)

  c.loss = ml_collections.ConfigDict()
  c.loss.mlm = 1.0  # MLM cross-entropy at masked positions
  # L1 toward the pre-trained values over the eligible body, both stages
  # (sum |theta - theta0| / eligible entries, as bistil normalises it).
  c.loss.l1 = 0.1

  c.sparse = ml_collections.ConfigDict()
  c.sparse.density = RELEASED_K / MBERT_BODY  # K = density x eligible
  c.sparse.num_entries = 0  # K as a count instead (0: use density)
  c.sparse.embeddings = True  # word/position/type embeddings eligible
  c.sparse.layer_norm = False  # LayerNorms frozen (--freeze_layer_norm)
  # Untie the output decoder from the word embeddings and freeze it
  # (--freeze_decoder); False keeps it tied (it moves with the embeddings).
  c.sparse.freeze_decoder = True
  # Freeze the whole MLM head (composable-sft --freeze_head; not used for
  # the released SFTs): the SFT is then body diffs only, all that phase 1
  # applies.
  c.sparse.freeze_head = False
  c.sparse.num_steps = 100_000  # the sparse stage (train.num_steps: dense)

  c.optim = common.optim(learning_rate=5e-5)
  c.mesh = common.mesh((-1, 1, 1))
  c.train = common.train(
    100_000, log_every=100, eval_every=1000, checkpoint_every=5000
  )

  if a.variant == "tiny":
    c.data.max_seq_len = 64
    c.sparse.density = 0.1
    c.sparse.num_steps = 40
    c.optim.learning_rate = 1e-3
    c.eval.batches = 4
    c.train = common.train(
      40,
      log_every=10,
      eval_every=0,
      checkpoint_every=20,
      async_checkpoints=False,
    )
  elif a.variant != "base":
    raise ValueError(f"unknown variant {a.variant!r}: base or tiny")
  return c
