"""`bistil demo`: the whole BiStil pipeline on synthetic languages, on a CPU.

For each seed: synthesise related languages (corpora + POS), train a
WordPiece tokenizer on all of them, MLM-pretrain a small multilingual
teacher, task-tune it on the source language, and for two targets (one
close to the source, one distant) build and compare, on the same budget:

  bistil      trimmed bilingual vocabulary -> phase 1 -> phase 2 (LT-SFT)
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
import os
import shutil
import statistics
import time
from typing import Any

from bistil_jax import cli, configlib
from bistil_jax.errors import BistilError

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


@dataclasses.dataclass(frozen=True)
class Budget:
  """Sizes of one demo run (full: ~15 min per seed on 2 cores)."""

  languages: int = 6  # family languages used (teacher + multi baseline)
  corpus: int = 6000  # sentences per language
  task_train: int = 1500
  task_eval: int = 400
  vocab: int = 3000
  teacher_layers: int = 4
  hidden: int = 64
  pretrain_steps: int = 2500
  distil_steps: int = 800  # phase 1, and the scratch MLM budget
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
  # Transfer languages of family 0. b1 and b2 share about two thirds of
  # their word tokens (names, digits, punctuation aside), as closely
  # related languages do; a1 has another lexicon, SOV order, postpositions
  # and case (family.json, written by `bistil synth`, lists all of it).
  source: str = "b1"
  close: str = "b2"
  distant: str = "a1"


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
)


def _run(argv: list[str]) -> None:
  """One public CLI command; a failure stops the demo with its message."""
  argv = [str(a) for a in argv]
  log.info("$ bistil %s", " ".join(argv))
  code = cli.main(argv)
  if code != 0:
    raise BistilError(f"demo stage failed (exit {code}): bistil {argv[0]}")


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


def _task_over(b: Budget, seed: int, data, src: str) -> list[str]:
  return [
    f"--config.seed={seed}",
    f"--config.data.batch_size={b.batch}",
    f"--config.data.max_seq_len={b.seq_len}",
    f"--config.data.train={data.pos[src]['train']}",
    f"--config.eval.sets=dev={data.pos[src]['dev']}",
    "--config.train.async_checkpoints=false",
  ]


def _evaluate(model: str, sft: str | None, data, langs, out: str) -> dict:
  argv = ["evaluate", "--model", model, "--task", "pos", "--out", out]
  if sft:
    argv += ["--sft", sft]
  for lang in langs:
    argv += ["--data", f"{lang}={data.pos[lang]['test']}"]
  _run(argv)
  with open(out) as f:
    res = json.load(f)
  return {lang: res[lang]["accuracy"] for lang in langs}


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
  with open(out) as f:
    res = json.load(f)
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
  return os.path.join(workdir, "export")


def _phase2(
  workdir: str, student: str, teacher_pos: str, b: Budget, seed, data, src
) -> str:
  """`bistil sft` of a student against the task teacher; the SFT dir."""
  _run(
    [
      "sft",
      "--config",
      _cfg("sft.py:pos,variant=tiny"),
      "--workdir",
      workdir,
      f"--config.student.model={student}",
      f"--config.teacher.model={teacher_pos}",
      f"--config.train.epochs={b.dense_epochs}",
      f"--config.sparse.epochs={b.sparse_epochs}",
      f"--config.sparse.num_entries={b.sparse_entries}",
      # Each stage keeps its best epoch on source dev (released NER/DP).
      "--config.train.select_best=dev/accuracy",
    ]
    + _task_over(b, seed, data, src)
  )
  return os.path.join(workdir, "export")


def _scored(model_dir, sft, data, langs, out: str, b: Budget) -> dict:
  """Test scores per language, size, MACs and latency of a model + SFT."""
  return {
    "scores": _evaluate(model_dir, sft, data, langs, out),
    **_measure(model_dir, sft, b, os.path.splitext(out)[0] + ".measure.json"),
  }


def majority_scores(data, src: str, langs) -> dict[str, float]:
  """Accuracy of tagging every word with the source training set's most
  frequent tag: the floor a transferring model must clear."""
  import collections

  from bistil_jax.data import tasks

  train = tasks.read_task("pos", str(data.pos[src]["train"]))
  counts = collections.Counter(t for ex in train for t in ex.labels)
  top = counts.most_common(1)[0][0]
  scores = {}
  for lang in langs:
    test = tasks.read_task("pos", str(data.pos[lang]["test"]))
    tags = [t for ex in test for t in ex.labels]
    scores[lang] = sum(t == top for t in tags) / len(tags)
  return scores


def transfer_languages(family, b: Budget) -> tuple[str, str, str]:
  """(source, close, distant) of a budget, checked against the family."""
  if not family.related(b.source, b.close):
    raise BistilError(f"{b.close} is not related to {b.source}")
  if family.related(b.source, b.distant):
    raise BistilError(f"{b.distant} is related to {b.source}")
  return b.source, b.close, b.distant


def run_seed(out: str, seed: int, b: Budget) -> dict[str, Any]:
  """The whole pipeline for one seed; returns its measurements."""
  from bistil_jax import synthetic

  root = os.path.join(out, f"seed{seed}")
  os.makedirs(root, exist_ok=True)
  timings = {}
  t0 = time.perf_counter()

  # --- data, tokenizer, teacher init (fixed family; seeds vary training)
  family = synthetic.make_family(0)
  src, close, distant = transfer_languages(family, b)
  langs = [src, close, distant]
  langs += [c for c in family.codes if c not in langs][: b.languages - 3]
  data_dir = os.path.join(root, "data")
  if not os.path.isfile(os.path.join(data_dir, "tokenizer", "tokenizer.json")):
    _run(
      [
        "synth",
        "--out",
        data_dir,
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
        "--tokenizer-vocab",
        str(b.vocab),
        "--overwrite",
      ]
    )
  data = synthetic.read_dataset(data_dir)
  all_txt = os.path.join(root, "all_languages.txt")
  if not os.path.isfile(all_txt):
    with open(all_txt, "w") as f:
      for lang in langs:
        with open(data.corpora[lang]["train"]) as g:
          shutil.copyfileobj(g, f)
  init_dir = os.path.join(root, "teacher_init")
  if not os.path.isdir(init_dir):
    _run(
      [
        "init",
        "--preset",
        "tiny",
        "--tokenizer",
        os.path.join(data_dir, "tokenizer"),
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
  timings["data"] = time.perf_counter() - t0

  # --- teacher: MLM on all languages, then task-tuned on the source
  t = time.perf_counter()
  teacher = _mlm_stage(
    "pretrain",
    os.path.join(root, "teacher_mlm"),
    b,
    b.pretrain_steps,
    seed,
    init_dir,
    all_txt,
    all_txt,
    "--config.optim.learning_rate=0.001",
    "--config.optim.warmup_steps=100",
  )
  teacher_task = os.path.join(root, "teacher_pos")
  _run(
    [
      "finetune",
      "--config",
      _cfg("finetune.py:pos,variant=tiny"),
      "--workdir",
      teacher_task,
      f"--config.student.model={teacher}",
      f"--config.train.epochs={b.finetune_epochs}",
    ]
    + _task_over(b, seed, data, src)
  )
  teacher_pos = os.path.join(teacher_task, "export")
  timings["teacher"] = time.perf_counter() - t

  results: dict[str, Any] = {
    "languages": {"source": src, "close": close, "distant": distant},
    "models": {},
  }
  ev_dir = os.path.join(root, "eval")
  os.makedirs(ev_dir, exist_ok=True)
  models = results["models"]
  models["majority"] = {
    "scores": majority_scores(data, src, [src, close, distant]),
    "params": 0,
    "macs": 0,
    "latency_ms": 0.0,
  }
  models["teacher"] = _scored(
    teacher_pos, None, data, [src, close, distant],
    os.path.join(ev_dir, "teacher.json"), b,
  )  # fmt: skip

  # --- multilingual distilled baseline: phase 1 on all languages, once
  t = time.perf_counter()
  multi = _mlm_stage(
    "distil", os.path.join(root, "distil_multi"), b, b.distil_steps, seed,
    teacher, all_txt, all_txt,
  )  # fmt: skip
  multi_sft = _phase2(
    os.path.join(root, "sft_multi"), multi, teacher_pos, b, seed, data, src
  )
  models["multi"] = _scored(
    multi, multi_sft, data, [src, close, distant],
    os.path.join(ev_dir, "multi.json"), b,
  )  # fmt: skip
  timings["multi"] = time.perf_counter() - t

  # --- per target: trim, BiStil phase 1 + 2, scratch bilingual + phase 2
  for kind, tgt in (("close", close), ("distant", distant)):
    t = time.perf_counter()
    trimmed = os.path.join(root, f"trimmed_{kind}")
    if not os.path.isfile(os.path.join(trimmed, "config.json")):
      _run(
        [
          "trim-vocab",
          "--model",
          teacher,
          "--source",
          data.corpora[src]["train"],
          "--target",
          data.corpora[tgt]["train"],
          "--out",
          trimmed,
          "--quiet",
          "--overwrite",
        ]
      )
    corpora = (data.corpora[src]["train"], data.corpora[tgt]["train"])
    student = _mlm_stage(
      "distil", os.path.join(root, f"distil_{kind}"), b, b.distil_steps,
      seed, trimmed, *corpora,
    )  # fmt: skip
    # Scratch: the student's architecture and vocabulary, random weights,
    # MLM on the same two corpora for the same number of steps.
    scratch_init = os.path.join(root, f"scratch_init_{kind}")
    if not os.path.isdir(scratch_init):
      _run(
        [
          "init", "--config", student, "--tokenizer", student,
          "--out", scratch_init, "--seed", 1000 + seed,
        ]
      )  # fmt: skip
    scratch = _mlm_stage(
      "pretrain", os.path.join(root, f"scratch_{kind}"), b, b.distil_steps,
      seed, scratch_init, *corpora,
    )  # fmt: skip
    for name, model_dir, sft_name in (
      ("bistil", student, kind),
      ("scratch", scratch, f"scratch_{kind}"),
    ):
      sft = _phase2(
        os.path.join(root, f"sft_{sft_name}"), model_dir, teacher_pos, b,
        seed, data, src,
      )  # fmt: skip
      models[f"{name}_{kind}"] = _scored(
        model_dir, sft, data, [src, tgt],
        os.path.join(ev_dir, f"{name}_{kind}.json"), b,
      )  # fmt: skip
    timings[kind] = time.perf_counter() - t
  results["timings_s"] = timings
  results["total_s"] = time.perf_counter() - t0
  return results


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
  from bistil_jax import synthetic

  root = os.path.join(out, f"seed{seed}")
  data = synthetic.read_dataset(os.path.join(root, "data"))
  src, close, _ = transfer_languages(synthetic.make_family(0), b)
  trimmed = os.path.join(root, "trimmed_close")
  teacher_pos = os.path.join(root, "teacher_pos", "export")
  rows_ = []
  for init in ABLATION_INITS:
    for mix, flags in ABLATION_LOSSES.items():
      tag = f"{init}_{mix.replace('+', '_')}"
      student = _mlm_stage(
        "distil", os.path.join(root, f"abl_distil_{tag}"), b, b.distil_steps,
        seed, trimmed, data.corpora[src]["train"],
        data.corpora[close]["train"], f"--config.student.init={init}", *flags,
      )  # fmt: skip
      sft = _phase2(
        os.path.join(root, f"abl_sft_{tag}"), student, teacher_pos, b, seed,
        data, src,
      )  # fmt: skip
      scores = _evaluate(
        student, sft, data, [src, close],
        os.path.join(root, "eval", f"abl_{tag}.json"),
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
def rows(all_results: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per (target kind, model): mean (and std over seeds, None for one
  seed) of each measurement."""
  out = []
  for kind in ("close", "distant"):
    for model in MODELS:
      key = model if model in SHARED else f"{model}_{kind}"
      per_seed = [r for r in all_results if key in r["models"]]
      if not per_seed:
        continue
      langs = per_seed[0]["languages"]
      tgt, src = langs[kind], langs["source"]

      def stat(f, key=key, per_seed=per_seed):
        return _mean_std([f(r["models"][key]) for r in per_seed])

      row = {
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
            "source": r["models"][key]["scores"][src],
            "target": r["models"][key]["scores"][tgt],
          }
          for r in per_seed
        },
      }
      for which, lang in (("vs_teacher", tgt), ("source_vs_teacher", src)):
        tvals = [r["models"]["teacher"]["scores"][lang] for r in per_seed]
        mvals = [r["models"][key]["scores"][lang] for r in per_seed]
        row[which] = statistics.mean(
          m / t for m, t in zip(mvals, tvals, strict=True)
        )
      out.append(row)
  return out


