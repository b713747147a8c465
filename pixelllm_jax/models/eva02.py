"""EVA02 ViT image tower (PixelLLM's trainable encoder A).

Architecture, as timm's `Eva` with the eva02 settings (`qkv_fused=False`,
`swiglu_mlp=True`, `scale_mlp=True`, `use_rot_pos_emb=True`) and as the
official PixelLLM `eva02_vit.py`:
- conv patch embed (VALID, so a 384 px image with patch 14 gives 27x27 and the
  last 6 pixel rows/columns are ignored, as in torch and the official code);
- CLS token, then an absolute pos-embed of `1 + pretrain_grid**2` tokens whose
  grid part is resized to the current grid with torch's antialiased bicubic
  (a = -0.5, what timm's `resample_abs_pos_embed` does; for upsampling this also
  equals the official code's `jax.image.resize`); CLS keeps its embedding;
- pre-LN blocks: attention with separate q/k/v projections (q and v biased,
  k not), 2-D RoPE on patch tokens only (never on CLS), SwiGLU MLP
  `w3(LN(silu(w1 x) * w2 x))` (the "sub-LN", timm `scale_mlp=True`: EVA02 base
  and large; `mlp_norm=False` drops it, as timm's EVA02 tiny and small), no
  layer-scale;
- final LayerNorm (PixelLLM's `use_ln_post`), CLS dropped.

RoPE layout (timm `RotaryEmbeddingCat(in_pixels=False)` + `apply_rot_embed_cat`,
equal to EVA's `VisionRotaryEmbeddingFast`): with head dim `Dh` there are
`Dh/4` bands `10000**(-k/(Dh/4))`; the first `Dh/2` channels rotate by
row * band, the last `Dh/2` by column * band, and channel pairs (2j, 2j+1)
rotate together. Positions are `arange(grid) * ref / grid`; PixelLLM takes the
reference grid equal to the current grid (plain indices), which is the default
here (`rope_ref_grid=None`); timm's pretrained models use `ref_feat_shape=16`.

All LayerNorms use `layer_norm_eps` (1e-6, timm). The official JAX code uses
flax's default 1e-5 in the SwiGLU sub-LN; set the config if matching that matters.

Parameter names -> timm state dict (torch Linear weights are [out, in]; ours
are [in, out]; conv kernels are OIHW in torch and HWIO here):
  patch_embed/kernel, bias        patch_embed.proj.weight (transpose 2,3,1,0), .bias
  cls_token [D]                   cls_token [1, 1, D]
  pos_embed [1 + G*G, D]          pos_embed [1, 1 + G*G, D]
  blocks_i/norm1/{scale,bias}     blocks.i.norm1.{weight,bias}
  blocks_i/attn/q_proj/{kernel,bias}  blocks.i.attn.q_proj.{weight.T,bias}  (timm `q_bias` if fused)
  blocks_i/attn/k_proj/kernel     blocks.i.attn.k_proj.weight.T
  blocks_i/attn/v_proj/{kernel,bias}  blocks.i.attn.v_proj.{weight.T,bias}
  blocks_i/attn/proj/{kernel,bias}    blocks.i.attn.proj.{weight.T,bias}
  blocks_i/norm2                  blocks.i.norm2
  blocks_i/mlp/fc1_g, fc1_x       blocks.i.mlp.fc1_g, fc1_x   (EVA/official: w1, w2)
  blocks_i/mlp/norm               blocks.i.mlp.norm           (EVA/official: ffn_ln; absent
                                                              without mlp_norm)
  blocks_i/mlp/fc2                blocks.i.mlp.fc2            (EVA/official: w3)
  norm                            norm (timm EVA02 ships fc_norm for pooling; official: ln_post)
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

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class EVA02Config:
  """EVA02 ViT sizes. Paper scale (EVA02-L/14 at 384): width 1024, depth 24,
  16 heads, mlp_dim 2730, patch 14, pretrain_grid 16."""
  image_size: int = 384          # nominal input size (used to build init inputs)
  patch_size: int = 14
  width: int = 1024
  depth: int = 24
  num_heads: int = 16
  mlp_dim: int = 2730            # SwiGLU hidden size
  pretrain_grid: int = 16        # grid the abs pos-embed was trained at (224 / 14)
  rope_ref_grid: int | None = None  # None: RoPE positions are plain indices (PixelLLM)
  layer_norm_eps: float = 1e-6
  mlp_norm: bool = True          # the SwiGLU sub-LN (timm scale_mlp); False: EVA02 tiny / small
  dtype: Any = jnp.float32
  remat: str = "none"               # partitioning.RematPolicy modes: 'none', 'block', ...
  scan: bool = False                # one nn.scan over the blocks (layers.block_stack layout)
  # 'sincos' (2-D sine-cosine start) or 'normal' (the reference init); only
  # matters when training from scratch: imported weights overwrite it.
  pos_embed_init: str = "sincos"

  def __post_init__(self):
    pos_embed_lib.check_init(self.pos_embed_init, "EVA02Config")
    partitioning.check_remat(self.remat)

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads


def rope_sin_cos(grid_hw: tuple[int, int], head_dim: int,
                 ref_hw: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """float32[h*w, head_dim] sin and cos tables of EVA02's 2-D RoPE (row-major tokens)."""
  if head_dim % 4:
    raise ValueError(f"RoPE needs head_dim divisible by 4, got {head_dim}")
  num_bands = head_dim // 4
  bands = 1.0 / (10000.0 ** (np.arange(num_bands, dtype=np.float32) / num_bands))
  ref_hw = grid_hw if ref_hw is None else ref_hw
  rows, cols = (np.arange(s, dtype=np.float32) / s * r for s, r in zip(grid_hw, ref_hw))
  row_grid, col_grid = np.meshgrid(rows, cols, indexing="ij")
  angles = np.concatenate(
      [row_grid.reshape(-1, 1) * bands, col_grid.reshape(-1, 1) * bands], axis=-1)
  angles = np.repeat(angles, 2, axis=-1)  # pairs (2j, 2j+1) share an angle
  return np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)


