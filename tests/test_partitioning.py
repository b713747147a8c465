"""partitioning.py: the mesh, the rule sets and their checks, batch sharding."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pixelllm_jax import partitioning
from pixelllm_jax.partitioning import Partitioner


def test_make_mesh_fills_the_minus_one_and_checks_the_device_count():
  mesh = partitioning.make_mesh((-1, 2, 1))
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "model": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(ValueError, match="one entry per axis"):
    partitioning.make_mesh((-1, 1))
  with pytest.raises(ValueError, match="at most one -1"):
    partitioning.make_mesh((-1, -1, 1))
  with pytest.raises(ValueError, match="does not divide 8 devices"):
    partitioning.make_mesh((-1, 3, 1))
  with pytest.raises(ValueError, match="needs 12 devices"):
    partitioning.make_mesh((2, 3, 2))


def test_rule_sets_name_every_axis_and_differ_where_they_should():
  dp, fsdp, fsdp_tp = (dict(partitioning.RULE_SETS[n]) for n in ("dp", "fsdp", "fsdp_tp"))
  assert set(dp) == set(fsdp) == set(fsdp_tp) == partitioning.KNOWN_AXES
  assert dp["embed"] is None and fsdp["embed"] == fsdp_tp["embed"] == "fsdp"
  assert dp["mlp"] == fsdp_tp["mlp"] == "model" and fsdp["mlp"] is None
  assert dp["batch"] == fsdp["batch"] == fsdp_tp["batch"] == ("data", "fsdp")


def test_custom_rules_are_checked():
  table = tuple((name, None) for name in sorted(partitioning.KNOWN_AXES))
  assert partitioning.rules_of(table) == table
  with pytest.raises(ValueError, match="missing \\['batch'\\]"):
    partitioning.rules_of(tuple(r for r in table if r[0] != "batch"))
  with pytest.raises(ValueError, match="unknown \\['emebd'\\]"):
    partitioning.rules_of(table + (("emebd", None),))
  with pytest.raises(ValueError, match="mesh axes are"):
    partitioning.rules_of(tuple((n, "tensor" if n == "mlp" else None) for n, _ in table))
  with pytest.raises(ValueError, match="unknown rule set 'zero3'"):
    Partitioner(rules="zero3")


def test_activations_keep_their_batch_over_data_and_fsdp():
  p = Partitioner((2, 2, 2), "fsdp_tp")
  # A mesh axis is used once per array: an activation's 'embed' stays replicated.
  specs = p.logical_sharding(P("batch", "length", "embed"))
  assert specs.spec == P(("data", "fsdp"), None, None)
  assert p.logical_sharding(P("embed", "mlp")).spec == P("fsdp", "model")
  assert p.batch_shards == 4 and p.batch_sharding().spec == P(("data", "fsdp"))


def test_shard_batch_splits_the_leading_axis_and_checks_the_size():
  p = Partitioner((4, 2, 1), "fsdp")
  x = p.shard_batch({"image": np.arange(8 * 3).reshape(8, 3)})["image"]
  assert x.shape == (8, 3) and x.addressable_shards[0].data.shape == (1, 3)
  p.check_batch_size(16, "training")
  with pytest.raises(ValueError, match="training: a global batch of 12 does not split over the 8"):
    p.check_batch_size(12, "training")
