"""timm EVA02 -> EVA02ViT conversion: parity with timm (random weights, built offline) and errors.

Parity compares timm's patch tokens (`forward_features` minus CLS) with our tower's output on the
same uint8 pixels, both normalized with the CLIP mean/std, at the pos-embed's native grid and at
other grids (timm `dynamic_img_size=True` resamples the pos-embed with antialiased bicubic and
rebuilds RoPE for the new grid; our tower must do the same).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torchvision_shim  # noqa: F401  (must precede timm: see the module docstring)
import timm  # noqa: E402
import torch  # noqa: E402
from timm.models.eva import Eva  # noqa: E402

from pixelllm_jax.convert import eva02 as convert  # noqa: E402
from pixelllm_jax.models import eva02  # noqa: E402

TOL = 1e-4
# timm: img 32, patch 8 -> pos-embed grid 4; mlp hidden int(64 * 4 * 2 / 3) = 170.
TIMM_KW = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4 * 2 / 3,
               swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True, num_classes=10,
               dynamic_img_size=True)
CFG = eva02.EVA02Config(image_size=32, patch_size=8, width=64, depth=2, num_heads=4, mlp_dim=170,
                        pretrain_grid=4, rope_ref_grid=4)


def _randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Perturbs every parameter (timm inits biases to 0 and norms to 1) so each one matters."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn(p.shape, generator=gen))
  return model.eval()


@functools.lru_cache(maxsize=None)
def _jitted(config):
  return jax.jit(eva02.EVA02ViT(config).apply)


def _compare(timm_model, params, config, hw, *, post=None) -> float:
  image = np.random.RandomState(hw[0] * 100 + hw[1]).randint(0, 256, (2, *hw, 3)).astype(np.uint8)
  pixels = (image.astype(np.float32) / 255.0 - np.asarray(eva02.CLIP_MEAN, np.float32)) \
      / np.asarray(eva02.CLIP_STD, np.float32)
  with torch.no_grad():
    ref = timm_model.forward_features(torch.from_numpy(pixels).permute(0, 3, 1, 2))
    ref = (post(ref) if post else ref)[:, 1:].numpy()
  ours = np.asarray(_jitted(config)({"params": params}, jnp.asarray(image)))
  grid = (hw[0] // config.patch_size, hw[1] // config.patch_size)
  assert ours.shape == (2, *grid, config.width)
  diff = float(np.abs(ours.reshape(ref.shape) - ref).max())
  print(f"max abs diff at {hw}: {diff:.2e}")
  return diff


@pytest.fixture(scope="module")
def separate_qkv():
  """eva02 base/large layout: q/k/v projections, SwiGLU sub-LN, final `norm`, RoPE ref grid 4."""
  torch.manual_seed(0)
  model = _randomized(Eva(**TIMM_KW, qkv_fused=False, ref_feat_shape=(4, 4),
                          global_pool="token"), seed=1)
  params, report = convert.eva02_params_from_timm(model.state_dict(), CFG, return_report=True)
  return model, params, report


@pytest.mark.parametrize("hw", [(32, 32), (48, 40), (24, 24)],
                         ids=["native_4x4", "up_6x5", "down_3x3"])
def test_parity_separate_qkv(separate_qkv, hw):
  model, params, _ = separate_qkv
  assert _compare(model, params, CFG, hw) <= TOL


def test_head_ignored_and_reported(separate_qkv):
  _, _, report = separate_qkv
  assert sorted(report.ignored) == ["head.bias", "head.weight"]
  assert not report.unused and not report.notes


def test_parity_fused_qkv_fc_norm_and_pixelllm_rope():
  """timm's default fused qkv (q_bias/v_bias), `fc_norm` only (avg pool), and ref_feat_shape=None:
  plain-index RoPE, which is PixelLLM's "reference grid = current grid" (rope_ref_grid=None)."""
  torch.manual_seed(0)
  model = _randomized(Eva(**TIMM_KW, qkv_fused=True, ref_feat_shape=None, global_pool="avg"), 2)
  assert "blocks.0.attn.qkv.weight" in model.state_dict()
  assert "norm.weight" not in model.state_dict()
  config = dataclasses.replace(CFG, rope_ref_grid=None)
  params, report = convert.eva02_params_from_timm(model.state_dict(), config, return_report=True)
  assert any("fc_norm" in note for note in report.notes)
  for hw in [(32, 32), (48, 40)]:
    assert _compare(model, params, config, hw, post=model.fc_norm) <= TOL


def test_parity_registered_eva02_base_variant():
  """timm's registered eva02_base kwargs (ref_feat_shape 16), shrunk: at grid 2, RoPE ref 16.
  Its default global_pool='avg' gives `fc_norm` and no `norm`, like timm's hosted EVA02 weights."""
  torch.manual_seed(0)
  model = _randomized(timm.create_model(
      "eva02_base_patch14_224", pretrained=False, img_size=28, embed_dim=64, num_heads=4,
      depth=1, num_classes=0), seed=3)
  config = eva02.EVA02Config(image_size=28, patch_size=14, width=64, depth=1, num_heads=4,
                             mlp_dim=170, pretrain_grid=2, rope_ref_grid=16)
  params = convert.eva02_params_from_timm(model.state_dict(), config)
  assert _compare(model, params, config, (28, 28), post=model.fc_norm) <= TOL


