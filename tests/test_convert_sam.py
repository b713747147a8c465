"""convert/sam.py: parity with HF's SamModel (random weights, offline); the original layout.

A tiny SamModel (vision width 32, 2 layers with one global, image 64, patch 8, window 3 so the 8x8
grid gets padded windows, 32 output channels; prompt / mask decoder width 32) gets random weights
everywhere (HF initializes pos-embed and rel-pos tables to zero), is saved with save_pretrained and
converted back from disk. Every component is compared in float32 on CPU at a fixed 1e-4.
"""
import copy
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torchvision_shim  # noqa: F401  (transformers' image utils import torchvision)
import torch
from transformers import SamConfig, SamModel

from pixelllm_jax.convert import common
from pixelllm_jax.convert import sam as convert_sam
from pixelllm_jax.models import mask_decoder as mask_decoder_lib
from pixelllm_jax.models import prompt_encoder as prompt_encoder_lib
from pixelllm_jax.models import sam_vit

TOL = 1e-4
IMAGE, PATCH, GRID, WIDTH = 64, 8, 8, 32
B, K = 2, 3


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "layer_norm" in name or "norm" in name.split(".")[-2]:
        p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
      elif name.endswith("positional_embedding"):
        p.copy_(noise)  # the Fourier matrix: N(0, 1) as in SAM
      elif ("pos_embed" in name or "rel_pos" in name or "embed" in name or "token" in name):
        p.copy_(0.5 * noise)
      elif p.ndim >= 2:
        p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
      else:
        p.copy_(0.1 * noise)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  config = SamConfig(
      vision_config=dict(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
                         image_size=IMAGE, patch_size=PATCH, window_size=3, global_attn_indexes=[1],
                         output_channels=32, num_pos_feats=16, mlp_dim=48),
      prompt_encoder_config=dict(hidden_size=32, image_size=IMAGE, patch_size=PATCH,
                                 mask_input_channels=8),
      mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_hidden_layers=2,
                               num_attention_heads=4, iou_head_hidden_dim=24),
  )
  torch.manual_seed(0)
  model = SamModel(config).eval()
  _randomize(model)
  directory = tmp_path_factory.mktemp("sam_hf")
  model.save_pretrained(directory)
  params, configs = convert_sam.load_hf_sam(str(directory))
  return model, params, configs, directory


def _np(t: torch.Tensor) -> np.ndarray:
  return t.detach().numpy()


def _max_diff(a, b) -> float:
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.abs(a - b).max())


def _image_and_pixel_values(seed=0):
  image = np.random.default_rng(seed).integers(0, 256, (B, IMAGE, IMAGE, 3), dtype=np.uint8)
  x = (image.astype(np.float32) / 255.0 - np.asarray(sam_vit.IMAGENET_MEAN, np.float32)) / (
      np.asarray(sam_vit.IMAGENET_STD, np.float32))
  return image, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def _prompts(seed=1):
  """HF-style prompts in input pixels: points [B, K, 2, 2], labels in {0, 1}, boxes [B, K, 4]."""
  rng = np.random.default_rng(seed)
  points = rng.uniform(0, IMAGE - 1, (B, K, 2, 2)).astype(np.float32)
  labels = rng.integers(0, 2, (B, K, 2)).astype(np.int64)
  corners = np.sort(rng.uniform(0, IMAGE - 1, (B, K, 2, 2)).astype(np.float32), axis=2)
  boxes = corners.reshape(B, K, 4)  # x1 y1 x2 y2 (per-axis min, then max)
  return points, labels, boxes


def _our_prompt_encoder(params, configs):
  model = prompt_encoder_lib.PromptEncoder(configs.prompt_encoder)
  variables = {"params": params.prompt_encoder}
  valid = jnp.ones((B, 2))

  def points(xy_pixels, labels):  # our inputs are normalized to the (unpadded) image
    return model.apply(variables, jnp.asarray(xy_pixels) / IMAGE, jnp.asarray(labels), valid,
                       method=model.embed_points)

  def boxes(xyxy_pixels):
    return model.apply(variables, jnp.asarray(xyxy_pixels) / IMAGE, valid,
                       method=model.embed_boxes)

  dense_pe = model.apply(variables, (GRID, GRID), method=model.dense_pe)
  no_mask = model.apply(variables, method=model.no_mask_embed)
  return points, boxes, dense_pe, no_mask


