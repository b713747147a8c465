"""PixelLLM composer: wires the separately tested towers into one model.

Data flow (docs/DESIGN.md, "The model"):
  image -> [EVA02 ViT] and/or [SAM ViT] -> per-tower maps -> fuse (resize to the
      largest grid, concat)
  prompt boxes (or points) -> SAM prompt encoder -> prompt feature extractor
      (learned queries, two-way attention with the fused map) -> Dense +
      LayerNorm to the LM width
  [visual tokens of the slot's prompt ; embedded text prompt] -> T5 encoder
  T5 decoder (teacher forced or cached) -> logits and final hidden states
  hidden states -> localization head -> P points per token
  (optional mask head) referring box + visual tokens + hidden states -> mask
      adapter -> SAM mask decoder on SAM's map -> mask logits, IoU prediction
  (optional box decoder) fused map -> feature pyramid -> CenterNet proposals ->
      ROI stage -> detections, which become the prompts of dense captioning

The composer takes arrays, not the training `Batch` (pixelllm_jax/model.py
unpacks batches): prompts may come from anywhere (a detector's proposals), and
`image_features` keeps each tower's own map beside the fused one so heads can
read them (the mask head reads SAM's). The extractor runs once per distinct
prompt (K per image); caption slots (N per image) pick their prompt through
`prompt_index`. Whether the localization loss reaches the LM is
`loc_grad_to_lm` (official: it does).

Mask branch (`PixelLLMConfig.mask_head`, models/heads/mask.py; None: no mask
submodules, existing configs and checkpoints unchanged): the teacher-forced
pass segments each slot when given `mask_positions` (where each slot's box is
read), returning the mask logits in `Output`.

Box decoder (`PixelLLMConfig.box_head`, models/heads/detection.py; None: none):
the teacher-forced pass adds its training losses when given ground-truth
boxes (`det_boxes`); `detect_and_encode` runs the image once, detects, and
encodes every detection as a prompt of its own caption slot (dense captioning).

One canvas: `PixelLLMConfig.image_size` is the square canvas every image is
padded to; the image towers' and the prompt encoder's sizes follow from it.

Freezing: `PixelLLMConfig.frozen` names top-level submodules that do not train
(LoRA adapters inside them still do: freezing 't5' with LoRA on trains only the
adapters). It is the one switch: the optimizer's trainable predicate
(`PixelLLMConfig.trainable`) derives from it, and the outputs of frozen input
towers (image towers, prompt encoder) are cut from the backward pass.

A box prompt is its two corner tokens (every paper config: the official
`prompt_use_box_rate=1`). The official code appended three copies of SAM's
no-mask embedding as padding tokens; with no official checkpoint to stay
compatible with, the padding is left out. `prompt_points_per_side = n >= 2`
instead encodes the box as the official point prompt: an n x n grid of
positive points spanning the box (n = 2: its 4 corners; n = 3 adds the edge
midpoints and the centre).
"""
import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from pixelllm_jax import layers
from pixelllm_jax.batch import Output
from pixelllm_jax.lora import is_lora_path
from pixelllm_jax.models.eva02 import EVA02Config, EVA02ViT
from pixelllm_jax.models.fusion import fuse_feature_maps
from pixelllm_jax.models.heads import mask as mask_lib
from pixelllm_jax.models.heads.localization import (LocHead, LocHeadConfig, points_at,
                                                    points_to_boxes)
from pixelllm_jax.models.heads import detection as detection_lib
from pixelllm_jax.models.mask_decoder import MaskDecoder
from pixelllm_jax.models.prompt_encoder import POSITIVE, PromptEncoder, PromptEncoderConfig
from pixelllm_jax.models.prompt_extractor import PromptExtractor, PromptExtractorConfig
from pixelllm_jax.models.sam_vit import SamViT, SamViTConfig
from pixelllm_jax.models.t5 import T5, T5Config

Array = jax.Array

# Top-level submodules (the parameter tree's first level), in data-flow order.
SUBMODULES = ("eva02", "sam", "prompt_encoder", "extractor", "visual_proj", "t5", "loc_head",
              "mask_adapter", "mask_decoder", "box_head")
