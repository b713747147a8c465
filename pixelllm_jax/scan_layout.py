"""Converting parameter trees between the per-layer and the scanned layouts.

A stack of `depth` blocks (layers.block_stack) stores its parameters either
- per layer: `{name}_0 ... {name}_{depth-1}` (what the weight importers write, what
  Hugging Face / timm / SAM checkpoints map onto, and the layout of unscanned runs), or
- scanned: `{name}` with every leaf stacked on a new leading axis of size depth; or,
  for blocks that repeat with a period p > 1 (SAM's windowed / global blocks),
  `{name}/{name}_0 ... {name}_{p-1}` stacked over depth / p periods, so that layer
  i = g * p + j is `{name}/{name}_j[g]`.

`convert(source, like)` rewrites `source` into the layout of `like` (a tree with the
target structure: arrays, `ShapeDtypeStruct`s, anything), stack by stack, so that an
imported or per-layer checkpoint loads into a scanned model and back. Only what `source`
holds is converted (it may cover a subset of the model); stacks already in the target's
layout, and keys the target lacks, pass through unchanged (the caller's structure check
then names them). Leaves are combined by `stack(list) -> leaf` and split by
`take(leaf, i) -> leaf`; numpy / jax arrays by default, `abstract_ops` for
`jax.ShapeDtypeStruct`s (restoring a checkpoint in its stored layout onto the shardings
of the target's).
"""
import re
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

Stack = Callable[[list], Any]
Take = Callable[[Any, int], Any]


def _default_stack(leaves: list) -> Any:
  if all(isinstance(x, np.ndarray) for x in leaves):
    return np.stack(leaves)
  return jax.numpy.stack(leaves)


def _default_take(leaf: Any, i: int) -> Any:
  return leaf[i]


def _abstract_stack(leaves: list) -> jax.ShapeDtypeStruct:
  x = leaves[0]
  sharding = x.sharding
  if isinstance(sharding, NamedSharding):
    sharding = NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
  return jax.ShapeDtypeStruct((len(leaves), *x.shape), x.dtype, sharding=sharding)


def _abstract_take(x: jax.ShapeDtypeStruct, _: int) -> jax.ShapeDtypeStruct:
  sharding = x.sharding
  if isinstance(sharding, NamedSharding):
    spec = tuple(sharding.spec) + (None,) * (len(x.shape) - len(sharding.spec))
    sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec[1:]))
  return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)


abstract_ops = {"stack": _abstract_stack, "take": _abstract_take}


def _indexed(keys, prefix: str) -> dict[int, str]:
  pattern = re.compile(re.escape(prefix) + r"_(\d+)")
  return {int(m.group(1)): k for k in keys if (m := pattern.fullmatch(k))}


def _period_of(scanned: Mapping[str, Any], prefix: str) -> int:
  """p of a scanned stack: the number of `{prefix}_j` children if they are all it has."""
  members = _indexed(scanned, prefix)
  if members and len(members) == len(scanned) and sorted(members) == list(range(len(members))):
    return len(members)
  return 1


def _map(tree: Any, fn: Callable[[Any], Any]) -> Any:
  return {k: _map(v, fn) for k, v in tree.items()} if isinstance(tree, Mapping) else fn(tree)


def _zip_stack(trees: list, stack: Stack, where: str) -> Any:
  first = trees[0]
  if isinstance(first, Mapping):
    for t in trees[1:]:
      if not isinstance(t, Mapping) or set(t) != set(first):
        raise ValueError(f"{where}: the layers of a stack differ in structure")
    return {k: _zip_stack([t[k] for t in trees], stack, f"{where}/{k}") for k in first}
  return stack(trees)


def _stacked(source: Mapping[str, Any], prefix: str, period: int, stack: Stack,
             where: str) -> Any:
  layers = _indexed(source, prefix)
  depth = len(layers)
  if sorted(layers) != list(range(depth)) or depth % period:
    raise ValueError(f"{where}: layers {sorted(layers)} of '{prefix}' cannot be stacked "
                     f"with period {period} (need 0..n-1, n a multiple of {period})")
  if period == 1:
    return _zip_stack([source[layers[i]] for i in range(depth)], stack, f"{where}/{prefix}")
  return {f"{prefix}_{j}": _zip_stack([source[layers[g * period + j]]
                                       for g in range(depth // period)],
                                      stack, f"{where}/{prefix}")
          for j in range(period)}


def _unstacked(scanned: Mapping[str, Any], prefix: str, depth: int, take: Take) -> dict:
  period = _period_of(scanned, prefix)
  leading = {x.shape[0] for x in jax.tree.leaves(scanned)}
  if leading != {depth // period} or depth % period:
    raise ValueError(f"'{prefix}': scanned leading sizes {sorted(leading)} x period {period} "
                     f"do not give the {depth} layers of the target")
  out = {}
  for i in range(depth):
    g, j = divmod(i, period)
    subtree = scanned if period == 1 else scanned[f"{prefix}_{j}"]
    out[f"{prefix}_{i}"] = _map(subtree, lambda x, g=g: take(x, g))
  return out


def convert(source: Any, like: Any, *, stack: Stack = _default_stack,
            take: Take = _default_take, where: str = "params") -> Any:
  """`source` in the layer layout of `like` (see the module docstring)."""
  if not isinstance(source, Mapping) or not isinstance(like, Mapping):
    return source
  out = {}
  done = set()
  for key, value in source.items():
    if key in done:
      continue
    if key in like:
      out[key] = convert(value, like[key], stack=stack, take=take, where=f"{where}/{key}")
      continue
    m = re.fullmatch(r"(.+)_(\d+)", key)
    if m and isinstance(like.get(m.group(1)), Mapping):  # per layer -> scanned
      prefix = m.group(1)
      out[prefix] = _stacked(source, prefix, _period_of(like[prefix], prefix), stack, where)
      done.update(_indexed(source, prefix).values())
      continue
    wanted = _indexed(like, key)
    if wanted and isinstance(value, Mapping):             # scanned -> per layer
      out.update(_unstacked(value, key, len(wanted), take))
      continue
    out[key] = value
  return out

