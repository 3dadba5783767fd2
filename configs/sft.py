r"""Phase 2: LT-SFT of the phase-1 student against a task teacher
(docs/method.md sections 4-5). ARG = TASK[,variant=tiny|base].

The phase-1 student + a fresh task head, LT-SFT with soft cross-entropy
(T=2) on the teacher's logits + hidden + attention MSE (the released mix),
exported as a task SFT dir:
  bistil sft --config configs/sft.py:ner --workdir runs/sft-ner \
    --config.student.model=runs/distil-mbert-en-mt/export \
    --config.teacher.model=runs/teacher-ner/export \
    --config.data.train=data/en/train.txt \
    --config.eval.sets=dev=data/en/dev.txt,mt=data/mt/test.txt

Teacher task-tuning, `bistil finetune`, uses configs/finetune.py (these
fields without a teacher, gold loss only, dense unless
--config.sparse.enabled=true).

Released values (docs/method.md 4.4): density 0.08, batch 8, lr 5e-5, NER 3
dense + 10 sparse epochs, DP (`:dp`, biaffine parser, UAS/LAS) 10 + 10, no
warmup, grad-clip 1. QA (`sft.py:qa`, docs/method.md
4.3, 4.4): 5 + 5 epochs at sequence length 384, windows overlapping by 128
tokens, n-best 20, answers of at most 30 tokens; its teacher
(`finetune.py:qa`): SQuAD v1.1, 2 + 2 epochs, batch 12, lr 3e-5:
  bistil sft --config configs/sft.py:qa --workdir runs/sft-qa \
    --config.student.model=runs/distil-mbert-en-ar/export \
    --config.teacher.model=runs/teacher-qa/export \
    --config.data.train=data/squad/train-v1.1.json \
    --config.eval.sets=dev=data/squad/dev-v1.1.json,ar=data/xquad/xquad.ar.json
"""

import ml_collections

from bistil_jax import configlib

common = configlib.load_sibling(__file__, "common")


def get_config(arg=None, *, teacher=True):
  a = common.parse_arg(arg, task="pos", variant="base")
  c = ml_collections.ConfigDict()
  c.task = a.task  # pos | ner | nli | dp | qa
  c.seed = 0
  c.student = ml_collections.ConfigDict()
  c.student.model = ""  # HF dir: the phase-1 student (sft) or the MMT
  c.student.sfts = ""  # SFT dirs applied to it first (comma-separated)
  c.student.dtype = "float32"  # compute dtype
  c.student.param_dtype = "float32"  # master weights
  if teacher:
    # Task teacher: an HF dir with the task head, or a base + SFTs (e.g.
    # language + task) that bring it.
    c.teacher = common.teacher()

  c.data = ml_collections.ConfigDict()
  c.data.train = ""  # source-language task data (file or hf: spec)
  c.data.labels = ""  # comma-separated label set; "" = teacher's / inferred
  c.data.tokenizer = ""  # "" = the student dir's tokenizer
  c.data.max_seq_len = 128  # longer training sentences are dropped
  c.data.batch_size = 8
  c.data.prefetch = 2  # host batches prepared ahead

  # "name=spec,...": evaluated every train.eval_every steps and at the end
  # (results.json); over-long sentences are windowed, never dropped.
  c.eval = common.eval_block()

  c.loss = ml_collections.ConfigDict()
  c.loss.gold = 0.0  # cross-entropy on gold labels
  if teacher:
    c.loss.kl = 1.0  # soft cross-entropy on the teacher's logits
    c.loss.hidden = 1.0  # hidden MSE, student i <- teacher i*r
    c.loss.attention = 1.0  # attention MSE, student i <- teacher (i+1)r-1
    c.loss.temperature = 2.0
  c.loss.l1 = 0.0  # L1 toward the initial values over trainable entries

  c.sparse = ml_collections.ConfigDict()
  c.sparse.enabled = True  # LT-SFT; False = dense fine-tuning
  c.sparse.density = 0.08  # K = density x eligible body entries
  # K as a count instead (the released ft_params_num; 0 = use density):
  # students with different vocabularies then get the same budget.
  c.sparse.num_entries = 0
  c.sparse.embeddings = True  # word/position/type embeddings eligible
  c.sparse.layer_norm = True  # LayerNorms eligible
  c.sparse.epochs = 10.0  # the sparse stage (train.epochs: the dense one)

  c.optim = common.optim(learning_rate=5e-5)
  c.mesh = common.mesh((-1, 1, 1))
  c.train = common.train(epochs=3.0, log_every=50, checkpoint_every=1000)
  # "" = the last step's weights (NLI/QA as released); "SET/METRIC", e.g.
  # "dev/accuracy": evaluate SET every epoch (unless train.eval_every is
  # set) and keep each stage's best-scoring weights, as the released
  # NER/DP training does (load_best_model_at_end on the source dev set).
  c.train.select_best = ""
  if a.task == "dp":
    # DP: 10 dense + 10 sparse epochs (docs/method.md 4.4)
    c.train.epochs = 10.0

  if a.task == "qa":
    _qa(c, student=teacher)

  if a.variant == "tiny":
    c.data.max_seq_len = 64
    c.data.batch_size = 16
    c.optim.learning_rate = 1e-3
    c.train.epochs = 2.0
    c.sparse.epochs = 2.0
    if a.task == "dp":  # a zero-initialised parser needs more steps
      c.train.epochs = c.sparse.epochs = 4.0
    c.train.log_every = 10
    c.train.async_checkpoints = False
    if a.task == "qa":
      c.data.doc_stride = 16  # < the context room of a 64-token window
      # A quarter of the window: with 30, a 64-wide QA teacher's diffuse
      # end scores picked over-long spans (synthetic source dev F1 0.63
      # -> 0.73 with 15; its answers are at most 12 tokens).
      c.data.max_answer_length = 15
  elif a.variant != "base":
    raise ValueError(f"unknown variant {a.variant!r}: base or tiny")
  return c


def _qa(c, student):
  """Extractive QA (docs/method.md 4.1, 4.3, 4.4): SQuAD v1.1 windows."""
  c.data.max_seq_len = 384  # every window; long contexts are split
  c.data.doc_stride = 128  # overlap of consecutive windows, in tokens
  c.data.n_best_size = 20  # start/end candidates per window
  c.data.max_answer_length = 30  # longest decoded answer, in tokens
  if student:  # phase 2: the example launchers' QA student
    c.train.epochs = 5.0
    c.sparse.epochs = 5.0
    c.train.eval_every = 2000
  else:  # the teacher's task SFT (jobs/sft_qa.sh, train_qa.sh)
    c.data.batch_size = 12
    c.optim.learning_rate = 3e-5
    c.train.epochs = 2.0
    c.sparse.epochs = 2.0