# Submodules whose inputs are data: when frozen, their outputs are cut from the backward pass.
_INPUT_TOWERS = ("eva02", "sam", "prompt_encoder")


@dataclasses.dataclass(frozen=True)
class PixelLLMConfig:
  """The composed model.

  image_size: side of the square canvas images are padded to; the image
    towers' `image_size` and the prompt encoder's `input_image_size` follow it.
  frozen: top-level submodules (SUBMODULES) that do not train; LoRA adapters
    inside a frozen submodule still train unless `frozen_lora`.
  frozen_lora: LoRA adapters inside frozen submodules do not train either (the
    official refseg configs freeze T5 entirely, its adapters included).
  dtype: compute dtype of the composer's own layers (the visual projection).
  mask_head: the referring-segmentation branch (None: none). It needs the SAM
    tower, a SAM width shared by SAM's map, the prompt encoder and the mask
    decoder, and 2 points per token (the box).
  box_head: the dense-captioning box decoder on the fused map (None: none); its
    `canvas_size` follows `image_size`.
  """
  t5: T5Config
  prompt_encoder: PromptEncoderConfig
  extractor: PromptExtractorConfig
  loc_head: LocHeadConfig = LocHeadConfig()
  eva02: EVA02Config | None = None
  sam: SamViTConfig | None = None
  image_size: int = 384
  frozen: tuple[str, ...] = ()
  frozen_lora: bool = False
  loc_grad_to_lm: bool = True
  visual_proj_eps: float = 1e-5
  # 0: a box is its 2 corner tokens; n >= 2: an n x n grid of positive points over it.
  prompt_points_per_side: int = 0
  dtype: Any = jnp.float32
  mask_head: mask_lib.MaskHeadConfig | None = None
  box_head: detection_lib.BoxHeadConfig | None = None

  def __post_init__(self):
    if self.eva02 is None and self.sam is None:
      raise ValueError("PixelLLMConfig needs at least one image encoder (eva02 and/or sam)")
    if self.prompt_points_per_side == 1 or self.prompt_points_per_side < 0:
      raise ValueError("PixelLLMConfig.prompt_points_per_side must be 0 (box corners) or >= 2, "
                       f"got {self.prompt_points_per_side}")
    if self.image_size <= 0:
      raise ValueError(f"PixelLLMConfig.image_size must be positive, got {self.image_size}")
    frozen = (self.frozen,) if isinstance(self.frozen, str) else tuple(self.frozen)
    unknown = sorted(set(frozen) - set(SUBMODULES))
    if unknown:
      raise ValueError(f"PixelLLMConfig.frozen names {unknown}; submodules are {SUBMODULES}")
    object.__setattr__(self, "frozen", frozen)
    if self.mask_head is not None:
      self._check_mask_head()
    size = self.image_size
    object.__setattr__(self, "prompt_encoder", dataclasses.replace(
        self.prompt_encoder, input_image_size=(size, size)))
    for tower in ("eva02", "sam"):
      if getattr(self, tower) is not None:
        object.__setattr__(self, tower, dataclasses.replace(getattr(self, tower), image_size=size))
    if self.box_head is not None:
      object.__setattr__(self, "box_head", dataclasses.replace(self.box_head, canvas_size=size))

  @property
  def fused_hw(self) -> tuple[int, int]:
    """(h, w) of the fused map: the largest of the image towers' grids."""
    grids = [self.image_size // tower.patch_size for tower in (self.eva02, self.sam)
             if tower is not None]
    return max(grids), max(grids)

  def _check_mask_head(self):
    if self.sam is None:
      raise ValueError("PixelLLMConfig.mask_head needs the SAM tower (its map is what SAM's "
                       "mask decoder reads): give PixelLLMConfig.sam")
    widths = {"SamViTConfig.out_channels": self.sam.out_channels,
              "PromptEncoderConfig.embed_dim": self.prompt_encoder.embed_dim,
              "MaskDecoderConfig.transformer_dim": self.mask_head.width}
    if len(set(widths.values())) > 1:
      raise ValueError(f"the mask head needs one SAM width; got {widths}")
    if self.loc_head.points_per_token != 2:
      raise ValueError("PixelLLMConfig.mask_head reads a box: LocHeadConfig.points_per_token "
                       f"must be 2, got {self.loc_head.points_per_token}")

  def trainable(self, path: Sequence[str]) -> bool:
    """Whether the parameter at `path` (names below 'params') trains."""
    if not path or path[0] not in self.frozen:
      return True
    return not self.frozen_lora and is_lora_path(path)


