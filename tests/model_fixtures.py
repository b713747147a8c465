"""Helpers for the composed-model tests: a toy PixelLLMConfig and random, well-formed Batches.

The toy model has every tower of the paper model (EVA02 and SAM image encoders, SAM prompt encoder,
two-way prompt extractor, T5 encoder-decoder with optional LoRA, localization MLP) at sizes smaller
than gin_configs/models/tiny.gin: 32x32 images, widths 32, depth 1-2, vocab 64. EVA02 (patch 8, a
4x4 grid) and SAM (patch 16, a 2x2 grid) give different grids, so the fusion's resize runs too.
"""
import jax
import jax.numpy as jnp
import numpy as np

from pixelllm_jax.batch import Batch, shift_right
from pixelllm_jax.tasks import TASKS
from pixelllm_jax.lora import LoraConfig
from pixelllm_jax.models.eva02 import EVA02Config
from pixelllm_jax.models.heads.detection import BoxHeadConfig
from pixelllm_jax.models.heads.localization import LocHeadConfig
from pixelllm_jax.models.heads.mask import MaskHeadConfig
from pixelllm_jax.models.mask_decoder import MaskDecoderConfig
from pixelllm_jax.models.pixel_llm import PixelLLMConfig
from pixelllm_jax.models.prompt_encoder import PromptEncoderConfig
from pixelllm_jax.models.prompt_extractor import PromptExtractorConfig
from pixelllm_jax.models.sam_vit import SamViTConfig
from pixelllm_jax.models.t5 import T5Config

IMAGE_SIZE = 32
VOCAB = 64
WIDTH = 32
POINTS = 2
NUM_QUERIES = 4
FIRST_WORD_ID = 3  # T5 ids: pad 0, eos 1, unk 2
EOS_ID = 1
# Random task ids come from the first six registered tasks (caption ... refseg): a task
# registered later must not change every fixture's random draws (the tolerances of some tests,
# e.g. tests/test_bf16.py, were measured on these batches).
FIXTURE_TASKS = 6
assert len(TASKS) >= FIXTURE_TASKS


def toy_config(*, lora_rank: int = 0, loc_grad_to_lm: bool = True, eva02: bool = True,
               sam: bool = True, dropout_rate: float = 0.0,
               frozen: tuple[str, ...] = ("sam",),
               points_per_token: int = POINTS) -> PixelLLMConfig:
  """A PixelLLMConfig with every tower at toy size (about 60 k parameters)."""
  t5 = T5Config(
      vocab_size=VOCAB, d_model=WIDTH, num_heads=2, d_kv=16, d_ff=64,
      num_encoder_layers=1, num_decoder_layers=2, relative_attention_num_buckets=8,
      relative_attention_max_distance=16, dropout_rate=dropout_rate,
      feed_forward="gated-gelu", tie_word_embeddings=False,
      lora=LoraConfig(rank=lora_rank, encoder_self=("q", "v"), decoder_self=("q", "v"),
                      decoder_cross=("q", "v")))
  return PixelLLMConfig(
      t5=t5,
      prompt_encoder=PromptEncoderConfig(embed_dim=16),
      extractor=PromptExtractorConfig(depth=1, width=WIDTH, num_heads=2, mlp_dim=32,
                                      num_queries=NUM_QUERIES, output_dim=WIDTH),
      loc_head=LocHeadConfig(hidden_dim=32, depth=2, points_per_token=points_per_token),
      eva02=EVA02Config(patch_size=8, width=WIDTH, depth=1, num_heads=2,
                        mlp_dim=48, pretrain_grid=4) if eva02 else None,
      sam=SamViTConfig(patch_size=16, width=WIDTH, depth=2, num_heads=2,
                       mlp_dim=32, window_size=2, global_blocks=(1,), out_channels=16,
                       pretrain_grid=2) if sam else None,
      image_size=IMAGE_SIZE,
      frozen=frozen,
      loc_grad_to_lm=loc_grad_to_lm,
  )


def toy_mask_head(**kwargs) -> MaskHeadConfig:
  """A mask head at the toy SAM width (16): adapter and decoder with 2 heads, MLP 32."""
  return MaskHeadConfig(
      decoder=MaskDecoderConfig(transformer_dim=16, iou_head_hidden_dim=16,
                                transformer_num_heads=2, transformer_mlp_dim=32),
      adapter_num_heads=2, adapter_mlp_dim=32, **kwargs)


