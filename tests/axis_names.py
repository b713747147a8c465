"""The one check that every parameter carries logical axis names the rules table knows."""
import flax.linen as nn
import jax

from pixelllm_jax import partitioning


def assert_known_axis_names(boxed_params) -> list[tuple[str, nn.LogicallyPartitioned]]:
  """Asserts every leaf of a boxed params tree is nn.LogicallyPartitioned with one name
  per dimension, no name twice, each in partitioning.KNOWN_AXES; lists every offender by path.

  Returns the (path, leaf) pairs, so callers can check what the walk covered.
  """
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed_params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  assert leaves, "no parameters"
  problems, named = [], []
  for kp, leaf in leaves:
    path = "/".join(str(getattr(k, "key", k)) for k in kp)
    if not isinstance(leaf, nn.LogicallyPartitioned):
      problems.append(f"{path}: no logical axis names ({type(leaf).__name__})")
      continue
    names = tuple(leaf.names)
    if len(names) != leaf.value.ndim:
      problems.append(f"{path}: names {names} for shape {leaf.value.shape}")
    if len(set(names)) != len(names):
      problems.append(f"{path}: a name repeats in {names}")
    bad = [n for n in names if n not in partitioning.KNOWN_AXES]
    if bad:
      problems.append(f"{path}: unknown or missing axis names {bad} in {names}")
    named.append((path, leaf))
  assert not problems, "\n".join(problems)
  return named
