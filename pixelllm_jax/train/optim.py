"""The optimizer: AdamW, linear warmup then cosine decay, with frozen parameters.

Choices (paper: AdamW with linear warmup then cosine, DESIGN.md section 2):
- One predicate on parameter paths decides what trains (STYLE.md item 12).
  Frozen leaves go through `optax.set_to_zero` inside `optax.multi_transform`,
  so they get a zero update and carry *no* optimizer state (Adam moments exist
  for trainable leaves only, which matters when a frozen SAM-H or T5-XL base
  would otherwise double the optimizer memory).
- Gradient clipping (optional) sees the trainable gradients only.
- Weight decay applies to leaves with ndim > 1 (kernels, embedding tables);
  biases, norm scales and 1-D tokens/embeddings are not decayed.
- Parameter paths are tuples of strings, the keys of the `params` collection
  without the leading 'params', e.g. ('t5', 'decoder', 'layers_0', 'lora_a').
"""
import dataclasses
from typing import Any, Callable, Literal

import gin
import jax
import optax

Path = tuple[str, ...]
TrainablePredicate = Callable[[Path], bool]

LORA_NAMES = ("lora_a", "lora_b")
_TRAIN, _FREEZE = "train", "freeze"


def path_of(key_path) -> Path:
  """A jax key path (DictKey / GetAttrKey / SequenceKey entries) as a tuple of str."""
  out = []
  for k in key_path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
    else:
      out.append(str(k))
  return tuple(out)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Trainable:
  """Which parameters train, as a predicate on parameter paths.

  Attributes:
    frozen_prefixes: top-level submodules that do not train at all (the paper
      freezes SAM's image encoder and prompt encoder).
    freeze_lm_base: if True, under `lm_prefix` only LoRA parameters (any path
      component named 'lora_a' / 'lora_b') train; the rest of the LM is frozen.
    lm_prefix: the composer's name for the language model submodule.
  """

  frozen_prefixes: tuple[str, ...] = ("sam", "prompt_encoder")
  freeze_lm_base: bool = False
  lm_prefix: str = "t5"

  def __call__(self, path: Path) -> bool:
    if not path:
      return True
    if path[0] in self.frozen_prefixes:
      return False
    if self.freeze_lm_base and path[0] == self.lm_prefix:
      return any(p in LORA_NAMES for p in path)
    return True


TRAIN_ALL = Trainable(frozen_prefixes=(), freeze_lm_base=False, lm_prefix="t5")


@gin.configurable
def trainable_predicate(
    mode: Literal["all", "paper", "paper_lora"] = "paper",
) -> Trainable:
  """Named presets of `Trainable` for gin files (all fields explicit, so gin
  bindings on `Trainable` itself do not leak into the presets).

  - 'all': everything trains.
  - 'paper': SAM image encoder and prompt encoder frozen, everything else trains.
  - 'paper_lora': as 'paper', and the T5 base is frozen; only its LoRA trains.
  """
  sam = ("sam", "prompt_encoder")
  presets = {
      "all": TRAIN_ALL,
      "paper": Trainable(frozen_prefixes=sam, freeze_lm_base=False, lm_prefix="t5"),
      "paper_lora": Trainable(frozen_prefixes=sam, freeze_lm_base=True, lm_prefix="t5"),
  }
  if mode not in presets:
    raise ValueError(f"trainable_predicate mode {mode!r}: choose one of {sorted(presets)}")
  return presets[mode]


def trainable_labels(params: Any, trainable: TrainablePredicate) -> Any:
  """A tree like `params` of 'train' / 'freeze' labels."""
  return jax.tree_util.tree_map_with_path(
      lambda kp, _: _TRAIN if trainable(path_of(kp)) else _FREEZE, params
  )


def trainable_mask(params: Any, trainable: TrainablePredicate) -> Any:
  """A tree like `params` of bools: True where the leaf trains."""
  return jax.tree_util.tree_map_with_path(lambda kp, _: bool(trainable(path_of(kp))), params)


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


@gin.configurable
def make_optimizer(
    *,
    learning_rate: float = gin.REQUIRED,
    warmup_steps: int = gin.REQUIRED,
    total_steps: int = gin.REQUIRED,
    weight_decay: float = gin.REQUIRED,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    grad_clip_norm: float | None = None,
    trainable: TrainablePredicate = TRAIN_ALL,
) -> optax.GradientTransformation:
  """AdamW + warmup/cosine schedule on trainable leaves; frozen leaves get no update.

  The returned transformation expects the params tree (no 'params' key on top);
  its state holds Adam moments only for leaves where `trainable(path)` is True.
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
  return optax.multi_transform(
      {_TRAIN: optax.chain(*parts), _FREEZE: optax.set_to_zero()},
      lambda params: trainable_labels(params, trainable),
  )
