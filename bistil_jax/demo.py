"""`bistil demo`: the whole BiStil pipeline on synthetic languages, on a CPU.

For each seed: synthesise related languages (corpora + POS), train a
WordPiece tokenizer on all of them, MLM-pretrain a small multilingual
teacher, task-tune it on the source language, and for two targets (one
close to the source, one distant) build and compare, on the same budget:

  bistil      `bistil run` (bistil_jax/recipe): trimmed bilingual
              vocabulary -> phase 1 (per-language teachers: the MMT plus
              each language's SFT, `bistil lang-sft`) -> phase 2 (LT-SFT)
              -> evaluate, measure, export, report; one run per target
              and task, the later tasks reusing the first's student
  scratch     a bilingual model of the student's size, trimmed vocabulary,
              MLM from scratch -> the same phase 2
  multi       a multilingually distilled student (phase 1 on all
              languages, full vocabulary, DistilmBERT-style) -> phase 2

and the teacher itself (dense task-tuned). Every stage is a public CLI
command (`cli.main([...])`) writing into OUT/seed<k>/..., so rerunning the
demo resumes. Results: OUT/results.json, OUT/report.md, OUT/*.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import time
from typing import Any, NamedTuple

import jax

from bistil_jax import configlib, paths, synthetic
from bistil_jax import tasks as tasks_lib
from bistil_jax.errors import BistilError
from bistil_jax.recipe import layout, runner, stages
from bistil_jax.train import loop

log = logging.getLogger(__name__)

MODELS = ("teacher", "bistil", "scratch", "multi", "majority")
MODEL_NAMES = {
  "teacher": "teacher (MMT, task-tuned)",
  "bistil": "BiStil student",
  "scratch": "scratch bilingual",
  "multi": "multilingual distilled",
  "majority": "majority tag (no model)",
}
# One colour per model in every plot (tab10 entries).
COLOURS = {
  "teacher": "tab:blue",
  "bistil": "tab:red",
  "scratch": "tab:green",
  "multi": "tab:purple",
  "majority": "tab:gray",
}

# Tasks `bistil demo --tasks` runs: each gets its own task teacher and phase
# 2 per student; data, teacher MLM, phase 1 and trimming are shared.
TASKS = ("pos", "dp", "qa")
# The headline metric (the table's score, phase 2's select_best) and the
# other metrics kept in results.json.
TASK_METRICS = {
  "pos": ("accuracy", ()),
  "dp": ("las", ("uas",)),
  "qa": ("f1", ("exact_match",)),
}
TASK_TITLES = {
  "pos": "POS accuracy",
  "dp": "DP LAS (UAS in results.json)",
  "qa": "QA F1 (EM in results.json)",
}
# The metric's short name in table headers and claims.
METRIC_LABELS = {"pos": ("acc", "accuracy"), "dp": ("LAS", "LAS"),
                 "qa": ("F1", "F1")}  # fmt: skip


def task_models(task: str) -> tuple[str, ...]:
  """The table's models of a task: the majority tag exists for POS only."""
  return (
    MODELS if task == "pos" else tuple(m for m in MODELS if m != "majority")
  )


def parse_tasks(text: str) -> tuple[str, ...]:
  """`--tasks pos,dp,qa` -> ("pos", "dp", "qa"), in the given order.

  Raises:
    BistilError: no task, or a task the demo does not run.
  """
  names = []
  for name in (t.strip() for t in text.split(",")):
    if not name:
      continue
    if name not in TASKS:
      raise BistilError(
        f"--tasks: unknown task {name!r}; choose from {', '.join(TASKS)}"
      )
    if name not in names:
      names.append(name)
  if not names:
    raise BistilError(f"--tasks needs at least one of {', '.join(TASKS)}")
  return tuple(names)


@dataclasses.dataclass(frozen=True)
class Budget:
  """Sizes of one demo run (full: ~15 min per seed on 2 cores)."""

  # Languages the MMT is pre-trained on (and the multilingual student is
  # distilled on): the source, both targets and the family's others. A real
  # MMT covers ~100 languages, so each gets a small share of its capacity
  # and of a multilingual student's distillation (here 1/16 of phase 1's
  # batches, against half of BiStil's). Above 8 the family grows (16: 6
  # groups); the transfer languages are the same in a family of any size.
  languages: int = 16
  corpus: int = 6000  # sentences per language
  task_train: int = 1500
  task_eval: int = 400
  vocab: int = 3000
  teacher_layers: int = 4
  hidden: int = 64
  pretrain_steps: int = 2500
  distil_steps: int = 800  # phase 1, and the scratch MLM budget
  # Phase 1's student.init: the released code's (random layers, SVD of the
  # teacher's word embeddings), so that phase 1 has to build the student,
  # as it has on a real MMT. At this size a copy of the 4-layer teacher's
  # layers 1 and 3 is already the student: with "teacher_layers" a BiStil
  # student with 0 phase-1 steps scored 0.867 on the close target, one
  # with 800 steps 0.868 and the multilingual one 0.865 (seed 0), so phase
  # 1's data could not matter.
  student_init: str = "svd_embeddings"
  finetune_epochs: float = 3.0
  dense_epochs: float = 2.0
  sparse_epochs: float = 3.0
  batch: int = 16
  seq_len: int = 64
  # Phase 2's trainable body entries, the same count for every student
  # (sparse.num_entries). A density (0.08) gave the trimmed BiStil student
  # 14.3k entries and the full-vocabulary multilingual one 24.0k (its
  # embedding matrix is larger): that alone put BiStil 8 points behind on
  # the source (0.82 vs 0.90 source dev; 0.90 for both at 24k). 40k (about
  # a fifth of a trimmed student's body) and 3 sparse epochs let the
  # students recover the teacher's source score after the LT-SFT reset.
  sparse_entries: int = 40000
  # Teacher task-tuning, dense and sparse phase-2 epochs of the other tasks
  # (POS: finetune_epochs, dense_epochs, sparse_epochs). The parser's
  # arc/label scorers start at zero (as released) and need more steps.
  dp_finetune_epochs: float = 6.0
  dp_dense_epochs: float = 3.0
  dp_sparse_epochs: float = 4.0
  # The QA teacher learns the answer phrase's extent slowly: source dev F1
  # 0.68 after 5 epochs, 0.73 after 10 (seed 0, docs/synthetic.md).
  qa_finetune_epochs: float = 10.0
  qa_dense_epochs: float = 3.0
  qa_sparse_epochs: float = 3.0
  # Transfer languages of family 0. b1 and b2 share about two thirds of
  # their word tokens (names, digits, punctuation aside), as closely
  # related languages do; a1 has another lexicon, SOV order, postpositions
  # and case (family.json, written by `bistil synth`, lists all of it).
  source: str = "b1"
  close: str = "b2"
  distant: str = "a1"
  # Sentences of each target language in the MMT's pre-training corpus,
  # which the multilingually distilled student is distilled on too (0:
  # the whole corpus). The targets are low-resource there, as Maltese or
  # Uyghur are in mBERT's Wikipedia; the user's monolingual corpus of the
  # target (`corpus` sentences) trains its language SFT and BiStil's phase
  # 1, as released (docs/method.md 2.1).
  mmt_target_sentences: int = 0
  # Dense and sparse steps of each language SFT (`bistil lang-sft` of the
  # teacher on the source, close and distant corpora), applied to the
  # phase-1 teacher per batch language (docs/method.md 2.1). 0: no language
  # SFTs (phase 1 distils the bare teacher).
  lang_sft_steps: int = 300


