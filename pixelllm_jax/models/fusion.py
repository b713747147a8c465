"""Fusion of the image towers' feature maps: resize to one grid, concatenate.

PixelLLM's `git_visual_features+sam_visual_features` key: every map is resized
to the largest grid (EVA02's 27x27 at 384 px; SAM gives 24x24) and the channels
are concatenated in the order given, e.g. 27x27x(1024+256). Resizing is torch's
plain bicubic (a = -0.75, no antialiasing); see `resize.py`.
"""
from typing import Sequence

import jax
import jax.numpy as jnp

from pixelllm_jax.models import resize


def fuse_feature_maps(maps: Sequence[jax.Array]) -> jax.Array:
  """[float32[B, h_i, w_i, C_i]] -> float32[B, max h, max w, sum C_i].

  The target grid takes the largest height and the largest width; maps already
  on it (and a single map) pass through unchanged.
  """
  if not maps:
    raise ValueError("fuse_feature_maps needs at least one map")
  if len({m.shape[0] for m in maps}) != 1:
    raise ValueError(f"batch sizes differ: {[m.shape for m in maps]}")
  out_hw = (max(m.shape[1] for m in maps), max(m.shape[2] for m in maps))
  resized = [resize.resize_bicubic(m, out_hw) for m in maps]
  return resized[0] if len(resized) == 1 else jnp.concatenate(resized, axis=-1)
