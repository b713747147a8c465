"""Initializers for learned absolute position embeddings.

'normal' is the reference initialization (timm EVA02: N(0, 0.02); SAM: zeros,
with pretrained weights always loaded on top). 'sincos' starts from the fixed
2-D sine-cosine embedding (as MAE does): half the channels encode the row, half
the column, at geometric frequencies, with unit amplitude. A tower trained from
scratch then carries absolute position in its token *content* from the first
step, which the per-token localization head needs: RoPE and the attention PE
only shape attention weights, not the values the language model reads. Any
imported checkpoint overwrites the embedding, so the choice only matters when
training from scratch.
"""
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

POS_EMBED_INITS = ("sincos", "normal")


def sincos_2d(grid: int, dim: int) -> np.ndarray:
  """float32[grid*grid, dim]: rows then columns, each dim/4 sines and dim/4 cosines."""
  if dim % 4:
    raise ValueError(f"sincos position embedding needs dim % 4 == 0, got {dim}")
  quarter = dim // 4
  freqs = 1.0 / (10000.0 ** (np.arange(quarter) / quarter))
  pos = np.arange(grid, dtype=np.float64)
  angles = pos[:, None] * freqs[None, :]                        # [grid, dim/4]
  axis_emb = np.concatenate([np.sin(angles), np.cos(angles)], 1)  # [grid, dim/2]
  rows = np.repeat(axis_emb, grid, axis=0)                      # row index major
  cols = np.tile(axis_emb, (grid, 1))
  return np.concatenate([rows, cols], axis=1).astype(np.float32)


def sincos_init(grid: int, num_prefix_tokens: int = 0):
  """Initializer for a [num_prefix_tokens + grid*grid, D] table; prefix rows are zero."""
  def init(key, shape, dtype=jnp.float32):
    del key
    n, dim = shape
    if n != num_prefix_tokens + grid * grid:
      raise ValueError(f"table of {n} rows does not hold {num_prefix_tokens} + {grid}x{grid}")
    table = np.concatenate([np.zeros((num_prefix_tokens, dim), np.float32), sincos_2d(grid, dim)])
    return jnp.asarray(table, dtype)
  return init


def check_init(kind: str, owner: str) -> None:
  """Raises ValueError naming `owner` unless `kind` is one of POS_EMBED_INITS."""
  if kind not in POS_EMBED_INITS:
    raise ValueError(f"{owner}.pos_embed_init must be one of {POS_EMBED_INITS}, got {kind!r}")


def initializer(kind: str, grid: int, num_prefix_tokens: int = 0):
  """The initializer `kind` names for a [num_prefix_tokens + grid*grid, D] table."""
  check_init(kind, "pos_embed")
  if kind == "sincos":
    return sincos_init(grid, num_prefix_tokens)
  return nn.initializers.normal(0.02)
