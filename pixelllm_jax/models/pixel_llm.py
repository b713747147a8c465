"""PixelLLM composer: wires the separately tested towers into one model.

Data flow (DESIGN.md section 1):
  image -> [EVA02 ViT] and/or [SAM ViT] -> fuse (resize to the largest grid, concat)
  prompt boxes -> SAM prompt encoder -> prompt feature extractor (learned queries,
      two-way attention with the fused map) -> Dense + LayerNorm to the LM width
  [visual tokens of the slot's prompt ; embedded text prompt] -> T5 encoder
  T5 decoder (teacher forced or cached) -> logits and final hidden states
  hidden states -> localization head -> P points per token

The extractor runs once per distinct prompt (K per image); caption slots (N per
image) pick their prompt through `Batch.prompt_index`. Whether the
localization loss reaches the LM is `loc_grad_to_lm` (official: it does).

A box prompt is its two corner tokens (every paper config: the official
`prompt_use_box_rate=1`). The official code appended three copies of SAM's
no-mask embedding as padding tokens; with no official checkpoint to stay
compatible with, the padding is left out. `prompt_points_per_side = n >= 2`
instead encodes the box as the official point prompt: an n x n grid of
positive points spanning the box (n = 2: its 4 corners; n = 3 adds the edge
midpoints and the centre).
"""
import dataclasses

import flax.linen as nn
import flax.struct
import gin
import jax
import jax.numpy as jnp

from pixelllm_jax import layers
from pixelllm_jax.batch import Batch, Output
from pixelllm_jax.models.eva02 import EVA02Config, EVA02ViT
from pixelllm_jax.models.fusion import fuse_feature_maps
from pixelllm_jax.models.loc_head import LocHead, LocHeadConfig
from pixelllm_jax.models.prompt_encoder import PromptEncoder, PromptEncoderConfig
from pixelllm_jax.models.prompt_extractor import PromptExtractor, PromptExtractorConfig
from pixelllm_jax.models.sam_vit import SamViT, SamViTConfig
from pixelllm_jax.models.t5 import T5, T5Config


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PixelLLMConfig:
  t5: T5Config
  prompt_encoder: PromptEncoderConfig
  extractor: PromptExtractorConfig
  loc_head: LocHeadConfig = LocHeadConfig()
  eva02: EVA02Config | None = None
  sam: SamViTConfig | None = None
  # Stop gradients at the SAM tower's output (it is frozen in every paper config).
  sam_frozen: bool = True
  loc_grad_to_lm: bool = True
  visual_proj_eps: float = 1e-5
  # 0: a box is its 2 corner tokens; n >= 2: an n x n grid of positive points over it.
  prompt_points_per_side: int = 0

  def __post_init__(self):
    if self.eva02 is None and self.sam is None:
      raise ValueError("PixelLLMConfig needs at least one image encoder (eva02 and/or sam)")
    if self.prompt_points_per_side == 1 or self.prompt_points_per_side < 0:
      raise ValueError("PixelLLMConfig.prompt_points_per_side must be 0 (box corners) or >= 2, "
                       f"got {self.prompt_points_per_side}")


def box_grid_points(boxes_x4: jax.Array, points_per_side: int) -> jax.Array:
  """float[..., 4] xyxy -> float[..., n * n, 2]: an n x n grid spanning each box, rows first."""
  steps = jnp.linspace(0.0, 1.0, points_per_side)
  fy, fx = jnp.meshgrid(steps, steps, indexing="ij")
  frac = jnp.stack([fx.reshape(-1), fy.reshape(-1)], axis=-1)  # [n*n, 2] (x, y)
  lo, hi = boxes_x4[..., None, :2], boxes_x4[..., None, 2:]
  return lo + frac * (hi - lo)


@flax.struct.dataclass
class Encoded:
  encoder_out: jax.Array   # float32[B, N, Le, D]
  encoder_mask: jax.Array  # bool[B, N, Le]


class VisualProjection(nn.Module):
  """Dense (N(0, 0.02) init) + LayerNorm from extractor width to the LM width."""

  features: int
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = layers.dense(self.features, ("mlp", "embed"),
                     kernel_init=nn.initializers.normal(0.02), name="dense")(x)
    return layers.layer_norm(epsilon=self.epsilon, name="norm")(x)


