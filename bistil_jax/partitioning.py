"""Device mesh, logical axis rules and shardings for any pytree.

Model code names axes (`vocab`, `embed`, `joined_kv`, `mlp`, `batch`, ...);
this module alone maps those names to the mesh axes `data`, `fsdp` and
`tensor`. Configs override single rules with `mesh.rules` (see
`merge_rules`); model code never holds a PartitionSpec.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from bistil_jax.errors import BistilError

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Sequence[tuple[str, Any]]

# Parameters: fully-sharded data parallel over `embed` and Megatron-style
# tensor parallel over heads / MLP / vocabulary. Activations: batch over
# data x fsdp, the per-head, MLP and vocab activations over tensor.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("joined_kv", "tensor"),
  ("mlp", "tensor"),
  ("kv", None),
  ("classes", None),
  ("embed_out", None),
  ("position", None),
  ("token_type", None),
  ("rel_position", None),  # rows of DeBERTa's relative-position table
  ("act_embed", None),
  ("act_heads", "tensor"),
  ("act_mlp", "tensor"),
  ("act_vocab", "tensor"),
)


def merge_rules(overrides: Sequence[Sequence[Any]] = ()) -> Rules:
  """DEFAULT_RULES with some logical names mapped anew.

  `overrides` holds (logical name, mesh axes) pairs, e.g.
  `--config.mesh.rules="(('embed', None), ('vocab', ('fsdp', 'tensor')))"`
  (mesh axes: None, an axis name, or a tuple of names).

  Raises:
    BistilError: an unknown logical name or mesh axis, or a malformed pair.
  """
  rules = dict(DEFAULT_RULES)
  for pair in overrides or ():
    if not isinstance(pair, Sequence) or len(pair) != 2:
      raise BistilError(f"mesh.rules entry {pair!r} is not a (name, axes) pair")
    name, axes = pair
    if name not in rules:
      raise BistilError(
        f"mesh.rules: unknown logical axis {name!r}; known: {sorted(rules)}"
      )
    names = () if axes is None else (axes,) if isinstance(axes, str) else axes
    bad = [a for a in names if a not in MESH_AXES]
    if bad:
      raise BistilError(
        f"mesh.rules: {name!r} -> unknown mesh axes {bad}; known: {MESH_AXES}"
      )
    rules[name] = (
      None if axes is None else axes if isinstance(axes, str) else tuple(axes)
    )
  return tuple(rules.items())


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolves at most one -1 entry so the product equals num_devices."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise BistilError(f"mesh shape {shape} needs {len(MESH_AXES)} entries")
  if shape.count(-1) > 1:
    raise BistilError(f"mesh shape {shape} has more than one -1")
  if any(s == 0 or s < -1 for s in shape):
    raise BistilError(f"mesh shape {shape} has invalid entries")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise BistilError(
        f"mesh shape {shape} does not divide {num_devices} devices"
      )
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise BistilError(
      f"mesh shape {shape} needs {math.prod(shape)} devices, have {num_devices}"
    )
  return shape


def make_mesh(
  shape: Sequence[int] = (-1, 1, 1),
  devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """A (data, fsdp, tensor) mesh over all (or the given) devices.

  NOTE: jax.make_mesh defaults to Explicit axis types, under which optax's
  integer-label losses fail inside jit; this mesh uses Auto axes.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(shape, len(devices))
  try:
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # non-TPU topologies the helper does not know
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_sharding(
  logical_tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> Any:
  """Maps a tree of logical PartitionSpecs (or boxed params) to shardings."""
  if _has_boxes(logical_tree):
    logical_tree = nn.get_partition_spec(logical_tree)
  return nn.logical_to_mesh_sharding(logical_tree, mesh, list(rules))


def _has_boxes(tree) -> bool:
  leaves = jax.tree.leaves(
    tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
  )
  return any(isinstance(x, nn.LogicallyPartitioned) for x in leaves)


def param_shardings(
  abstract: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> Any:
  """NamedShardings for a model's params (unboxed structure).

  Args:
    abstract: the boxed abstract params, e.g.
      `model.encoder.abstract_params(config)` (the caller builds them: the
      model sits on a floor above this module).
    mesh: the device mesh.
    rules: logical axis rules.

  Raises:
    BistilError: `abstract` carries no logical axes (plain params).
  """
  if not _has_boxes(abstract):
    raise BistilError(
      "param_shardings needs the boxed abstract params "
      "(model.encoder.abstract_params(config)), not plain params"
    )
  return logical_to_sharding(abstract, mesh, rules)


def data_sharding(
  mesh: Mesh, rules: Rules = DEFAULT_RULES, ndim: int = 2
) -> NamedSharding:
  """Sharding of a [batch, length, ...] input array."""
  axes = ("batch", "length") + (None,) * (ndim - 2)
  spec = nn.logical_to_mesh_axes(axes[:ndim], list(rules))
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
  """Mesh and rules in scope, so activation constraints in the model apply.

  Trace jitted model code inside this context.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
    yield


def shard(tree: Any, shardings: Any) -> Any:
  """Places host arrays on devices with the given shardings."""
  return jax.device_put(tree, shardings)


def programs_may_overlap() -> bool:
  """Whether independent jitted programs may be in flight together.

  False on a CPU backend with several devices, in one process or across
  processes. XLA's CPU client runs each device's part of a program on one
  shared thread pool; a program whose devices wait in an all-reduce can
  hold every pool thread while its last device's part waits behind another
  program, and nothing moves again (a 4-device LT-SFT mask selection hung
  so, and XLA aborts it after its rendezvous timeout as "only N of them
  arrived on time"). Across processes, gloo's collectives of two programs
  can also run in different orders on different hosts. TPU and GPU run
  each device's programs in order on a stream and overlap safely, on one
  host or many.
  """
  return not (jax.default_backend() == "cpu" and jax.device_count() > 1)


def fetch_all(calls: Sequence[Any]) -> list[Any]:
  """`[jax.device_get(call()) for call in calls]`, overlapped where safe.

  Where `programs_may_overlap()` every call is dispatched before the first
  result is fetched, so the device never waits for the host; elsewhere each
  result is fetched before the next call starts.

  Args:
    calls: zero-argument callables that dispatch a jitted computation.

  Returns:
    Their results as host (NumPy) values, in order.
  """
  if programs_may_overlap():
    return list(jax.device_get([call() for call in calls]))
  return [jax.device_get(call()) for call in calls]
