"""The one config schema: shared blocks, only the fields a phase reads,
mesh rules from the config, shipped configs found from anywhere."""

import contextlib
import io
import os
import shutil
import tempfile

from absl.testing import absltest, parameterized

from bistil_jax import cli, configlib, partitioning
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


class ConfigErrorsTest(parameterized.TestCase):
  @parameterized.parameters(
    ("optim.lrr", "optim.learning_rate"),  # was optim.clip_norm
    ("optim.lr", "optim.learning_rate"),
    ("optim.clipnorm", "optim.clip_norm"),
    ("data.num_steps", "train.num_steps"),  # the name in another block
    ("optimizer.learning_rate", "optim.learning_rate"),
  )
  def test_a_typo_suggests_the_closest_field(self, typo, meant):
    with self.assertRaisesRegex(
      BistilError, rf"^unknown config key {typo} \(did you mean {meant}\?\)$"
    ):
      load("distil", **{typo: "1"})

  def test_values_take_the_fields_type(self):
    c = load(
      "distil",
      **{
        "optim.learning_rate": "1",  # int -> float
        "mesh.shape": "[2, 1, 1]",  # list -> tuple
        "train.async_checkpoints": "on",
      },
    )
    self.assertEqual(c.optim.learning_rate, 1.0)
    self.assertIsInstance(c.optim.learning_rate, float)
    self.assertEqual(c.mesh.shape, (2, 1, 1))
    self.assertTrue(c.train.async_checkpoints)
    self.assertEqual(load("distil", **{"mesh.shape": "4"}).mesh.shape, (4,))

  @parameterized.parameters(
    ("train.num_steps", "2.5", "int"),
    ("train.num_steps", "None", "int"),  # ConfigDict would take None
    ("optim", "{'learning_rate': 1.0}", "ConfigDict"),  # a whole block
    ("mesh.shape", "abc", "tuple"),
  )
  def test_a_value_of_another_type_is_refused(self, key, text, kind):
    with self.assertRaisesRegex(
      BistilError, rf"^config.{key} expects {kind}, got "
    ):
      load("distil", **{key: text})

  def test_no_suggestion_when_nothing_is_close(self):
    with self.assertRaisesRegex(BistilError, r"^unknown config key optim.foo$"):
      load("distil", **{"optim.foo": "1"})

  def test_another_commands_config_is_named_as_such(self):
    err = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(err):
      wd = os.path.join(tmp, "run")
      code = cli.main(
        ["distil", "--config", "configs/sft.py:pos", "--workdir", wd]
      )
      self.assertFalse(os.path.exists(wd))
    self.assertEqual(code, 2)
    self.assertEqual(
      err.getvalue().strip().splitlines()[-1],
      "error: configs/sft.py is the config of `bistil sft`, not `bistil "
      "distil` (its config is configs/distil.py)",
    )
    with self.assertRaisesRegex(
      BistilError, "config of `bistil sft`, not `bistil finetune`"
    ):
      configlib.build_config("configs/sft.py:pos", command="finetune")
    for command, spec in PHASES.items():  # each its own: accepted
      configlib.build_config(spec, command=command)

  def test_a_copy_of_another_commands_config_is_named_by_its_fields(self):
    with tempfile.TemporaryDirectory() as tmp:
      shipped = configlib.repo_configs_dir()
      for name in ("common.py", "lang_sft.py"):
        shutil.copy(shipped / name, os.path.join(tmp, name))
      mine = os.path.join(tmp, "lang_sft.py")
      with self.assertRaisesRegex(
        BistilError,
        r"lang_sft.py is a config of `bistil lang-sft` \(it has no "
        r"data.source, data.target\), not of `bistil distil`",
      ):
        configlib.build_config(mine, command="distil")
      configlib.build_config(mine, command="lang-sft")


if __name__ == "__main__":
  absltest.main()
