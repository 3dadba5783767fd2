"""Meshes, logical rules and sharded forward passes on 8 fake CPU devices."""

import flax.linen as nn
import jax
import numpy as np
from absl.testing import absltest, parameterized
from flax.traverse_util import flatten_dict
from jax.sharding import PartitionSpec as P

from bistil_jax import partitioning
from bistil_jax.errors import BistilError
from bistil_jax.model import Model, init_params, preset
from bistil_jax.model.encoder import abstract_params

MESHES = ((1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 1, 8), (1, 2, 4))


def config(name, head):
  # 8 heads and widths divisible by 8, so (1, 1, 8) shards every axis.
  return preset(
    name,
    head=head,
    hidden_size=64,
    num_attention_heads=8,
    intermediate_size=128,
    add_pooler=head == "sequence_classification",
  )


class FetchAllTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    mesh = partitioning.make_mesh((1, 8, 1))
    self.x = jax.device_put(
      np.arange(64, dtype=np.float32).reshape(8, 8),
      jax.sharding.NamedSharding(mesh, P("fsdp")),
    )
    self.count = jax.jit(lambda a, t: (a >= t).sum())  # an all-reduce
    self.events = []
    get = jax.device_get

    def fetch(x):
      self.events.append("fetch")
      return get(x)

    patch = absltest.mock.patch.object(jax, "device_get", fetch)
    patch.start()
    self.addCleanup(patch.stop)

  def calls(self, ts):
    def call(t):
      self.events.append(f"run {t}")
      return self.count(self.x, np.float32(t))

    return [lambda t=t: call(t) for t in ts]

  def test_cpu_mesh_fetches_each_program_before_the_next(self):
    # The suite's 8 CPU devices: independent collective programs must not
    # be in flight together (XLA's CPU client can deadlock on them).
    self.assertFalse(partitioning.programs_may_overlap())
    out = partitioning.fetch_all(self.calls([0, 60, 8]))
    self.assertEqual([int(v) for v in out], [64, 4, 56])
    self.assertEqual(
      self.events, ["run 0", "fetch", "run 60", "fetch", "run 8", "fetch"]
    )

  def test_overlaps_where_safe(self):
    with absltest.mock.patch.object(
      partitioning, "programs_may_overlap", return_value=True
    ):
      out = partitioning.fetch_all(self.calls([0, 60]))
    self.assertEqual([int(v) for v in out], [64, 4])
    self.assertEqual(self.events, ["run 0", "run 60", "fetch"])


class MeshTest(parameterized.TestCase):
  def test_eight_devices(self):
    self.assertLen(jax.devices(), 8)

  @parameterized.parameters(
    ((-1, 1, 1), (8, 1, 1)),
    ((2, -1, 2), (2, 2, 2)),
    ((1, 1, -1), (1, 1, 8)),
    ((4, 2, 1), (4, 2, 1)),
  )
  def test_mesh_shape(self, shape, want):
    self.assertEqual(partitioning.mesh_shape(shape, 8), want)
    mesh = partitioning.make_mesh(shape)
    self.assertEqual(tuple(mesh.shape.values()), want)
    self.assertEqual(mesh.axis_names, ("data", "fsdp", "tensor"))

  @parameterized.parameters(
    ((-1, -1, 1), "more than one"),
    ((3, -1, 1), "does not divide"),
    ((2, 2, 1), "needs 4 devices"),
    ((8, 1), "3 entries"),
    ((0, 1, 8), "invalid"),
  )
  def test_bad_mesh_shapes(self, shape, needle):
    with self.assertRaisesRegex(BistilError, needle):
      partitioning.mesh_shape(shape, 8)

  def test_param_shardings_needs_the_boxed_abstract_params(self):
    mesh = partitioning.make_mesh((2, 2, 2))
    plain = nn.unbox(abstract_params(config("tiny", "mlm")))
    with self.assertRaisesRegex(BistilError, "boxed abstract params"):
      partitioning.param_shardings(plain, mesh)

  def test_rules_map_params_as_documented(self):
    mesh = partitioning.make_mesh((2, 2, 2))
    shard = flatten_dict(
      partitioning.param_shardings(
        abstract_params(config("tiny", "mlm")), mesh
      ),
      sep="/",
    )
    self.assertEqual(
      shard["embeddings/word_embeddings/embedding"].spec, P("tensor", "fsdp")
    )
    self.assertEqual(
      shard["encoder/layer/0/attention/self/query/kernel"].spec,
      P("fsdp", "tensor"),
    )
    self.assertEqual(
      shard["encoder/layer/1/output/dense/kernel"].spec, P("tensor", "fsdp")
    )
    self.assertEqual(shard["lm_head/bias"].spec, P("tensor"))
    self.assertEqual(
      shard["embeddings/position_embeddings/embedding"].spec, P(None, "fsdp")
    )
    self.assertEqual(
      partitioning.data_sharding(mesh).spec, P(("data", "fsdp"), None)
    )


def sharded_and_single(cfg, mesh_shape, length, pad_from):
  """(sharded outputs, single-device outputs, param shardings, params) of
  a forward pass returning logits, hidden states and attentions, on 8
  rows of `length` tokens; row 3 is padded from `pad_from`, row 5 from 2."""
  params = init_params(cfg, jax.random.PRNGKey(0))
  rng = np.random.RandomState(0)
  ids = rng.randint(3, cfg.vocab_size, (8, length))
  mask = np.ones_like(ids)
  mask[3, pad_from:] = 0
  mask[5, 2:] = 0
  model = Model(cfg)

  def fwd(p, ids, mask):
    out = model.apply(
      {"params": p}, ids, attention_mask=mask, output_attentions=True
    )
    return out.logits, out.hidden_states, out.attentions

  single = jax.jit(fwd)(params, ids, mask)
  n = int(np.prod(mesh_shape))
  mesh = partitioning.make_mesh(mesh_shape, devices=jax.devices()[:n])
  ps = partitioning.param_shardings(abstract_params(cfg), mesh)
  ds = partitioning.data_sharding(mesh)
  with partitioning.activate(mesh):
    sharded = jax.jit(fwd, in_shardings=(ps, ds, ds))(
      partitioning.shard(params, ps),
      partitioning.shard(ids, ds),
      partitioning.shard(mask, ds),
    )
  return sharded, single, ps, params


class ShardedForwardTest(parameterized.TestCase):
  @parameterized.product(
    mesh_shape=MESHES,
    case=(("tiny", "mlm"), ("tiny-xlmr", "sequence_classification")),
  )
  def test_sharded_forward_equals_single_device(self, mesh_shape, case):
    cfg = config(*case)
    sharded, single, ps, params = sharded_and_single(cfg, mesh_shape, 16, 10)
    placed = partitioning.shard(params, ps)
    q = placed["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"]
    self.assertEqual(q.sharding, ps["encoder"]["layer"]["0"]["attention"][
        "self"]["query"]["kernel"])  # fmt: skip
    for a, b in zip(
      jax.tree.leaves(sharded), jax.tree.leaves(single), strict=True
    ):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


if __name__ == "__main__":
  absltest.main()