def _pm(v) -> str:
  """mean ± std, or the mean alone for one seed."""
  return f"{v[0]:.3f}" if v[1] is None else f"{v[0]:.3f} ± {v[1]:.3f}"


def format_table(table: list[dict[str, Any]]) -> str:
  head = (
    "| target | model | params | MACs/seq | CPU ms (8x64) | source acc | "
    "target acc | target vs teacher |\n|---|---|---:|---:|---:|---:|---:|---:|"
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
      f"{100 * r['vs_teacher']:.0f}% |"
    )
  return "\n".join(lines)


def claims(table: list[dict[str, Any]]) -> list[tuple[str, bool, str]]:
  """The paper's three claims (METHOD.md section 0), each checked on this
  run's mean scores: (claim, holds, the numbers that decide it)."""
  by = {(r["target"].split()[0], r["model"]): r for r in table}
  kinds = [k for k in ("close", "distant") if (k, "bistil") in by]

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
      f"BiStil keeps >= {KEEP_RATIO:.0%} of the teacher's target accuracy "
      "while smaller and faster",
      all(keep),
      ", ".join(
        f"{k} {100 * by[(k, 'bistil')]['vs_teacher']:.0f}%, "
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


def plots(out: str, all_results, table) -> list[str]:
  """Training curves of the first seed and the size/accuracy trade-off."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:  # pragma: no cover - a runtime dependency
    log.warning("matplotlib missing: no plots")
    return []
  from bistil_jax.train import loop

  written = []
  seed = all_results[0]["seed"]
  root = os.path.join(out, f"seed{seed}")
  curves = (
    ("teacher_mlm", "train/mlm", "teacher", "teacher: MLM pre-training",
     "MLM loss"),
    ("distil_close", "train/loss", "bistil", "BiStil phase 1 (close target)",
     "distillation loss"),
    ("scratch_close", "train/mlm", "scratch", "scratch bilingual (close)",
     "MLM loss"),
  )  # fmt: skip
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for ax, (run, key, model, title, ylabel) in zip(axes, curves, strict=True):
    rows_ = [
      r
      for r in loop.read_metrics(os.path.join(root, run, "metrics"))
      if key in r
    ]
    ax.plot(
      [r["step"] for r in rows_], [r[key] for r in rows_],
      color=COLOURS[model],
    )  # fmt: skip
    ax.set_title(title)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
  fig.suptitle(f"Training curves (seed {seed})")
  fig.tight_layout()
  path = os.path.join(out, "training_curves.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  written.append(path)

  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for r in table:
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
  ax.set_title("Zero-shot target accuracy against model size")
  ax.set_xlabel("parameters (thousands; majority tag at 0)")
  ax.set_ylabel("target POS accuracy (test)")
  ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  path = os.path.join(out, "tradeoff.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  written.append(path)
  return written


def write_report(out: str, all_results, budget: Budget, quick: bool) -> str:
  table = rows(all_results)
  text = format_table(table)
  pngs = plots(out, all_results, table)
  langs = all_results[0]["languages"]
  n = len(all_results)
  spread = "mean ± std over seeds" if n > 1 else "one seed: no spread is shown"
  md = [
    "# bistil demo report",
    "",
    f"Synthetic family seed 0: source {langs['source']}, close target "
    f"{langs['close']}, distant target {langs['distant']}; task POS; "
    f"{n} seed(s) ({'quick' if quick else 'full'} budget).",
    f"Scores are accuracy on each language's test set ({spread}); 'target "
    "vs teacher' is the mean per-seed ratio.",
    "",
    text,
    "",
    "The paper's claims on this run:",
    "",
    format_claims(table),
    "",
    f"Budget: {json.dumps(dataclasses.asdict(budget))}",
    "",
    *[f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs],
    "",
  ]
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(md))
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(
      {
        "budget": dataclasses.asdict(budget),
        "quick": quick,
        "seeds": all_results,
        "table": table,
        "claims": [
          {"claim": c, "holds": ok, "numbers": nums}
          for c, ok, nums in claims(table)
        ],
      },
      f,
      indent=2,
    )
  return text + "\n\n" + format_claims(table)


def check_report(out: str) -> None:
  """Checks the structure (not the numbers) of a demo output directory.

  Raises:
    BistilError: a missing file, key, model row or non-finite score.
  """
  import math

  for name in (
    "report.md",
    "results.json",
    "training_curves.png",
    "tradeoff.png",
  ):
    if not os.path.isfile(os.path.join(out, name)):
      raise BistilError(f"demo output {out} lacks {name}")
  with open(os.path.join(out, "results.json")) as f:
    res = json.load(f)
  for key in ("budget", "seeds", "table", "claims"):
    if key not in res:
      raise BistilError(f"results.json lacks {key!r}")
  want = {(k, m) for k in ("close", "distant") for m in MODELS}
  got = {(r["target"].split()[0], r["model"]) for r in res["table"]}
  if got != want:
    raise BistilError(f"results table rows {sorted(got)} != {sorted(want)}")
  for r in res["table"]:
    sized = ("params", "macs") if r["model"] != "majority" else ()
    for key in sized:
      if not r[key] > 0:
        raise BistilError(f"{r['model']}/{r['target']}: {key} = {r[key]}")
    for key in ("source", "target_score", "latency_ms"):
      mean = r[key][0]
      if not math.isfinite(mean) or mean < 0:
        raise BistilError(f"{r['model']}/{r['target']}: {key} = {mean}")
  if len(res["claims"]) != 3:
    raise BistilError(f"results.json has {len(res['claims'])} claims, not 3")
  with open(os.path.join(out, "report.md")) as f:
    text = f.read()
  rows_md = [line for line in text.splitlines() if line.startswith("| ")]
  if len(rows_md) != 1 + len(want):
    raise BistilError(f"report.md has {len(rows_md) - 1} table rows")
  verdicts = [
    ln for ln in text.splitlines() if ln.startswith("- ") and "hold" in ln
  ]
  if len(verdicts) != 3:
    raise BistilError(f"report.md states {len(verdicts)} claims, not 3")


# ------------------------------------------------------------------ cli
def register(subparsers: argparse._SubParsersAction) -> None:
  p = subparsers.add_parser(
    "demo",
    help="the whole pipeline on synthetic languages, with a results table",
    description=__doc__.split("\n\n")[0],
  )
  p.add_argument("--out", default="bistil_demo", help="output dir")
  p.add_argument("--quick", action="store_true", help="~4 minute version")
  p.add_argument("--seeds", default="0", help="comma-separated seeds")
  p.add_argument(
    "--ablation",
    action="store_true",
    help="also compare student inits x phase-1 loss mixes (close target, "
    "every seed of --seeds)",
  )
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  import jax

  budget = QUICK if args.quick else Budget()
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  if not seeds:
    raise BistilError("--seeds needs at least one seed")
  start = time.perf_counter()
  os.makedirs(args.out, exist_ok=True)
  log.info("demo on %s; output in %s", jax.devices()[0].platform, args.out)
  all_results = []
  for seed in seeds:
    res = run_seed(args.out, seed, budget)
    res["seed"] = seed
    all_results.append(res)
  table = write_report(args.out, all_results, budget, args.quick)
  check_report(args.out)
  print(table)
  if args.ablation:
    abl = [r for seed in seeds for r in run_ablation(args.out, seed, budget)]
    text = format_ablation(abl)
    with open(os.path.join(args.out, "ablation.json"), "w") as f:
      json.dump(abl, f, indent=2)
    with open(os.path.join(args.out, "report.md"), "a") as f:
      f.write("\n## Student initialisation x phase-1 loss (close target)\n\n")
      f.write(text + "\n")
    print("\n" + text)
  print(
    f"\nwrote {args.out}/report.md, results.json and plots in "
    f"{time.perf_counter() - start:.0f} s"
  )
  return 0