def apply_rope(x_BTHD: Array, sin_TD: Array, cos_TD: Array) -> Array:
  """Rotates channel pairs (2j, 2j+1) of x by the per-token angles."""
  pairs = x_BTHD.reshape(*x_BTHD.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x_BTHD.shape)
  sin, cos = sin_TD[:, None, :], cos_TD[:, None, :]
  return (x_BTHD * cos + rotated * sin).astype(x_BTHD.dtype)


class Attention(nn.Module):
  """Global self-attention, q/v biased, RoPE on every token but the first (CLS)."""
  config: EVA02Config

  @nn.compact
  def __call__(self, x_BTD: Array, sin_TD: Array, cos_TD: Array) -> Array:
    cfg = self.config
    b, t, _ = x_BTD.shape
    def project(name, use_bias):
      y = layers.dense(cfg.width, ("embed", "joined_kv"), use_bias=use_bias,
                       dtype=cfg.dtype, name=name)(x_BTD)
      y = y.reshape(b, t, cfg.num_heads, cfg.head_dim)
      return nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))
    q, k, v = project("q_proj", True), project("k_proj", False), project("v_proj", True)
    q = jnp.concatenate([q[:, :1], apply_rope(q[:, 1:], sin_TD, cos_TD)], axis=1)
    k = jnp.concatenate([k[:, :1], apply_rope(k[:, 1:], sin_TD, cos_TD)], axis=1)
    out = layers.attend(q, k, v).reshape(b, t, cfg.width)
    return layers.dense(cfg.width, ("joined_kv", "embed"), dtype=cfg.dtype, name="proj")(out)


