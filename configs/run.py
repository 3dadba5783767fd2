r"""`bistil run`: the whole recipe, from an MMT and a language pair to an
evaluated, deployable student (docs/recipe.md). ARG = VARIANT[,key=value].

Each stage's block is that stage's own config (configs/distil.py,
lang_sft.py, finetune.py, sft.py), so `--config.distil.train.num_steps=...`
reads as `bistil distil --config.train.num_steps=...`. The fields that
connect the stages (model dirs, corpora, task data) are filled in by the
recipe from the top-level fields below; leave them empty in the blocks.

  tiny[,data=DIR,task=pos]   CPU sizes on the synthetic languages b1 -> b2
                             of `bistil synth` (docs/recipe.md shows how to
                             make DIR and its teacher):
    bistil run --config configs/run.py:tiny,data=synth --workdir runs/tiny

  paper,task=TASK,tgt=LANG   the paper's setting for one row of its tables:
                             TASK ner (MasakhaNER), dp (UD 2.7), nli
                             (AmericasNLI) or qa (XQuAD); English source;
                             the paper's teacher, datasets as hf: specs,
                             phase-1 corpora in corpora/LANG.txt and
                             corpora/LANG.dev.txt, LRF 2 (BiStil-TF 2):
    bistil run --config configs/run.py:paper,task=ner,tgt=hau \
      --workdir runs/ner-hau --config.teacher=models/mbert
"""

import ml_collections

from bistil_jax import configlib

common = configlib.load_sibling(__file__, "common")
distil = configlib.load_sibling(__file__, "distil")
finetune = configlib.load_sibling(__file__, "finetune")
lang_sft = configlib.load_sibling(__file__, "lang_sft")
sft = configlib.load_sibling(__file__, "sft")

# Each task's headline metric: phase 2's select_best and the report's score.
HEADLINE = {"pos": "accuracy", "ner": "f1", "dp": "las", "nli": "accuracy",
            "qa": "f1"}  # fmt: skip

# The paper's teacher per task (HF hub names; download them to the dirs the
# preset names, models/NAME). mDeBERTa-v3's hub dir ships spm.model without
# tokenizer.json: write one first (docs/recipe.md).
PAPER_TEACHERS = {"ner": ("models/mbert", "bert-base-multilingual-cased"),
                  "dp": ("models/mbert", "bert-base-multilingual-cased"),
                  "nli": ("models/xlmr", "xlm-roberta-base"),
                  "qa": ("models/mdeberta", "microsoft/mdeberta-v3-base")}  # fmt: skip

# UD 2.7 treebanks of the paper's DP target languages (hf universal_dependencies).
UD_TREEBANKS = {
  "ar": "ar_padt", "bm": "bm_crb", "bxr": "bxr_bdt", "fo": "fo_oft",
  "gv": "gv_cadhan", "hsb": "hsb_ufal", "ja": "ja_gsd", "kpv": "kpv_lattice",
  "mt": "mt_mudt", "myv": "myv_jr", "olo": "olo_kkpp", "sa": "sa_ufal",
  "sme": "sme_giella", "ug": "ug_udt", "yue": "yue_hk", "zh": "zh_gsd",
}  # fmt: skip


def _row(langs: str, *values: float) -> dict[str, float]:
  return dict(zip(langs.split(), values, strict=True))


# The paper's figures (Ansell et al. 2023), per task: its table, metric,
# and the undistilled LTSFT and BiStil-TF (LRF 2) scores per target.
PAPER = {
  "dp": {
    "table": "Table 3 (UD 2.7 LAS)",
    "ltsft": _row("ar bm bxr fo gv hsb ja kpv mt myv olo sa sme ug yue zh",
                  53.6, 16.5, 25.9, 55.5, 42.4, 60.5, 19.7, 27.2, 55.4, 45.3,
                  47.8, 25.2, 42.1, 16.7, 34.0, 37.0),
    "bistil_tf": _row("ar bm bxr fo gv hsb ja kpv mt myv olo sa sme ug yue zh",
                      53.2, 16.4, 24.6, 54.8, 39.1, 59.0, 19.0, 23.8, 54.1,
                      43.5, 46.0, 26.9, 40.7, 13.1, 32.7, 36.4),
  },
  "ner": {
    "table": "Table 4 (MasakhaNER F1)",
    "ltsft": _row("hau ibo kin lug luo pcm swa wol yor",
                  83.5, 76.7, 67.4, 67.9, 54.7, 74.6, 79.4, 66.3, 74.8),
    "bistil_tf": _row("hau ibo kin lug luo pcm swa wol yor",
                      81.0, 74.8, 67.5, 67.3, 55.0, 72.9, 78.4, 69.0, 75.7),
  },
  "nli": {
    "table": "Table 5 (AmericasNLI accuracy)",
    "ltsft": _row("aym bzd cni gn hch nah oto quy shp tar",
                  58.1, 44.4, 47.9, 63.5, 42.8, 52.4, 48.5, 62.0, 50.3, 43.3),
    "bistil_tf": _row("aym bzd cni gn hch nah oto quy shp tar",
                      58.9, 45.7, 46.4, 62.9, 44.3, 50.8, 44.0, 58.7, 47.2,
                      43.1),
  },
  "qa": {
    "table": "Table 10 (XQuAD F1)",
    "ltsft": _row("ar de el es hi ro ru th tr vi zh",
                  73.0, 80.5, 78.6, 80.6, 74.3, 82.4, 77.8, 69.7, 72.2, 76.5,
                  68.9),
    "bistil_tf": _row("ar de el es hi ro ru th tr vi zh",
                      69.4, 77.4, 73.8, 77.6, 69.7, 79.1, 75.0, 66.7, 68.8,
                      72.8, 64.5),
  },
}  # fmt: skip


