"""SAM ViT image encoder with its conv neck (PixelLLM's frozen encoder B).

As segment-anything's `ImageEncoderViT`:
- conv patch embed, plus an absolute pos-embed learned on a `pretrain_grid`
  square grid (64 for SAM at 1024 px) and bicubically resized to the current
  grid (PixelLLM runs SAM at 384 px: 64 -> 24);
- pre-LN blocks (eps 1e-6): windowed attention (zero-pad the map to a multiple
  of the window, partition, attend inside each window, unpartition, crop) in
  every block except `global_blocks`; joint qkv projection with bias; decomposed
  relative position bias (MViTv2): per-axis tables of `2*S - 1` rows, S the
  window or, for global blocks, the pretrain grid; when `2*max(q, k) - 1`
  differs from the table length the table is linearly resized first (SAM's
  `get_rel_pos`); exact-GELU MLP;
- neck: conv1x1 (no bias) -> LayerNorm over channels -> conv3x3 SAME (no bias)
  -> LayerNorm, to `out_channels`.

Resizing. By default both resizes follow torch's `F.interpolate` without
antialiasing (bicubic a = -0.75 for the pos-embed, linear for the rel-pos
tables), i.e. what segment-anything / HF transformers compute. The official
PixelLLM (scenic) code instead calls `jax.image.resize`, which antialiases when
downsampling (a = -0.5 cubic, widened triangle for linear); set
`resize_like_scenic=True` to reproduce that. The two differ noticeably for
64 -> 24.

Parameter names -> SAM state dict (`image_encoder.` prefix) / HF `SamVisionEncoder`
(`vision_encoder.` prefix). torch Linear weights are [out, in] (ours [in, out]),
conv kernels OIHW (ours HWIO):
  patch_embed/{kernel,bias}        patch_embed.proj        / patch_embed.projection
  pos_embed [G*G, D]               pos_embed [1, G, G, D]  / pos_embed (reshape)
  blocks_i/norm1, norm2            blocks.i.norm1, norm2   / layers.i.layer_norm1, layer_norm2
  blocks_i/attn/qkv, proj          blocks.i.attn.qkv, proj / layers.i.attn.qkv, proj
  blocks_i/attn/rel_pos_h, _w      blocks.i.attn.rel_pos_h, rel_pos_w (same in HF)
  blocks_i/mlp/lin1, lin2          blocks.i.mlp.lin1, lin2 / layers.i.mlp.lin1, lin2
  neck/conv1, norm1, conv2, norm2  neck.0, neck.1, neck.2, neck.3
                                   / neck.conv1, layer_norm1, conv2, layer_norm2
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pixelllm_jax import layers, partitioning
from pixelllm_jax.models import pos_embed as pos_embed_lib
from pixelllm_jax.models import resize

Array = jax.Array

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class SamViTConfig:
  """SAM ViT sizes. SAM ViT-H at 384 px: width 1280, depth 32, 16 heads,
  mlp_dim 5120, patch 16, window 14, global blocks (7, 15, 23, 31), out 256."""
  image_size: int = 384            # nominal input size (used to build init inputs)
  patch_size: int = 16
  width: int = 1280
  depth: int = 32
  num_heads: int = 16
  mlp_dim: int = 5120
  window_size: int = 14
  global_blocks: tuple[int, ...] = (7, 15, 23, 31)
  out_channels: int = 256
  pretrain_grid: int = 64          # 1024 / 16
  use_rel_pos: bool = True
  resize_like_scenic: bool = False  # jax.image.resize (antialiased) instead of torch resizes
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  remat: str = "none"               # partitioning.RematPolicy modes: 'none', 'block', ...
  # One nn.scan over periods of blocks (`scan_period` blocks per step, so that the
  # windowed and global blocks, whose parameters differ in shape, keep their places).
  scan: bool = False
  # 'sincos' (2-D sine-cosine start) or 'normal' (the reference init); only
  # matters when training from scratch: imported weights overwrite it.
  pos_embed_init: str = "sincos"

  def __post_init__(self):
    pos_embed_lib.check_init(self.pos_embed_init, "SamViTConfig")
    partitioning.check_remat(self.remat)

  @property
  def scan_period(self) -> int:
    """The smallest p dividing depth with block i global iff block i % p is (ViT-H: 8;
    a pattern that never repeats gives depth: one scan step, nothing saved)."""
    is_global = [i in self.global_blocks for i in range(self.depth)]
    for p in range(1, self.depth + 1):
      if self.depth % p == 0 and all(is_global[i] == is_global[i % p] for i in range(self.depth)):
        return p
    return self.depth  # not reached: p = depth always repeats

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads


def window_partition(x_BHWC: Array, window: int) -> tuple[Array, tuple[int, int]]:
  """Zero-pads to multiples of `window` -> ([B * nh * nw, window, window, C], (Hp, Wp))."""
  b, h, w, c = x_BHWC.shape
  pad_h, pad_w = -h % window, -w % window
  x = jnp.pad(x_BHWC, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  hp, wp = h + pad_h, w + pad_w
  x = x.reshape(b, hp // window, window, wp // window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows: Array, window: int, padded_hw: tuple[int, int],
                       hw: tuple[int, int]) -> Array:
  """Inverse of `window_partition`: [B * nh * nw, window, window, C] -> [B, H, W, C]."""
  hp, wp = padded_hw
  nh, nw = hp // window, wp // window
  b = windows.shape[0] // (nh * nw)
  x = windows.reshape(b, nh, nw, window, window, -1).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, hp, wp, -1)[:, :hw[0], :hw[1]]


def get_rel_pos(q_size: int, k_size: int, table_LC: Array, *, antialias: bool = False) -> Array:
  """[q_size, k_size, C] relative embeddings read from a [L, C] table (SAM's get_rel_pos).

  The table is linearly resized to `2 * max(q, k) - 1` rows when its length
  differs; coordinates of the shorter side are stretched when q != k.
  """
  length = 2 * max(q_size, k_size) - 1
  table = resize.resize_linear(table_LC, length, axis=0, antialias=antialias)
  q_coords = np.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
  k_coords = np.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
  rel = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
  return table[rel.astype(np.int64)]


class Attention(nn.Module):
  """Multi-head attention over a [B, h, w, D] map with decomposed rel-pos bias."""
  config: SamViTConfig
  table_size: int  # S: rel-pos tables have 2*S - 1 rows

  @nn.compact
  def __call__(self, x_BHWD: Array) -> Array:
    cfg = self.config
    b, h, w, d = x_BHWD.shape
    qkv = layers.dense(3 * d, ("embed", "joined_kv"), dtype=cfg.dtype, name="qkv")(x_BHWD)
    qkv = qkv.reshape(b, h * w, 3, cfg.num_heads, cfg.head_dim)
    q, k, v = (nn.with_logical_constraint(qkv[:, :, i], ("batch", "length", "heads", "kv"))
               for i in range(3))  # [B, T, H, Dh]
    bias = None
    if cfg.use_rel_pos:
      init = layers.param_init(nn.initializers.zeros, ("relpos", "kv"))
      shape = (2 * self.table_size - 1, cfg.head_dim)
      rel_h = get_rel_pos(h, h, self.param("rel_pos_h", init, shape),
                          antialias=cfg.resize_like_scenic)  # [h, h, Dh]
      rel_w = get_rel_pos(w, w, self.param("rel_pos_w", init, shape),
                          antialias=cfg.resize_like_scenic)  # [w, w, Dh]
      q_grid = q.reshape(b, h, w, cfg.num_heads, cfg.head_dim)
      hp = jax.lax.Precision.HIGHEST
      bias_h = jnp.einsum("byxnc,ykc->bnyxk", q_grid, rel_h.astype(q.dtype), precision=hp)
      bias_w = jnp.einsum("byxnc,xkc->bnyxk", q_grid, rel_w.astype(q.dtype), precision=hp)
      bias = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(b, cfg.num_heads, h * w, h * w)
    out = layers.attend(q, k, v, bias_BHTS=bias).reshape(b, h, w, d)
    return layers.dense(d, ("joined_kv", "embed"), dtype=cfg.dtype, name="proj")(out)


class Block(nn.Module):
  """Pre-LN block; windowed attention unless `is_global`."""
  config: SamViTConfig
  is_global: bool

  @nn.compact
  def __call__(self, x_BHWD: Array) -> Array:
    cfg = self.config
    norm = lambda name: layers.layer_norm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, name=name)
    y = norm("norm1")(x_BHWD)
    if self.is_global:
      y = Attention(cfg, cfg.pretrain_grid, name="attn")(y)
    else:
      hw = y.shape[1:3]
      windows, padded_hw = window_partition(y, cfg.window_size)
      windows = Attention(cfg, cfg.window_size, name="attn")(windows)
      y = window_unpartition(windows, cfg.window_size, padded_hw, hw)
    x_BHWD = x_BHWD + y
    y = norm("norm2")(x_BHWD)
    y = layers.dense(cfg.mlp_dim, ("embed", "mlp"), dtype=cfg.dtype, name="lin1")(y)
    y = nn.with_logical_constraint(nn.gelu(y, approximate=False), ("batch", None, None, "mlp"))
    y = layers.dense(cfg.width, ("mlp", "embed"), dtype=cfg.dtype, name="lin2")(y)
    return nn.with_logical_constraint(x_BHWD + y, ("batch", None, None, "embed"))


class Neck(nn.Module):
  """conv1x1 -> LN -> conv3x3 -> LN, no conv biases: [B, h, w, D] -> [B, h, w, out].

  Conv kernels are named (conv_height, conv_width, channels [in], embed [out]) as
  everywhere in the project; the LayerNorms act over the output width.
  """
  config: SamViTConfig

  @nn.compact
  def __call__(self, x_BHWD: Array) -> Array:
    cfg = self.config
    def conv(size, name):
      return nn.Conv(
          cfg.out_channels, (size, size), padding="SAME", use_bias=False, dtype=cfg.dtype,
          kernel_init=layers.param_init(nn.initializers.lecun_normal(),
                                        ("conv_height", "conv_width", "channels", "embed")),
          name=name)
    norm = lambda name: layers.layer_norm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, name=name)
    x = norm("norm1")(conv(1, "conv1")(x_BHWD))
    return norm("norm2")(conv(3, "conv2")(x))


class SamViT(nn.Module):
  """uint8[B, H, W, 3] -> float32[B, H // p, W // p, out_channels].

  `normalized=True`: the image is float[B, H, W, 3] already normalized as the tower
  does it ([0, 1] pixels, then IMAGENET_MEAN / IMAGENET_STD).
  """
  config: SamViTConfig

  @nn.compact
  def __call__(self, image_BHWC: Array, *, normalized: bool = False) -> Array:
    cfg = self.config
    x = layers.patch_embed(image_BHWC, width=cfg.width, patch_size=cfg.patch_size,
                           mean=IMAGENET_MEAN, std=IMAGENET_STD, normalized=normalized,
                           dtype=cfg.dtype)
    _, h, w, d = x.shape
    g = cfg.pretrain_grid
    pos_init = pos_embed_lib.initializer(cfg.pos_embed_init, g)
    pos_embed = self.param("pos_embed", layers.param_init(pos_init, ("pos", "embed")), (g * g, d))
    a, antialias = (-0.5, True) if cfg.resize_like_scenic else (-0.75, False)
    pos_embed = resize.resize_bicubic(pos_embed.reshape(g, g, d), (h, w), a=a, antialias=antialias)
    x = x + pos_embed.astype(x.dtype)
    x = nn.with_logical_constraint(x, ("batch", None, None, "embed"))

    x = layers.block_stack(Block, x, depth=cfg.depth, name="blocks", scan=cfg.scan,
                           period=cfg.scan_period,
                           block_kwargs=lambda i: dict(config=cfg, is_global=i in cfg.global_blocks),
                           remat=lambda c: partitioning.remat(c, cfg.remat))
    x = Neck(cfg, name="neck")(x)
    return nn.with_logical_constraint(x.astype(jnp.float32), ("batch", None, None, "embed"))
