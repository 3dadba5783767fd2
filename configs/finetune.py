r"""Task-tuning a model on gold labels (`bistil finetune`): the task teacher.

Same fields as configs/sft.py (ARG = TASK[,variant=tiny]) without a
teacher: the loss is on gold labels only and training is dense (exports an
HF dir with the task head); `--config.sparse.enabled=true` makes it LT-SFT
(exports an SFT dir):

  bistil finetune --config configs/finetune.py:pos --workdir runs/teacher-pos \
    --config.student.model=models/mbert-en-mt \
    --config.data.train=en/train.conllu --config.eval.sets=dev=en/dev.conllu
"""

from bistil_jax import configlib

sft = configlib.load_sibling(__file__, "sft")


def get_config(arg=None):
  c = sft.get_config(arg, teacher=False)
  c.loss.gold = 1.0  # no teacher: gold labels only
  c.sparse.enabled = False  # dense fine-tuning, as a task teacher
  return c