def get_config(arg=None):
  a = common.parse_arg(arg, variant="tiny", task="pos", tgt="", data="synth")
  if a.variant == "tiny":
    return tiny(a.task, a.tgt or "b2", a.data)
  if a.variant == "paper":
    return paper(a.task, a.tgt)
  raise ValueError(f"unknown variant {a.variant!r}: tiny or paper")


def base(task: str, variant: str) -> ml_collections.ConfigDict:
  """Every field, with each stage's block from that stage's own config."""
  if task not in HEADLINE:
    raise ValueError(f"unknown task {task!r}; choose from {sorted(HEADLINE)}")
  c = ml_collections.ConfigDict()
  c.teacher = ""  # HF model dir of the MMT (local or gs://)
  # A phase-1 student to use (HF dir, e.g. another task's run's
  # distil/workdir/export); "" = trim, lang_sft and distil make one here.
  c.student = ""
  for side in ("source", "target"):
    c[side] = ml_collections.ConfigDict()
    c[side].lang = ""  # language code (names the test set and the report)
    c[side].corpus = ""  # CORPUS spec: file, json:PATH, hf:NAME:CONF:SPLIT:COL
    c[side].dev = ""  # held-out corpus: phase 1 selects its step on it

  c.task = ml_collections.ConfigDict()
  c.task.name = task  # pos | ner | nli | dp | qa (set it in ARG: task=...)
  c.task.train = ""  # source-language labelled data (file or hf: spec)
  c.task.dev = ""  # source-language dev split: phase-2 checkpoint choice
  c.task.source_test = ""  # "" = report the source on task.dev
  # "NAME=SPEC,...": the target language's test sets (a bare SPEC is named
  # after target.lang); `\,` for a comma inside a path.
  c.task.target_tests = ""

  c.trim = ml_collections.ConfigDict()  # `bistil trim-vocab` flags
  c.trim.threshold = 1e-6  # keep ids with unigram prob >= this in a corpus
  c.trim.max_lines = 0  # count at most this many lines per corpus (0: all)

  c.lang_sft = ml_collections.ConfigDict()
  c.lang_sft.mode = "none"  # none | given (dirs below) | train (block below)
  c.lang_sft.source = ""  # given: the source language's SFT dir
  c.lang_sft.target = ""  # given: the target language's SFT dir
  c.lang_sft.train = lang_sft.get_config(variant)  # configs/lang_sft.py

  # configs/distil.py (phase 1); its mbert variant holds the released
  # values, its paths are the recipe's to fill.
  c.distil = distil.get_config("tiny" if variant == "tiny" else "mbert")
  c.distil.teacher.model = c.distil.data.source = c.distil.data.target = ""
  c.distil.eval.sets = ""
  c.distil.train.select_best = "source+target/loss"

  c.task_teacher = ml_collections.ConfigDict()
  c.task_teacher.model = ""  # a task-tuned HF dir to use; "" = train one
  # configs/finetune.py: `bistil finetune` of the teacher on task.train
  c.task_teacher.train = finetune.get_config(f"{task},variant={variant}")

  c.sft = sft.get_config(f"{task},variant={variant}")  # phase 2

  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.batch_size = 32
  c.measure = ml_collections.ConfigDict()  # `bistil measure` of both models
  c.measure.seq_len = 128  # tokens per sequence (MACs and latency)
  c.measure.batch = 1  # sequences per timed pass
  c.measure.repeats = 10  # timed passes on the CPU
  c.measure.device = "cpu"  # the paper's speed column: CPU, batch 1

  # The paper's row for this task and target ({} when it has none).
  c.paper = ml_collections.ConfigDict()
  c.paper.table = ""
  c.paper.metric = HEADLINE[task]
  c.paper.ltsft = -1.0  # the undistilled MMT + language SFT + task SFT
  c.paper.bistil_tf = -1.0  # BiStil-TF, LRF 2
  return c


