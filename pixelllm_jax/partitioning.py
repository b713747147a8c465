"""How a run lays its arrays out and computes: the mesh, the logical-axis rule sets,
the dtype policy and the rematerialization policy (one module for all four).

Mesh. Three axes, `data`, `fsdp` and `model` (any of them may be 1), built in one
place (`make_mesh`); a -1 entry takes the devices left over.

Rule sets. Every parameter and key activation carries logical axis names
(`batch`, `embed`, `mlp`, ...; docs/CONVENTIONS.md lists them). A rule set maps
each name to a mesh axis, a tuple of mesh axes, or None (replicated); it is a
value the `Partitioner` holds and hands to flax at trace time, never a module
constant. Named sets:
- `dp`: the batch over `data` x `fsdp`; parameters replicated there. The wide
  axes (`mlp`, `heads`, `joined_kv`, `vocab`) go over `model`, so with a model
  axis of 1 this is plain data parallelism (the project's first behaviour).
- `fsdp`: as `dp` for the batch, and every parameter's `embed` axis (the model
  width, present in nearly every weight) over `fsdp` (ZeRO-3 style: each
  weight is gathered just before use). Nothing over `model`.
- `fsdp_tp`: `fsdp`'s `embed` over `fsdp` plus `dp`'s wide axes over `model`
  (2-D weight sharding: FSDP x tensor parallelism, the MaxText default).
Activations share the names: an activation `('batch', 'length', 'embed')` takes
`(data, fsdp)` for its batch, and flax leaves its `embed` replicated because a
mesh axis is used once per array (rules are applied in order).

Dtype policy. Parameters are stored in `param_dtype` (float32 master weights by
default); each tower computes in its compute dtype (`compute_dtype`, with
per-tower overrides). Towers return float32 feature maps and the losses are
float32 whatever the compute dtype.

Remat policy. `none`, `block` (rematerialize every transformer block in the
backward pass: keep only its inputs), or the name of a `jax.checkpoint_policies`
policy applied per block (e.g. `dots_with_no_batch_dims_saveable`: keep the
matmul outputs, recompute the rest).
"""
import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")

Rules = tuple[tuple[str, Any], ...]

# Names no rule set shards.
_REPLICATED: Rules = tuple((name, None) for name in (
    "length", "kv_length", "kv", "relpos_buckets", "relpos", "pos", "patch", "conv_height",
    "conv_width", "channels", "queries", "lora_rank", "coords", "points", "prompt_types",
    "layers"))
_BATCH: Rules = (("batch", ("data", "fsdp")),)
_WIDE = ("mlp", "heads", "joined_kv", "vocab")

RULE_SETS: dict[str, Rules] = {
    "dp": _BATCH + (("embed", None),) + tuple((n, "model") for n in _WIDE) + _REPLICATED,
    "fsdp": _BATCH + (("embed", "fsdp"),) + tuple((n, None) for n in _WIDE) + _REPLICATED,
    "fsdp_tp": _BATCH + (("embed", "fsdp"),) + tuple((n, "model") for n in _WIDE) + _REPLICATED,
}

# Every logical name used anywhere in the project; a test checks each parameter's
# names against it, so a typo fails loudly instead of replicating.
KNOWN_AXES = frozenset(name for name, _ in RULE_SETS["dp"])
for _name, _rules in RULE_SETS.items():
  assert frozenset(n for n, _ in _rules) == KNOWN_AXES, _name


