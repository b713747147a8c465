"""The optimizer: AdamW, linear warmup then cosine decay, with frozen parameters.

Choices (paper: AdamW with linear warmup then cosine, docs/DESIGN.md "Tasks"):
- What trains is one predicate on parameter paths, the model's
  (`BaseModel.trainable`, from `PixelLLMConfig.frozen`). `with_frozen` sends
  frozen leaves through `optax.set_to_zero` inside `optax.multi_transform`, so
  they get a zero update and carry *no* optimizer state (Adam moments exist
  for trainable leaves only, which matters when a frozen SAM-H or T5-XL base
  would otherwise double the optimizer memory).
- Gradient clipping (optional) sees the trainable gradients only.
- Weight decay applies to leaves with ndim > 1 (kernels, embedding tables);
  biases, norm scales and 1-D tokens/embeddings are not decayed. A scanned
  stack's leading layer axis (layers.block_stack: under a key named 'blocks' or
  'layers', never '{name}_i') is not counted, so both layouts decay the same leaves.
- Layer-wise learning-rate decay (optional, `layer_decay`): see
  `scale_by_layer_decay` below.
- Learning-rate multipliers per top-level submodule (optional,
  `lr_multipliers`, e.g. the official refseg configs' 10x on 'mask_adapter'):
  see `scale_by_submodule` below.
- Parameter paths are tuples of strings (`tree_paths.path_of`), the keys of
  the `params` collection without the leading 'params'.
"""
import re
from typing import Any, Callable, Mapping

import jax
import numpy as np
import optax

from pixelllm_jax.tree_paths import Path, path_of

TrainablePredicate = Callable[[Path], bool]

_TRAIN, _FREEZE = "train", "freeze"


def trainable_labels(params: Any, trainable: TrainablePredicate) -> Any:
  """A tree like `params` of 'train' / 'freeze' labels."""
  return jax.tree_util.tree_map_with_path(
      lambda kp, _: _TRAIN if trainable(path_of(kp)) else _FREEZE, params
  )


# The names layers.block_stack gives a scanned stack (EVA02 and SAM 'blocks', the T5
# encoder and decoder 'layers'); their leaves carry one leading layer axis. Unrolled
# stacks are '{name}_i', so an exact match means scanned.
_SCANNED_STACKS = frozenset({"blocks", "layers"})


def _layer_axes(path: Path) -> int:
  return int(any(k in _SCANNED_STACKS for k in path))


def _decay_mask(params: Any) -> Any:
  # Under multi_transform the frozen leaves are `MaskedNode`s (empty pytrees),
  # so this sees trainable leaves only.
  return jax.tree_util.tree_map_with_path(
      lambda kp, x: x.ndim - _layer_axes(path_of(kp)) > 1, params)


def warmup_cosine(
    *, learning_rate: float, warmup_steps: int, total_steps: int
) -> optax.Schedule:
  """0 -> learning_rate linearly over warmup_steps, then cosine to 0 at total_steps."""
  if total_steps <= warmup_steps:
    raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=learning_rate,
      warmup_steps=warmup_steps,
      decay_steps=total_steps,  # optax counts decay_steps from 0, warmup included
      end_value=0.0,
  )


# Layer-wise learning-rate decay (the recipe and its sources: `scale_by_layer_decay`).
_STEM = frozenset({"patch_embed", "pos_embed"})
_BLOCKS = "blocks"
_BLOCK_I = re.compile(_BLOCKS + r"_(\d+)")


def _block_index(key: str) -> int | None:
  m = _BLOCK_I.fullmatch(key)
  return int(m.group(1)) if m else None


def _scan_period(stack: Mapping[str, Any]) -> int:
  """p of a scanned stack: its children are `blocks_0 ... blocks_{p-1}` (scan_layout.py)."""
  members = [_block_index(k) for k in stack]
  if members and all(j is not None for j in members) and sorted(members) == list(
      range(len(members))):
    return len(members)
  return 1


