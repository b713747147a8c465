"""Referring-segmentation head: the official gated mask adapter and SAM's mask decoder.

As the official PixelLLM refseg model (docs/DESIGN.md, "Official code"; its
`SamMaskAdaptor` and `forward_mask_decode`):

- The box prompt is the referring box the localization head gives at the
  position whose target is EOS (the one referring localization reads), clipped
  to the image and cut from the backward pass. In training too the mask branch
  is driven by this *predicted* box, not the ground-truth box (official).
- SAM's prompt encoder embeds it as 2 sparse tokens (TL, BR corners).
- Mask adapter (`MaskAdapter`): keys are [LayerNorm + Dense of the slot's Q
  visual prompt tokens (the LM-width tokens the T5 encoder reads) ; LayerNorm
  + Dense of the slot's L decoder hidden states], both to the SAM width C,
  with a zero positional encoding; queries are 2 learned tokens; a SAM two-way
  transformer (depth 2, 8 heads, MLP 2048 at paper scale) runs them. Its 2
  output tokens are multiplied by tanh(alpha), alpha initialized to 0, and
  added to the 2 box tokens, so a fresh adapter leaves SAM's box prompt
  exactly as it is (`gate=False` adds them ungated).
- SAM's mask decoder (models/mask_decoder.py) on SAM's image embedding
  (`Features.maps['sam']`) with the prompt encoder's dense PE and no-mask
  embedding, `multimask_output=False`: one mask of low-resolution logits
  (4x the SAM grid: 96 x 96 at 384 px) and its IoU prediction per slot.

One deviation, a fix: the official adapter let the learned queries attend to
the decoder's padded positions (no key mask), so a slot's mask depended on how
far its batch was padded. Here positions after the box's position are masked
(`mask_text_padding`; False restores the official behaviour).

Parameters: the composer holds two top-level submodules, `mask_adapter` (this
file) and `mask_decoder` (SAM's, imported with SAM's weights: convert/sam.py),
so `PixelLLMConfig.frozen` can freeze the decoder and train the adapter, as the
paper's refseg stage does.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixelllm_jax import layers
from pixelllm_jax.models.mask_decoder import MaskDecoderConfig
from pixelllm_jax.models.two_way import TwoWayTransformer

Array = jax.Array

BOX_TOKENS = 2  # SAM's box prompt: its top-left and bottom-right corner tokens


@dataclasses.dataclass(frozen=True)
class MaskHeadConfig:
  """The mask branch (module docstring). Paper sizes by default.

  decoder: SAM's mask decoder; its `transformer_dim` is the SAM width C, which
    the SAM image embedding and the prompt encoder must share.
  adapter_depth / adapter_num_heads / adapter_mlp_dim: the adapter's two-way
    transformer (width C).
  gate: multiply the adapter's output by tanh(alpha), alpha initialized to 0.
  mask_text_padding: hide the decoder positions after the box's position from
    the adapter (a fix; the official code attends to them).
  dtype: compute dtype of the adapter and the decoder (the decoder's own
    `dtype` follows it); outputs are float32.
  """
  decoder: MaskDecoderConfig = MaskDecoderConfig()
  adapter_depth: int = 2
  adapter_num_heads: int = 8
  adapter_mlp_dim: int = 2048
  gate: bool = True
  mask_text_padding: bool = True
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.adapter_depth < 1:
      raise ValueError(f"MaskHeadConfig.adapter_depth must be >= 1, got {self.adapter_depth}")
    object.__setattr__(self, "decoder", dataclasses.replace(self.decoder, dtype=self.dtype))

  @property
  def width(self) -> int:
    return self.decoder.transformer_dim


class MaskAdapter(nn.Module):
  """Text- and prompt-conditioned residual for SAM's 2 box tokens (module docstring)."""

  config: MaskHeadConfig

  @nn.compact
  def __call__(self, visual_BNQD: Array, hidden_BNLD: Array,
               text_mask_BNL: Array | None = None) -> Array:
    """Returns float32[B, N, 2, C], to be added to the box tokens.

    Args:
      visual_BNQD: each slot's visual prompt tokens (LM width D).
      hidden_BNLD: each slot's decoder hidden states.
      text_mask_BNL: bool, True for the decoder positions to read (None: all).
    """
    cfg = self.config
    c, dt = cfg.width, cfg.dtype
    b, n, q, _ = visual_BNQD.shape
    length = hidden_BNLD.shape[2]

    def project(x: Array, name: str) -> Array:
      x = layers.layer_norm(epsilon=1e-5, dtype=dt, name=f"{name}_norm")(x)
      return layers.dense(c, ("embed", "mlp"), dtype=dt, name=f"{name}_proj")(x)

    keys = jnp.concatenate([project(visual_BNQD, "visual"), project(hidden_BNLD, "text")],
                           axis=2).reshape(b * n, q + length, c)
    key_mask = None
    if text_mask_BNL is not None and cfg.mask_text_padding:
      key_mask = jnp.concatenate([jnp.ones((b, n, q), bool), text_mask_BNL.astype(bool)],
                                 axis=2).reshape(b * n, q + length)
    queries = self.param("queries", layers.param_init(nn.initializers.normal(1.0),
                                                      ("queries", "embed")), (BOX_TOKENS, c))
    queries = jnp.broadcast_to(queries.astype(dt), (b * n, BOX_TOKENS, c))
    out, _ = TwoWayTransformer(
        depth=cfg.adapter_depth, embedding_dim=c, num_heads=cfg.adapter_num_heads,
        mlp_dim=cfg.adapter_mlp_dim, dtype=dt, name="transformer",
    )(keys, jnp.zeros_like(keys), queries, key_mask)
    out = out.astype(jnp.float32).reshape(b, n, BOX_TOKENS, c)
    if cfg.gate:
      alpha = self.param("alpha", layers.param_init(nn.initializers.zeros, ()), ())
      out = out * jnp.tanh(alpha)
    return out


def text_positions(index_BN: Array, length: int) -> Array:
  """bool[B, N, L]: decoder positions 0..index (the start token up to the box's position:
  what the slot has read when its box is read)."""
  return jnp.arange(length)[None, None, :] <= index_BN[:, :, None]