def tiny(task: str, tgt: str, data: str) -> ml_collections.ConfigDict:
  """The synthetic languages of `bistil synth` in DATA, teacher DATA/teacher."""
  c = base(task, "tiny")
  c.teacher = f"{data}/teacher"
  for side, lang in (("source", "b1"), ("target", tgt)):
    c[side].lang = lang
    c[side].corpus = f"{data}/corpora/{lang}.txt"
    c[side].dev = f"{data}/corpora/{lang}.dev.txt"
  folder, ext = {"pos": ("pos", "conllu"), "dp": ("pos", "conllu"),
                 "ner": ("ner", "txt"), "nli": ("nli", "jsonl"),
                 "qa": ("qa", "json")}[task]  # fmt: skip
  c.task.train = f"{data}/{folder}/b1/train.{ext}"
  c.task.dev = f"{data}/{folder}/b1/dev.{ext}"
  c.task.source_test = f"{data}/{folder}/b1/test.{ext}"
  c.task.target_tests = f"{tgt}={data}/{folder}/{tgt}/test.{ext}"
  c.distil.train.eval_every = 10
  c.distil.eval.batches = 2
  c.lang_sft.train.train.num_steps = 10
  c.lang_sft.train.sparse.num_steps = 10
  c.sft.train.select_best = f"dev/{HEADLINE[task]}"
  c.measure.seq_len = 64
  c.measure.repeats = 5
  return c


def paper(task: str, tgt: str) -> ml_collections.ConfigDict:
  """One row of the paper (PAPER.md protocol): English source, LRF 2."""
  if task not in PAPER:
    raise ValueError(f"paper presets: task is one of {sorted(PAPER)}")
  row = PAPER[task]
  if tgt not in row["ltsft"]:
    raise ValueError(
      f"the paper has no {task} row for {tgt!r}; one of {sorted(row['ltsft'])}"
    )
  c = base(task, "base")
  c.teacher = PAPER_TEACHERS[task][0]
  for side, lang in (("source", "en"), ("target", tgt)):
    c[side].lang = lang
    c[side].corpus = f"corpora/{lang}.txt"  # e.g. Wikipedia, one line each
    c[side].dev = f"corpora/{lang}.dev.txt"  # a 5% held-out part of it
  _paper_task_data(c, task, tgt)
  c.lang_sft.mode = "train"  # or "given": the released language SFTs
  # Phase 1 (section 3.2, A.1): 200k steps of 8 x 256, lr 1e-4, no warmup,
  # held-out loss every 1k steps, the lowest-loss step kept.
  c.distil.train.eval_every = 1000
  c.distil.student.layer_reduction = 2
  _paper_task_settings(c, task)
  c.paper.table = row["table"]
  c.paper.ltsft = row["ltsft"][tgt]
  c.paper.bistil_tf = row["bistil_tf"][tgt]
  return c


def _paper_task_data(c, task: str, tgt: str) -> None:
  """The paper's datasets as hf: specs (English source, T8 targets)."""
  if task == "ner":
    src, tests = "hf:conll2003:", f"hf:masakhaner:{tgt}:test"
    splits = ("train", "validation", "test")
  elif task == "dp":
    tb = UD_TREEBANKS[tgt]
    src, tests = (
      "hf:universal_dependencies:en_ewt",
      (f"hf:universal_dependencies:{tb}:test"),
    )
    splits = ("train", "validation", "test")
  elif task == "nli":
    src, tests = "hf:multi_nli:", f"hf:americas_nli:{tgt}:test"
    splits = ("train", "validation_matched", "")
  else:  # qa: SQuAD v1.1 -> XQuAD (its only split is validation)
    src, tests = "hf:squad:", f"hf:xquad:xquad.{tgt}:validation"
    splits = ("train", "validation", "")
  c.task.train, c.task.dev = (f"{src}:{s}" for s in splits[:2])
  c.task.source_test = f"{src}:{splits[2]}" if splits[2] else ""
  c.task.target_tests = f"{tgt}={tests}"


def _paper_task_settings(c, task: str) -> None:
  """Phase 2 (A.2): density 8%; DP/NER 3 dense + 10 sparse epochs, lr 5e-5,
  best dev epoch; NLI 5 epochs, batch 32, eval every 625 steps, lr 2e-5;
  QA 5 epochs, batch 12, eval every 2000 steps, lr 3e-5 (the NLI/QA
  dense/sparse split is not stated: 5 + 5, as configs/sft.py's QA)."""
  s = c.sft
  s.sparse.density = 0.08
  if task in ("dp", "ner"):
    s.train.epochs, s.sparse.epochs = 3.0, 10.0
    s.optim.learning_rate = 5e-5
    s.train.select_best = f"dev/{HEADLINE[task]}"
  elif task == "nli":
    s.train.epochs, s.sparse.epochs = 5.0, 5.0
    s.data.batch_size = 32
    s.train.eval_every = 625
    s.optim.learning_rate = 2e-5
  else:
    s.train.epochs, s.sparse.epochs = 5.0, 5.0
    s.data.batch_size = 12
    s.train.eval_every = 2000
    s.optim.learning_rate = 3e-5
