"""The one LoRA-capable projection, its config, merging, and the trainable-path predicate.

Low-rank adaptation (Hu et al. 2021) as the official PixelLLM T5 head uses it:
the effective kernel is `W + scale * A @ B` with `A [in, rank]` drawn from the
layer's own kernel initializer and `B [rank, out]` zero-initialized, so a fresh
adapter leaves the model unchanged. `scale` is a plain multiplier (official:
2.0), not the `alpha / rank` of the LoRA paper.

Where adapters go is typed (`LoraConfig`, checked at construction), and what
trains is one predicate on parameter paths (`is_lora_path`), never a regex
copied into every config.
"""
import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixelllm_jax import layers, tree_paths

Array = jax.Array
Dtype = Any

PROJECTIONS = ("q", "k", "v", "o")
LORA_PARAM_NAMES = ("lora_a", "lora_b")


def _check_targets(field: str, targets: Sequence[str]) -> tuple[str, ...]:
  if isinstance(targets, str):
    raise TypeError(
        f"LoraConfig.{field} must be a tuple of {PROJECTIONS}, got the string {targets!r}")
  targets = tuple(targets)
  bad = [t for t in targets if t not in PROJECTIONS]
  if bad:
    raise ValueError(f"LoraConfig.{field}: unknown projections {bad}; choose from {PROJECTIONS}")
  return targets


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which attention projections of a T5 get an adapter, and its size.

  rank: adapter rank; 0 disables LoRA everywhere (plain projections, no lora params).
  scale: plain multiplier on `A @ B` (official PixelLLM: 2.0).
  encoder_self / decoder_self / decoder_cross: subsets of ('q', 'k', 'v', 'o').
  """

  rank: int = 0
  scale: float = 2.0
  encoder_self: tuple[str, ...] = ("q", "v")
  decoder_self: tuple[str, ...] = ("q", "v")
  decoder_cross: tuple[str, ...] = ("q", "v")

  def __post_init__(self):
    if self.rank < 0:
      raise ValueError(f"LoraConfig.rank must be >= 0, got {self.rank}")
    for field in ("encoder_self", "decoder_self", "decoder_cross"):
      # Lists from gin become tuples so the config stays hashable.
      object.__setattr__(self, field, _check_targets(field, getattr(self, field)))

  def rank_for(self, targets: tuple[str, ...], projection: str) -> int:
    """The adapter rank of `projection` ('q'|'k'|'v'|'o') in an attention with `targets`."""
    return self.rank if projection in targets else 0


class LoraDense(nn.Module):
  """y = x @ kernel (+ bias) + scale * (x @ lora_a) @ lora_b.

  Attributes:
    features: output width.
    kernel_axes: logical names (in, out) of the kernel; lora_a is named
      (in, 'lora_rank') and lora_b ('lora_rank', out).
    rank: adapter rank; 0 makes a plain projection with no lora params.
    scale: multiplier on the adapter product.
    use_bias: adds a bias named (out,).
    kernel_init: init of the kernel and of lora_a; lora_b starts at zero.
  Input `[..., in]` -> output `[..., features]` in `dtype`.
  """

  features: int
  kernel_axes: tuple[str, str]
  rank: int = 0
  scale: float = 2.0
  use_bias: bool = False
  kernel_init: layers.Initializer = nn.initializers.lecun_normal()
  bias_init: layers.Initializer = nn.initializers.zeros
  dtype: Dtype = jnp.float32
  precision: jax.lax.Precision | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_axis, out_axis = self.kernel_axes
    d_in = x.shape[-1]
    kernel = self.param(
        "kernel", layers.param_init(self.kernel_init, self.kernel_axes), (d_in, self.features))
    x = x.astype(self.dtype)
    y = jnp.einsum("...i,io->...o", x, kernel.astype(self.dtype), precision=self.precision)
    if self.rank > 0:
      lora_a = self.param(
          "lora_a", layers.param_init(self.kernel_init, (in_axis, "lora_rank")), (d_in, self.rank))
      lora_b = self.param(
          "lora_b", layers.param_init(nn.initializers.zeros, ("lora_rank", out_axis)),
          (self.rank, self.features))
      down = jnp.einsum("...i,ir->...r", x, lora_a.astype(self.dtype), precision=self.precision)
      up = jnp.einsum("...r,ro->...o", down, lora_b.astype(self.dtype), precision=self.precision)
      y = y + jnp.asarray(self.scale, self.dtype) * up
    if self.use_bias:
      bias = self.param("bias", layers.param_init(self.bias_init, (out_axis,)), (self.features,))
      y = y + bias.astype(self.dtype)
    return y


def _unbox(x: Any) -> Any:
  return x.unbox() if isinstance(x, nn.meta.AxisMetadata) else x


def _rebox(like: Any, value: Array) -> Any:
  return like.replace_boxed(value) if isinstance(like, nn.meta.AxisMetadata) else value


def merge_lora(params: Mapping[str, Any], *, scale: float = LoraConfig.scale) -> dict[str, Any]:
  """Folds every adapter into its kernel: kernel <- kernel + scale * lora_a @ lora_b.

  Works on any nesting (a bare params tree or `{'params': ...}`) of plain arrays
  or `nn.LogicallyPartitioned` boxes (boxes are kept, with their names). The
  lora_a / lora_b leaves are dropped, so the result loads into the same model
  built with `LoraConfig(rank=0)`. Pass the `LoraConfig.scale` the model used.
  The product is taken at highest precision and cast to the kernel's dtype.
  """

  def merge(node: Any) -> Any:
    if not isinstance(node, Mapping):
      return node
    out = {k: merge(v) for k, v in node.items() if k not in LORA_PARAM_NAMES}
    has_a, has_b = "lora_a" in node, "lora_b" in node
    if has_a != has_b or ((has_a or has_b) and "kernel" not in node):
      raise ValueError(f"incomplete LoRA projection with leaves {sorted(node)}")
    if has_a:
      kernel = _unbox(node["kernel"])
      delta = jnp.matmul(_unbox(node["lora_a"]).astype(jnp.float32),
                         _unbox(node["lora_b"]).astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
      merged = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
      out["kernel"] = _rebox(node["kernel"], merged)
    return out

  return merge(params)


def is_lora_path(path: str | Sequence[Any]) -> bool:
  """True if a parameter path names an adapter leaf (lora_a / lora_b).

  `path` is a '/'-joined string ('decoder/layers_0/self_attention/query/lora_a'),
  a tuple of names (as from `flax.traverse_util.flatten_dict`), or a jax key path
  (as `jax.tree_util.tree_map_with_path` gives, boxes included).
  """
  parts = path.split("/") if isinstance(path, str) else tree_paths.path_of(path)
  return any(p in LORA_PARAM_NAMES for p in parts)
