"""Exact, jit-friendly resizing of feature maps and position tables.

Resizing is separable, so each axis is one `[out, in]` weight matrix built in
numpy (float64) from the static sizes, applied with an einsum. This lets us
reproduce PyTorch's `F.interpolate(..., align_corners=False)` exactly, which
`jax.image.resize` does not:

- plain bicubic (`antialias=False`): Keys cubic with a = -0.75, source
  coordinate `(i + 0.5) * in / out - 0.5`, four taps with indices clamped to
  the border (edge replication). Used for SAM's pos-embed and feature fusion.
- antialiased (`antialias=True`): PIL-style kernels (cubic a = -0.5, or the
  triangle for linear) whose support widens by `in / out` when downsampling;
  taps outside the input are dropped and the weights renormalized. timm's
  `resample_abs_pos_embed` (EVA02) uses this. `jax.image.resize` computes the
  same thing (its default antialiasing), so the two agree for a = -0.5.
- plain linear (`antialias=False`): two taps, source coordinate clamped at 0,
  upper index clamped at `in - 1` (SAM's `get_rel_pos`).
"""
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys cubic convolution kernel with coefficient `a` (support [-2, 2])."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
  return np.maximum(0.0, 1.0 - np.abs(x))


def _antialiased_matrix(in_size: int, out_size: int, kernel, support: float) -> np.ndarray:
  """torch's `_upsample_*_aa` weights: kernel widened by the scale when downsampling."""
  scale = in_size / out_size
  widen = max(scale, 1.0)
  matrix = np.zeros((out_size, in_size))
  for i in range(out_size):
    center = scale * (i + 0.5)
    lo = max(int(center - support * widen + 0.5), 0)
    hi = min(int(center + support * widen + 0.5), in_size)
    taps = np.arange(lo, hi)
    weights = kernel((taps - center + 0.5) / widen)
    total = weights.sum()
    if total != 0:
      weights = weights / total
    matrix[i, lo:hi] = weights
  return matrix


def bicubic_matrix(in_size: int, out_size: int, *, a: float = -0.75,
                   antialias: bool = False) -> np.ndarray:
  """float64[out_size, in_size] weights of torch's bicubic resize along one axis.

  `antialias=True` follows torch's antialiased path, which always uses the
  PIL kernel; pass a = -0.5 there to match torch (other values are allowed).
  """
  if antialias:
    return _antialiased_matrix(in_size, out_size, lambda x: _cubic(x, a), support=2.0)
  scale = in_size / out_size
  matrix = np.zeros((out_size, in_size))
  for i in range(out_size):
    src = scale * (i + 0.5) - 0.5  # not clamped for cubic, as in torch
    base = math.floor(src)
    t = src - base
    weights = _cubic(np.array([t + 1, t, 1 - t, 2 - t]), a)
    for offset, weight in zip(range(-1, 3), weights):
      matrix[i, min(max(base + offset, 0), in_size - 1)] += weight
  return matrix


def linear_matrix(in_size: int, out_size: int, *, antialias: bool = False) -> np.ndarray:
  """float64[out_size, in_size] weights of torch's 1-D linear resize."""
  if antialias:
    return _antialiased_matrix(in_size, out_size, _triangle, support=1.0)
  scale = in_size / out_size
  matrix = np.zeros((out_size, in_size))
  for i in range(out_size):
    src = max(scale * (i + 0.5) - 0.5, 0.0)
    lo = min(int(src), in_size - 1)
    hi = min(lo + 1, in_size - 1)
    t = src - lo
    matrix[i, lo] += 1 - t
    matrix[i, hi] += t
  return matrix


def apply_matrix(x: jax.Array, matrix: np.ndarray, axis: int) -> jax.Array:
  """Contracts `x` along `axis` with `matrix[out, in]`; the output keeps x's dtype."""
  moved = jnp.moveaxis(x, axis, -1)
  y = jnp.einsum("...i,oi->...o", moved, jnp.asarray(matrix, dtype=x.dtype),
                 precision=jax.lax.Precision.HIGHEST)
  return jnp.moveaxis(y, -1, axis)


def resize_bicubic(x: jax.Array, out_hw: Sequence[int], *, a: float = -0.75,
                   antialias: bool = False) -> jax.Array:
  """Bicubic resize of channels-last maps: [..., h, w, C] -> [..., H, W, C].

  Defaults reproduce `torch.nn.functional.interpolate(mode='bicubic',
  align_corners=False)`; `a=-0.5, antialias=True` reproduces the same call with
  `antialias=True` (timm's pos-embed resampling). Equal sizes return `x`.
  """
  in_h, in_w = x.shape[-3], x.shape[-2]
  out_h, out_w = int(out_hw[0]), int(out_hw[1])
  if in_h != out_h:
    x = apply_matrix(x, bicubic_matrix(in_h, out_h, a=a, antialias=antialias), axis=x.ndim - 3)
  if in_w != out_w:
    x = apply_matrix(x, bicubic_matrix(in_w, out_w, a=a, antialias=antialias), axis=x.ndim - 2)
  return x


def resize_linear(x: jax.Array, out_size: int, *, axis: int = 0,
                  antialias: bool = False) -> jax.Array:
  """Linear resize of one axis (torch `mode='linear'`, align_corners=False)."""
  axis = axis % x.ndim
  if x.shape[axis] == out_size:
    return x
  return apply_matrix(x, linear_matrix(x.shape[axis], out_size, antialias=antialias), axis)