def test_configs_from_hf(hf):
  _, _, configs, _ = hf
  vit = configs.image_encoder
  assert (vit.width, vit.depth, vit.num_heads, vit.patch_size, vit.window_size) == (32, 2, 4, 8, 3)
  assert vit.global_blocks == (1,) and vit.pretrain_grid == GRID and vit.layer_norm_eps == 1e-6
  assert configs.prompt_encoder.input_image_size == (IMAGE, IMAGE)
  md = configs.mask_decoder
  assert (md.transformer_dim, md.transformer_mlp_dim, md.iou_head_hidden_dim) == (32, 64, 24)
  assert md.layer_norm_eps == 1e-6


def test_image_encoder_parity(hf):
  model, params, configs, _ = hf
  image, pixel_values = _image_and_pixel_values()
  with torch.no_grad():
    ref = _np(model.vision_encoder(pixel_values).last_hidden_state).transpose(0, 2, 3, 1)
  ours = jax.jit(sam_vit.SamViT(configs.image_encoder).apply)(
      {"params": params.image_encoder}, jnp.asarray(image))
  assert ours.shape == (B, GRID, GRID, 32)
  assert np.abs(ref).max() > 0.5  # a non-trivial output
  assert _max_diff(ours, ref) <= TOL


def test_prompt_encoder_parity(hf):
  model, params, configs, _ = hf
  points, labels, boxes = _prompts()
  ours_points, ours_boxes, dense_pe, no_mask = _our_prompt_encoder(params, configs)
  with torch.no_grad():
    # Points only: HF appends a padding point (label -1); we pad explicitly.
    sparse, dense = model.prompt_encoder(torch.from_numpy(points), torch.from_numpy(labels),
                                         None, None)
    box_sparse, _ = model.prompt_encoder(None, None, torch.from_numpy(boxes), None)
    ref_pe = _np(model.get_image_wide_positional_embeddings())[0].transpose(1, 2, 0)
  padded_points = np.concatenate([points, np.zeros((B, K, 1, 2), np.float32)], axis=2)
  padded_labels = np.concatenate([labels, -np.ones((B, K, 1), np.int64)], axis=2)
  assert _max_diff(ours_points(padded_points, padded_labels), _np(sparse)) <= TOL
  assert _max_diff(ours_boxes(boxes), _np(box_sparse)) <= TOL
  assert _max_diff(dense_pe, ref_pe) <= TOL
  assert _max_diff(jnp.broadcast_to(no_mask, (B, GRID, GRID, 32)),
                   _np(dense).transpose(0, 2, 3, 1)) <= TOL


def _hf_decoder_inputs(model, seed=2):
  points, labels, boxes = _prompts()
  embeddings = torch.from_numpy(
      np.random.default_rng(seed).normal(size=(B, 32, GRID, GRID)).astype(np.float32))
  with torch.no_grad():
    sparse, dense = model.prompt_encoder(torch.from_numpy(points), torch.from_numpy(labels),
                                         torch.from_numpy(boxes), None)
    pe = model.get_image_wide_positional_embeddings().repeat(B, 1, 1, 1)
  return embeddings, pe, sparse, dense


@functools.lru_cache(maxsize=None)
def _decoder_apply(md_config):
  """One jitted apply per config, so tests with equal shapes share a compile."""
  return jax.jit(mask_decoder_lib.MaskDecoder(md_config).apply, static_argnums=5)


def _compare_decoder(hf_decoder, params, md_config, inputs, multimask):
  embeddings, pe, sparse, dense = inputs
  with torch.no_grad():
    ref_masks, ref_iou = hf_decoder(embeddings, pe, sparse, dense, multimask)
  ours_masks, ours_iou = _decoder_apply(md_config)(
          {"params": params.mask_decoder}, jnp.asarray(_np(embeddings).transpose(0, 2, 3, 1)),
          jnp.asarray(_np(pe)[0].transpose(1, 2, 0)), jnp.asarray(_np(sparse)),
          jnp.asarray(_np(dense).transpose(0, 2, 3, 1)), multimask)
  m = 3 if multimask else 1
  assert ours_masks.shape == (B, K, m, 4 * GRID, 4 * GRID) and ours_iou.shape == (B, K, m)
  return _max_diff(ours_masks, _np(ref_masks)), _max_diff(ours_iou, _np(ref_iou))