QUICK = Budget(
  languages=3,
  corpus=1200,
  task_train=300,
  task_eval=120,
  vocab=1200,
  pretrain_steps=300,
  distil_steps=60,
  finetune_epochs=2.0,
  dense_epochs=1.0,
  sparse_epochs=1.0,
  dp_finetune_epochs=4.0,
  dp_dense_epochs=2.0,
  dp_sparse_epochs=2.0,
  qa_finetune_epochs=4.0,
  qa_dense_epochs=2.0,
  qa_sparse_epochs=2.0,
  # Three language SFT runs cost ~110 s of --quick's ~390 s on 2 busy
  # cores, almost all of it compiling; --quick distils the bare teacher.
  lang_sft_steps=0,
  # 60 phase-1 steps cannot build a student from random layers; --quick
  # checks the pipeline and the report, so it copies the teacher's layers.
  student_init="teacher_layers",
)


def task_epochs(b: Budget, task: str) -> tuple[float, float, float]:
  """(teacher finetune, phase-2 dense, phase-2 sparse) epochs of a task."""
  if task == "pos":
    return b.finetune_epochs, b.dense_epochs, b.sparse_epochs
  return tuple(
    getattr(b, f"{task}_{stage}_epochs")
    for stage in ("finetune", "dense", "sparse")
  )


def _suffix(task: str) -> str:
  """Workdir/eval-file infix: none for POS (the names before --tasks, so
  earlier outputs resume), `dp_`, `qa_` for the others."""
  return "" if task == "pos" else f"{task}_"


# One public CLI command, logged; a failure stops the demo with its message.
_run = stages.run_command
_join = layout.join


def _savefig(fig, path: str) -> None:
  """A matplotlib figure as a PNG at `path` (local or remote)."""
  import io

  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  paths.write_bytes(path, buf.getvalue())


def _cfg(name: str) -> str:
  return str(configlib.repo_configs_dir() / name)


def _train_over(b: Budget, steps: int, seed: int) -> list[str]:
  return [
    f"--config.seed={seed}",
    f"--config.train.num_steps={steps}",
    f"--config.train.log_every={max(steps // 10, 1)}",
    f"--config.train.checkpoint_every={steps}",
    f"--config.data.batch_size={b.batch}",
    f"--config.data.max_seq_len={b.seq_len}",
    "--config.train.async_checkpoints=false",
  ]


def _task_over(b: Budget, seed: int, files, src: str) -> list[str]:
  """Shared task-training flags; `files`: lang -> split -> the task's file."""
  return [
    f"--config.seed={seed}",
    f"--config.data.batch_size={b.batch}",
    f"--config.data.max_seq_len={b.seq_len}",
    f"--config.data.train={files[src]['train']}",
    f"--config.eval.sets=dev={files[src]['dev']}",
    "--config.train.async_checkpoints=false",
  ]


def _qa_doc_stride() -> int:
  """The tiny QA config's window overlap: evaluation windows as trained."""
  return configlib.build_config(_cfg("sft.py:qa,variant=tiny")).data.doc_stride


def _evaluate_metrics(
  model: str, sft: str | None, files, langs, out: str, task: str = "pos",
  b: Budget | None = None,
) -> dict[str, dict[str, float]]:  # fmt: skip
  """`bistil evaluate --task TASK` on each language's test file; per
  language the headline and other metrics of TASK_METRICS."""
  argv = ["evaluate", "--model", model, "--task", task, "--out", out]
  if sft:
    argv += ["--sft", sft]
  if task == "qa":  # the windows the QA models were trained on
    argv += ["--max-seq-len", b.seq_len, "--doc-stride", _qa_doc_stride()]
  for lang in langs:
    argv += ["--data", f"{lang}={files[lang]['test']}"]
  _run(argv)
  res = json.loads(paths.read_text(out))
  head, others = TASK_METRICS[task]
  return {lang: {k: res[lang][k] for k in (head, *others)} for lang in langs}


def _evaluate(model: str, sft: str | None, files, langs, out: str) -> dict:
  """POS accuracy per language."""
  res = _evaluate_metrics(model, sft, files, langs, out)
  return {lang: m["accuracy"] for lang, m in res.items()}


def _measure(
  model_dir: str, sft: str | None, b: Budget, out: str
) -> dict[str, float]:
  """`bistil measure` of a model + SFT: the table's size/latency columns."""
  argv = ["measure", model_dir, "--seq-len", b.seq_len]
  argv += ["--batch-shapes", f"8x{b.seq_len}", "--repeats", 10, "--out", out]
  argv += ["--device", "cpu"]  # the report's column is CPU latency
  if sft:
    argv += ["--sft", sft]
  _run(argv)
  return _size_of(out)


def _size_of(measured: str) -> dict[str, float]:
  """The size columns from a `bistil measure --out` file."""
  res = json.loads(paths.read_text(measured))
  return {
    "params": res["parameters"]["total"],
    "macs": res["macs_per_sequence"]["analytic"],
    "latency_ms": res["latency"][0]["median_ms"],
  }


def _mlm_stage(
  command: str,
  workdir: str,
  b: Budget,
  steps: int,
  seed: int,
  model: str,
  source: str,
  target: str,
  *extra: str,
) -> str:
  """`bistil distil` or `bistil pretrain` on two corpora; the export dir."""
  config = "distil.py:tiny" if command == "distil" else "pretrain.py:tiny"
  _run(
    [command, "--config", _cfg(config), "--workdir", workdir]
    + _train_over(b, steps, seed)
    + [
      f"--config.{'teacher' if command == 'distil' else 'student'}.model="
      f"{model}",
      f"--config.data.source={source}",
      f"--config.data.target={target}",
      *extra,
    ]
  )
  return _join(workdir, "export")


