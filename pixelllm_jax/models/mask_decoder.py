"""SAM's mask decoder: prompt tokens + image embedding -> mask logits and IoU predictions.

PixelLLM's referring-segmentation head runs Segment Anything's `MaskDecoder`
(Kirillov et al. 2023, `modeling/mask_decoder.py`), frozen, on the SAM image
embedding, prompted by the box read from the localization head. As SAM:

- Output tokens: one IoU token and `num_multimask_outputs + 1` mask tokens,
  prepended to the sparse prompt tokens of every prompt.
- The image embedding plus the dense prompt (`no_mask_embed` broadcast, or a
  mask embedding) is repeated per prompt, and a two-way transformer
  (`models/two_way.py`) runs tokens against image positions.
- Output upscaling: transposed conv 2x2 stride 2 (C -> C/4), LayerNorm over
  channels (eps 1e-6, SAM's `LayerNorm2d`), GELU (exact), transposed conv 2x2
  stride 2 (C/4 -> C/8), GELU: [h, w] -> [4h, 4w].
- One hypernetwork MLP per mask token (C -> C -> C -> C/8, ReLU between)
  turns the token into weights over the upscaled channels; mask logits are
  their dot product with the upscaled map at each pixel.
- The IoU head is an MLP (`iou_head_depth` layers, hidden `iou_head_hidden_dim`,
  ReLU between, no sigmoid) on the IoU token, one score per mask token.
- `multimask_output=True` returns masks 1..M (the three ambiguity-aware
  masks), False returns mask 0 only.

LayerNorm eps of the two-way transformer: original SAM uses torch's default
1e-5 everywhere; Hugging Face's `SamMaskDecoder` uses `layer_norm_eps` (1e-6)
in the blocks but keeps 1e-5 in the final `layer_norm_final_attn`.
`TwoWayTransformer` has one eps for all its norms, so for HF weights set
`layer_norm_eps` to the HF config's value; the final norm then differs by
1e-5 vs 1e-6 (measured ~1e-5 on mask logits of unit scale, see
tests/test_convert_sam.py). `upscale_layer_norm_eps` is 1e-6 in both.

Parameter names here -> original SAM (`mask_decoder.` prefix) / HF `SamModel`
(`mask_decoder.` prefix). torch Linear weights are [out, in] (ours [in, out]);
ConvTranspose2d weights [in, out, kh, kw] (ours [kh, kw, in, out]):

  iou_token [C]                  iou_token.weight [1, C] (same in HF)
  mask_tokens [M+1, C]           mask_tokens.weight (same in HF)
  transformer/...                transformer.* (two_way.py; HF: norm{i} -> layer_norm{i},
                                 norm_final_attn -> layer_norm_final_attn)
  upscale_conv1/{kernel,bias}    output_upscaling.0 / upscale_conv1
  upscale_norm/{scale,bias}      output_upscaling.1 / upscale_layer_norm
  upscale_conv2/{kernel,bias}    output_upscaling.3 / upscale_conv2
  output_hypernetworks_mlps_{i}/layers_{j}
                                 output_hypernetworks_mlps.{i}.layers.{j}
                                 / HF ...mlps.{i}.{proj_in, layers.{j-1}, proj_out}
  iou_prediction_head/layers_{j} iou_prediction_head.layers.{j}
                                 / HF iou_prediction_head.{proj_in, layers.{j-1}, proj_out}
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixelllm_jax import layers
from pixelllm_jax.models.two_way import TwoWayTransformer

Array = jax.Array
Dtype = Any

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class MaskDecoderConfig:
  """SAM mask decoder sizes (SAM's defaults for every ViT size).

  Attributes:
    transformer_dim: token and image-embedding width C (256); divisible by 8.
    num_multimask_outputs: M ambiguity masks; M + 1 mask tokens are learned.
    iou_head_depth: layers of the IoU MLP.
    iou_head_hidden_dim: hidden width of the IoU MLP.
    transformer_depth: two-way blocks.
    transformer_num_heads: attention heads in the two-way transformer.
    transformer_mlp_dim: token MLP width in the two-way transformer.
    attention_downsample_rate: cross-attention runs at C // rate.
    layer_norm_eps: two-way transformer LayerNorm eps (SAM 1e-5; HF config 1e-6).
    upscale_layer_norm_eps: eps of the LayerNorm2d in the upscaling (1e-6 in both).
    dtype: activation dtype; parameters stay float32, outputs are float32.
  """

  transformer_dim: int = 256
  num_multimask_outputs: int = 3
  iou_head_depth: int = 3
  iou_head_hidden_dim: int = 256
  transformer_depth: int = 2
  transformer_num_heads: int = 8
  transformer_mlp_dim: int = 2048
  attention_downsample_rate: int = 2
  layer_norm_eps: float = 1e-5
  upscale_layer_norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @property
  def num_mask_tokens(self) -> int:
    return self.num_multimask_outputs + 1


class MLP(nn.Module):
  """SAM's `MLP`: `num_layers` Linear layers with ReLU between (none after the last).

  Kernels alternate ('embed', 'mlp') / ('mlp', 'embed') so no parameter repeats a
  logical name; the last layer's output axis is `out_axis`.
  """

  hidden_dim: int
  output_dim: int
  num_layers: int
  out_axis: str = "embed"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_axis = "embed"
    for j in range(self.num_layers):
      last = j == self.num_layers - 1
      out_axis = self.out_axis if last else ("mlp" if in_axis == "embed" else "embed")
      if out_axis == in_axis:
        out_axis = "mlp" if in_axis != "mlp" else "embed"
      features = self.output_dim if last else self.hidden_dim
      x = layers.dense(features, (in_axis, out_axis), dtype=self.dtype, name=f"layers_{j}")(x)
      if not last:
        x = nn.relu(x)
      in_axis = out_axis
    return x


class ConvTranspose2x2(nn.Module):
  """Transposed conv, kernel 2 stride 2 (non-overlapping): [B, h, w, I] -> [B, 2h, 2w, O].

  out[2i + a, 2j + b, o] = sum_c x[i, j, c] kernel[a, b, c, o] + bias[o], i.e.
  torch `ConvTranspose2d(I, O, kernel_size=2, stride=2)` with its weight
  [I, O, 2, 2] transposed to [2, 2, I, O].
  """

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxI: Array) -> Array:
    kernel = self.param(
        "kernel",
        layers.param_init(nn.initializers.lecun_normal(),
                          ("conv_height", "conv_width", "channels", "embed")),
        (2, 2, x_BxHxWxI.shape[-1], self.features))
    bias = self.param("bias", layers.param_init(nn.initializers.zeros, ("embed",)),
                      (self.features,))
    x = x_BxHxWxI.astype(self.dtype)
    y = jnp.einsum("nhwc,pqco->nhpwqo", x, kernel.astype(self.dtype), precision=_HIGHEST)
    n, h, _, w, _, o = y.shape
    return y.reshape(n, 2 * h, 2 * w, o) + bias.astype(self.dtype)


class MaskDecoder(nn.Module):
  """SAM mask decoder; see the module docstring."""

  config: MaskDecoderConfig

  @nn.compact
  def __call__(
      self,
      image_embeddings_BxhxwxC: Array,
      image_pe_hxwxC: Array,
      sparse_prompt_BxKxTxC: Array,
      dense_prompt: Array,
      multimask_output: bool = True,
  ) -> tuple[Array, Array]:
    """Predicts masks for K prompts per image.

    Args:
      image_embeddings_BxhxwxC: SAM image embedding (the ViT neck output).
      image_pe_hxwxC: dense positional encoding of the grid
        (`PromptEncoder.dense_pe`); [B, h, w, C] is accepted too.
      sparse_prompt_BxKxTxC: T point / box-corner tokens for each of K prompts
        (T may be 0).
      dense_prompt: float[B, h, w, C] (mask embeddings), or float[C]
        (`PromptEncoder.no_mask_embed`, broadcast over the grid). A [B, K, h,
        w, C] map gives each prompt its own dense prompt.
      multimask_output: static; True -> the M ambiguity masks, False -> mask 0.

    Returns:
      (low_res_masks float32[B, K, M', 4h, 4w], iou_pred float32[B, K, M']),
      M' = num_multimask_outputs if multimask_output else 1.
    """
    cfg = self.config
    c = cfg.transformer_dim
    if c % 8:
      raise ValueError(f"transformer_dim must be divisible by 8, got {c}")
    b, h, w, _ = image_embeddings_BxhxwxC.shape
    k, t = sparse_prompt_BxKxTxC.shape[1], sparse_prompt_BxKxTxC.shape[2]
    n_masks = cfg.num_mask_tokens
    dt = cfg.dtype

    normal = nn.initializers.normal(stddev=1.0)  # torch nn.Embedding init
    iou_token = self.param("iou_token", layers.param_init(normal, ("embed",)), (c,))
    mask_tokens = self.param(
        "mask_tokens", layers.param_init(normal, ("queries", "embed")), (n_masks, c))

    output_tokens = jnp.concatenate([iou_token[None], mask_tokens], axis=0).astype(dt)
    output_tokens = jnp.broadcast_to(output_tokens, (b, k, 1 + n_masks, c))
    tokens = jnp.concatenate([output_tokens, sparse_prompt_BxKxTxC.astype(dt)], axis=2)
    tokens = tokens.reshape(b * k, 1 + n_masks + t, c)

    # Image + dense prompt, repeated per prompt (SAM's repeat_interleave).
    src = image_embeddings_BxhxwxC.astype(dt)[:, None]  # [B, 1, h, w, C]
    dense = dense_prompt.astype(dt)
    if dense.ndim == 1:
      src = src + dense
    elif dense.ndim == 4:
      src = src + dense[:, None]
    elif dense.ndim == 5:
      src = src + dense
    else:
      raise ValueError(f"dense_prompt must be [C], [B, h, w, C] or [B, K, h, w, C]: "
                       f"{dense.shape}")
    src = jnp.broadcast_to(src, (b, k, h, w, c)).reshape(b * k, h * w, c)
    pe = image_pe_hxwxC.astype(dt)
    if pe.ndim == 3:
      pe = jnp.broadcast_to(pe[None, None], (b, k, h, w, c))
    else:
      pe = jnp.broadcast_to(pe[:, None], (b, k, h, w, c))
    pe = pe.reshape(b * k, h * w, c)

    hs, src = TwoWayTransformer(
        depth=cfg.transformer_depth,
        embedding_dim=c,
        num_heads=cfg.transformer_num_heads,
        mlp_dim=cfg.transformer_mlp_dim,
        attention_downsample_rate=cfg.attention_downsample_rate,
        layer_norm_eps=cfg.layer_norm_eps,
        dtype=dt,
        name="transformer",
    )(src, pe, tokens)
    iou_token_out = hs[:, 0]
    mask_tokens_out = hs[:, 1:1 + n_masks]

    x = src.reshape(b * k, h, w, c)
    x = ConvTranspose2x2(c // 4, dtype=dt, name="upscale_conv1")(x)
    x = layers.layer_norm(epsilon=cfg.upscale_layer_norm_eps, dtype=dt, name="upscale_norm")(x)
    x = nn.gelu(x, approximate=False)
    x = ConvTranspose2x2(c // 8, dtype=dt, name="upscale_conv2")(x)
    upscaled = nn.gelu(x, approximate=False)  # [B*K, 4h, 4w, C/8]

    hyper_in = jnp.stack([
        MLP(c, c // 8, 3, out_axis="channels", dtype=dt,
            name=f"output_hypernetworks_mlps_{i}")(mask_tokens_out[:, i])
        for i in range(n_masks)
    ], axis=1)  # [B*K, M+1, C/8]
    masks = jnp.einsum("nmc,nyxc->nmyx", hyper_in, upscaled, precision=_HIGHEST)
    masks = masks.reshape(b, k, n_masks, 4 * h, 4 * w)

    iou_pred = MLP(cfg.iou_head_hidden_dim, n_masks, cfg.iou_head_depth, out_axis="queries",
                   dtype=dt, name="iou_prediction_head")(iou_token_out)
    iou_pred = iou_pred.reshape(b, k, n_masks)

    sl = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, :, sl].astype(jnp.float32), iou_pred[:, :, sl].astype(jnp.float32)