def rules_of(rules: str | Rules) -> Rules:
  """A rule set by name, or a given table checked to name every known axis once."""
  if isinstance(rules, str):
    if rules not in RULE_SETS:
      raise ValueError(f"unknown rule set {rules!r}; choose from {sorted(RULE_SETS)}")
    return RULE_SETS[rules]
  table = tuple((str(name), axis) for name, axis in rules)
  names = [name for name, _ in table]
  missing, unknown = KNOWN_AXES - set(names), set(names) - KNOWN_AXES
  if missing or unknown or len(names) != len(set(names)):
    raise ValueError(f"a rule table must name each logical axis once: missing {sorted(missing)}, "
                     f"unknown {sorted(unknown)}, repeated "
                     f"{sorted({n for n in names if names.count(n) > 1})}")
  for name, axis in table:
    for mesh_axis in (axis if isinstance(axis, (tuple, list)) else (axis,)):
      if mesh_axis is not None and mesh_axis not in MESH_AXES:
        raise ValueError(f"rule {name!r} -> {axis!r}: mesh axes are {MESH_AXES}")
  return table


def make_mesh(mesh_shape: Sequence[int] = (-1, 1, 1),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'model') mesh over `devices` (default: all); one -1 takes the rest.

  Axes are `Auto`: shardings come from the logical annotations and jit's in/out
  shardings, and XLA propagates the rest (flax's logical constraints are hints,
  which Explicit axes, jax's default, would turn into assertions).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = list(mesh_shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh_shape {tuple(mesh_shape)} must have one entry per axis {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh_shape {tuple(mesh_shape)}: at most one -1")
  n = len(devices)
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    if n % known:
      raise ValueError(f"mesh_shape {tuple(mesh_shape)} does not divide {n} devices")
    shape[shape.index(-1)] = n // known
  if int(np.prod(shape)) != n:
    raise ValueError(f"mesh_shape {tuple(shape)} needs {int(np.prod(shape))} devices, have {n}")
  return jax.make_mesh(tuple(shape), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


class Partitioner:
  """A mesh and the rule set that places arrays on it; the loops' one source of shardings.

  Attributes:
    mesh: the device mesh.
    rules: the logical-name -> mesh-axis table.
    rule_set: its name (or 'custom').
  """

  def __init__(self, mesh_shape: Sequence[int] = (-1, 1, 1), rules: str | Rules = "dp",
               devices: Sequence[jax.Device] | None = None):
    self.rule_set = rules if isinstance(rules, str) else "custom"
    self.rules = rules_of(rules)
    self.mesh = make_mesh(mesh_shape, devices)

  def __repr__(self) -> str:
    return f"Partitioner(mesh={dict(self.mesh.shape)}, rules={self.rule_set!r})"

  @contextlib.contextmanager
  def context(self) -> Iterator[None]:
    """Mesh and rules active, as flax's logical constraints need them at trace time."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  # ---- shardings
  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def logical_sharding(self, logical_tree: Any) -> Any:
    """A tree of logical PartitionSpecs -> NamedShardings on the mesh."""
    return nn.logical_to_mesh_sharding(logical_tree, self.mesh, self.rules)

  def shardings_of(self, boxed_tree: Any) -> Any:
    """NamedShardings of a tree of `nn.LogicallyPartitioned` (e.g. abstract boxed params)."""
    return self.logical_sharding(nn.get_partition_spec(boxed_tree))

  @property
  def batch_axes(self) -> Any:
    """The mesh axes the leading (batch) dimension is split over."""
    return nn.logical_to_mesh_axes(("batch",), self.rules)[0]

  @property
  def batch_shards(self) -> int:
    """How many pieces the batch is split into (its size must be a multiple)."""
    axes = self.batch_axes
    axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    return int(np.prod([self.mesh.shape[a] for a in axes]))

  def check_batch_size(self, global_batch_size: int, where: str) -> None:
    """Raises naming `where` unless the global batch splits evenly over the batch axes."""
    if global_batch_size % self.batch_shards:
      raise ValueError(
          f"{where}: a global batch of {global_batch_size} does not split over the "
          f"{self.batch_shards} batch shards of mesh {dict(self.mesh.shape)} (rules "
          f"{self.rule_set!r} put the batch over {self.batch_axes}); give a multiple of "
          f"{self.batch_shards}")

  def batch_sharding(self) -> NamedSharding:
    """Leading axis over the batch axes, the rest replicated."""
    return NamedSharding(self.mesh, P(self.batch_axes))

  def replicate(self, value: Any) -> jax.Array:
    """A global array holding `value` (the same on every process) on every device.

    `jax.device_put` cannot place a host value on devices of other processes;
    this works in single- and multi-process runs. PRNG keys keep their type.
    """
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(self.replicate(jax.random.key_data(value)),
                                      impl=jax.random.key_impl(value))
    return jax.make_array_from_process_local_data(self.replicated, np.asarray(value))

  def shard_batch(self, batch: Any) -> Any:
    """Per-process numpy leaves -> global arrays split over the batch axes."""
    spec = self.batch_sharding()
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(spec, np.asarray(x)), batch)

  def opt_state_shardings(self, optimizer: optax.GradientTransformation, abstract_opt_state: Any,
                          param_shardings: Any) -> Any:
    """Each optimizer-state leaf that mirrors a parameter (Adam moments) takes that
    parameter's sharding; the rest (step counts) is replicated.

    Which leaves mirror which parameter is optax's own knowledge
    (`tree_map_params` initializes the optimizer on placeholders); frozen
    parameters appear as `optax.MaskedNode`s and stay so.
    """
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    return optax.tree_utils.tree_map_params(
        optimizer, lambda leaf, sharding: leaf if masked(leaf) else sharding,
        abstract_opt_state, param_shardings,
        transform_non_params=lambda _: self.replicated, is_leaf=masked)

  # ---- compiled functions
  def jit(self, fn: Callable, *, in_shardings: Any = None, out_shardings: Any = None,
          donate_argnums: int | Sequence[int] = (),
          static_argnames: str | Sequence[str] = ()) -> Callable:
    """`jax.jit` with explicit shardings whose calls run inside `context()`."""
    kwargs = {}
    if in_shardings is not None:
      kwargs["in_shardings"] = in_shardings
    if out_shardings is not None:
      kwargs["out_shardings"] = out_shardings
    jitted = jax.jit(fn, donate_argnums=donate_argnums, static_argnames=static_argnames,
                     **kwargs)

    def call(*args, **kw):
      with self.context():
        return jitted(*args, **kw)

    return call

  def abstract_params(self, init_fn: Callable[[jax.Array], Any]) -> tuple[Any, Any]:
    """(boxed abstract params, their NamedShardings) from `init_fn(rng)` via `eval_shape`."""
    with self.context():
      boxed = jax.eval_shape(init_fn, jax.random.key(0))
    return boxed, self.shardings_of(boxed)

  def restore_params(self, checkpoint_dir: str, boxed_abstract_params: Any,
                     step: int | None = None) -> tuple[int, Any]:
    """(step, params) of a training checkpoint, parameters only, placed on this mesh.

    The checkpoint may have been written on any mesh; its optimizer state is
    not read (no optimizer needed). `step` None: the latest.
    """
    from pixelllm_jax.train import checkpoint  # pylint: disable=import-outside-toplevel
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.meta.unbox(boxed_abstract_params), self.shardings_of(boxed_abstract_params))
    return checkpoint.restore_params(checkpoint_dir, target, step=step)


# ---- dtype policy
def _dtype(name: Any) -> jnp.dtype:
  dtype = jnp.dtype(name)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"dtype policy: {name!r} is not a floating dtype")
  return dtype


@dataclasses.dataclass(frozen=True)
class DtypePolicy:
  """Parameter storage dtype and per-tower compute dtypes.

  param_dtype: dtype the parameters are stored (and updated) in.
  compute_dtype: activation / matmul dtype of every tower and the composer.
  tower_dtypes: (tower, dtype) overrides, towers named as the composer's
    config fields ('eva02', 'sam', 'prompt_encoder', 'extractor', 't5',
    'loc_head') or 'composer' for its own layers.
  """

  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  tower_dtypes: tuple[tuple[str, str], ...] = ()

  def __post_init__(self):
    _dtype(self.param_dtype), _dtype(self.compute_dtype)
    object.__setattr__(self, "tower_dtypes", tuple((str(t), str(d)) for t, d in self.tower_dtypes))
    for _, dtype in self.tower_dtypes:
      _dtype(dtype)

  def compute(self, tower: str) -> jnp.dtype:
    return _dtype(dict(self.tower_dtypes).get(tower, self.compute_dtype))

  def cast_params(self, params: Any) -> Any:
    """Floating leaves in `param_dtype` (integer leaves untouched)."""
    dtype = _dtype(self.param_dtype)
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)

  def apply(self, config: Any) -> Any:
    """`config` (a dataclass of tower configs) with each tower's `dtype` set."""
    return _apply_per_tower(config, "dtype", self.compute, self.tower_dtypes)


# ---- remat policy
REMAT_MODES = ("none", "block")
# Policies of `jax.checkpoint_policies` usable by name (the ones that take no arguments).
CHECKPOINT_POLICIES = ("everything_saveable", "nothing_saveable", "dots_saveable",
                       "checkpoint_dots", "dots_with_no_batch_dims_saveable",
                       "checkpoint_dots_with_no_batch_dims")


def check_remat(mode: str) -> str:
  if mode not in REMAT_MODES + CHECKPOINT_POLICIES:
    raise ValueError(f"remat mode {mode!r}: choose from {REMAT_MODES + CHECKPOINT_POLICIES}")
  return mode


def remat(module_cls: type[nn.Module], mode: str,
          static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
  """`module_cls` rematerialized per call as `mode` says (`self` counts as argument 0)."""
  check_remat(mode)
  if mode == "none":
    return module_cls
  policy = None if mode == "block" else getattr(jax.checkpoint_policies, mode)
  return nn.remat(module_cls, policy=policy, static_argnums=static_argnums)


@dataclasses.dataclass(frozen=True)
class RematPolicy:
  """Rematerialization of every tower's blocks in the backward pass.

  mode: 'none', 'block', or a `jax.checkpoint_policies` name (CHECKPOINT_POLICIES).
  tower_modes: (tower, mode) overrides, towers named as in `DtypePolicy`.
  """

  mode: str = "none"
  tower_modes: tuple[tuple[str, str], ...] = ()

  def __post_init__(self):
    check_remat(self.mode)
    object.__setattr__(self, "tower_modes", tuple((str(t), str(m)) for t, m in self.tower_modes))
    for _, mode in self.tower_modes:
      check_remat(mode)

  def mode_for(self, tower: str) -> str:
    return dict(self.tower_modes).get(tower, self.mode)

  def apply(self, config: Any) -> Any:
    """`config` with each tower's `remat` set."""
    return _apply_per_tower(config, "remat", self.mode_for, self.tower_modes)


def _apply_per_tower(config: Any, field: str, value_for: Callable[[str], Any],
                     overrides: Sequence[tuple[str, Any]]) -> Any:
  """Sets `field` on each sub-config of `config` that has it (and on `config`
  itself, as tower 'composer'); overrides must name a tower that has the field."""
  towers = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
  towers = {name: sub for name, sub in towers.items()
            if dataclasses.is_dataclass(sub) and field in {f.name for f in dataclasses.fields(sub)}}
  own = field in {f.name for f in dataclasses.fields(config)}
  unknown = sorted({t for t, _ in overrides} - set(towers) - ({"composer"} if own else set()))
  if unknown:
    raise ValueError(f"{field} policy names towers {unknown}; this model has "
                     f"{sorted(towers) + (['composer'] if own else [])}")
  changes: Mapping[str, Any] = {name: dataclasses.replace(sub, **{field: value_for(name)})
                                for name, sub in towers.items()}
  if own:
    changes = {**changes, field: value_for("composer")}
  return dataclasses.replace(config, **changes)
