"""Primitives shared by every tower: parameters with logical axis names.

Every parameter in the project is created through `param_init` (or the
layers below, which use it), so it carries logical axis names; one rules table
in `partitioning.py` (a rule set) maps those names to mesh axes. Shapes use nanodo-style
suffixes in dense code: B batch, T/S sequence, H heads, D width.
"""
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]


def param_init(init: Initializer, axes: Sequence[str | None]) -> Initializer:
  """Wraps an initializer so the parameter it makes carries logical axis names."""
  return nn.with_logical_partitioning(init, tuple(axes))


def dense(
    features: int,
    axes: tuple[str, str],
    *,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    kernel_init: Initializer = nn.initializers.lecun_normal(),
    bias_init: Initializer = nn.initializers.zeros,
    name: str | None = None,
) -> nn.Dense:
  """An `nn.Dense` whose kernel is named `axes` (in, out) and bias `axes[1]`."""
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      kernel_init=param_init(kernel_init, axes),
      bias_init=param_init(bias_init, (axes[1],)),
      name=name,
  )


def layer_norm(
    *, epsilon: float = 1e-6, axis_name: str = "embed", dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.LayerNorm:
  """LayerNorm with scale and bias named `(axis_name,)`."""
  return nn.LayerNorm(
      epsilon=epsilon,
      dtype=dtype,
      scale_init=param_init(nn.initializers.ones, (axis_name,)),
      bias_init=param_init(nn.initializers.zeros, (axis_name,)),
      name=name,
  )


class RMSNorm(nn.Module):
  """T5 layer norm: scale only, no mean subtraction, no bias (computed in float32)."""

  epsilon: float = 1e-6
  axis_name: str = "embed"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param(
        "scale", param_init(nn.initializers.ones, (self.axis_name,)), (x.shape[-1],)
    )
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.epsilon)
    return (y * scale).astype(self.dtype)


def attend(
    q_BTHD: Array,
    k_BSHD: Array,
    v_BSHD: Array,
    *,
    bias_BHTS: Array | None = None,
    mask_BHTS: Array | None = None,
    scale: float | None = None,
    precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST,
) -> Array:
  """Softmax attention; returns [B, T, H, D].

  `scale=None` means 1/sqrt(D); T5 passes 1.0 (it does not scale scores).
  `mask_BHTS` is boolean (True = attend) and broadcastable. The softmax runs in
  float32 whatever the input dtype. Written with einsums (not
  `jax.nn.dot_product_attention`) so the parity tests run at highest
  precision on any backend; a fused kernel can replace this in one place.
  """
  depth = q_BTHD.shape[-1]
  scale = depth**-0.5 if scale is None else scale
  logits = jnp.einsum(
      "bthd,bshd->bhts", q_BTHD, k_BSHD, precision=precision
  ).astype(jnp.float32) * scale
  if bias_BHTS is not None:
    logits = logits + bias_BHTS.astype(jnp.float32)
  if mask_BHTS is not None:
    logits = jnp.where(mask_BHTS, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v_BSHD.dtype)
  return jnp.einsum("bhts,bshd->bthd", weights, v_BSHD, precision=precision)


def patch_embed(
    image_BHWC: Array, *, width: int, patch_size: int, mean: Sequence[float],
    std: Sequence[float], normalized: bool = False, dtype: Dtype = jnp.float32,
    name: str = "patch_embed",
) -> Array:
  """Pixels -> [B, H // p, W // p, width]: a stride-p conv (remainder pixels dropped, as torch).

  `image_BHWC` is uint8[B, H, W, 3], normalized here (to [0, 1], then with the
  tower's mean / std), or with `normalized=True` float[B, H, W, 3] that the
  caller has already normalized that way.

  Call from inside a compact module: the conv's parameters land under `name`.
  """
  if normalized:
    if not jnp.issubdtype(image_BHWC.dtype, jnp.floating):
      raise ValueError(f"normalized=True takes a float image, got {image_BHWC.dtype}")
    x = image_BHWC.astype(dtype)
  else:
    x = image_BHWC.astype(jnp.float32) / 255.0
    x = ((x - jnp.asarray(mean)) / jnp.asarray(std)).astype(dtype)
  return nn.Conv(
      width, (patch_size, patch_size), strides=(patch_size, patch_size), padding="VALID",
      dtype=dtype,
      kernel_init=param_init(nn.initializers.lecun_normal(),
                             ("conv_height", "conv_width", "channels", "embed")),
      bias_init=param_init(nn.initializers.zeros, ("embed",)),
      name=name)(x)



def _carrying(block_cls: type[nn.Module]) -> type[nn.Module]:
  """`block_cls` returning (x, None), the (carry, output) pair nn.scan wants."""
  class Carrying(block_cls):
    def __call__(self, x, *args):
      return super().__call__(x, *args), None
  Carrying.__name__ = Carrying.__qualname__ = block_cls.__name__
  return Carrying


class _Period(nn.Module):
  """Blocks `{prefix}_0 .. {prefix}_{period-1}` in sequence: one step of a periodic scan."""
  block_cls: type[nn.Module]
  block_kwargs: Callable[[int], dict]
  period: int
  prefix: str

  @nn.compact
  def __call__(self, x: Array, *args) -> tuple[Array, None]:
    for j in range(self.period):
      x = self.block_cls(**self.block_kwargs(j), name=f"{self.prefix}_{j}")(x, *args)
    return x, None


def block_stack(block_cls: type[nn.Module], x: Array, *args: Any, depth: int, name: str,
                block_kwargs: Callable[[int], dict], remat: Callable[..., type[nn.Module]],
                scan: bool = False, period: int = 1) -> Array:
  """`x` through `depth` blocks `block_cls(**block_kwargs(i))(x, *args)`, unrolled or scanned.

  Call from inside a compact method; `args` (arrays or static Python values) are the same
  for every block. `remat(cls)` wraps a block class for the backward pass (e.g.
  `lambda c: partitioning.remat(c, mode, static_argnums)`). Parameter layouts
  (scan_layout.py converts between them):
  - unrolled: `{name}_0 ... {name}_{depth-1}`, one subtree per block;
  - scanned, period 1: one subtree `{name}` whose leaves have a leading axis of size
    depth (logical axis 'layers', never sharded): t5x's scanned layout;
  - scanned, period p > 1 (blocks that repeat with period p, e.g. SAM's every-8th global
    block, whose parameters differ in shape): `{name}/{name}_0 ... {name}_{p-1}` with a
    leading axis of depth / p; block j of each period is built with `block_kwargs(j)`.
  'params' and 'cache' are stacked; every block draws its own 'params' and 'dropout'
  keys. Scanning traces and compiles one block (or period) instead of `depth`, which is
  what keeps paper-scale compiles short; the arithmetic is the same.
  """
  if not scan:
    cls = remat(block_cls)
    for i in range(depth):
      x = cls(**block_kwargs(i), name=f"{name}_{i}")(x, *args)
    return x
  if depth % period:
    raise ValueError(f"{name}: depth {depth} is not a multiple of the scan period {period}")
  scan_kw = dict(variable_axes={"params": 0, "cache": 0},
                 split_rngs={"params": True, "dropout": True},
                 in_axes=(nn.broadcast,) * len(args), length=depth // period,
                 metadata_params={nn.PARTITION_NAME: "layers"})
  if period == 1:
    step = nn.scan(remat(_carrying(block_cls)), **scan_kw)(**block_kwargs(0), name=name)
  else:
    step = nn.scan(_Period, **scan_kw)(remat(block_cls), block_kwargs, period, name, name=name)
  x, _ = step(x, *args)
  return x