def toy_box_head(**kwargs) -> BoxHeadConfig:
  """A box decoder at toy width over the toy model's 4x4 fused map: levels of stride 4 and 8 px,
  one conv per tower, 8 proposals, a 16-wide ROI stage on 8 sampled ROIs, 4 detections."""
  settings = dict(width=16, scales=(2.0, 1.0), extra_levels=0, head_convs=1,
                  num_proposals_train=8, num_proposals_test=8, roi_size=3, roi_fc=16,
                  roi_samples=8, max_detections=4)
  return BoxHeadConfig(**{**settings, **kwargs})


def _tokens_with_eos(r: np.random.RandomState, shape: tuple[int, ...], max_words: int,
                     min_words: int = 1) -> np.ndarray:
  """int32[*shape, max_words + 1]: random words, EOS, then 0-padding; random lengths."""
  out = np.zeros((*shape, max_words + 1), np.int32)
  lengths = r.randint(min_words, max_words + 1, size=shape)
  words = r.randint(FIRST_WORD_ID, VOCAB, size=out.shape)
  pos = np.arange(max_words + 1)
  out = np.where(pos < lengths[..., None], words, out)
  out = np.where(pos == lengths[..., None], EOS_ID, out)
  return out.astype(np.int32)


def random_batch(seed: int, *, b: int = 2, k: int = 2, n: int = 3, l: int = 6, lc: int = 4,
                 p: int = POINTS, image_size: int = IMAGE_SIZE, masks: bool = False,
                 detections: int = 0) -> Batch:
  """A random but well-formed numpy Batch.

  Context tokens: 1..lc-1 words, EOS, 0-padding. Decoder targets: 1..l-1 words, EOS, 0-padding;
  inputs are the targets shifted right (t5x). Caption weights mark non-pad targets, point weights
  a random subset of them; prompt boxes are valid xyxy in [0, 1]. `masks`: random target masks
  (drawn after everything else, so the other fields do not change). `detections` = G > 0:
  G random ground-truth boxes per image (of 4-16 px at the toy size), some rows' last ones
  invalid, drawn after the masks.
  """
  r = np.random.RandomState(seed)
  corners = np.sort(r.rand(b, k, 2, 2), axis=2)           # [B, K, (lo, hi), xy]
  boxes = np.concatenate([corners[:, :, 0], corners[:, :, 1]], axis=-1).astype(np.float32)
  targets = _tokens_with_eos(r, (b, n), l - 1)
  text_w = (targets > 0).astype(np.float32)
  batch = Batch(
      image=r.randint(0, 256, size=(b, image_size, image_size, 3)).astype(np.uint8),
      image_valid_hw=r.uniform(0.5, 1.0, size=(b, 2)).astype(np.float32),
      prompt_boxes=boxes,
      prompt_index=r.randint(0, k, size=(b, n)).astype(np.int32),
      context_tokens=_tokens_with_eos(r, (b, n), lc - 1),
      decoder_input_tokens=shift_right(targets),
      decoder_target_tokens=targets,
      decoder_loss_weights=text_w,
      point_targets=r.rand(b, n, l, p, 2).astype(np.float32),
      point_weights=text_w * (r.rand(b, n, l) > 0.4),
      task_ids=r.randint(0, FIXTURE_TASKS, size=(b, n)).astype(np.int32),
      mask_targets=r.rand(b, n, image_size, image_size) > 0.6 if masks else None,
  )
  if not detections:
    return batch
  size = r.uniform(0.12, 0.5, size=(b, detections, 2))
  lo = r.uniform(0.0, 1.0 - size)
  det_valid = np.arange(detections)[None, :] < r.randint(1, detections + 1, size=(b, 1))
  return batch.replace(det_boxes=np.concatenate([lo, lo + size], -1).astype(np.float32),
                       det_valid=det_valid)


def as_jnp(batch: Batch) -> Batch:
  return jax.tree.map(jnp.asarray, batch)


def inputs(batch: Batch) -> dict:
  """The composer's keyword arguments from a Batch (`PixelLLM.__call__` / `encode`)."""
  names = ("image", "image_valid_hw", "prompt_boxes", "prompt_index", "context_tokens",
           "decoder_input_tokens")
  return {name: getattr(batch, name) for name in names}


def encode_inputs(batch: Batch) -> dict:
  """`PixelLLM.encode`'s keyword arguments from a Batch."""
  out = inputs(batch)
  del out["decoder_input_tokens"]
  return out
