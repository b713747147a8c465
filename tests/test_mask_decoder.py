"""models/mask_decoder.py: shapes, parameter names / axes, per-prompt independence, transposed conv.

Numerical parity with Hugging Face's SamMaskDecoder is in tests/test_convert_sam.py.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pixelllm_jax.models import mask_decoder as md
from axis_names import assert_known_axis_names

C, H, W = 16, 4, 4
CFG = md.MaskDecoderConfig(transformer_dim=C, iou_head_hidden_dim=12, transformer_num_heads=2,
                           transformer_mlp_dim=24)


def _inputs(b=2, k=3, t=2, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(ks[0], (b, H, W, C)), jax.random.normal(ks[1], (H, W, C)),
          jax.random.normal(ks[2], (b, k, t, C)), jax.random.normal(ks[3], (C,)))


@pytest.fixture(scope="module")
def setup():
  """(model, abstract variables with logical axes, random params, jitted apply).

  Parameters are drawn from an abstract init (no init compile: CPU time is scarce here).
  """
  model = md.MaskDecoder(CFG)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(1), *_inputs(), True))
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: rng.normal(size=s.shape).astype(np.float32) / np.sqrt(s.shape[0]),
      nn.unbox(abstract["params"]))
  return model, abstract, {"params": params}, jax.jit(model.apply, static_argnums=5)


def test_shapes_and_dtypes(setup):
  _, _, params, apply = setup
  masks, iou = apply(params, *_inputs(), True)
  assert masks.shape == (2, 3, 3, 4 * H, 4 * W) and iou.shape == (2, 3, 3)
  assert masks.dtype == jnp.float32 and iou.dtype == jnp.float32
  # multimask_output=False (mask 0 only) is checked against HF in test_convert_sam.py.
  # No sparse tokens at all (T = 0) still works.
  masks0, _ = apply(params, *_inputs(t=0), True)
  assert masks0.shape == (2, 3, 3, 4 * H, 4 * W)
  assert np.isfinite(np.asarray(masks)).all() and np.isfinite(np.asarray(masks0)).all()


def test_parameter_names_shapes_and_axes(setup):
  _, variables, _, _ = setup
  params = nn.unbox(variables["params"])
  assert params["iou_token"].shape == (C,)
  assert params["mask_tokens"].shape == (CFG.num_mask_tokens, C)
  assert params["upscale_conv1"]["kernel"].shape == (2, 2, C, C // 4)
  assert params["upscale_conv2"]["kernel"].shape == (2, 2, C // 4, C // 8)
  assert params["upscale_norm"]["scale"].shape == (C // 4,)
  assert set(params["transformer"]) >= {"layers_0", "layers_1", "final_attn_token_to_image",
                                        "norm_final_attn"}
  for i in range(CFG.num_mask_tokens):
    mlp = params[f"output_hypernetworks_mlps_{i}"]
    assert [mlp[f"layers_{j}"]["kernel"].shape for j in range(3)] == [(C, C), (C, C), (C, C // 8)]
  iou_head = params["iou_prediction_head"]
  assert [iou_head[f"layers_{j}"]["kernel"].shape for j in range(3)] == [
      (C, 12), (12, 12), (12, CFG.num_mask_tokens)]
  assert_known_axis_names(variables["params"])


def test_prompts_are_independent_and_dense_broadcasts(setup):
  _, _, params, apply = setup
  image, pe, sparse, dense = _inputs()
  masks, iou = apply(params, image, pe, sparse, dense, True)
  for k in range(3):
    mk, ik = apply(params, image, pe, sparse[:, k:k + 1], dense, True)
    np.testing.assert_allclose(mk[:, 0], masks[:, k], atol=1e-5)
    np.testing.assert_allclose(ik[:, 0], iou[:, k], atol=1e-5)
  # A [C] dense prompt is the same as that vector on every position of a [B, h, w, C] map;
  # a [h, w, C] PE is the same as a per-image [B, h, w, C] one.
  dense_map = jnp.broadcast_to(dense, (2, H, W, C))
  masks_map, iou_map = apply(params, image, jnp.broadcast_to(pe, (2, H, W, C)), sparse,
                             dense_map, True)
  np.testing.assert_allclose(masks_map, masks, atol=1e-5)
  np.testing.assert_allclose(iou_map, iou, atol=1e-5)
  # The dense prompt matters (it is added to the image embedding).
  masks_other, _ = apply(params, image, pe, sparse, dense + 1.0, True)
  assert np.abs(np.asarray(masks_other - masks)).max() > 1e-3


def test_conv_transpose_matches_torch():
  x = np.random.default_rng(0).normal(size=(2, 3, 5, 6)).astype(np.float32)
  conv = torch.nn.ConvTranspose2d(6, 4, kernel_size=2, stride=2)
  with torch.no_grad():
    ref = conv(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  params = {"kernel": conv.weight.detach().numpy().transpose(2, 3, 0, 1),
            "bias": conv.bias.detach().numpy()}
  ours = md.ConvTranspose2x2(4).apply({"params": params}, jnp.asarray(x))
  assert ours.shape == (2, 6, 10, 4)
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_bfloat16_activations_return_float32(setup):
  _, _, params, apply = setup  # float32 params, shared with the float32 run
  cfg = md.MaskDecoderConfig(**{**CFG.__dict__, "dtype": jnp.bfloat16})
  inputs = _inputs()
  masks, iou = jax.jit(md.MaskDecoder(cfg).apply, static_argnums=5)(params, *inputs, True)
  assert masks.dtype == jnp.float32 and iou.dtype == jnp.float32
  ref, _ = apply(params, *inputs, True)
  # bf16 activations stay close to float32 (relative to the logit scale).
  assert np.abs(np.asarray(masks - ref)).max() <= 0.1 * np.abs(np.asarray(ref)).max()