def tower_layer_ids(tower: Mapping[str, Any]) -> tuple[int, dict[Path, Any]]:
  """(depth, {path in the tower: layer id}) for a ViT tower's leaves.

  An id is an int, or, for a scanned stack's leaf (leading axis of size depth / p),
  int[depth / p] along that axis: layer g * p + j for `blocks/blocks_j[g]`, p = 1
  for `blocks[g]`. The depth is the number of `blocks_i`, or the scanned leading size
  times p. Leaves hidden as optax `MaskedNode`s (frozen) have no entry.
  """
  unrolled = [i for k in tower if (i := _block_index(k)) is not None]
  stack = tower.get(_BLOCKS)
  period = _scan_period(stack) if isinstance(stack, Mapping) else 1
  if unrolled:
    depth = len(unrolled)
  elif isinstance(stack, Mapping) and (leaves := jax.tree.leaves(stack)):
    depth = leaves[0].shape[0] * period
  else:
    depth = None  # no blocks, or all of them frozen: only a tree without other leaves is fine

  ids = {}
  for kp, leaf in jax.tree_util.tree_leaves_with_path(tower):
    path = path_of(kp)
    if depth is None:
      raise ValueError(f"layer decay: cannot tell the tower's depth (no trainable "
                       f"'{_BLOCKS}_i' or scanned '{_BLOCKS}') for {path}")
    if path[0] in _STEM:
      ids[path] = 0
    elif (i := _block_index(path[0])) is not None:
      ids[path] = i + 1
    elif path[0] == _BLOCKS:
      j = _block_index(path[1]) if period > 1 else 0
      ids[path] = np.arange(leaf.shape[0]) * period + j + 1
    else:
      ids[path] = depth + 1
  return depth, ids