def _phase2(
  workdir: str, student: str, teacher: str, b: Budget, seed, files, src,
  task: str = "pos",
) -> str:  # fmt: skip
  """`bistil sft` of a student against the task teacher; the SFT dir."""
  _, dense, sparse = task_epochs(b, task)
  _run(
    [
      "sft",
      "--config",
      _cfg(f"sft.py:{task},variant=tiny"),
      "--workdir",
      workdir,
      f"--config.student.model={student}",
      f"--config.teacher.model={teacher}",
      f"--config.train.epochs={dense}",
      f"--config.sparse.epochs={sparse}",
      f"--config.sparse.num_entries={b.sparse_entries}",
      # Each stage keeps its best epoch on source dev (released NER/DP).
      f"--config.train.select_best=dev/{TASK_METRICS[task][0]}",
    ]
    + _task_over(b, seed, files, src)
  )
  return _join(workdir, "export")


def _scored(
  model_dir, sft, files, langs, out: str, task: str, b: Budget,
  size: dict[str, float],
) -> dict[str, Any]:  # fmt: skip
  """Test scores per language (the headline metric, and every metric under
  "metrics" for tasks with more than one) plus the size columns."""
  res = _evaluate_metrics(model_dir, sft, files, langs, out, task, b)
  head, others = TASK_METRICS[task]
  entry = {"scores": {lang: m[head] for lang, m in res.items()}}
  if others:
    entry["metrics"] = res
  return {**entry, **size}


def majority_scores(data, src: str, langs) -> dict[str, float]:
  """Accuracy of tagging every word with the source training set's most
  frequent tag: the floor a transferring model must clear."""
  import collections

  pos = tasks_lib.get("pos")
  train = pos.read(str(data.pos[src]["train"]))
  counts = collections.Counter(t for ex in train for t in ex.labels)
  top = counts.most_common(1)[0][0]
  scores = {}
  for lang in langs:
    test = pos.read(str(data.pos[lang]["test"]))
    tags = [t for ex in test for t in ex.labels]
    scores[lang] = sum(t == top for t in tags) / len(tags)
  return scores


def family_size(b: Budget) -> int:
  """Languages in the synthetic family: the default 8, or more when the
  MMT covers more (the transfer languages are the same in any size)."""
  return max(8, b.languages)


def _family(b: Budget):
  """The demo's synthetic family (seed 0; seeds vary training only)."""
  return synthetic.make_family(0, num_languages=family_size(b))


def transfer_languages(family, b: Budget) -> tuple[str, str, str]:
  """(source, close, distant) of a budget, checked against the family."""
  if not family.related(b.source, b.close):
    raise BistilError(f"{b.close} is not related to {b.source}")
  if family.related(b.source, b.distant):
    raise BistilError(f"{b.distant} is related to {b.source}")
  return b.source, b.close, b.distant


def mmt_corpus(data, langs, targets, b: Budget) -> str:
  """The MMT's pre-training corpus: every language's training corpus, the
  targets' cut to their first `b.mmt_target_sentences` lines (if set)."""
  parts = []
  for lang in langs:
    lines = paths.read_text(data.corpora[lang]["train"]).splitlines()
    if lang in targets and b.mmt_target_sentences:
      lines = lines[: b.mmt_target_sentences]
    parts.append("".join(f"{line}\n" for line in lines))
  return "".join(parts)


def _lang_sft(root: str, lang: str, teacher: str, b: Budget, seed, data):
  """`bistil lang-sft` of the teacher on one language's corpus; its SFT."""
  workdir = _join(root, f"lang_sft_{lang}")
  steps = b.lang_sft_steps
  _run(
    [
      "lang-sft", "--config", _cfg("lang_sft.py:tiny"), "--workdir", workdir,
      f"--config.student.model={teacher}",
      f"--config.data.corpus={data.corpora[lang]['train']}",
      f"--config.eval.sets=dev={data.corpora[lang]['dev']}",
      f"--config.sparse.num_steps={steps}",
    ]
    + _train_over(b, steps, seed)
  )  # fmt: skip
  return _join(workdir, "export")


def _teacher_sfts(sfts: dict[str, str], src: str, tgt: str) -> list[str]:
  """Phase 1's per-language teachers (teacher.sfts), if any were made."""
  if not sfts:
    return []
  return [f"--config.teacher.sfts=source={sfts[src]},target={sfts[tgt]}"]


