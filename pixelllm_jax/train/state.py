"""The train state, born sharded on a mesh (STYLE.md item 6).

`create_sharded_state` follows the t5x / flax recipe: `jax.eval_shape` on the
init gives boxed abstract params carrying logical axis names ->
`nn.get_partition_spec` -> `sharding.logical_to_sharding` (AXIS_RULES) ->
`jax.jit(init, out_shardings=...)`, so no parameter ever exists unsharded.

Params are stored *unboxed*: plain arrays, no `nn.LogicallyPartitioned` boxes.
The logical names live only in the `state_shardings` tree returned next to the
state, which every jit and every checkpoint restore takes explicitly. This
keeps the params tree what importers, optax and Orbax expect.

Optimizer-state shardings mirror the params they belong to (matched by path
suffix and shape); counts and other non-param leaves are replicated.
"""
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from pixelllm_jax import sharding
from pixelllm_jax.batch import Batch
from pixelllm_jax.train import optim


@flax.struct.dataclass
class TrainState:
  """step int32[], params (the 'params' collection, unboxed), opt_state.

  Pure data: no `apply_fn` / `tx` static fields (unlike flax's TrainState).
  Static fields become part of the tree structure, compared by identity for
  modules and optax closures, so a state restored or sharded with trees built
  from another (equal) model or optimizer instance would not match; the train
  step closes over the model and the optimizer instead.
  """

  step: jax.Array
  params: Any
  opt_state: optax.OptState


def opt_state_shardings(opt_state: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for `opt_state` (abstract or concrete): each moment like its param.

  An optimizer-state leaf belongs to a parameter when the parameter's path is
  a suffix of the leaf's path (optax nests `mu`, `nu`, ... trees that mirror
  the params, possibly with frozen leaves masked out) and the shapes agree;
  every other leaf (step counts, ...) is replicated.
  """
  by_path = {
      optim.path_of(kp): (x.shape, s)
      for (kp, x), s in zip(jax.tree_util.tree_leaves_with_path(params),
                            jax.tree.leaves(param_shardings))
  }
  longest = max((len(p) for p in by_path), default=0)

  def leaf_sharding(kp, x):
    path = optim.path_of(kp)
    for start in range(max(len(path) - longest, 0), len(path)):
      shape_and_sharding = by_path.get(path[start:])
      if shape_and_sharding is not None and tuple(shape_and_sharding[0]) == tuple(x.shape):
        return shape_and_sharding[1]
    return sharding.replicated(mesh)

  return jax.tree_util.tree_map_with_path(leaf_sharding, opt_state)


@dataclasses.dataclass(frozen=True)
class StateSpec:
  """What is known about the train state before any array exists.

  abstract: TrainState of `jax.ShapeDtypeStruct`s carrying their shardings
    (an Orbax restore target).
  shardings: TrainState of NamedShardings.
  init: rng -> TrainState, jitted with `out_shardings=shardings`.
  """

  abstract: TrainState
  shardings: TrainState
  init: Callable[[jax.Array], TrainState]


def state_spec(
    model: nn.Module,
    init_batch: Batch,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
) -> StateSpec:
  """Shapes and shardings of the train state, from `jax.eval_shape` only.

  Args:
    model: a linen Module called as `model.apply(variables, batch, train=...)`;
      only its 'params' collection is kept.
    init_batch: a Batch (numpy or abstract) fixing the shapes to trace with;
      its values are not used beyond tracing.
    optimizer: applied to the unboxed params tree.
    mesh: the device mesh; logical names map through `sharding.AXIS_RULES`.
  """
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), init_batch)

  def init_params(rng):  # boxed params: leaves are nn.LogicallyPartitioned
    batch = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return model.init({"params": rng, "dropout": rng}, batch, train=False)["params"]

  def init_state(rng):
    params = nn.meta.unbox(init_params(rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))

  rng = jax.random.key(0)  # shapes only
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.AXIS_RULES):
    boxed = jax.eval_shape(init_params, rng)
    abstract = jax.eval_shape(init_state, rng)
  param_shardings = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh)
  shardings = TrainState(
      step=sharding.replicated(mesh),
      params=param_shardings,
      opt_state=opt_state_shardings(abstract.opt_state, abstract.params, param_shardings, mesh),
  )
  jitted = jax.jit(init_state, in_shardings=sharding.replicated(mesh), out_shardings=shardings)

  def init(rng: jax.Array) -> TrainState:
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.AXIS_RULES):
      return jitted(rng)

  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  return StateSpec(abstract=abstract, shardings=shardings, init=init)


def create_sharded_state(
    model: nn.Module,
    init_batch: Batch,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rng: jax.Array,
) -> tuple[TrainState, TrainState]:
  """Initializes params and optimizer state directly into their shardings.

  Arguments as `state_spec`, plus the init PRNG key. Returns (state,
  state_shardings): a TrainState on `mesh` and a TrainState of NamedShardings.
  """
  spec = state_spec(model, init_batch, optimizer, mesh)
  return spec.init(rng), spec.shardings
