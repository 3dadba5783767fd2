"""Per-device memory of phase 1 on a mesh, without the devices.

  python benchmarks/memory.py            # the README table
  python benchmarks/memory.py --json     # one JSON line per row

For each teacher (mBERT and XLM-R base with the vocabulary trimmed to
--vocab rows; mDeBERTa-v3-base with its 251,000-row vocabulary and trimmed
to --deberta-vocab rows; DistilmBERT with its 119,547 rows), the LRF-2
student (6 layers; DistilmBERT's: 3) and batch 8 x 256, and a mesh over N
devices (v4-32: 16 chips; 8 GPUs), it gives the bytes one device holds:
student parameters (fp32), AdamW moments (2 x fp32), the frozen teacher
(its compute dtype) and an activation estimate (driver.activation_bytes).
Shard shapes come from the real partitioning rules on an abstract mesh, so
the figures are what `bistil distil` logs at start-up on such a slice.

The driver's activation estimate counts BERT's per-layer tensors; DeBERTa's
disentangled attention also keeps, per layer and term of pos_att_type, the
scores against the relative table [b, h, l, 2s] and their gather
[b, h, l, l] (float32). `rel_activations` estimates those (student, plus
half the teacher's as for the rest) and is printed under the table, not
added to the total, which stays what the driver logs.
"""

from __future__ import annotations

import argparse
import json
import math

import jax
from jax.sharding import AbstractMesh, AxisType

from bistil_jax import partitioning
from bistil_jax.checkpoint import student_init
from bistil_jax.model.config import preset
from bistil_jax.model.encoder import abstract_params
from bistil_jax.train import driver

# mDeBERTa-v3-base (12 layers, 768, 12 heads, FFN 3072; relative attention,
# position_buckets 256, max_relative_positions -1, share_att_key,
# pos_att_type p2c|c2p); vocabulary as released (config.json vocab_size).
MDEBERTA_VOCAB = 251000
DISTILMBERT_VOCAB = 119547

SLICES = {
  "v4-32 (16 chips)": [(16, 1, 1), (1, 16, 1), (2, 8, 1)],
  "8 GPUs": [(8, 1, 1), (1, 8, 1)],
}


def shard_bytes(cfg, mesh, itemsize: int) -> int:
  """Bytes of one device's shard of Model(cfg)'s params."""
  shapes = jax.tree.leaves(abstract_params(cfg))
  shardings = jax.tree.leaves(
    partitioning.param_shardings(abstract_params(cfg), mesh)
  )
  total = 0
  for x, s in zip(shapes, shardings, strict=True):
    total += math.prod(s.shard_shape(x.shape)) * itemsize
  return total


def mdeberta_base(vocab: int):
  """mDeBERTa-v3-base's config at `vocab` rows (benchmarks/common.py's
  deberta_config, without importing the benchmarks' JAX/PyTorch setup)."""
  return preset(
    "tiny-deberta",
    head="mlm",
    vocab_size=vocab,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=512,
    max_relative_positions=-1,
    position_buckets=256,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
  )


def rel_activation_bytes(cfg, rows: int, length: int) -> int:
  """DeBERTa's relative-score activations one device keeps for training:
  per layer and pos_att_type term, [rows, h, l, 2s] + [rows, h, l, l]
  float32 (0 for a body without relative attention)."""
  if not cfg.relative_attention:
    return 0
  per = cfg.num_attention_heads * length * (2 * cfg.rel_span + length)
  terms = len(cfg.pos_att_type) * cfg.num_hidden_layers
  return 4 * rows * per * terms


def teachers(vocab: int, deberta_vocab: int):
  """(label, teacher config) of every row group."""
  yield "mbert", preset("mbert", vocab_size=vocab, head="mlm")
  yield "xlmr-base", preset("xlmr-base", vocab_size=vocab, head="mlm")
  for v in (MDEBERTA_VOCAB, deberta_vocab):
    yield "mdeberta-v3-base", mdeberta_base(v)
  yield (
    "distilmbert",
    preset("distilmbert", vocab_size=DISTILMBERT_VOCAB, head="mlm"),
  )


def rows(name: str, tcfg, batch: int, length: int, teacher_dtype: str):
  vocab = tcfg.vocab_size
  scfg = student_init.student_config(tcfg, layer_reduction=2)
  t_item = 2 if teacher_dtype == "bfloat16" else 4
  for where, shapes in SLICES.items():
    for shape in shapes:
      mesh = AbstractMesh(
        shape, partitioning.MESH_AXES, axis_types=(AxisType.Auto,) * 3
      )
      params = shard_bytes(scfg, mesh, 4)
      # The global batch must split over the batch shards (data x fsdp):
      # the released 8 rows are raised to one row per shard.
      shards = shape[0] * shape[1]
      global_batch = max(batch, shards)
      per_rows = global_batch // shards
      out = {
        "teacher": name,
        "vocab": vocab,
        "slice": where,
        "mesh": shape,
        "batch": global_batch,
        "student_params": params,
        "adam": 2 * params,
        "teacher_params": shard_bytes(tcfg, mesh, t_item),
        "activations": driver.activation_bytes(scfg, per_rows, length)
        + driver.activation_bytes(tcfg, per_rows, length) // 2,
        "student_layers": scfg.num_hidden_layers,
      }
      out["total"] = sum(v for k, v in out.items() if k in KEYS)
      rel = rel_activation_bytes(scfg, per_rows, length)
      rel += rel_activation_bytes(tcfg, per_rows, length) // 2
      if rel:
        out["rel_activations"] = rel
      yield out


KEYS = ("student_params", "adam", "teacher_params", "activations")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--vocab", type=int, default=30000)
  p.add_argument(
    "--deberta-vocab",
    type=int,
    default=41000,
    help="mDeBERTa-v3-base's trimmed vocabulary (rows)",
  )
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=256)
  p.add_argument("--teacher-dtype", default="bfloat16")
  p.add_argument("--json", action="store_true")
  a = p.parse_args()
  table = []
  for name, tcfg in teachers(a.vocab, a.deberta_vocab):
    for r in rows(name, tcfg, a.batch, a.length, a.teacher_dtype):
      table.append(r)
      if a.json:
        print(json.dumps(r))
  if a.json:
    return
  mib = 2.0**20
  print(
    "| teacher | slice | mesh (data, fsdp, tensor) | batch | student | "
    "AdamW | teacher | activations (est.) | total / device |"
  )
  print("|---|---|---|---:|---:|---:|---:|---:|---:|")
  notes = {}
  for r in table:
    cells = [f"{r[k] / mib:,.0f} MiB" for k in (*KEYS, "total")]
    label = f"{r['teacher']} ({r['vocab']:,} vocab)"
    if r["student_layers"] != 6:
      label += f", {r['student_layers']}-layer student"
    print(
      f"| {label} | {r['slice']} | "
      f"{tuple(r['mesh'])} | {r['batch']} x {a.length} | "
      + " | ".join(cells)
      + " |"
    )
    if "rel_activations" in r:
      rows_per = r["batch"] // (r["mesh"][0] * r["mesh"][1])
      notes.setdefault(r["teacher"], set()).add(
        (rows_per, r["rel_activations"])
      )
  for name, seen in notes.items():
    parts = ", ".join(
      f"{rel / mib:,.0f} MiB at {n} row(s) of {a.length} per device"
      for n, rel in sorted(seen)
    )
    print(
      f"\n{name}: its relative-attention scores add about {parts} "
      "(not in the activation estimate above, which is what the driver "
      "logs)."
    )


if __name__ == "__main__":
  main()
