"""Shared config blocks: argument parsing, mesh, optimiser, training cadence.

Config files are loaded by path, so they load this sibling by path too:

  common = configlib.load_sibling(__file__, "common")
  config.mesh = common.mesh()
"""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """ "tiny,src=en,tgt=mt" -> ConfigDict(variant="tiny", src="en", ...).

  Positional (key-less) items fill the keys of `defaults` in order; items
  with "=" set that key. Values keep the type of their default.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  names = list(defaults)
  if not arg:
    return out
  positional = 0
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    if "=" in item:
      key, value = item.split("=", 1)
    else:
      if positional >= len(names):
        raise ValueError(f"too many positional config args in {arg!r}")
      key, value = names[positional], item
      positional += 1
    if key not in out:
      raise ValueError(f"unknown config arg {key!r}; known: {names}")
    current = out[key]
    if isinstance(current, bool):
      value = value.lower() in ("1", "true", "yes")
    elif isinstance(current, int):
      value = int(value)
    elif isinstance(current, float):
      value = float(value)
    out[key] = value
  return out


def mesh(shape=(-1, 1, 1)) -> ml_collections.ConfigDict:
  """Device mesh (data, fsdp, tensor); one axis may be -1 (the rest)."""
  c = ml_collections.ConfigDict()
  c.shape = tuple(shape)
  # (logical axis, mesh axes) pairs replacing defaults of
  # bistil_jax/partitioning.py, e.g. (("embed", None),) for no FSDP.
  c.rules = ()
  return c


def teacher(dtype: str = "float32") -> ml_collections.ConfigDict:
  """The frozen teacher: an HF model dir plus SFT dirs applied to it."""
  c = ml_collections.ConfigDict()
  c.model = ""  # HF model dir
  c.sfts = ""  # comma-separated SFT dirs, in order; `\,` in a path
  c.dtype = dtype  # compute dtype (bfloat16 on TPU/GPU)
  return c


def eval_block(batches: int | None = None) -> ml_collections.ConfigDict:
  """Evaluation sets, "name=spec,..." (a bare spec is named by position;
  a comma inside a path is written \\,)."""
  c = ml_collections.ConfigDict()
  c.sets = ""
  if batches is not None:
    c.batches = batches  # batches per set (corpora: masked-LM batches)
  return c


def optim(learning_rate: float = 1e-4, **kw) -> ml_collections.ConfigDict:
  """AdamW, linear warmup then linear decay to 0 over train.num_steps."""
  c = ml_collections.ConfigDict()
  c.learning_rate = learning_rate
  c.warmup_steps = kw.pop("warmup_steps", 0)
  c.weight_decay = kw.pop("weight_decay", 0.0)
  c.clip_norm = kw.pop("clip_norm", 1.0)  # 0 disables clipping
  c.accumulate_steps = kw.pop("accumulate_steps", 1)  # gradient accumulation
  if kw:
    raise ValueError(f"unknown optim fields {sorted(kw)}")
  return c


def train(
  num_steps: int | None = None, epochs: float | None = None, **kw
) -> ml_collections.ConfigDict:
  """Loop length (steps, or epochs of the training split), cadence (steps),
  checkpoints and export."""
  c = ml_collections.ConfigDict()
  if (num_steps is None) == (epochs is None):
    raise ValueError("train() takes num_steps or epochs")
  if num_steps is not None:
    c.num_steps = num_steps  # 0: export the initialisation
  else:
    c.epochs = float(epochs)
  c.log_every = kw.pop("log_every", 50)
  c.eval_every = kw.pop("eval_every", 0)  # 0: evaluate at the end only
  c.checkpoint_every = kw.pop("checkpoint_every", 1000)
  c.keep_checkpoints = kw.pop("keep_checkpoints", 3)
  c.async_checkpoints = kw.pop("async_checkpoints", True)
  c.export = kw.pop("export", True)  # HF model dir in workdir/export
  if kw:
    raise ValueError(f"unknown train fields {sorted(kw)}")
  return c
