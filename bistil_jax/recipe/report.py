"""The recipe's report: DIR/report/report.md, results.json and scores.png.

Everything is read from the stages' outputs (evaluate/*.json,
measure/*.json, the phase-1 metrics, the stage records), so the report
stage can be rerun alone.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any

from bistil_jax import paths
from bistil_jax import tasks as tasks_lib
from bistil_jax.recipe import state
from bistil_jax.recipe.layout import eval_sets, join, merged, workdir
from bistil_jax.train import loop

log = logging.getLogger(__name__)

WHO = ("teacher", "student")


def _json(path: str) -> dict[str, Any]:
  return json.loads(paths.read_text(path))


def _size(measured: dict[str, Any]) -> dict[str, float]:
  """params, MACs per sequence and median latency (ms) at measure.batch."""
  return {
    "params": measured["parameters"]["total"],
    "macs": measured["macs_per_sequence"]["analytic"],
    "latency_ms": measured["latency"][0]["median_ms"],
  }


def _ratio(a: float, b: float) -> float | None:
  return a / b if b else None


def results(c, root: str, names=()) -> dict[str, Any]:
  """results.json's content: scores per model and set, sizes, speed-up
  over the teacher, the paper's row and the records of stages `names`."""

  headline = tasks_lib.get(c.task.name).headline
  sets = [name for name, _ in eval_sets(c)]
  scores, size = {}, {}
  for who in WHO:
    ev = _json(join(root, "evaluate", f"{who}.json"))
    scores[who] = {name: ev[name] for name in sets}
    size[who] = _size(_json(join(root, "measure", f"{who}.json")))
  t, s = size["teacher"], size["student"]
  records = {n: state.read_record(join(root, n), state.DONE) for n in names}
  paper = None
  if c.paper.table:
    paper = {
      "table": c.paper.table,
      "metric": c.paper.metric,
      "target": c.target.lang,
      "ltsft": c.paper.ltsft,
      "bistil_tf": c.paper.bistil_tf,
    }
  return {
    "task": c.task.name,
    "metric": headline,
    "languages": {"source": c.source.lang, "target": c.target.lang},
    "sets": sets,
    "scores": scores,
    "size": size,
    "latency_batch": c.measure.batch,
    "speedup_cpu": _ratio(t["latency_ms"], s["latency_ms"]),
    "params_vs_teacher": _ratio(s["params"], t["params"]),
    "macs_vs_teacher": _ratio(s["macs"], t["macs"]),
    "paper": paper,
    "export": merged(root),
    "stages": {
      n: {"fingerprint": r["fingerprint"], "seconds": r.get("seconds")}
      for n, r in records.items()
      if r is not None
    },
  }


def markdown(res: dict[str, Any]) -> str:
  """report.md: scores, sizes and the paper's figures beside the run's."""
  m = res["metric"]
  langs = res["languages"]
  md = [
    f"# bistil run: {res['task']} {langs['source']} -> {langs['target']}",
    "",
    f"Scores are {m} on each set ({langs['source']}: the source).",
    "",
    "| set | teacher | student | student / teacher |",
    "|---|---:|---:|---:|",
  ]
  for name in res["sets"]:
    t, s = (res["scores"][w][name][m] for w in WHO)
    ratio = f"{100 * s / t:.0f}%" if t else "–"
    md.append(f"| {name} | {t:.4f} | {s:.4f} | {ratio} |")
  md += [
    "",
    f"| model | params | MACs/seq | CPU ms (batch {res['latency_batch']}) |",
    "|---|---:|---:|---:|",
  ]
  for who in WHO:
    z = res["size"][who]
    md.append(
      f"| {who} | {z['params'] / 1e6:.2f}M | {z['macs'] / 1e6:.1f}M | "
      f"{z['latency_ms']:.2f} |"
    )
  speed = res["speedup_cpu"]
  md += [
    "",
    f"Speed-up over the teacher (CPU, batch {res['latency_batch']}): "
    f"{'–' if speed is None else f'{speed:.2f}x'}; parameters "
    f"{100 * (res['params_vs_teacher'] or 0):.0f}% of the teacher's.",
    "",
    *_paper_lines(res),
    f"The merged student (transformers' pipeline() loads it): {res['export']}",
    "",
    "![scores](scores.png)",
    "",
  ]
  return "\n".join(md)


def _paper_lines(res: dict[str, Any]) -> list[str]:
  p = res["paper"]
  if not p:
    return []
  tgt = p["target"]
  t, s = (100 * res["scores"][w][tgt][res["metric"]] for w in WHO)
  return [
    f"The paper's figures ({p['table']}), {tgt}:",
    "",
    "| | undistilled | BiStil | gap |",
    "|---|---:|---:|---:|",
    f"| paper (LTSFT, BiStil-TF LRF 2) | {p['ltsft']:.1f} | "
    f"{p['bistil_tf']:.1f} | {p['bistil_tf'] - p['ltsft']:+.1f} |",
    f"| this run (task teacher, student) | {t:.1f} | {s:.1f} | {s - t:+.1f} |",
    "",
  ]


def plot(res: dict[str, Any], root: str, out: str) -> None:
  """scores.png: scores per set (and the paper's) | phase-1 held-out loss."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  m = res["metric"]
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
  sets = res["sets"]
  for i, who in enumerate(WHO):
    vals = [100 * res["scores"][who][n][m] for n in sets]
    ax.bar([k + 0.4 * i for k in range(len(sets))], vals, 0.4, label=who)
  p = res["paper"]
  if p and p["target"] in sets:
    k = sets.index(p["target"])
    for y, name, style in ((p["ltsft"], "paper LTSFT", "--"),
                           (p["bistil_tf"], "paper BiStil-TF", ":")):  # fmt: skip
      ax.hlines(y, k - 0.2, k + 0.6, colors="k", linestyles=style, label=name)
  ax.set_xticks([k + 0.2 for k in range(len(sets))], sets)
  ax.set_ylabel(f"{m} (x100)")
  ax.set_title(f"{res['task']}: teacher vs student")
  ax.legend(fontsize=7)
  rows = loop.read_metrics(join(workdir(root, "distil"), "metrics"))
  for key in sorted({k for r in rows for k in r if k.endswith("/loss")}):
    if key.startswith("eval/"):
      pts = [(r["step"], r[key]) for r in rows if key in r]
      ax2.plot(*zip(*pts, strict=True), marker="o", label=key)
  if not rows:
    ax2.text(0.5, 0.5, "phase 1: no held-out loss here", ha="center")
  ax2.set_xlabel("phase-1 step")
  ax2.set_ylabel("held-out loss")
  ax2.set_title("phase 1 (the lowest summed loss is kept)")
  if ax2.get_legend_handles_labels()[0]:
    ax2.legend(fontsize=7)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=90)
  plt.close(fig)
  paths.write_bytes(out, buf.getvalue())


def write(c, root: str, names=()) -> dict[str, Any]:
  """Writes DIR/report/{report.md,results.json,scores.png}; the results."""
  res = results(c, root, names)
  out = join(root, "report")
  paths.write_text(join(out, "results.json"), json.dumps(res, indent=2))
  paths.write_text(join(out, "report.md"), markdown(res))
  plot(res, root, join(out, "scores.png"))
  return res
