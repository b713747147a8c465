"""Orbax checkpoints: the train state and the input-iterator state together.

A step directory holds two items (the nanodo recipe):
  state/  the TrainState pytree (step, params, opt_state), StandardSave
  data/   the data iterator's `get_state()` as JSON, JsonSave
so a resumed run continues from the same parameters *and* the same example.
Saves are asynchronous (the device->host copy happens inside `save`, so the
donated state may be overwritten by the next step right after); call
`wait_until_finished` before exiting. Restores go straight onto the target
shardings, given as `jax.ShapeDtypeStruct(..., sharding=...)`, so a checkpoint
written on one mesh restores onto another. `restore_params` reads the
parameters alone (evaluation and inference need no optimizer).

Separately, `save_params` / `load_params` read and write a bare params tree
(possibly covering only some submodules), the format an importer of
pretrained weights writes and `train(init_checkpoint=...)` reads.
"""
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from pixelllm_jax import scan_layout
from pixelllm_jax.tree_paths import path_of

STATE, DATA = "state", "data"


def make_manager(directory: str, *, max_to_keep: int | None = 3,
                 async_save: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager over `directory` with items ('state', 'data')."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
  )
  return ocp.CheckpointManager(
      os.path.abspath(directory), options=options, item_names=(STATE, DATA)
  )


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: Any) -> bool:
  """Starts saving `state` and the iterator state at `step` (returns once on host)."""
  return manager.save(
      int(step),
      args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(data_state),
      ),
  )


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def restore(manager: ocp.CheckpointManager, abstract_state: Any, shardings: Any,
            step: int | None = None) -> tuple[Any, Any] | None:
  """Restores (state, data_state) at `step` (default: latest) onto `shardings`.

  Args:
    abstract_state: a tree with the state's structure whose leaves have
      `.shape` and `.dtype` (e.g. `jax.eval_shape` output or the live state).
    shardings: the same structure of NamedShardings.

  Returns None when the directory holds no checkpoint.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  restored = manager.restore(
      step,
      args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(abstract_state, shardings)),
          data=ocp.args.JsonRestore(),
      ),
  )
  return restored[STATE], restored[DATA]


def restore_params(directory: str, abstract_params: Any,
                   step: int | None = None) -> tuple[int, Any]:
  """(step, params) of the training checkpoint at `step` (default: the latest) in
  `directory` (a model dir's `checkpoints/`), the optimizer state left unread.

  `abstract_params`: the params tree of `jax.ShapeDtypeStruct`s with the target
  shardings (any mesh); the checkpoint's params must have the same structure
  and shapes, else ValueError naming the differences.
  """
  manager = ocp.CheckpointManager(
      os.path.abspath(directory),
      item_handlers={STATE: ocp.PyTreeCheckpointHandler(), DATA: ocp.JsonCheckpointHandler()})
  try:
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
      have = manager.all_steps()
      raise FileNotFoundError(f"no checkpoint{'' if step is None else f' at step {step}'} under "
                              f"{os.path.abspath(directory)} (steps there: {list(have)})")
    stored = manager.item_metadata(step)[STATE].tree["params"]
    stored_layout = _in_stored_layout(abstract_params, stored)
    _check_same_tree(stored, stored_layout, f"{directory} step {step}")
    target = {"params": stored_layout}
    restored = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)}))
  finally:
    manager.close()
  return int(step), _in_model_layout(restored[STATE]["params"], abstract_params)


def _in_stored_layout(abstract: Any, stored: Any) -> Any:
  """The model's abstract params (with shardings) rearranged into the layer layout of the
  checkpoint's tree `stored` (scanned or per layer: scan_layout.py)."""
  return scan_layout.convert(abstract, stored, **scan_layout.abstract_ops)


def _in_model_layout(restored: Any, abstract: Any) -> Any:
  """Restored params in the model's layer layout, each leaf on the model's sharding."""
  converted = scan_layout.convert(restored, abstract)
  sharding = {path_of(kp): x.sharding for kp, x in jax.tree_util.tree_leaves_with_path(abstract)}
  # A no-op for leaves already in place; stacked / split layers move onto their sharding.
  return jax.tree_util.tree_map_with_path(
      lambda kp, x: jax.device_put(x, sharding[path_of(kp)]), converted)


def _check_same_tree(stored: Any, wanted: Any, where: str) -> None:
  stored_leaves = {path_of(kp): meta for kp, meta in jax.tree_util.tree_leaves_with_path(stored)}
  wanted_leaves = {path_of(kp): x for kp, x in jax.tree_util.tree_leaves_with_path(wanted)}
  problems = [f"missing {'/'.join(p)}" for p in sorted(set(wanted_leaves) - set(stored_leaves))]
  problems += [f"not in the model: {'/'.join(p)}"
               for p in sorted(set(stored_leaves) - set(wanted_leaves))]
  problems += [f"{'/'.join(p)}: stored {tuple(stored_leaves[p].shape)}, model "
               f"{tuple(wanted_leaves[p].shape)}"
               for p in sorted(set(stored_leaves) & set(wanted_leaves))
               if tuple(stored_leaves[p].shape) != tuple(wanted_leaves[p].shape)]
  if problems:
    raise ValueError(f"{where}: the checkpoint's parameters do not fit the model "
                     f"({len(problems)} differences): {problems[:10]}")


def save_params(path: str, params: Any) -> None:
  """Writes a bare params tree (blocking) to `path`, which must not exist."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(path), params)
  checkpointer.wait_until_finished()


def load_params(path: str, params: Any, param_shardings: Any) -> Any:
  """Overwrites the leaves of `params` that the checkpoint at `path` holds.

  `path` is a bare params tree (`save_params`, what `convert` writes) or a training
  run's checkpoints (its `checkpoints/` folder, or the model dir holding it): then the
  latest step's parameters are read, not its optimizer state (chaining the paper's
  stages: the next stage starts from the previous one's run).

  The checkpoint may cover a subset of the model (e.g. only 't5'); leaves it
  does not hold keep their values from `params`. Every leaf it holds must exist
  in `params` with the same shape, else ValueError (a silent skip would train
  from random weights without a word). Restored leaves land on their
  `param_shardings`; dtypes follow `params`.
  """
  path = os.path.abspath(path)
  stored, restore = _params_reader(path)
  stored_leaves = {
      path_of(kp): meta for kp, meta in jax.tree_util.tree_leaves_with_path(stored)
  }
  model_layout = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              params, param_shardings)
  stored_layout = _in_stored_layout(model_layout, stored)
  ours = {path_of(kp): (kp, x) for kp, x in jax.tree_util.tree_leaves_with_path(stored_layout)}
  unknown = sorted("/".join(p) for p in stored_leaves if p not in ours)
  if unknown:
    raise ValueError(f"{path}: parameters not in the model: {unknown[:10]}")
  for p, meta in stored_leaves.items():
    if tuple(meta.shape) != tuple(ours[p][1].shape):
      raise ValueError(f"{path}: {'/'.join(p)} has shape {tuple(meta.shape)}, "
                       f"the model wants {tuple(ours[p][1].shape)}")

  abstract = jax.tree_util.tree_map_with_path(lambda kp, _: ours[path_of(kp)][1], stored)
  loaded = _in_model_layout(restore(abstract), model_layout)
  by_path = {path_of(kp): x for kp, x in jax.tree_util.tree_leaves_with_path(loaded)}
  return jax.tree_util.tree_map_with_path(
      lambda kp, x: by_path.get(path_of(kp), x), params
  )



def _params_reader(path: str):
  """(stored params metadata tree, restore(abstract) -> params) for a bare params
  checkpoint or a training run's latest checkpoint at `path`."""
  runs = [d for d in (os.path.join(path, "checkpoints"), path)
          if os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))]
  if not runs:
    checkpointer = ocp.StandardCheckpointer()
    return (checkpointer.metadata(path).item_metadata.tree,
            lambda abstract: checkpointer.restore(path, abstract))
  manager = ocp.CheckpointManager(
      runs[0], item_handlers={STATE: ocp.PyTreeCheckpointHandler(),
                              DATA: ocp.JsonCheckpointHandler()})
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"no finished checkpoint under {runs[0]}")

  def restore(abstract):
    target = {"params": abstract}
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**{
          STATE: ocp.args.PyTreeRestore(
              item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
              partial_restore=True)}))
    finally:
      manager.close()
    return restored[STATE]["params"]
  return manager.item_metadata(step)[STATE].tree["params"], restore
