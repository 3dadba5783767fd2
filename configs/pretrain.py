r"""MLM pre-training of a model dir on two corpora (no teacher).

Used by the demo for its multilingual teacher (pass one mixed corpus as both
source and target) and for the scratch bilingual baseline. Same data
pipeline, loop, checkpoints and export as phase 1 (configs/distil.py);
`student.model` is the MLM model dir being trained, e.g. one written by
`bistil init`:

  bistil pretrain --config configs/pretrain.py:tiny --workdir runs/mlm \
    --config.student.model=init_dir \
    --config.data.source=all.txt --config.data.target=all.txt
"""

import ml_collections

from bistil_jax import configlib

common = configlib.load_sibling(__file__, "common")
distil = configlib.load_sibling(__file__, "distil")


def get_config(arg=None):
  a = common.parse_arg(arg, variant="tiny")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.student = ml_collections.ConfigDict()
  c.student.model = ""  # HF model dir with an MLM head: trained in place
  c.student.dtype = "float32"  # compute dtype
  c.student.param_dtype = "float32"  # master weights
  c.data = distil.data_block()
  c.eval = common.eval_block(batches=8)  # "source=SPEC,target=SPEC"
  c.loss = ml_collections.ConfigDict()
  c.loss.mlm = 1.0  # the only term without a teacher
  c.optim = common.optim(learning_rate=1e-4)
  c.mesh = common.mesh((-1, 1, 1))
  c.train = common.train(
    200_000, log_every=100, eval_every=5000, checkpoint_every=5000
  )
  if a.variant == "tiny":
    distil.tiny(c)
  elif a.variant != "base":
    raise ValueError(f"unknown variant {a.variant!r}: tiny or base")
  # "" = export the last step; "source+target/loss": the step with the
  # lowest summed held-out MLM loss (see configs/distil.py).
  c.train.select_best = ""
  return c
