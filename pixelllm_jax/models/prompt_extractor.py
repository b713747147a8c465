"""PixelLLM's prompt feature extractor: a location prompt -> Q visual tokens.

The official code calls it the "prompt adapter" (`modeling/prompt_adapter.py`
in Scenic's `projects/pixel_llm`). Architecture:

- Single Dense layers project the inputs to `width`: the fused image map
  (C -> width), the prompt tokens and the dense prompt (Dp -> width, *one
  shared* projection, as the official `prompt_embedding_projection_mlp`), and
  the image PE (Dp -> width). The projected dense prompt is added to every
  image position. As the official code, the prompt-side projections are
  skipped when Dp == width (the prompt PE and image PE then share one space).
- Tokens = Q learned queries followed by the prompt's T tokens. A SAM
  two-way transformer (`two_way.py`) runs over tokens and image positions; the
  tokens themselves serve as the token PE, as in SAM's mask decoder.
- Each of the first Q output tokens gets its own Dense width -> output_dim
  (the official `output_hypernetworks_mlps.{i}`, stored here as one stacked
  kernel [Q, width, output_dim]).
- The official dense branch (updated image tokens -> Dense), which PixelLLM
  computes and never uses (`prompt_fuse_fn='sparse'`), is built only when
  `fuse` asks for it; here it adds the grid PE back to the image tokens first,
  so each dense token tells the LM where it is.

Deliberate change from the official code: the image map is projected once
per image and *not* repeated per prompt; the transformer is vmapped over the
K prompts with the image broadcast (`in_axes=None`). The transformer's
updated image tokens are per-prompt by construction (each prompt writes into
its own copy through image->token attention), but the input map, its
projection and the PE exist once per image.
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


FUSE_MODES = ("sparse", "dense", "sparse+dense")


@dataclasses.dataclass(frozen=True)
class PromptExtractorConfig:
  """Prompt feature extractor size (defaults: the paper's model).

  Attributes:
    depth: two-way transformer blocks (6).
    width: transformer width (512).
    num_heads: attention heads (8).
    mlp_dim: token MLP hidden width (2048).
    num_queries: learned queries Q = visual tokens per prompt (32).
    output_dim: width of each visual token (1024).
    layer_norm_eps: two-way transformer LayerNorm eps (1e-5 as SAM).
    dtype: activation dtype; parameters stay float32.
  """

  depth: int = 6
  width: int = 512
  num_heads: int = 8
  mlp_dim: int = 2048
  num_queries: int = 32
  output_dim: int = 1024
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  # Which tokens reach the LM (the official `prompt_fuse_fn`): 'sparse' = the Q
  # query tokens (every paper config); 'dense' = the h*w updated image tokens;
  # 'sparse+dense' = both, queries first (this project's addition).
  fuse: str = "sparse"

  def __post_init__(self):
    if self.fuse not in FUSE_MODES:
      raise ValueError(f"PromptExtractorConfig.fuse must be one of {FUSE_MODES}, got {self.fuse!r}")

  def num_tokens(self, grid_hw: tuple[int, int]) -> int:
    """Visual tokens per prompt for a feature map of `grid_hw`."""
    dense = grid_hw[0] * grid_hw[1]
    return {"sparse": self.num_queries, "dense": dense,
            "sparse+dense": self.num_queries + dense}[self.fuse]



class PerQueryDense(nn.Module):
  """Q independent Dense layers, query q applied to token q: [..., Q, W] -> [..., Q, O]."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_xQxW: Array) -> Array:
    q, w = x_xQxW.shape[-2:]
    kernel = self.param(
        "kernel",
        layers.param_init(nn.initializers.lecun_normal(batch_axis=(0,)), ("queries", "embed", "mlp")),
        (q, w, self.features))
    bias = self.param(
        "bias", layers.param_init(nn.initializers.zeros, ("queries", "mlp")), (q, self.features))
    y = jnp.einsum("...qw,qwo->...qo", x_xQxW.astype(self.dtype), kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)


class PromptExtractor(nn.Module):
  """Learned-query extractor; see the module docstring."""

  config: PromptExtractorConfig

  @nn.compact
  def __call__(
      self,
      image_features_BxhxwxC: Array,
      image_pe_hxwxDp: Array,
      prompt_tokens_BxKxTxDp: Array,
      dense_prompt_Dp: Array,
  ) -> Array:
    """Extracts Q visual tokens for each of the K prompts of every image.

    Args:
      image_features_BxhxwxC: fused image map, float[B, h, w, C].
      image_pe_hxwxDp: dense PE of the map's grid (`PromptEncoder.dense_pe`).
      prompt_tokens_BxKxTxDp: sparse prompt tokens, K prompts of T tokens each.
      dense_prompt_Dp: dense prompt added at every position (`no_mask_embed`).

    Returns:
      float[B, K, Tv, output_dim] in `config.dtype`, Tv = config.num_tokens((h, w)).
    """
    cfg = self.config
    b, h, w, _ = image_features_BxhxwxC.shape
    dtype = cfg.dtype

    # In-projections are named ('channels', 'embed'): flax rejects one logical
    # name twice in a parameter, and the input widths are not the model width.
    # As the official adapter, prompt-side inputs (prompt tokens, dense prompt,
    # image PE) pass through unprojected when their width already equals the
    # transformer width: the prompt tokens' Fourier PE and the image PE then
    # share one space, so attention is spatially aligned from the first step.
    prompt_width = prompt_tokens_BxKxTxDp.shape[-1]
    if prompt_width == cfg.width:
      prompt_proj = pe_proj = lambda x: x
    else:
      prompt_proj = layers.dense(cfg.width, ("channels", "embed"), dtype=dtype, name="prompt_proj")
      pe_proj = layers.dense(cfg.width, ("channels", "embed"), dtype=dtype, name="pe_proj")
    image_BxSxW = layers.dense(cfg.width, ("channels", "embed"), dtype=dtype, name="image_proj")(
        image_features_BxhxwxC.astype(dtype)).reshape(b, h * w, cfg.width)
    image_BxSxW = image_BxSxW + prompt_proj(dense_prompt_Dp.astype(dtype))
    pe_SxW = pe_proj(image_pe_hxwxDp.astype(dtype)).reshape(h * w, cfg.width)
    pe_BxSxW = jnp.broadcast_to(pe_SxW, (b, h * w, cfg.width))

    prompts_BxKxTxW = prompt_proj(prompt_tokens_BxKxTxDp.astype(dtype))
    k = prompts_BxKxTxW.shape[1]
    queries_QxW = self.param(
        "output_tokens", layers.param_init(nn.initializers.normal(stddev=1.0), ("queries", "embed")),
        (cfg.num_queries, cfg.width))
    queries_BxKxQxW = jnp.broadcast_to(
        queries_QxW.astype(dtype), (b, k, cfg.num_queries, cfg.width))
    tokens_BxKxNxW = jnp.concatenate([queries_BxKxQxW, prompts_BxKxTxW], axis=2)  # N = Q + T

    # One transformer, vmapped over prompts; the image and its PE are broadcast.
    two_way_over_prompts = nn.vmap(
        TwoWayTransformer,
        in_axes=(None, None, 1),
        out_axes=1,
        variable_axes={"params": None},
        split_rngs={"params": False},
    )
    out_BxKxNxW, image_out_BxKxSxW = two_way_over_prompts(
        depth=cfg.depth,
        embedding_dim=cfg.width,
        num_heads=cfg.num_heads,
        mlp_dim=cfg.mlp_dim,
        layer_norm_eps=cfg.layer_norm_eps,
        dtype=dtype,
        name="transformer",
    )(image_BxSxW, pe_BxSxW, tokens_BxKxNxW)

    parts = []
    if cfg.fuse in ("sparse", "sparse+dense"):
      parts.append(PerQueryDense(cfg.output_dim, dtype=dtype, name="output_heads")(
          out_BxKxNxW[:, :, :cfg.num_queries]))
    if cfg.fuse in ("dense", "sparse+dense"):
      # The updated image tokens carry no position of their own (attention values
      # never include the PE), so the grid PE is added back before the LM reads them.
      parts.append(layers.dense(cfg.output_dim, ("embed", "mlp"), dtype=dtype,
                                name="dense_head")(image_out_BxKxSxW + pe_SxW))
    visual = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=2)
    return nn.with_logical_constraint(visual, ("batch", None, "length", "embed"))