@gin.configurable
class PixelLLM(nn.Module):
  config: PixelLLMConfig

  def setup(self):
    cfg = self.config
    self.eva02 = EVA02ViT(cfg.eva02) if cfg.eva02 is not None else None
    self.sam = SamViT(cfg.sam) if cfg.sam is not None else None
    self.prompt_encoder = PromptEncoder(cfg.prompt_encoder)
    self.extractor = PromptExtractor(cfg.extractor)
    self.visual_proj = VisualProjection(cfg.t5.d_model, cfg.visual_proj_eps)
    self.t5 = T5(cfg.t5)
    self.loc_head = LocHead(cfg.loc_head)

  def image_features(self, image: jax.Array) -> jax.Array:
    """uint8[B, H, W, 3] -> float32[B, h, w, C] fused feature map."""
    maps = []
    if self.eva02 is not None:
      maps.append(self.eva02(image))
    if self.sam is not None:
      sam_map = self.sam(image)
      maps.append(jax.lax.stop_gradient(sam_map) if self.config.sam_frozen else sam_map)
    return fuse_feature_maps(maps)

  def visual_tokens(self, batch: Batch) -> jax.Array:
    """float32[B, K, Q, D]: LM-width visual tokens for each distinct prompt."""
    fused = self.image_features(batch.image)
    grid_hw = fused.shape[1:3]
    n = self.config.prompt_points_per_side
    if n:
      points = box_grid_points(batch.prompt_boxes, n)
      prompt_tokens = self.prompt_encoder.embed_points(
          points, jnp.ones(points.shape[:-1], jnp.int32), batch.image_valid_hw)
    else:
      prompt_tokens = self.prompt_encoder.embed_boxes(batch.prompt_boxes, batch.image_valid_hw)
    image_pe = self.prompt_encoder.dense_pe(grid_hw)
    dense_prompt = self.prompt_encoder.no_mask_embed()
    visual = self.extractor(fused, image_pe, prompt_tokens, dense_prompt)
    return self.visual_proj(visual)

  def encode(self, batch: Batch, *, train: bool = False) -> Encoded:
    visual_BKQD = self.visual_tokens(batch)
    b, n, lc = batch.context_tokens.shape
    visual_BNQD = jnp.take_along_axis(
        visual_BKQD, batch.prompt_index[:, :, None, None].astype(jnp.int32), axis=1)
    context_BNLD = self.t5.embed(batch.context_tokens)
    embeds = jnp.concatenate([visual_BNQD.astype(context_BNLD.dtype), context_BNLD], axis=2)
    q = visual_BNQD.shape[2]
    mask = jnp.concatenate(
        [jnp.ones((b, n, q), bool), batch.context_tokens > 0], axis=2)
    le, d = embeds.shape[2], embeds.shape[3]
    out = self.t5.encode(embeds.reshape(b * n, le, d), mask.reshape(b * n, le),
                         deterministic=not train)
    return Encoded(encoder_out=out.reshape(b, n, le, -1), encoder_mask=mask)

  def decode(self, encoded: Encoded, decoder_input_tokens: jax.Array, *,
             decode: bool = False, train: bool = False) -> Output:
    b, n, t = decoder_input_tokens.shape
    le, d = encoded.encoder_out.shape[2:]
    logits, hidden = self.t5.decode(
        encoded.encoder_out.reshape(b * n, le, d),
        encoded.encoder_mask.reshape(b * n, le),
        decoder_input_tokens.reshape(b * n, t),
        deterministic=not train, decode=decode)
    head_in = hidden if self.config.loc_grad_to_lm else jax.lax.stop_gradient(hidden)
    points = self.loc_head(head_in)
    return Output(
        logits=logits.reshape(b, n, t, -1),
        points=points.reshape(b, n, t, *points.shape[-2:]),
        hidden=hidden.reshape(b, n, t, -1),
    )

  def __call__(self, batch: Batch, *, train: bool = False) -> Output:
    return self.decode(self.encode(batch, train=train), batch.decoder_input_tokens, train=train)