@pytest.mark.parametrize("multimask", [True, False])
def test_mask_decoder_parity_hf_eps(hf, multimask):
  """HF eps (1e-6 in the blocks; its final two-way norm stays at torch's 1e-5, ours uses 1e-6)."""
  model, params, configs, _ = hf
  masks_diff, iou_diff = _compare_decoder(model.mask_decoder, params, configs.mask_decoder,
                                          _hf_decoder_inputs(model), multimask)
  assert masks_diff <= TOL and iou_diff <= TOL


def test_mask_decoder_parity_original_eps(hf):
  """Original SAM: every two-way LayerNorm at 1e-5 (the LayerNorm2d in the upscaling stays 1e-6)."""
  model, params, configs, _ = hf
  decoder = copy.deepcopy(model.mask_decoder)
  for module in decoder.transformer.modules():
    if isinstance(module, torch.nn.LayerNorm):
      module.eps = 1e-5
  md_config = mask_decoder_lib.MaskDecoderConfig(
      **{**configs.mask_decoder.__dict__, "layer_norm_eps": 1e-5})
  masks_diff, iou_diff = _compare_decoder(decoder, params, md_config, _hf_decoder_inputs(model),
                                          True)
  assert masks_diff <= TOL and iou_diff <= TOL


def test_end_to_end_parity(hf):
  """pixels + points + boxes -> masks and IoU scores, through all three converted towers."""
  model, params, configs, _ = hf
  image, pixel_values = _image_and_pixel_values(seed=3)
  points, labels, boxes = _prompts(seed=4)
  with torch.no_grad():
    out = model(pixel_values=pixel_values, input_points=torch.from_numpy(points),
                input_labels=torch.from_numpy(labels), input_boxes=torch.from_numpy(boxes),
                multimask_output=True)
  embeddings = jax.jit(sam_vit.SamViT(configs.image_encoder).apply)(
      {"params": params.image_encoder}, jnp.asarray(image))
  ours_points, ours_boxes, dense_pe, no_mask = _our_prompt_encoder(params, configs)
  sparse = jnp.concatenate([ours_points(points, labels), ours_boxes(boxes)], axis=2)
  dense = jnp.broadcast_to(no_mask, (B, GRID, GRID, no_mask.shape[-1]))
  masks, iou = _decoder_apply(configs.mask_decoder)(
      {"params": params.mask_decoder}, embeddings, dense_pe, sparse, dense, True)
  assert _max_diff(masks, _np(out.pred_masks)) <= TOL
  assert _max_diff(iou, _np(out.iou_scores)) <= TOL


# ---- the original segment-anything layout -----------------------------------------------------