def box_grid_points(boxes_x4: jax.Array, points_per_side: int) -> jax.Array:
  """float[..., 4] xyxy -> float[..., n * n, 2]: an n x n grid spanning each box, rows first."""
  steps = jnp.linspace(0.0, 1.0, points_per_side)
  fy, fx = jnp.meshgrid(steps, steps, indexing="ij")
  frac = jnp.stack([fx.reshape(-1), fy.reshape(-1)], axis=-1)  # [n*n, 2] (x, y)
  lo, hi = boxes_x4[..., None, :2], boxes_x4[..., None, 2:]
  return lo + frac * (hi - lo)


@flax.struct.dataclass
class Features:
  maps: dict[str, jax.Array]  # each image tower's map, float32[B, h_i, w_i, C_i], by tower name
  fused: jax.Array            # float32[B, h, w, sum C_i] on the largest grid


@flax.struct.dataclass
class Encoded:
  encoder_out: jax.Array   # float32[B, N, Le, D]
  encoder_mask: jax.Array  # bool[B, N, Le]


class VisualProjection(nn.Module):
  """Dense (N(0, 0.02) init) + LayerNorm from extractor width to the LM width."""

  features: int
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = layers.dense(self.features, ("mlp", "embed"), dtype=self.dtype,
                     kernel_init=nn.initializers.normal(0.02), name="dense")(x)
    return layers.layer_norm(epsilon=self.epsilon, dtype=self.dtype, name="norm")(x)


