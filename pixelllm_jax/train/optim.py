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
  biases, norm scales and 1-D tokens/embeddings are not decayed.
- Parameter paths are tuples of strings (`tree_paths.path_of`), the keys of
  the `params` collection without the leading 'params'.
"""
from typing import Any, Callable

import jax
import optax

from pixelllm_jax.tree_paths import Path, path_of

TrainablePredicate = Callable[[Path], bool]

_TRAIN, _FREEZE = "train", "freeze"


def trainable_labels(params: Any, trainable: TrainablePredicate) -> Any:
  """A tree like `params` of 'train' / 'freeze' labels."""
  return jax.tree_util.tree_map_with_path(
      lambda kp, _: _TRAIN if trainable(path_of(kp)) else _FREEZE, params
  )


def _decay_mask(params: Any) -> Any:
  # Under multi_transform the frozen leaves are `MaskedNode`s (empty pytrees),
  # so this sees trainable leaves only.
  return jax.tree.map(lambda x: x.ndim > 1, params)


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
) -> optax.GradientTransformation:
  """AdamW + warmup/cosine schedule (+ optional clipping), for the trainable leaves.

  The training loop wraps it with `with_frozen(..., model.trainable)`; it
  expects the params tree (no 'params' key on top).
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
  return optax.chain(*parts)


def with_frozen(optimizer: optax.GradientTransformation,
                trainable: TrainablePredicate) -> optax.GradientTransformation:
  """`optimizer` on the leaves where `trainable(path)`; the rest get zero updates and no state."""
  return optax.multi_transform(
      {_TRAIN: optimizer, _FREEZE: optax.set_to_zero()},
      lambda params: trainable_labels(params, trainable),
  )