class SwiGLU(nn.Module):
  """fc2(LN(silu(fc1_g x) * fc1_x x)): EVA02's SwiGLU with sub-LN (without LN if not mlp_norm)."""
  config: EVA02Config

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    cfg = self.config
    gate = layers.dense(cfg.mlp_dim, ("embed", "mlp"), dtype=cfg.dtype, name="fc1_g")(x_BTD)
    value = layers.dense(cfg.mlp_dim, ("embed", "mlp"), dtype=cfg.dtype, name="fc1_x")(x_BTD)
    hidden = nn.with_logical_constraint(nn.silu(gate) * value, ("batch", "length", "mlp"))
    if cfg.mlp_norm:
      hidden = layers.layer_norm(epsilon=cfg.layer_norm_eps, axis_name="mlp", dtype=cfg.dtype,
                                 name="norm")(hidden)
    return layers.dense(cfg.width, ("mlp", "embed"), dtype=cfg.dtype, name="fc2")(hidden)


class Block(nn.Module):
  """Pre-LN transformer block: x + attn(LN x), then x + SwiGLU(LN x)."""
  config: EVA02Config

  @nn.compact
  def __call__(self, x_BTD: Array, sin_TD: Array, cos_TD: Array) -> Array:
    cfg = self.config
    norm = lambda name: layers.layer_norm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, name=name)
    x_BTD = x_BTD + Attention(cfg, name="attn")(norm("norm1")(x_BTD), sin_TD, cos_TD)
    x_BTD = x_BTD + SwiGLU(cfg, name="mlp")(norm("norm2")(x_BTD))
    return nn.with_logical_constraint(x_BTD, ("batch", "length", "embed"))


def resize_pos_embed(pos_embed_ND: Array, grid_hw: tuple[int, int]) -> Array:
  """[1 + g*g, D] -> [1 + h*w, D]: CLS kept, grid part resized like timm (antialiased a=-0.5)."""
  cls, grid = pos_embed_ND[:1], pos_embed_ND[1:]
  g = int(round(grid.shape[0] ** 0.5))
  grid = grid.reshape(g, g, -1)
  grid = resize.resize_bicubic(grid, grid_hw, a=-0.5, antialias=True)
  return jnp.concatenate([cls, grid.reshape(grid_hw[0] * grid_hw[1], -1)], axis=0)


class EVA02ViT(nn.Module):
  """uint8[B, H, W, 3] -> float32[B, H // p, W // p, width].

  `normalized=True`: the image is float[B, H, W, 3] already normalized as the tower
  does it ([0, 1] pixels, then CLIP_MEAN / CLIP_STD).
  """
  config: EVA02Config

  @nn.compact
  def __call__(self, image_BHWC: Array, *, normalized: bool = False) -> Array:
    cfg = self.config
    x = layers.patch_embed(image_BHWC, width=cfg.width, patch_size=cfg.patch_size,
                           mean=CLIP_MEAN, std=CLIP_STD, normalized=normalized, dtype=cfg.dtype)
    b, h, w, d = x.shape
    cls = self.param("cls_token", layers.param_init(nn.initializers.normal(0.02), ("embed",)),
                     (d,))
    pos_init = pos_embed_lib.initializer(cfg.pos_embed_init, cfg.pretrain_grid,
                                         num_prefix_tokens=1)
    pos_embed = self.param(
        "pos_embed", layers.param_init(pos_init, ("pos", "embed")),
        (1 + cfg.pretrain_grid**2, d))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)),
                         x.reshape(b, h * w, d)], axis=1)
    x = x + resize_pos_embed(pos_embed, (h, w)).astype(x.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    ref = None if cfg.rope_ref_grid is None else (cfg.rope_ref_grid, cfg.rope_ref_grid)
    sin, cos = (jnp.asarray(t, dtype=cfg.dtype) for t in rope_sin_cos((h, w), cfg.head_dim, ref))
    x = layers.block_stack(Block, x, sin, cos, depth=cfg.depth, name="blocks", scan=cfg.scan,
                           block_kwargs=lambda i: dict(config=cfg),
                           remat=lambda c: partitioning.remat(c, cfg.remat))
    x = layers.layer_norm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, name="norm")(x)
    x = x[:, 1:].reshape(b, h, w, d).astype(jnp.float32)
    return nn.with_logical_constraint(x, ("batch", None, None, "embed"))