class PixelLLM(nn.Module):
  """The composer; see the module docstring. Methods take arrays (shapes below)."""

  config: PixelLLMConfig

  def setup(self):
    cfg = self.config
    self.eva02 = EVA02ViT(cfg.eva02) if cfg.eva02 is not None else None
    self.sam = SamViT(cfg.sam) if cfg.sam is not None else None
    self.prompt_encoder = PromptEncoder(cfg.prompt_encoder)
    self.extractor = PromptExtractor(cfg.extractor)
    self.visual_proj = VisualProjection(cfg.t5.d_model, cfg.visual_proj_eps, dtype=cfg.dtype)
    self.t5 = T5(cfg.t5)
    self.loc_head = LocHead(cfg.loc_head)
    if cfg.mask_head is not None:
      self.mask_adapter = mask_lib.MaskAdapter(cfg.mask_head)
      self.mask_decoder = MaskDecoder(cfg.mask_head.decoder)
    if cfg.box_head is not None:
      self.box_head = detection_lib.BoxHead(cfg.box_head)

  def _input_tower(self, name: str, x: jax.Array) -> jax.Array:
    return jax.lax.stop_gradient(x) if name in self.config.frozen else x

  def image_features(self, image: jax.Array) -> Features:
    """uint8[B, H, W, 3] -> each tower's map and the fused map."""
    maps = {}
    if self.eva02 is not None:
      maps["eva02"] = self._input_tower("eva02", self.eva02(image))
    if self.sam is not None:
      maps["sam"] = self._input_tower("sam", self.sam(image))
    return Features(maps=maps, fused=fuse_feature_maps(list(maps.values())))

  def visual_tokens(self, fused: jax.Array, image_valid_hw: jax.Array,
                    prompt_boxes: jax.Array | None = None, prompt_points: jax.Array | None = None,
                    prompt_labels: jax.Array | None = None) -> jax.Array:
    """LM-width visual tokens float32[B, K, Q, D] for each of K prompts per image.

    Args:
      fused: float32[B, h, w, C], `Features.fused`.
      image_valid_hw: float32[B, 2], the fraction of the canvas holding the image.
      prompt_boxes: float32[B, K, 4] xyxy in [0, 1] of the image; or
      prompt_points, prompt_labels: float32[B, K, M, 2] and int32[B, K, M]
        (SAM labels: 1 positive, 0 negative, -1 padding).
    """
    if (prompt_boxes is None) == (prompt_points is None):
      raise ValueError("visual_tokens takes prompt_boxes or prompt_points (with labels), not both")
    n = self.config.prompt_points_per_side
    if prompt_boxes is not None and n:
      prompt_points = box_grid_points(prompt_boxes, n)
      prompt_labels = jnp.full(prompt_points.shape[:-1], POSITIVE, jnp.int32)
    if prompt_points is not None:
      prompt_tokens = self.prompt_encoder.embed_points(prompt_points, prompt_labels, image_valid_hw)
    else:
      prompt_tokens = self.prompt_encoder.embed_boxes(prompt_boxes, image_valid_hw)
    image_pe = self.prompt_encoder.dense_pe(fused.shape[1:3])
    dense_prompt = self.prompt_encoder.no_mask_embed()
    prompt_tokens, image_pe, dense_prompt = (
        self._input_tower("prompt_encoder", x) for x in (prompt_tokens, image_pe, dense_prompt))
    visual = self.extractor(fused, image_pe, prompt_tokens, dense_prompt)
    return self.visual_proj(visual)

  def encode_visual(self, visual_BKQD: jax.Array, prompt_index: jax.Array,
                    context_tokens: jax.Array, *, train: bool = False) -> Encoded:
    """T5 encoder over [the slot's visual tokens ; its embedded text prompt].

    visual_BKQD float32[B, K, Q, D]; prompt_index int32[B, N]; context_tokens int32[B, N, Lc].
    """
    b, n, _ = context_tokens.shape
    visual_BNQD = jnp.take_along_axis(
        visual_BKQD, prompt_index[:, :, None, None].astype(jnp.int32), axis=1)
    context_BNLD = self.t5.embed(context_tokens)
    embeds = jnp.concatenate([visual_BNQD.astype(context_BNLD.dtype), context_BNLD], axis=2)
    q = visual_BNQD.shape[2]
    mask = jnp.concatenate([jnp.ones((b, n, q), bool), context_tokens > 0], axis=2)
    le, d = embeds.shape[2], embeds.shape[3]
    out = self.t5.encode(embeds.reshape(b * n, le, d), mask.reshape(b * n, le),
                         deterministic=not train)
    return Encoded(encoder_out=out.reshape(b, n, le, -1), encoder_mask=mask)

  def encode(self, image: jax.Array, image_valid_hw: jax.Array, prompt_boxes: jax.Array,
             prompt_index: jax.Array, context_tokens: jax.Array, *,
             train: bool = False) -> Encoded:
    """Image, K prompt boxes and N slots' text prompts -> the encoder side of every slot."""
    fused = self.image_features(image).fused
    visual = self.visual_tokens(fused, image_valid_hw, prompt_boxes)
    return self.encode_visual(visual, prompt_index, context_tokens, train=train)

  def decode(self, encoded: Encoded, decoder_input_tokens: jax.Array, *,
             decode: bool = False, train: bool = False) -> Output:
    """Decoder over int32[B, N, L] inputs (or [B, N, 1] steps with the cache)."""
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

  def segment(self, sam_map: jax.Array, image_valid_hw: jax.Array, visual_BKQD: jax.Array,
              prompt_index: jax.Array, output: Output, mask_positions: jax.Array) -> Output:
    """`output` with each slot's mask (models/heads/mask.py).

    sam_map float32[B, h, w, C] (`Features.maps['sam']`); visual_BKQD the
    prompts' visual tokens (`visual_tokens`); mask_positions int32[B, N]: the
    decoder position whose points give each slot's box. Adds
    `mask_logits` float32[B, N, 4h, 4w] (covering the canvas) and `mask_iou`
    float32[B, N].
    """
    visual_BNQD = jnp.take_along_axis(
        visual_BKQD, prompt_index[:, :, None, None].astype(jnp.int32), axis=1)
    boxes = points_to_boxes(points_at(output.points, mask_positions))
    boxes = jax.lax.stop_gradient(jnp.clip(boxes, 0.0, 1.0))
    box_tokens = self.prompt_encoder.embed_boxes(boxes, image_valid_hw)
    image_pe = self.prompt_encoder.dense_pe(sam_map.shape[1:3])
    dense_prompt = self.prompt_encoder.no_mask_embed()
    box_tokens, image_pe, dense_prompt = (
        self._input_tower("prompt_encoder", x) for x in (box_tokens, image_pe, dense_prompt))
    text_mask = mask_lib.text_positions(mask_positions, output.hidden.shape[2])
    residual = self.mask_adapter(visual_BNQD, output.hidden, text_mask)
    sparse = box_tokens.astype(jnp.float32) + residual
    logits, iou = self.mask_decoder(sam_map, image_pe, sparse, dense_prompt,
                                    multimask_output=False)
    return output.replace(mask_logits=logits[:, :, 0], mask_iou=iou[:, :, 0])

  def detect_and_encode(self, image: jax.Array, image_valid_hw: jax.Array,
                        context_tokens: jax.Array
                        ) -> tuple[detection_lib.Detections, Encoded]:
    """Dense captioning's encoder side: the image's detections (D per image, padded)
    and the encoder side of D slots, slot d prompted by detection d.

    context_tokens int32[B, Lc]: the text prompt every slot reads ("an object of").
    """
    if self.config.box_head is None:
      raise ValueError("dense captioning needs a box decoder (PixelLLMConfig.box_head)")
    fused = self.image_features(image).fused
    detections = self.box_head.detect(fused, image_valid_hw)
    b, d = detections.scores.shape
    visual = self.visual_tokens(fused, image_valid_hw, detections.boxes)
    prompt_index = jnp.broadcast_to(jnp.arange(d, dtype=jnp.int32), (b, d))
    context = jnp.broadcast_to(context_tokens[:, None, :], (b, d, context_tokens.shape[-1]))
    return detections, self.encode_visual(visual, prompt_index, context)

  def __call__(self, image: jax.Array, image_valid_hw: jax.Array, prompt_boxes: jax.Array,
               prompt_index: jax.Array, context_tokens: jax.Array,
               decoder_input_tokens: jax.Array, *, train: bool = False,
               mask_positions: jax.Array | None = None,
               det_boxes: jax.Array | None = None, det_valid: jax.Array | None = None,
               det_normalizers: Any = None) -> Output:
    """Teacher-forced pass: the arrays of `batch.Batch` (same names) -> Output.

    mask_positions: int32[B, N], where each slot's box is read, to segment it
      too (needs `PixelLLMConfig.mask_head`); None: no masks.
    det_boxes, det_valid: float32[B, G, 4] and bool[B, G], ground-truth boxes for
      the box decoder's losses (needs `PixelLLMConfig.box_head`; `Output.det_losses`),
      divided by `det_normalizers` (`detection.normalizers` of the whole batch;
      None: this batch's own).
    """
    if mask_positions is not None and self.config.mask_head is None:
      raise ValueError("mask_positions given but the model has no mask head "
                       "(PixelLLMConfig.mask_head)")
    if det_boxes is not None and self.config.box_head is None:
      raise ValueError("detection targets given but the model has no box decoder "
                       "(PixelLLMConfig.box_head)")
    features = self.image_features(image)
    visual = self.visual_tokens(features.fused, image_valid_hw, prompt_boxes)
    encoded = self.encode_visual(visual, prompt_index, context_tokens, train=train)
    output = self.decode(encoded, decoder_input_tokens, train=train)
    if det_boxes is not None:
      output = output.replace(det_losses=self.box_head(
          features.fused, image_valid_hw, det_boxes, det_valid, normalizers=det_normalizers))
    if mask_positions is None:
      return output
    return self.segment(features.maps["sam"], image_valid_hw, visual, prompt_index, output,
                        mask_positions)
