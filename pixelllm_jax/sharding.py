"""Logical axis names -> mesh axes, and the device mesh built from gin.

One table (`AXIS_RULES`) maps every logical axis name used by a parameter or a
key activation to a mesh axis (or None = replicated), in the t5x style.
The default mesh has axes ('data', 'model'): batch is split over 'data',
wide projections (mlp, heads, vocab) over 'model'.
"""
from typing import Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "model")

# Every logical name used anywhere in the project must appear here; a test
# enforces it, so a typo in a name fails loudly instead of replicating.
AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("length", None),
    ("kv_length", None),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("joined_kv", "model"),
    ("kv", None),
    ("vocab", "model"),
    ("relpos_buckets", None),
    ("relpos", None),
    ("pos", None),
    ("patch", None),
    ("conv_height", None),
    ("conv_width", None),
    ("channels", None),
    ("queries", None),
    ("lora_rank", None),
    ("coords", None),
    ("points", None),
    ("prompt_types", None),
    ("layers", None),
)

KNOWN_AXES = frozenset(name for name, _ in AXIS_RULES)


@gin.configurable
def make_mesh(mesh_shape: Sequence[int] = (-1, 1), axis_names: Sequence[str] = MESH_AXES) -> Mesh:
  """A mesh over all devices; one -1 entry takes the devices left over."""
  shape = list(mesh_shape)
  n = jax.device_count()
  if shape.count(-1) > 1:
    raise ValueError(f"mesh_shape {mesh_shape}: at most one -1")
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    if n % known:
      raise ValueError(f"mesh_shape {mesh_shape} does not divide {n} devices")
    shape[shape.index(-1)] = n // known
  if int(np.prod(shape)) != n:
    raise ValueError(f"mesh_shape {tuple(shape)} needs {int(np.prod(shape))} devices, have {n}")
  # Auto axes: shardings come from logical-axis annotations and jit in/out
  # shardings, with XLA propagating the rest (jax 0.10's default is Explicit).
  return jax.make_mesh(tuple(shape), tuple(axis_names),
                       axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def logical_to_sharding(logical_tree, mesh: Mesh, rules=AXIS_RULES):
  """Maps a tree of logical PartitionSpecs to NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_tree, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) axis over 'data', the rest replicated."""
  return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
