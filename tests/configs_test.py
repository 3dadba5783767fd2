"""The one config schema: shared blocks, only the fields a phase reads,
mesh rules from the config, shipped configs found from anywhere."""

import os

from absl.testing import absltest, parameterized

from bistil_jax import configlib, partitioning
from bistil_jax.errors import BistilError

PHASES = {
  "distil": "configs/distil.py:tiny",
  "pretrain": "configs/pretrain.py:tiny",
  "finetune": "configs/finetune.py:pos,variant=tiny",
  "sft": "configs/sft.py:pos,variant=tiny",
  "lang-sft": "configs/lang_sft.py:tiny",
}


def load(phase, **overrides):
  return configlib.build_config(
    PHASES[phase], {k: str(v) for k, v in overrides.items()}
  )


class SchemaTest(parameterized.TestCase):
  @parameterized.parameters(*PHASES)
  def test_shared_blocks(self, phase):
    c = load(phase)
    for block in ("seed", "student", "data", "eval", "loss", "optim", "mesh"):
      self.assertIn(block, c)
    self.assertEqual(set(c.mesh), {"shape", "rules"})
    self.assertIn("sets", c.eval)
    self.assertEqual(
      set(c.optim),
      {
        "learning_rate",
        "warmup_steps",
        "weight_decay",
        "clip_norm",
        "accumulate_steps",
      },
    )
    steps = ("distil", "pretrain", "lang-sft")
    length = "num_steps" if phase in steps else "epochs"
    self.assertIn(length, c.train)
    if "teacher" in c:
      self.assertEqual(set(c.teacher), {"model", "sfts", "dtype"})

  @parameterized.parameters(
    ("pretrain", "teacher.model"),  # no teacher in MLM pre-training
    ("pretrain", "student.init"),  # the model dir is trained as it is
    ("pretrain", "loss.hidden"),
    ("finetune", "teacher.model"),  # gold labels only
    ("finetune", "loss.kl"),
    ("distil", "student.model"),  # derived from the teacher
    ("distil", "loss.mask_padding"),  # removed: it could change nothing
    ("sft", "train.num_steps"),  # task stages count epochs
    ("lang-sft", "teacher.model"),  # MLM on the corpus, no teacher
    ("lang-sft", "sparse.epochs"),  # its stages count steps
  )
  def test_fields_a_phase_does_not_read_are_unknown(self, phase, key):
    with self.assertRaisesRegex(BistilError, f"unknown config key {key}"):
      load(phase, **{key: "1"})

  def test_mesh_rules_override_the_defaults(self):
    c = load(
      "distil",
      **{"mesh.rules": "(('embed', None), ('vocab', ('fsdp', 'tensor')))"},
    )
    rules = dict(partitioning.merge_rules(c.mesh.rules))
    self.assertIsNone(rules["embed"])
    self.assertEqual(rules["vocab"], ("fsdp", "tensor"))
    self.assertEqual(rules["mlp"], "tensor")  # untouched default
    with self.assertRaisesRegex(BistilError, "unknown logical axis 'embd'"):
      partitioning.merge_rules((("embd", None),))
    with self.assertRaisesRegex(BistilError, "unknown mesh axes"):
      partitioning.merge_rules((("embed", "model"),))

  def test_named_lists(self):
    self.assertEqual(
      configlib.parse_named_list("dev=a.conllu, mt=b/c.conllu,d.txt"),
      [("dev", "a.conllu"), ("mt", "b/c.conllu"), ("set2", "d.txt")],
    )
    self.assertEqual(configlib.parse_named_list(""), [])
    with self.assertRaisesRegex(BistilError, "names dev more than once"):
      configlib.parse_named_list("dev=a,dev=b")

  def test_shipped_configs_resolve_from_another_directory(self):
    old = os.getcwd()
    os.chdir(os.path.dirname(os.path.abspath(__file__)))  # no configs/ here
    try:
      self.assertEqual(load("distil").train.num_steps, 30)
      self.assertEqual(configlib.load_config("sft").task, "pos")
    finally:
      os.chdir(old)


if __name__ == "__main__":
  absltest.main()