def _hf_to_original_name(key: str, iou_depth: int) -> str:
  """Renames one HF SamModel key to segment-anything's `Sam` state-dict name."""
  subs = [
      (r"^vision_encoder\.", "image_encoder."),
      (r"^image_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
      (r"^image_encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"image_encoder.blocks.\1.norm\2."),
      (r"^image_encoder\.layers\.", "image_encoder.blocks."),
      (r"\.neck\.conv1\.", ".neck.0."), (r"\.neck\.layer_norm1\.", ".neck.1."),
      (r"\.neck\.conv2\.", ".neck.2."), (r"\.neck\.layer_norm2\.", ".neck.3."),
      (r"^shared_image_embedding\.positional_embedding$",
       "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
      (r"^prompt_encoder\.point_embed\.", "prompt_encoder.point_embeddings."),
      (r"\.mask_embed\.conv1\.", ".mask_downscaling.0."),
      (r"\.mask_embed\.layer_norm1\.", ".mask_downscaling.1."),
      (r"\.mask_embed\.conv2\.", ".mask_downscaling.3."),
      (r"\.mask_embed\.layer_norm2\.", ".mask_downscaling.4."),
      (r"\.mask_embed\.conv3\.", ".mask_downscaling.6."),
      (r"\.transformer\.layers\.(\d+)\.layer_norm(\d)\.", r".transformer.layers.\1.norm\2."),
      (r"\.transformer\.layer_norm_final_attn\.", ".transformer.norm_final_attn."),
      (r"\.upscale_conv1\.", ".output_upscaling.0."),
      (r"\.upscale_layer_norm\.", ".output_upscaling.1."),
      (r"\.upscale_conv2\.", ".output_upscaling.3."),
  ]
  for pattern, repl in subs:
    key = re.sub(pattern, repl, key)
  mlp = re.match(r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\."
                 r"(proj_in|proj_out|layers\.(\d+))\.(weight|bias)$", key)
  if mlp:
    depth = 3 if "hypernetworks" in key else iou_depth
    j = {"proj_in": 0, "proj_out": depth - 1}.get(mlp.group(2))
    j = int(mlp.group(3)) + 1 if j is None else j
    key = f"{mlp.group(1)}.layers.{j}.{mlp.group(4)}"
  return key


@pytest.fixture(scope="module")
def original_pth(hf, tmp_path_factory):
  model, _, configs, _ = hf
  state = {_hf_to_original_name(k, configs.mask_decoder.iou_head_depth): v.clone()
           for k, v in model.state_dict().items()
           if k != "prompt_encoder.shared_embedding.positional_embedding"}  # tied copy
  path = tmp_path_factory.mktemp("sam_pth") / "sam_tiny.pth"
  torch.save(state, path)
  return state, str(path)


def test_original_pth_gives_the_same_params(hf, original_pth):
  _, params, configs, _ = hf
  state, path = original_pth
  assert "mask_decoder.output_hypernetworks_mlps.0.layers.2.weight" in state
  assert "image_encoder.blocks.1.attn.rel_pos_h" in state
  converted = convert_sam.load_original_sam(path, configs)
  for name in convert_sam.COMPONENTS:
    ours, ref = common.flatten_params(getattr(converted, name)), common.flatten_params(
        getattr(params, name))
    assert ours.keys() == ref.keys()
    for key in ref:
      np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
  assert "prompt_encoder.mask_downscaling.0.weight" in converted.report.ignored
  assert not converted.report.unused


def test_mismatch_errors_list_every_offending_key(hf, original_pth):
  _, _, configs, _ = hf
  state = {k: v.numpy() for k, v in original_pth[0].items()}
  del state["mask_decoder.iou_token.weight"]
  state["image_encoder.blocks.0.attn.qkv.weight"] = np.zeros((5, 32), np.float32)
  state["mask_decoder.some_new_head.weight"] = np.zeros((3,), np.float32)
  with pytest.raises(common.ConversionError) as err:
    convert_sam.convert_original_sam(state, configs)
  message = str(err.value)
  for key in ("mask_decoder.iou_token.weight", "image_encoder/blocks_0/attn/qkv/kernel",
              "mask_decoder.some_new_head.weight"):
    assert key in message, message
  # Wrong config (width 48 instead of 32): the shape errors name the keys.
  wrong = convert_sam.SamConfigs(
      image_encoder=sam_vit.SamViTConfig(**{**configs.image_encoder.__dict__, "width": 48,
                                            "num_heads": 6}),
      prompt_encoder=configs.prompt_encoder, mask_decoder=configs.mask_decoder)
  with pytest.raises(common.ConversionError, match=r"image_encoder/patch_embed/kernel"):
    convert_sam.convert_original_sam(original_pth[0], wrong)
  # A tensor of the wrong rank (the 4-D patch conv flattened) is named with its key.
  flat_conv = {k: v.numpy() for k, v in original_pth[0].items()}
  flat_conv["image_encoder.patch_embed.proj.weight"] = flat_conv[
      "image_encoder.patch_embed.proj.weight"].reshape(32, -1)
  with pytest.raises(common.ConversionError,
                     match=r"image_encoder.patch_embed.proj.weight \(32, 192\).*cannot be "
                     r"converted"):
    convert_sam.convert_original_sam(flat_conv, configs)


def test_components_subset_and_hf_names(hf):
  _, _, configs, directory = hf
  state = common.load_state_dict(str(directory))
  only_vit = convert_sam.convert_hf_sam(state, configs, components=("image_encoder",))
  assert only_vit.image_encoder is not None
  assert only_vit.prompt_encoder is None and only_vit.mask_decoder is None
  assert "mask_decoder.iou_token.weight" in only_vit.report.ignored
  # The original layout's names are not HF names: every key is reported.
  with pytest.raises(common.ConversionError, match=r"vision_encoder\.patch_embed"):
    convert_sam.convert_original_sam(state, configs)