def test_errors_list_every_offending_key(separate_qkv):
  model, _, _ = separate_qkv
  sd = dict(model.state_dict())
  sd["blocks.0.gamma_1"] = torch.ones(64)      # layer scale: would change the math
  del sd["blocks.1.norm2.weight"]
  sd["pos_embed"] = torch.zeros(1, 10, 64)     # pos-embed of another grid
  with pytest.raises(ValueError) as err:
    convert.eva02_params_from_timm(sd, CFG)
  message = str(err.value)
  for key in ("blocks.1.norm2.weight", "blocks.0.gamma_1", "pos_embed"):
    assert key in message
  with pytest.raises(ValueError, match="blocks_0/attn/q_proj/kernel"):
    convert.eva02_params_from_timm(model.state_dict(), dataclasses.replace(CFG, width=32))
  with pytest.raises(ValueError, match="unused source keys.*blocks.1.norm1.weight"):
    convert.eva02_params_from_timm(model.state_dict(), dataclasses.replace(CFG, depth=1))


@pytest.mark.parametrize("name, width, heads", [("eva02_tiny_patch14_224", 192, 3),
                                                 ("eva02_small_patch14_224", 384, 6)])
def test_parity_no_sub_ln_variants(name, width, heads):
  """timm's eva02_tiny / eva02_small (scale_mlp=False: no SwiGLU sub-LN; fused qkv; packed
  fc1), registered kwargs shrunk to 2 blocks at 28 px: EVA02Config(mlp_norm=False) imports
  them with parity, at the native grid and above it."""
  torch.manual_seed(0)
  model = _randomized(timm.create_model(name, pretrained=False, img_size=28, depth=2,
                                        num_classes=0, dynamic_img_size=True), seed=4)
  assert not any(".mlp.norm." in k for k in model.state_dict())
  mlp_dim = model.state_dict()["blocks.0.mlp.fc2.weight"].shape[1]
  config = eva02.EVA02Config(image_size=28, patch_size=14, width=width, depth=2, num_heads=heads,
                             mlp_dim=mlp_dim, pretrain_grid=2, rope_ref_grid=16, mlp_norm=False)
  params = convert.eva02_params_from_timm(model.state_dict(), config)
  assert "norm" not in params["blocks_0"]["mlp"]
  for hw in [(28, 28), (42, 56)]:
    assert _compare(model, params, config, hw, post=model.fc_norm) <= TOL
  # The sub-LN's presence must match the config, either way, naming the keys.
  with pytest.raises(ValueError, match=r"blocks.0.mlp.norm.*mlp_norm=False"):
    convert.eva02_params_from_timm(model.state_dict(), dataclasses.replace(config, mlp_norm=True))


def test_sub_ln_checkpoint_into_a_config_without_it_is_an_error(separate_qkv):
  model, _, _ = separate_qkv
  with pytest.raises(ValueError, match=r"unused source keys.*blocks.0.mlp.norm.weight"):
    convert.eva02_params_from_timm(model.state_dict(), dataclasses.replace(CFG, mlp_norm=False))


def test_load_safetensors_and_wrapped_pth(separate_qkv, tmp_path):
  """A timm .safetensors, and an OpenCLIP-style .pth ({'model': {'visual.' + k: ...}} plus a text
  tower key, which is ignored with its reason)."""
  from safetensors.torch import save_file
  model, params, _ = separate_qkv
  sd = {k: v.contiguous() for k, v in model.state_dict().items()}
  save_file(sd, str(tmp_path / "m.safetensors"))
  clip = {"visual." + k: v for k, v in sd.items()}
  clip["text.token_embedding.weight"] = torch.zeros(3, 4)
  torch.save({"model": clip, "epoch": 3}, tmp_path / "m.pth")
  for name in ("m.safetensors", "m.pth"):
    loaded, report = convert.load_timm_eva02(tmp_path / name, CFG, return_report=True)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
  assert "text.token_embedding.weight" in report.ignored


def test_original_eva_names(separate_qkv):
  """The EVA repo's names (what timm's checkpoint_filter_fn renames) give the same params."""
  model, params, _ = separate_qkv
  renames = ((".mlp.fc1_g.", ".mlp.w1."), (".mlp.fc1_x.", ".mlp.w2."), (".mlp.fc2.", ".mlp.w3."),
             (".mlp.norm.", ".mlp.ffn_ln."), (".attn.q_proj.bias", ".attn.q_bias"),
             (".attn.v_proj.bias", ".attn.v_bias"))
  sd = {}
  for key, value in model.state_dict().items():
    for new, old in renames:
      key = key.replace(new, old)
    sd[key] = value
  sd["rope.freqs_cos"] = torch.zeros(16, 16)
  assert "blocks.0.mlp.w1.weight" in sd and "blocks.0.attn.q_bias" in sd
  converted, report = convert.eva02_params_from_timm(sd, CFG, return_report=True)
  jax.tree.map(np.testing.assert_array_equal, converted, params)
  assert "rope.freqs_cos" in report.ignored
