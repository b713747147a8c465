"""SAM-style prompt encoder: boxes and points -> sparse prompt tokens.

Architecture as Segment Anything's `PromptEncoder` (Kirillov et al. 2023), which
PixelLLM uses frozen with width 256:

- Coordinates get a random-Fourier positional encoding: with a Gaussian matrix
  G [2, D/2], `pe(c) = [sin(2 pi (2c - 1) G), cos(2 pi (2c - 1) G)]` for c in
  [0, 1]^2 (x, y order).
- Coordinates are pixel centres: SAM adds 0.5 to absolute canvas pixels and
  divides by the canvas size. Inputs here are normalized to [0, 1] of the
  *unpadded* image (project convention); `valid_hw` (the fraction of the canvas
  holding the image) converts them to canvas pixels first, so a prompt means
  the same PE as in SAM / the official PixelLLM code (absolute pixels on the
  padded canvas).
- A box is 2 tokens: PE of its top-left and bottom-right corners plus the
  corner type embeddings. A point is PE plus the positive / negative type
  embedding; label -1 marks "not a point": its PE is zeroed and
  `not_a_point_embed` used instead.
- Unlike SAM's `_embed_points(pad=True)`, no padding point is appended when no
  box is given: callers pad explicitly with label -1 (shapes stay static).
- `dense_pe` is SAM's `get_dense_pe`: the PE of the pixel-centre grid
  ((i + 0.5) / h, (j + 0.5) / w).
- Mask prompts (SAM's `mask_downscaling` convs) are not implemented: PixelLLM
  never feeds mask inputs, it always uses `no_mask_embed` as the dense prompt.

Parameters and their checkpoint names (SAM `prompt_encoder.*` / HF `SamModel`):

| here | SAM | Hugging Face |
|---|---|---|
| `point_embeddings` [4, D] rows neg, pos, box TL, box BR | `point_embeddings.{0..3}.weight` ([1, D] each) | `prompt_encoder.point_embed.{0..3}.weight` |
| `not_a_point_embed` [D] | `not_a_point_embed.weight` [1, D] | `prompt_encoder.not_a_point_embed.weight` |
| `no_mask_embed` [D] | `no_mask_embed.weight` [1, D] | `prompt_encoder.no_mask_embed.weight` |
| `positional_encoding_gaussian_matrix` [2, D/2] | `pe_layer.positional_encoding_gaussian_matrix` (a buffer) | `shared_image_embedding.positional_embedding` (a buffer) |

The Gaussian matrix is a parameter here so converters can load it; the
trainable predicate freezes it (and the whole encoder, as PixelLLM does).
"""
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixelllm_jax import layers

Array = jax.Array
Dtype = Any

# Rows of the `point_embeddings` table (SAM's order).
NEGATIVE, POSITIVE, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = 0, 1, 2, 3
NOT_A_POINT = -1


@dataclasses.dataclass(frozen=True)
class PromptEncoderConfig:
  """Prompt encoder size.

  Attributes:
    embed_dim: token width D (256 in SAM / PixelLLM); must be even.
    input_image_size: (H, W) of the padded canvas in pixels, for SAM's +0.5
      pixel-centre shift (PixelLLM: (384, 384)).
    dtype: dtype of the returned embeddings (computed in float32).
  """

  embed_dim: int = 256
  input_image_size: tuple[int, int] = (384, 384)
  dtype: Dtype = jnp.float32


