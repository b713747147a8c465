"""The train state, born sharded on the partitioner's mesh.

`state_spec` follows the t5x / flax recipe: `jax.eval_shape` on the model's
init gives boxed abstract params carrying logical axis names -> the
partitioner's rule set -> NamedShardings -> `jax.jit(init, out_shardings=...)`,
so no parameter ever exists unsharded. Optimizer-state shardings follow from
the parameters' (`Partitioner.opt_state_shardings`).

Params are stored *unboxed*: plain arrays, no `nn.LogicallyPartitioned` boxes.
The logical names live only in the shardings tree returned next to the state,
which every jit and every checkpoint restore takes explicitly. This keeps the
params tree what importers, optax and Orbax expect.
"""
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from pixelllm_jax.batch import Batch
from pixelllm_jax.model import BaseModel
from pixelllm_jax.partitioning import Partitioner


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


def abstract_batch(batch: Batch) -> Batch:
  """The batch's shapes and dtypes (values are never needed to build the state)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)


def param_init_fn(model: BaseModel, init_batch: Batch) -> Callable[[jax.Array], Any]:
  """rng -> boxed params of `model` for batches shaped like `init_batch`."""
  shapes = abstract_batch(init_batch)

  def init_params(rng):
    batch = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return model.init(rng, batch)

  return init_params


def state_spec(model: BaseModel, init_batch: Batch, optimizer: optax.GradientTransformation,
               partitioner: Partitioner) -> StateSpec:
  """Shapes and shardings of the train state, from `jax.eval_shape` only.

  Args:
    model: the model API (`model.init` gives boxed params).
    init_batch: a Batch (numpy or abstract) fixing the shapes to trace with.
    optimizer: applied to the unboxed params tree.
    partitioner: mesh and rules.
  """
  init_params = param_init_fn(model, init_batch)

  def init_state(rng):
    params = nn.meta.unbox(init_params(rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))

  _, param_shardings = partitioner.abstract_params(init_params)
  with partitioner.context():
    abstract = jax.eval_shape(init_state, jax.random.key(0))
  shardings = TrainState(
      step=partitioner.replicated,
      params=param_shardings,
      opt_state=partitioner.opt_state_shardings(optimizer, abstract.opt_state, param_shardings),
  )
  init = partitioner.jit(init_state, in_shardings=partitioner.replicated,
                         out_shardings=shardings)
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  return StateSpec(abstract=abstract, shardings=shardings, init=init)
