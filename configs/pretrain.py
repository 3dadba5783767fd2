r"""MLM pre-training of a model dir on two corpora (no teacher).

Used by the demo for its multilingual teacher (pass one mixed corpus as both
source and target) and for the scratch bilingual baseline. Same data
pipeline, loop, checkpoints and export as phase 1 (configs/distil.py);
`teacher.model` is the MLM model dir being trained, e.g. one written by
`bistil synth --init-model`:

  bistil pretrain --config configs/pretrain.py:tiny --workdir runs/mlm \
    --config.teacher.model=init_dir \
    --config.data.source=all.txt --config.data.target=all.txt
"""

from bistil_jax import configlib

distil = configlib.load_sibling(__file__, "distil")


def get_config(arg=None):
  c = distil.get_config(arg)
  c.loss.hidden = 0.0
  c.loss.attention = 0.0
  c.loss.kl = 0.0
  c.loss.mlm = 1.0  # the only term without a teacher
  c.optim.warmup_steps = 0
  return c