def fourier_pe(coords: Array, gaussian_2xF: Array) -> Array:
  """Random-Fourier features of xy in [0, 1]: float32[..., 2] -> float32[..., 2F] (sin, cos)."""
  c = 2.0 * coords.astype(jnp.float32) - 1.0
  proj = 2.0 * math.pi * jnp.einsum(
      "...c,cf->...f", c, gaussian_2xF.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


class PromptEncoder(nn.Module):
  """Embeds boxes and points as SAM does; see the module docstring.

  Use through its methods (`embed_boxes`, `embed_points`, `dense_pe`,
  `no_mask_embed`); all parameters are created whichever method `init` calls.
  """

  config: PromptEncoderConfig

  def setup(self):
    d = self.config.embed_dim
    if d % 2:
      raise ValueError(f"embed_dim must be even, got {d}")
    # torch nn.Embedding and SAM's Gaussian matrix are N(0, 1) at init.
    normal = nn.initializers.normal(stddev=1.0)
    self.point_embeddings = self.param(
        "point_embeddings", layers.param_init(normal, ("prompt_types", "embed")), (4, d))
    self.not_a_point = self.param(
        "not_a_point_embed", layers.param_init(normal, ("embed",)), (d,))
    self.no_mask = self.param("no_mask_embed", layers.param_init(normal, ("embed",)), (d,))
    self.gaussian_matrix = self.param(
        "positional_encoding_gaussian_matrix",
        layers.param_init(normal, ("coords", "embed")), (2, d // 2))

  def _canvas_coords(self, xy: Array, valid_hw_Bx2: Array) -> Array:
    """float[B, ..., 2] xy in [0, 1] of the image -> SAM's normalized pixel centres.

    x -> (x * valid_w * W + 0.5) / W on a canvas of W pixels (y likewise with H).
    """
    h_canvas, w_canvas = self.config.input_image_size
    canvas_wh = jnp.asarray([w_canvas, h_canvas], jnp.float32)
    valid_wh_Bx2 = valid_hw_Bx2.astype(jnp.float32)[:, ::-1]
    valid_wh = valid_wh_Bx2.reshape(valid_wh_Bx2.shape[0], *([1] * (xy.ndim - 2)), 2)
    pixels = xy.astype(jnp.float32) * valid_wh * canvas_wh
    return (pixels + 0.5) / canvas_wh

  def embed_boxes(self, boxes_BxKx4: Array, valid_hw_Bx2: Array) -> Array:
    """Boxes xyxy in [0, 1] of the unpadded image -> float[B, K, 2, D] (TL, BR tokens)."""
    corners_BxKx2x2 = boxes_BxKx4.reshape(*boxes_BxKx4.shape[:-1], 2, 2)
    pe = fourier_pe(self._canvas_coords(corners_BxKx2x2, valid_hw_Bx2), self.gaussian_matrix)
    out = pe + self.point_embeddings[BOX_TOP_LEFT:BOX_BOTTOM_RIGHT + 1]
    return out.astype(self.config.dtype)

  def embed_points(
      self, points_BxKxMx2: Array, labels_BxKxM: Array, valid_hw_Bx2: Array
  ) -> Array:
    """Points xy in [0, 1] of the unpadded image -> float[B, K, M, D].

    labels: int[B, K, M], 1 positive, 0 negative, -1 padding ("not a point":
    the coordinates are ignored and `not_a_point_embed` is returned), 2 / 3
    box top-left / bottom-right corner.
    """
    pe = fourier_pe(self._canvas_coords(points_BxKxMx2, valid_hw_Bx2), self.gaussian_matrix)
    # Labels 2 / 3 pick the box-corner rows (as SAM 2 encodes boxes as points).
    type_embed = jnp.take(self.point_embeddings, jnp.clip(labels_BxKxM, 0, 3), axis=0)
    padding = (labels_BxKxM == NOT_A_POINT)[..., None]
    out = jnp.where(padding, self.not_a_point, pe + type_embed)
    return out.astype(self.config.dtype)

  def dense_pe(self, grid_hw: tuple[int, int]) -> Array:
    """PE of the pixel-centre grid of a (h, w) feature map: float[h, w, D]."""
    h, w = grid_hw
    ys = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
    xs = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
    grid_hxwx2 = jnp.stack(jnp.meshgrid(xs, ys, indexing="xy"), axis=-1)
    return fourier_pe(grid_hxwx2, self.gaussian_matrix).astype(self.config.dtype)

  def no_mask_embed(self) -> Array:
    """The dense "no mask" embedding, float[D]; SAM broadcasts it over the grid."""
    return self.no_mask.astype(self.config.dtype)