def _synth(out: str, langs, b: Budget, qa: bool, tokenizer: bool) -> None:
  argv = [
    "synth",
    "--out",
    out,
    "--num-languages",
    str(family_size(b)),
    "--languages",
    ",".join(langs),
    "--corpus-sentences",
    str(b.corpus),
    "--corpus-dev-sentences",
    str(max(b.corpus // 20, 100)),
    "--task-sentences",
    str(b.task_train),
    "--task-eval-sentences",
    str(b.task_eval),
  ]
  if tokenizer:
    argv += ["--tokenizer-vocab", str(b.vocab)]
  if qa:
    argv.append("--qa")
  _run(argv + ["--overwrite"])


@dataclasses.dataclass(frozen=True)
class _SeedData:
  """The data stage's outputs, which every later stage reads.

  Attributes:
    data: the synthetic dataset (corpora, POS/DP files, tokenizer).
    files: task -> language -> split -> the task's file.
    src: the source language.
    close: the close target.
    distant: the distant target.
    all_txt: the MMT's pre-training corpus (every language).
    init_dir: the teacher's random init.
  """

  data: Any
  files: dict[str, Any]
  src: str
  close: str
  distant: str
  all_txt: str
  init_dir: str

  @property
  def transfer(self) -> list[str]:
    """[source, close, distant]: the languages the teacher is scored on."""
    return [self.src, self.close, self.distant]


class _Student(NamedTuple):
  """A phase-1 student: its results key, model dir, phase-2 workdir infix
  and the languages it is scored on."""

  key: str
  model_dir: str
  sft_name: str
  langs: list[str]


def run_seed(
  out: str, seed: int, b: Budget, tasks: tuple[str, ...] = ("pos",)
) -> dict[str, Any]:
  """The whole pipeline for one seed and each task; its measurements.

  Stages, each feeding the next: data (_data_stage), the teacher's MLM,
  its task teachers, the language SFTs, every student's phase 1 (shared by
  the tasks), then per task phase 2 and test scores (_task_stage).
  """
  root = _join(out, f"seed{seed}")
  paths.mkdirs(root)
  timings = {}
  t0 = time.perf_counter()
  d = _data_stage(root, seed, b, tasks)
  timings["data"] = time.perf_counter() - t0

  t = time.perf_counter()
  teacher = _teacher_stage(root, seed, b, d)
  task_teachers = {  # POS first: its run measures the students' sizes
    task: _task_teacher(root, seed, b, task, teacher, d)
    for task in sorted(tasks, key=lambda x: x != "pos")
  }
  timings["teacher"] = time.perf_counter() - t
  t = time.perf_counter()
  sfts = _lang_sfts(root, seed, b, teacher, d)
  if sfts:
    timings["lang_sfts"] = time.perf_counter() - t

  sizes = _SizeColumns(_join(root, "eval"), b)
  # --- phase 1 of every student, shared by the tasks; the BiStil students
  # through `bistil run` (phase 1 to the report, each task), the
  # baselines' phase 2 in _task_stage
  t = time.perf_counter()
  students = [_multi_student(root, seed, b, teacher, d)]
  timings["multi"] = time.perf_counter() - t
  runs: dict[str, dict[str, str]] = {}
  for kind, tgt in (("close", d.close), ("distant", d.distant)):
    t = time.perf_counter()
    runs[kind], student = _bistil_runs(
      root, seed, b, kind, tgt, teacher, task_teachers, d, sfts
    )
    first = runs[kind][next(iter(runs[kind]))]
    sizes.given(f"bistil_{kind}", _join(first, "measure", "student.json"))
    corpora = (d.data.corpora[d.src]["train"], d.data.corpora[tgt]["train"])
    scratch = _scratch_student(root, seed, b, kind, student, corpora)
    students.append(
      _Student(f"scratch_{kind}", scratch, f"scratch_{kind}", [d.src, tgt])
    )
    timings[kind] = time.perf_counter() - t

  # --- per task: phase 2 of each student against that task's teacher,
  # then test scores
  results: dict[str, Any] = {
    "languages": {"source": d.src, "close": d.close, "distant": d.distant},
    "tasks": {},
  }
  for task in sorted(tasks, key=lambda x: x != "pos"):  # POS measures first
    t = time.perf_counter()
    models = _task_stage(
      root, seed, b, task, d, teacher, task_teachers[task], students, sizes,
      {kind: (runs[kind][task], tgt)
       for kind, tgt in (("close", d.close), ("distant", d.distant))},
    )  # fmt: skip
    results["tasks"][task] = {"metric": TASK_METRICS[task][0], "models": models}
    timings[f"task_{task}"] = time.perf_counter() - t
  if "pos" in results["tasks"]:
    # The POS entries where they were before --tasks (report, older tools).
    results["models"] = results["tasks"]["pos"]["models"]
  # The BiStil students' `bistil run` dirs (kind -> task -> DIR).
  results["runs"] = runs
  results["timings_s"] = timings
  results["total_s"] = time.perf_counter() - t0
  return results


def _data_stage(
  root: str, seed: int, b: Budget, tasks: tuple[str, ...]
) -> _SeedData:
  """Data, tokenizer and the teacher's init (a fixed family; the seed
  varies training only). Each piece is made only if missing."""

  family = _family(b)
  src, close, distant = transfer_languages(family, b)
  langs = [src, close, distant]
  langs += [c for c in family.codes if c not in langs][: b.languages - 3]
  data_dir = _join(root, "data")
  if not paths.path(_join(data_dir, "tokenizer", "tokenizer.json")).is_file():
    _synth(data_dir, langs, b, qa="qa" in tasks, tokenizer=True)
  data = synthetic.read_dataset(data_dir)
  qa_files = data.qa
  if "qa" in tasks and not qa_files:
    # An earlier run's data without QA: the same (deterministic) stories in
    # a directory of their own, so its tokenizer and files stay untouched.
    qa_dir = _join(root, "data_qa")
    if not paths.path(_join(qa_dir, "manifest.json")).is_file():
      _synth(qa_dir, langs, b, qa=True, tokenizer=False)
    qa_files = synthetic.read_dataset(qa_dir).qa
  # The dependency trees are in the POS CoNLL-U files.
  files = {"pos": data.pos, "dp": data.pos, "qa": qa_files}
  all_txt = _join(root, "all_languages.txt")
  if not paths.path(all_txt).is_file():
    paths.write_text(all_txt, mmt_corpus(data, langs, (close, distant), b))
  init_dir = _join(root, "teacher_init")
  if not paths.path(init_dir).is_dir():
    _init_teacher(init_dir, _join(data_dir, "tokenizer"), seed, b)
  return _SeedData(data, files, src, close, distant, all_txt, init_dir)


def _init_teacher(init_dir: str, tokenizer: str, seed: int, b: Budget) -> None:
  """`bistil init` of the teacher: the tiny preset at the budget's size."""
  _run(
    [
      "init",
      "--preset",
      "tiny",
      "--tokenizer",
      tokenizer,
      "--out",
      init_dir,
      "--seed",
      seed,
      "--set",
      f"num_hidden_layers={b.teacher_layers}",
      "--set",
      f"hidden_size={b.hidden}",
      "--set",
      "num_attention_heads=4",
      "--set",
      f"intermediate_size={4 * b.hidden}",
      "--set",
      f"max_position_embeddings={max(128, b.seq_len)}",
    ]
  )


def _teacher_stage(root: str, seed: int, b: Budget, d: _SeedData) -> str:
  """The teacher: MLM on all languages; its export dir."""
  return _mlm_stage(
    "pretrain",
    _join(root, "teacher_mlm"),
    b,
    b.pretrain_steps,
    seed,
    d.init_dir,
    d.all_txt,
    d.all_txt,
    "--config.optim.learning_rate=0.001",
    "--config.optim.warmup_steps=100",
  )


def _task_teacher(
  root: str, seed: int, b: Budget, task: str, teacher: str, d: _SeedData
) -> str:
  """`bistil finetune` of the teacher on the source's task data; the
  export dir."""
  workdir = _join(root, f"teacher_{task}")
  _run(
    [
      "finetune",
      "--config",
      _cfg(f"finetune.py:{task},variant=tiny"),
      "--workdir",
      workdir,
      f"--config.student.model={teacher}",
      f"--config.train.epochs={task_epochs(b, task)[0]}",
    ]
    + _task_over(b, seed, d.files[task], d.src)
  )
  return _join(workdir, "export")


def _lang_sfts(
  root: str, seed: int, b: Budget, teacher: str, d: _SeedData
) -> dict[str, str]:
  """Phase 1's language SFTs of the source and both targets (lang -> SFT
  dir); none when the budget has no language-SFT steps."""
  if not b.lang_sft_steps:
    return {}
  return {
    lang: _lang_sft(root, lang, teacher, b, seed, d.data) for lang in d.transfer
  }


def _multi_student(
  root: str, seed: int, b: Budget, teacher: str, d: _SeedData
) -> _Student:
  """Phase 1 on all languages with the full vocabulary (DistilmBERT-style),
  scored on the source and both targets."""
  model_dir = _mlm_stage(
    "distil", _join(root, "distil_multi"), b, b.distil_steps,
    seed, teacher, d.all_txt, d.all_txt,
    f"--config.student.init={b.student_init}",
  )  # fmt: skip
  return _Student("multi", model_dir, "multi", d.transfer)


def recipe_config(
  b: Budget, seed: int, task: str, d: _SeedData, tgt: str, teacher: str,
  task_teacher: str, sfts: dict[str, str], student: str = "",
):  # fmt: skip
  """The `bistil run` config of one BiStil student and task
  (configs/run.py), with the demo's budget: phase 1 from the trimmed
  teacher with the language SFTs given (trained once per language, shared
  by both targets), its last step kept (no held-out corpora), the task
  teacher given (trained once per task), size and latency at batch 8.
  `student`: the first task's phase-1 student, which the other tasks'
  runs reuse."""
  data, fs = d.data, d.files[task]
  c = configlib.load_config(_cfg(f"run.py:tiny,task={task},tgt={tgt}"))
  c.teacher = teacher
  c.student = student
  for side, lang in (("source", d.src), ("target", tgt)):
    c[side].lang = lang
    c[side].corpus = str(data.corpora[lang]["train"])
    c[side].dev = ""
  c.task.train, c.task.dev, c.task.source_test = (
    str(fs[d.src][split]) for split in ("train", "dev", "test")
  )
  c.task.target_tests = f"{tgt}={str(fs[tgt]['test'])}"
  c.lang_sft.mode = "given" if sfts else "none"
  if sfts:
    c.lang_sft.source, c.lang_sft.target = sfts[d.src], sfts[tgt]
  c.distil = configlib.load_config(_cfg("distil.py:tiny"))
  _budget(c.distil, b, b.distil_steps, seed)
  c.distil.student.init = b.student_init
  c.distil.train.select_best = ""
  c.task_teacher.model = task_teacher
  c.sft = configlib.load_config(_cfg(f"sft.py:{task},variant=tiny"))
  _budget(c.sft, b, None, seed)
  _, c.sft.train.epochs, c.sft.sparse.epochs = task_epochs(b, task)
  c.sft.sparse.num_entries = b.sparse_entries
  # Each stage keeps its best epoch on source dev (released NER/DP).
  c.sft.train.select_best = f"dev/{TASK_METRICS[task][0]}"
  c.measure.seq_len, c.measure.batch, c.measure.repeats = b.seq_len, 8, 10
  return c


def _budget(block, b: Budget, steps: int | None, seed: int) -> None:
  """The budget's seed, batch and (training stages) step settings in a
  stage's config block: what _train_over / _task_over pass as flags."""
  block.seed = seed
  block.data.batch_size = b.batch
  block.data.max_seq_len = b.seq_len
  block.train.async_checkpoints = False
  if steps is not None:
    block.train.num_steps = steps
    block.train.log_every = max(steps // 10, 1)
    block.train.checkpoint_every = steps


def _bistil_runs(
  root: str, seed: int, b: Budget, kind: str, tgt: str, teacher: str,
  task_teachers: dict[str, str], d: _SeedData, sfts: dict[str, str],
) -> tuple[dict[str, str], str]:  # fmt: skip
  """`bistil run` of the BiStil student of one target, once per task
  (POS first): the first run trims, distils and measures; the others
  reuse its student. (task -> the run's DIR, the phase-1 student)."""
  runs: dict[str, str] = {}
  student = ""
  for task in task_teachers:
    run_root = _join(root, f"bistil_{kind}_{task}")
    c = recipe_config(
      b, seed, task, d, tgt, teacher, task_teachers[task], sfts, student
    )
    log.info("$ bistil run (BiStil %s, %s) --workdir %s", kind, task, run_root)
    runner.execute(c, run_root, stages.NAMES)
    student = student or layout.student(c, run_root)
    runs[task] = run_root
  return runs, student


def _recipe_scores(run_root: str, task: str, langs) -> dict[str, Any]:
  """A table entry's scores from a recipe run's evaluate/student.json."""
  res = json.loads(paths.read_text(_join(run_root, "evaluate", "student.json")))
  head, others = TASK_METRICS[task]
  metrics = {lang: {k: res[lang][k] for k in (head, *others)} for lang in langs}
  entry: dict[str, Any] = {"scores": {k: m[head] for k, m in metrics.items()}}
  if others:
    entry["metrics"] = metrics
  return entry


def _scratch_student(
  root: str,
  seed: int,
  b: Budget,
  kind: str,
  student: str,
  corpora: tuple[str, str],
) -> str:
  """The student's architecture and vocabulary, random weights, MLM on the
  same two corpora for the same number of steps; the export dir."""
  scratch_init = _join(root, f"scratch_init_{kind}")
  if not paths.path(scratch_init).is_dir():
    _run(
      [
        "init", "--config", student, "--tokenizer", student,
        "--out", scratch_init, "--seed", 1000 + seed,
      ]
    )  # fmt: skip
  return _mlm_stage(
    "pretrain", _join(root, f"scratch_{kind}"), b, b.distil_steps,
    seed, scratch_init, *corpora,
  )  # fmt: skip


class _SizeColumns:
  """The table's size and latency columns, measured once per model key.

  The first task to ask measures (run_seed asks for POS first, with its
  POS SFT: a POS head; the encoder, which the columns are about, is the
  same for every task); later tasks reuse the numbers.
  """

  def __init__(self, ev_dir: str, b: Budget):
    paths.mkdirs(ev_dir)
    self._ev_dir = ev_dir
    self._b = b
    self._sizes: dict[str, dict[str, float]] = {}

  def given(self, key: str, measured: str) -> None:
    """The columns of `key` from a measure file (once, like a measure)."""
    if key not in self._sizes:
      self._sizes[key] = _size_of(measured)

  def __call__(
    self, key: str, model_dir: str, sft: str | None
  ) -> dict[str, float]:
    if key not in self._sizes:
      out = _join(self._ev_dir, f"{key}.measure.json")
      self._sizes[key] = _measure(model_dir, sft, self._b, out)
    return self._sizes[key]


def _task_stage(
  root: str,
  seed: int,
  b: Budget,
  task: str,
  d: _SeedData,
  teacher: str,
  task_teacher: str,
  students: list[_Student],
  size: _SizeColumns,
  bistil: dict[str, tuple[str, str]],
) -> dict[str, Any]:
  """One task's models: the teacher's test scores, the BiStil students'
  from their `bistil run` (`bistil`: kind -> (the run's DIR, target)),
  then each baseline student's phase 2 against `task_teacher` and its test
  scores. Size and latency come with the POS SFT when POS runs, else
  without an SFT (the BiStil students': the first task's run)."""
  ev_dir = _join(root, "eval")
  pre = _suffix(task)
  fs = d.files[task]
  models: dict[str, Any] = {}
  if task == "pos":
    models["majority"] = {
      "scores": majority_scores(d.data, d.src, d.transfer),
      "params": 0,
      "macs": 0,
      "latency_ms": 0.0,
    }
  models["teacher"] = _scored(
    task_teacher, None, fs, d.transfer,
    _join(ev_dir, f"{pre}teacher.json"), task, b,
    size("teacher", task_teacher if task == "pos" else teacher, None),
  )  # fmt: skip
  for kind, (run_root, tgt) in bistil.items():
    key = f"bistil_{kind}"
    models[key] = {
      **_recipe_scores(run_root, task, [d.src, tgt]),
      **size(key, "", None),
    }
  for key, model_dir, sft_name, score_langs in students:
    sft = _phase2(
      _join(root, f"sft_{pre}{sft_name}"), model_dir, task_teacher, b, seed,
      fs, d.src, task,
    )  # fmt: skip
    models[key] = _scored(
      model_dir, sft, fs, score_langs,
      _join(ev_dir, f"{pre}{key}.json"), task, b,
      size(key, model_dir, sft if task == "pos" else None),
    )  # fmt: skip
  return models


# Models trained once per seed and shown under both targets.
SHARED = ("teacher", "multi", "majority")
# Claim 1's threshold: the student keeps this share of the teacher's score.
KEEP_RATIO = 0.95

ABLATION_INITS = ("teacher_layers", "svd_embeddings", "random")
ABLATION_LOSSES = {
  "hidden+attention": ["--config.loss.hidden=1", "--config.loss.attention=1"],
  "kl+hidden": [
    "--config.loss.kl=1",
    "--config.loss.hidden=1",
    "--config.loss.attention=0",
  ],
}


def run_ablation(out: str, seed: int, b: Budget) -> list[dict[str, Any]]:
  """Student init x phase-1 loss mix on the close target (after run_seed).

  Reuses the seed's teacher, trimmed vocabulary and task teacher; each
  variant gets the same phase-1 budget and the same phase 2.
  """

  root = _join(out, f"seed{seed}")
  data = synthetic.read_dataset(_join(root, "data"))
  src, close, _ = transfer_languages(_family(b), b)
  trimmed = _join(root, "bistil_close_pos", "trim", "model")  # its run's
  teacher_pos = _join(root, "teacher_pos", "export")
  sfts = (
    {lang: _join(root, f"lang_sft_{lang}", "export") for lang in (src, close)}
    if b.lang_sft_steps
    else {}
  )
  rows_ = []
  for init in ABLATION_INITS:
    for mix, flags in ABLATION_LOSSES.items():
      tag = f"{init}_{mix.replace('+', '_')}"
      student = _mlm_stage(
        "distil", _join(root, f"abl_distil_{tag}"), b, b.distil_steps,
        seed, trimmed, data.corpora[src]["train"],
        data.corpora[close]["train"], f"--config.student.init={init}", *flags,
        *_teacher_sfts(sfts, src, close),
      )  # fmt: skip
      sft = _phase2(
        _join(root, f"abl_sft_{tag}"), student, teacher_pos, b, seed,
        data.pos, src,
      )  # fmt: skip
      scores = _evaluate(
        student, sft, data.pos, [src, close],
        _join(root, "eval", f"abl_{tag}.json"),
      )  # fmt: skip
      rows_.append(
        {
          "seed": seed,
          "init": init,
          "loss": mix,
          "source": scores[src],
          "target": scores[close],
        }
      )
  return rows_


def _mean_std(vals: list[float]) -> tuple[float, float | None]:
  """Mean and sample std; the std is None for a single seed (no spread
  can be estimated from one run)."""
  if len(vals) > 1:
    return statistics.mean(vals), statistics.stdev(vals)
  return statistics.mean(vals), None


def format_ablation(rows_: list[dict[str, Any]]) -> str:
  by = {}
  for r in rows_:
    by.setdefault((r["init"], r["loss"]), []).append(r)
  lines = [
    "| student init | phase-1 loss | seeds | source acc | close-target acc |",
    "|---|---|---:|---:|---:|",
  ]
  for (init, loss), rs in by.items():
    src = _mean_std([r["source"] for r in rs])
    tgt = _mean_std([r["target"] for r in rs])
    lines.append(f"| {init} | {loss} | {len(rs)} | {_pm(src)} | {_pm(tgt)} |")
  return "\n".join(lines)


# ------------------------------------------------------------------ report
def seed_tasks(res: dict[str, Any]) -> list[str]:
  """The tasks of one seed's results (a result from before --tasks: POS)."""
  return list(res["tasks"]) if "tasks" in res else ["pos"]


def _task_models_of(res: dict[str, Any], task: str) -> dict[str, Any]:
  if "tasks" in res:
    return res["tasks"].get(task, {}).get("models", {})
  return res["models"] if task == "pos" else {}


def rows(
  all_results: list[dict[str, Any]], task: str = "pos"
) -> list[dict[str, Any]]:
  """Per (target kind, model) of a task: mean (and std over seeds, None
  for one seed) of each measurement; scores are the task's headline metric
  (TASK_METRICS), its other metrics under "source_M"/"target_M"."""
  out = []
  head, others = TASK_METRICS[task]
  for kind in ("close", "distant"):
    for model in task_models(task):
      key = model if model in SHARED else f"{model}_{kind}"
      per_seed = [
        (r, _task_models_of(r, task))
        for r in all_results
        if key in _task_models_of(r, task)
      ]
      if not per_seed:
        continue
      langs = per_seed[0][0]["languages"]
      tgt, src = langs[kind], langs["source"]

      def stat(f, key=key, per_seed=per_seed):
        return _mean_std([f(ms[key]) for _, ms in per_seed])

      row = {
        "task": task,
        "metric": head,
        "target": f"{kind} ({tgt})",
        "model": model,
        "params": stat(lambda m: m["params"])[0],
        "macs": stat(lambda m: m["macs"])[0],
        "latency_ms": stat(lambda m: m["latency_ms"]),
        "source": stat(lambda m, s=src: m["scores"][s]),
        "target_score": stat(lambda m, t=tgt: m["scores"][t]),
        "seeds": len(per_seed),
        "per_seed": {
          str(r["seed"]): {
            "source": ms[key]["scores"][src],
            "target": ms[key]["scores"][tgt],
          }
          for r, ms in per_seed
        },
      }
      for metric in others:
        for which, lang in (("source", src), ("target", tgt)):
          row[f"{which}_{metric}"] = stat(
            lambda m, lang=lang, metric=metric: m["metrics"][lang][metric]
          )
      for which, lang in (("vs_teacher", tgt), ("source_vs_teacher", src)):
        tvals = [ms["teacher"]["scores"][lang] for _, ms in per_seed]
        mvals = [ms[key]["scores"][lang] for _, ms in per_seed]
        # A teacher at 0 (an untrained QA head can score F1 0) has no ratio.
        row[which] = (
          statistics.mean(m / t for m, t in zip(mvals, tvals, strict=True))
          if all(tvals)
          else float("nan")
        )
      out.append(row)
  return out


def _pm(v) -> str:
  """mean ± std, or the mean alone for one seed."""
  return f"{v[0]:.3f}" if v[1] is None else f"{v[0]:.3f} ± {v[1]:.3f}"


def _pct(ratio: float) -> str:
  return "–" if ratio != ratio else f"{100 * ratio:.0f}%"  # NaN: no ratio


def format_table(table: list[dict[str, Any]]) -> str:
  """The markdown table of rows() (of one task)."""
  short = METRIC_LABELS[table[0].get("task", "pos") if table else "pos"][0]
  head = (
    f"| target | model | params | MACs/seq | CPU ms (8x64) | source {short} | "
    f"target {short} | target vs teacher |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|"
  )
  lines = [head]
  for r in table:
    if r["model"] == "majority":
      size = "– | – | –"
    else:
      size = (
        f"{r['params'] / 1e3:.0f}k | {r['macs'] / 1e6:.2f}M | "
        f"{r['latency_ms'][0]:.2f}"
      )
    lines.append(
      f"| {r['target']} | {MODEL_NAMES[r['model']]} | {size} | "
      f"{_pm(r['source'])} | {_pm(r['target_score'])} | "
      f"{_pct(r['vs_teacher'])} |"
    )
  return "\n".join(lines)


def claims(table: list[dict[str, Any]]) -> list[tuple[str, bool, str]]:
  """The paper's three claims (docs/method.md section 0), each checked on this
  run's mean scores of one task: (claim, holds, the numbers that decide
  it)."""
  by = {(r["target"].split()[0], r["model"]): r for r in table}
  kinds = [k for k in ("close", "distant") if (k, "bistil") in by]
  metric = METRIC_LABELS[table[0].get("task", "pos") if table else "pos"][1]

  def acc(kind, model):
    return by[(kind, model)]["target_score"][0]

  keep = [
    by[(k, "bistil")]["vs_teacher"] >= KEEP_RATIO
    and by[(k, "bistil")]["params"] < by[(k, "teacher")]["params"]
    and by[(k, "bistil")]["latency_ms"][0] < by[(k, "teacher")]["latency_ms"][0]
    for k in kinds
  ]
  out = [
    (
      f"BiStil keeps >= {KEEP_RATIO:.0%} of the teacher's target {metric} "
      "while smaller and faster",
      all(keep),
      ", ".join(
        f"{k} {_pct(by[(k, 'bistil')]['vs_teacher'])}, "
        f"{by[(k, 'bistil')]['params'] / 1e3:.0f}k vs "
        f"{by[(k, 'teacher')]['params'] / 1e3:.0f}k params, "
        f"{by[(k, 'bistil')]['latency_ms'][0]:.2f} vs "
        f"{by[(k, 'teacher')]['latency_ms'][0]:.2f} ms"
        for k in kinds
      ),
    )
  ]
  for other, what in (
    ("multi", "the multilingually distilled student of the same depth"),
    ("scratch", "the bilingual model trained from scratch"),
  ):
    out.append(
      (
        f"BiStil beats {what} on the target",
        all(acc(k, "bistil") > acc(k, other) for k in kinds),
        ", ".join(
          f"{k} {acc(k, 'bistil'):.3f} vs {acc(k, other):.3f}" for k in kinds
        ),
      )
    )
  return out


def format_claims(table: list[dict[str, Any]]) -> str:
  return "\n".join(
    f"- {'holds' if ok else 'does NOT hold'}: {text} ({nums})."
    for text, ok, nums in claims(table)
  )


def plots(out: str, all_results, table, tables=None) -> list[str]:
  """Training curves of the first seed and the size/score trade-off (one
  panel per task of `tables`, task -> rows; default POS `table`)."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:  # pragma: no cover - a runtime dependency
    log.warning("matplotlib missing: no plots")
    return []

  written = []
  seed = all_results[0]["seed"]
  root = _join(out, f"seed{seed}")
  close_runs = all_results[0].get("runs", {}).get("close", {})
  phase1 = (  # the close target's first `bistil run` distilled its student
    _join(next(iter(close_runs.values())), "distil", "workdir")
    if close_runs
    else _join(root, "distil_close")
  )
  curves = (
    (_join(root, "teacher_mlm"), "train/mlm", "teacher",
     "teacher: MLM pre-training", "MLM loss"),
    (phase1, "train/loss", "bistil", "BiStil phase 1 (close target)",
     "distillation loss"),
    (_join(root, "scratch_close"), "train/mlm", "scratch",
     "scratch bilingual (close)", "MLM loss"),
  )  # fmt: skip
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for ax, (run, key, model, title, ylabel) in zip(axes, curves, strict=True):
    rows_ = [r for r in loop.read_metrics(_join(run, "metrics")) if key in r]
    ax.plot(
      [r["step"] for r in rows_], [r[key] for r in rows_],
      color=COLOURS[model],
    )  # fmt: skip
    ax.set_title(title)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
  fig.suptitle(f"Training curves (seed {seed})")
  fig.tight_layout()
  path = _join(out, "training_curves.png")
  _savefig(fig, path)
  plt.close(fig)
  written.append(path)

  tables = tables or {"pos": table}
  fig, axes = plt.subplots(
    1, len(tables), figsize=(6.5 * len(tables), 4.2), squeeze=False
  )
  for ax, (task, tab) in zip(axes[0], tables.items(), strict=True):
    for r in tab:
      kind = r["target"].split()[0]
      x = r["params"] / 1e3
      ax.errorbar(
        x,
        r["target_score"][0],
        yerr=r["target_score"][1],
        fmt="o" if kind == "close" else "s",
        color=COLOURS[r["model"]],
        label=f"{MODEL_NAMES[r['model']]}, {r['target']}",
      )
    ax.set_title(f"Zero-shot target {TASK_TITLES[task].split(' (')[0]}")
    ax.set_xlabel(
      "parameters (thousands; majority tag at 0)"
      if task == "pos"
      else "parameters (thousands)"
    )
    ax.set_ylabel(f"target {TASK_TITLES[task].split(' (')[0]} (test)")
    ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  path = _join(out, "tradeoff.png")
  _savefig(fig, path)
  plt.close(fig)
  written.append(path)
  return written


def _claims_json(table):
  return [
    {"claim": c, "holds": ok, "numbers": nums} for c, ok, nums in claims(table)
  ]


def write_report(out: str, all_results, budget: Budget, quick: bool) -> str:
  """report.md and results.json of a run: a table and claims per task.

  Returns:
    The printed text: every task's heading, table and claims.
  """
  tasks = seed_tasks(all_results[0])
  tables = {task: rows(all_results, task) for task in tasks}
  pngs = plots(out, all_results, tables.get("pos", []), tables)
  langs = all_results[0]["languages"]
  n = len(all_results)
  spread = "mean ± std over seeds" if n > 1 else "one seed: no spread is shown"
  names = ", ".join(t.upper() for t in tasks)
  md = [
    "# bistil demo report",
    "",
    f"Synthetic family seed 0: source {langs['source']}, close target "
    f"{langs['close']}, distant target {langs['distant']}; "
    f"task{'s' if len(tasks) > 1 else ''} {names}; "
    f"{n} seed(s) ({'quick' if quick else 'full'} budget).",
    f"Scores are each task's metric on each language's test set ({spread}); "
    "'target vs teacher' is the mean per-seed ratio. Size and latency "
    "columns are measured once per model (with its POS head when POS runs).",
    "",
  ]
  printed = []
  for task, table in tables.items():
    section = [
      f"## {TASK_TITLES[task]}",
      "",
      format_table(table),
      "",
      f"The paper's claims on this run ({task.upper()}):",
      "",
      format_claims(table),
      "",
    ]
    md += section
    printed.append("\n".join(section).rstrip())
  run_reports = [
    f"seed{res['seed']}/{paths.path(root).name}/report/report.md"
    for res in all_results
    for by_task in res.get("runs", {}).values()
    for root in by_task.values()
  ]
  if run_reports:
    md += [
      "The BiStil rows come from `bistil run`, one per seed, target and "
      "task; each run's own report (teacher vs student on its pair, "
      "sizes, speed-up): "
      + ", ".join(run_reports[:4])
      + (f" and {len(run_reports) - 4} more." if len(run_reports) > 4 else "."),
      "",
    ]
  md += [
    f"Budget: {json.dumps(dataclasses.asdict(budget))}",
    "",
    *[f"![{paths.path(p).name}]({paths.path(p).name})" for p in pngs],
    "",
  ]
  paths.write_text(_join(out, "report.md"), "\n".join(md))
  res = {
    "budget": dataclasses.asdict(budget),
    "quick": quick,
    "task_names": tasks,
    "seeds": all_results,
    "tasks": {
      task: {
        "metric": TASK_METRICS[task][0],
        "title": TASK_TITLES[task],
        "table": table,
        "claims": _claims_json(table),
      }
      for task, table in tables.items()
    },
  }
  if "pos" in tables:  # the POS keys from before --tasks
    res["table"] = tables["pos"]
    res["claims"] = _claims_json(tables["pos"])
  paths.write_text(_join(out, "results.json"), json.dumps(res, indent=2))
  return "\n\n".join(printed)


def _report_sections(text: str) -> dict[str, list[str]]:
  """report.md's lines under each `## ` heading."""
  sections: dict[str, list[str]] = {}
  current = None
  for line in text.splitlines():
    if line.startswith("## "):
      current = sections.setdefault(line[3:].strip(), [])
    elif current is not None:
      current.append(line)
  return sections


def _check_table(task: str, table, claims_, lines: list[str]) -> None:
  import math

  want = {(k, m) for k in ("close", "distant") for m in task_models(task)}
  got = {(r["target"].split()[0], r["model"]) for r in table}
  if got != want:
    raise BistilError(
      f"results table rows ({task}) {sorted(got)} != {sorted(want)}"
    )
  for r in table:
    sized = ("params", "macs") if r["model"] != "majority" else ()
    for key in sized:
      if not r[key] > 0:
        raise BistilError(
          f"{task} {r['model']}/{r['target']}: {key} = {r[key]}"
        )
    for key in ("source", "target_score", "latency_ms"):
      mean = r[key][0]
      if not math.isfinite(mean) or mean < 0:
        raise BistilError(f"{task} {r['model']}/{r['target']}: {key} = {mean}")
  if len(claims_) != 3:
    raise BistilError(f"results.json has {len(claims_)} {task} claims, not 3")
  rows_md = [line for line in lines if line.startswith("| ")]
  if len(rows_md) != 1 + len(want):
    raise BistilError(f"report.md has {len(rows_md) - 1} {task} table rows")
  verdicts = [ln for ln in lines if ln.startswith("- ") and "hold" in ln]
  if len(verdicts) != 3:
    raise BistilError(f"report.md states {len(verdicts)} {task} claims, not 3")


def check_report(out: str, tasks: tuple[str, ...] | None = None) -> None:
  """Checks the structure (not the numbers) of a demo output directory:
  a table and three claims per task in results.json and report.md.

  Args:
    out: the demo's output directory.
    tasks: the tasks it must hold (default: those results.json names).

  Raises:
    BistilError: a missing file, key, task table, model row or non-finite
      score.
  """
  for name in (
    "report.md",
    "results.json",
    "training_curves.png",
    "tradeoff.png",
  ):
    if not paths.path(_join(out, name)).is_file():
      raise BistilError(f"demo output {out} lacks {name}")
  res = json.loads(paths.read_text(_join(out, "results.json")))
  for key in ("budget", "seeds", "tasks", "task_names"):
    if key not in res:
      raise BistilError(f"results.json lacks {key!r}")
  tasks = tuple(tasks or res["task_names"])
  sections = _report_sections(paths.read_text(_join(out, "report.md")))
  for task in tasks:
    if task not in res["tasks"]:
      raise BistilError(f"results.json lacks the {task} table")
    if TASK_TITLES[task] not in sections:
      raise BistilError(f"report.md lacks the section '## {TASK_TITLES[task]}'")
    entry = res["tasks"][task]
    _check_table(
      task, entry["table"], entry["claims"], sections[TASK_TITLES[task]]
    )
  if "pos" in tasks:
    for key in ("table", "claims"):
      if key not in res:
        raise BistilError(f"results.json lacks {key!r}")
    _check_table(
      "pos", res["table"], res["claims"], sections[TASK_TITLES["pos"]]
    )


# ------------------------------------------------------------------ cli
def run(args: argparse.Namespace) -> int:
  """`bistil demo` (its options: recipe/commands.py)."""
  budget = QUICK if args.quick else Budget()
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  if not seeds:
    raise BistilError("--seeds needs at least one seed")
  tasks = parse_tasks(getattr(args, "tasks", "pos"))
  if args.ablation and "pos" not in tasks:
    raise BistilError("--ablation compares POS students: add pos to --tasks")
  start = time.perf_counter()
  paths.mkdirs(args.out)
  log.info("demo on %s; output in %s", jax.devices()[0].platform, args.out)
  all_results = []
  for seed in seeds:
    res = run_seed(args.out, seed, budget, tasks)
    res["seed"] = seed
    all_results.append(res)
  table = write_report(args.out, all_results, budget, args.quick)
  check_report(args.out, tasks)
  print(table)
  if args.ablation:
    abl = [r for seed in seeds for r in run_ablation(args.out, seed, budget)]
    text = format_ablation(abl)
    paths.write_text(
      _join(args.out, "ablation.json"), json.dumps(abl, indent=2)
    )
    report = _join(args.out, "report.md")
    paths.write_text(
      report,
      paths.read_text(report)
      + "\n## Student initialisation x phase-1 loss (close target)\n\n"
      + text
      + "\n",
    )
    print("\n" + text)
  print(
    f"\nwrote {args.out}/report.md, results.json and plots in "
    f"{time.perf_counter() - start:.0f} s"
  )
  return 0
