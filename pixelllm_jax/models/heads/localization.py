"""Per-token localization head: decoder hidden state -> P points per token.

As the official PixelLLM point predictor (docs/DESIGN.md, "Official code"):
pre-LayerNorm (eps 1e-6), then `depth` Dense layers with exact GELU between
them (hidden 512 at paper scale), the last one emitting P x 2 numbers.
Coordinates are `(raw + 1) / 2` with no sigmoid and no clip, so a freshly
initialized head predicts around the image centre. Unlike the official code,
outputs are normalized to [0, 1] of the unpadded image instead of pixels.
The official head also emitted two unused "logit" channels per point; they are
dropped here.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixelllm_jax import layers


@dataclasses.dataclass(frozen=True)
class LocHeadConfig:
  hidden_dim: int = 512
  depth: int = 4
  points_per_token: int = 2
  layer_norm_eps: float = 1e-6
  dtype: str = "float32"

  def __post_init__(self):
    if self.depth < 1:
      raise ValueError(f"LocHeadConfig.depth must be >= 1, got {self.depth}")
    if self.points_per_token not in (1, 2):
      raise ValueError(f"points_per_token must be 1 or 2, got {self.points_per_token}")


class LocHead(nn.Module):
  """float32[..., D] -> float32[..., P, 2] normalized xy."""

  config: LocHeadConfig

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    x = layers.layer_norm(epsilon=cfg.layer_norm_eps, dtype=dtype, name="norm")(hidden)
    for i in range(cfg.depth - 1):
      x = layers.dense(cfg.hidden_dim, ("embed", "mlp"), dtype=dtype, name=f"dense_{i}")(x)
      x = nn.gelu(x, approximate=False)
      x = nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 2) + ("mlp",))
    out_axes = ("mlp", "points") if cfg.depth > 1 else ("embed", "points")
    raw = layers.dense(2 * cfg.points_per_token, out_axes, dtype=dtype, name="out")(x)
    raw = raw.astype(jnp.float32).reshape(*raw.shape[:-1], cfg.points_per_token, 2)
    return (raw + 1.0) / 2.0


def points_at(points_BNTP2: jax.Array, index_BN: jax.Array) -> jax.Array:
  """float[B, N, P, 2]: each slot's points at position `index` along T (clipped into range)."""
  index = jnp.clip(index_BN, 0, points_BNTP2.shape[2] - 1)
  return jnp.take_along_axis(points_BNTP2, index[:, :, None, None, None], axis=2)[:, :, 0]


def points_to_boxes(points_xP2: jax.Array) -> jax.Array:
  """float[..., P, 2] -> float[..., 4] xyxy (min / max over the P points)."""
  return jnp.concatenate([points_xP2.min(axis=-2), points_xP2.max(axis=-2)], axis=-1)