def scale_by_layer_decay(decay: float, tower: str) -> optax.GradientTransformation:
  """Multiplies the updates of `tower`'s leaves by decay ** (depth + 1 - layer id).

  Stateless. Leaves outside `params[tower]` pass through unchanged; a scanned leaf's
  scale is a vector along its leading layer axis, broadcast. Placed after the
  learning-rate scaling (see `make_optimizer`), so it acts as a per-layer learning rate.

  The recipe (BEiT / MAE fine-tuning; ViTDet's `get_vit_lr_decay_rate`, detectron2
  modeling/backbone/vit.py), as the official PixelLLM applies it (google-research/scenic:
  projects/pixel_llm/partition_utils.py calls projects/baselines/centernet/
  optimizer_utils.py `optimizer_with_layerwise_decay`):
  - one ViT tower decays: the official densecap config (configs/t5/pixel_llm_t5_densecap.py)
    and the joint one (configs/t5/pixel_llm_t5_trace_ref_densecap_llava.py; the bert
    variants alike) set `layerwise_decay = 0.8`, `num_layers = git_backbone depth` (24) and
    `decay_layer_prefix = 'git_backbone/blocks.'`: the EVA02 image tower, 'eva02' here.
    The other stage configs (trace, ref, refseg, the refseg joint mixture) set none.
  - layer ids: the stem (`decay_stem_layers = ['patch_embed.proj', 'pos_embed']`) is 0,
    block i is i + 1, everything else is depth + 1;
  - scale = decay ** (depth + 1 - id): the stem gets decay**(depth + 1), block i
    decay**(depth - i), the rest (here the tower's final `norm`, and its `cls_token`,
    which the official stem list does not name; BEiT / MAE put it at 0) gets 1.
  Differences from the official code: its stem names match every trainable parameter
  of any tower (a trainable SAM `pos_embed` would decay too; its configs freeze SAM), here
  only the named tower is scaled; the depth is read from the tree, not a `num_layers`.
  """
  if not decay > 0:
    raise ValueError(f"layer decay must be > 0, got {decay}")

  def update_fn(updates, state, params=None):
    del params
    if not isinstance(updates, Mapping) or tower not in updates:
      raise ValueError(f"layer decay: no '{tower}' at the top of the parameter tree "
                       f"(keys: {sorted(updates) if isinstance(updates, Mapping) else updates})")
    depth, ids = tower_layer_ids(updates[tower])

    def scaled(kp, u):
      path = path_of(kp)
      if path[0] != tower:
        return u
      scale = np.power(np.float64(decay), depth + 1 - np.asarray(ids[path[1:]]))
      scale = scale.astype(np.float32).reshape(scale.shape + (1,) * (u.ndim - scale.ndim))
      return (u * scale).astype(u.dtype)

    return jax.tree_util.tree_map_with_path(scaled, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def scale_by_submodule(multipliers: Mapping[str, float]) -> optax.GradientTransformation:
  """Multiplies the updates of the top-level submodules named in `multipliers` by their factor.

  Stateless; placed after the learning-rate scaling (`make_optimizer`), so a factor acts as
  a learning-rate multiplier for that submodule, weight decay included. This is the official
  refseg configs' `backbone_multiplier = 10` on the 'mask_adapter' prefix (scenic
  projects/baselines/centernet/optimizer_utils.py builds one optimizer per prefix with
  learning rate lr * multiplier: the same update, as for layer decay). A name the parameter
  tree lacks is an error at the first update, not a silent no-op.
  """
  multipliers = dict(multipliers)
  for name, factor in multipliers.items():
    if not factor > 0:
      raise ValueError(f"lr_multipliers[{name!r}] must be > 0, got {factor}")

  def update_fn(updates, state, params=None):
    del params
    missing = sorted(set(multipliers) - set(updates))
    if missing:
      raise ValueError(f"lr_multipliers name {missing}, not at the top of the parameter tree "
                       f"(keys: {sorted(updates)})")

    def scaled(kp, u):
      factor = multipliers.get(path_of(kp)[0])
      return u if factor is None else (u * factor).astype(u.dtype)

    return jax.tree_util.tree_map_with_path(scaled, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(
    *,
    learning_rate: float,
    warmup_steps: int,
    total_steps: int,
    weight_decay: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    grad_clip_norm: float | None = None,
    layer_decay: float | None = None,
    layer_decay_tower: str = "eva02",
    lr_multipliers: Mapping[str, float] | None = None,
) -> optax.GradientTransformation:
  """AdamW + warmup/cosine schedule (+ optional clipping and layer decay), for the trainable leaves.

  The training loop wraps it with `with_frozen(..., model.trainable)`; it
  expects the params tree (no 'params' key on top). `layer_decay` (None: off; the
  official densecap and joint configs: 0.8) scales the updates of `layer_decay_tower`
  per layer (`scale_by_layer_decay`). `lr_multipliers` ({submodule: factor}; None: off)
  scales whole submodules' updates (`scale_by_submodule`).

  Order, as the official code composes them (scenic train_lib/optimizers.py
  `get_optimizer` per layer group inside centernet's `optimizer_with_layerwise_decay`,
  over the trainable parameters only, the frozen ones split off first):
  clip -> Adam -> decoupled weight decay (`+ wd * param`) -> * -lr(step) -> * layer scale.
  The official code builds one AdamW per layer id with learning rate lr * scale; since
  the learning rate multiplies Adam's direction and the weight-decay term alike, one
  AdamW followed by the scale is the same update (the weight decay is scaled too), and
  Adam's moments never see the scale. Clipping sees the raw gradients in both; here it
  is one global norm over all trainable leaves (the official code would clip each
  layer group by its own norm; its PixelLLM configs set no clipping).
  """
  schedule = warmup_cosine(
      learning_rate=learning_rate, warmup_steps=warmup_steps, total_steps=total_steps
  )
  parts = []
  if grad_clip_norm is not None:
    parts.append(optax.clip_by_global_norm(grad_clip_norm))
  parts.append(
      optax.adamw(
          schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask
      )
  )
  if layer_decay is not None:
    parts.append(scale_by_layer_decay(layer_decay, layer_decay_tower))
  if lr_multipliers:
    parts.append(scale_by_submodule(lr_multipliers))
  return optax.chain(*parts)


def with_frozen(optimizer: optax.GradientTransformation,
                trainable: TrainablePredicate) -> optax.GradientTransformation:
  """`optimizer` on the leaves where `trainable(path)`; the rest get zero updates and no state."""
  return optax.multi_transform(
      {_TRAIN: optimizer, _FREEZE: optax.set_to_zero()},
      lambda params: trainable_labels(params, trainable),
  )
