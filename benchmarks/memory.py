"""Per-device memory of phase 1 on a mesh, without the devices.

  python benchmarks/memory.py            # the README table
  python benchmarks/memory.py --json     # one JSON line per row

For each teacher preset (vocabulary trimmed to --vocab rows), the released
6-layer student and batch 8 x 256, and a mesh over N devices (v4-32: 16
chips; 8 GPUs), it gives the bytes one device holds: student parameters
(fp32), AdamW moments (2 x fp32), the frozen teacher (its compute dtype)
and an activation estimate (driver.activation_bytes). Shard shapes come
from the real partitioning rules on an abstract mesh, so the figures are
what `bistil distil` logs at start-up on such a slice.
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


def rows(name: str, vocab: int, batch: int, length: int, teacher_dtype: str):
  tcfg = preset(name, vocab_size=vocab, head="mlm")
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
      }
      out["total"] = sum(v for k, v in out.items() if k in KEYS)
      yield out


KEYS = ("student_params", "adam", "teacher_params", "activations")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--vocab", type=int, default=30000)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=256)
  p.add_argument("--teacher-dtype", default="bfloat16")
  p.add_argument("--json", action="store_true")
  a = p.parse_args()
  table = []
  for name in ("mbert", "xlmr-base"):
    for r in rows(name, a.vocab, a.batch, a.length, a.teacher_dtype):
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
  for r in table:
    cells = [f"{r[k] / mib:,.0f} MiB" for k in (*KEYS, "total")]
    print(
      f"| {r['teacher']} ({r['vocab']:,} vocab) | {r['slice']} | "
      f"{tuple(r['mesh'])} | {r['batch']} x {a.length} | "
      + " | ".join(cells)
      + " |"
    )


if __name__ == "__main__":
  main()
