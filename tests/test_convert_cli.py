"""`python -m pixelllm_jax.convert`: random toy checkpoints in, an init checkpoint `train` loads.

The model is a toy gin written by the test (every tower, LoRA rank 4). Its sources are built
offline at the same sizes: a random Hugging Face Flan-T5-layout `T5ForConditionalGeneration`
(save_pretrained), a random timm EVA02 state dict (torch.save) and, when the SAM importer is
present, a random Hugging Face `SamModel` (save_pretrained). The CLI's `main` runs in-process; the
written checkpoint is loaded with `train.checkpoint.load_params` over a fresh init of the same
model, and must hold exactly the converted leaves, zero lora_b, and reproduce the HF T5's logits.
"""
import importlib.util
import os
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torchvision_shim  # noqa: F401  (must precede timm)
import torch  # noqa: E402
import transformers  # noqa: E402
from timm.models.eva import Eva  # noqa: E402

import model_fixtures as mf  # noqa: E402
from pixelllm_jax.convert import assemble, common  # noqa: E402
from pixelllm_jax.convert.__main__ import build_model, main  # noqa: E402
from pixelllm_jax.models.t5 import T5  # noqa: E402
from pixelllm_jax.train import checkpoint as ckpt  # noqa: E402

REPO = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))
HAS_SAM = importlib.util.find_spec("pixelllm_jax.convert.sam") is not None
IMAGE = 64
# The toy model: every tower at a few thousand parameters, LoRA rank 4 on q, v. Its own file so
# that changes to the shipped tiny.gin do not move the sources built below.
TOY_GIN = f"""
import pixelllm_jax.configurables
PixelLLMModel.config = @PixelLLMConfig()
PixelLLMConfig.image_size = {IMAGE}
PixelLLMConfig.eva02 = @EVA02Config()
PixelLLMConfig.sam = @SamViTConfig()
PixelLLMConfig.prompt_encoder = @PromptEncoderConfig()
PixelLLMConfig.extractor = @PromptExtractorConfig()
PixelLLMConfig.t5 = @T5Config()
PixelLLMConfig.loc_head = @LocHeadConfig()
EVA02Config.patch_size = 8
EVA02Config.width = 64
EVA02Config.depth = 2
EVA02Config.num_heads = 4
EVA02Config.mlp_dim = 170
EVA02Config.pretrain_grid = 4
SamViTConfig.patch_size = 8
SamViTConfig.width = 32
SamViTConfig.depth = 2
SamViTConfig.num_heads = 2
SamViTConfig.mlp_dim = 64
SamViTConfig.window_size = 4
SamViTConfig.global_blocks = (1,)
SamViTConfig.out_channels = 32
SamViTConfig.pretrain_grid = 8
PromptEncoderConfig.embed_dim = 32
PromptExtractorConfig.depth = 1
PromptExtractorConfig.width = 32
PromptExtractorConfig.num_heads = 2
PromptExtractorConfig.mlp_dim = 64
PromptExtractorConfig.num_queries = 4
PromptExtractorConfig.output_dim = 32
T5Config.vocab_size = 256
T5Config.d_model = 64
T5Config.num_heads = 4
T5Config.d_kv = 16
T5Config.d_ff = 128
T5Config.num_encoder_layers = 2
T5Config.num_decoder_layers = 2
T5Config.feed_forward = 'gated-gelu'
T5Config.tie_word_embeddings = False
T5Config.lora = @LoraConfig()
LoraConfig.rank = 4
LocHeadConfig.hidden_dim = 32
LocHeadConfig.depth = 2
LocHeadConfig.points_per_token = 2
"""


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _randomize(model: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn(p.shape, generator=gen))
  return model.eval()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  root = tmp_path_factory.mktemp("sources")
  (root / "toy.gin").write_text(TOY_GIN)
  # T5 at the toy sizes: d 64, 4 heads x 16, d_ff 128, 2 + 2 layers, vocab 256, untied.
  t5_cfg = transformers.T5Config(
      vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
      num_heads=4, relative_attention_num_buckets=32, relative_attention_max_distance=128,
      feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  torch.manual_seed(0)
  hf_t5 = _randomize(transformers.T5ForConditionalGeneration(t5_cfg), seed=1, scale=0.05)
  hf_t5.save_pretrained(root / "t5")
  # timm EVA02 at the toy sizes: width 64, depth 2, 4 heads, SwiGLU 170, patch 8, grid 4.
  eva = _randomize(Eva(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                       mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True,
                       qkv_fused=False, ref_feat_shape=(4, 4), global_pool="token",
                       num_classes=0), seed=2)
  torch.save(eva.state_dict(), root / "eva02.pth")
  out = {"gin": str(root / "toy.gin"), "t5": str(root / "t5"), "eva02": str(root / "eva02.pth"),
         "hf_t5": hf_t5}
  if HAS_SAM:
    sam_cfg = transformers.SamConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE, patch_size=8, window_size=4, global_attn_indexes=[1],
                           output_channels=32, num_pos_feats=16, mlp_dim=64),
        prompt_encoder_config=dict(hidden_size=32, image_size=IMAGE, patch_size=8),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_hidden_layers=2,
                                 num_attention_heads=4, iou_head_hidden_dim=24))
    sam = _randomize(transformers.SamModel(sam_cfg), seed=3, scale=0.05)
    sam.save_pretrained(root / "sam")
    out["sam"] = str(root / "sam")
  return out


def _args(sources, out, *extra, sam=HAS_SAM):
  args = [f"--model_gin={sources['gin']}", f"--t5={sources['t5']}",
          f"--eva02={sources['eva02']}", f"--out={out}", *extra]
  return args + [f"--sam={sources['sam']}"] if sam else args


def _flat(tree):
  return common.flatten_params(tree)


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
  out = tmp_path_factory.mktemp("ckpt") / "init"
  gin.clear_config()
  assembled = main(_args(sources, out))
  model = build_model([sources["gin"]])
  gin.clear_config()
  return assembled, model, str(out)


def test_writes_every_given_tower_with_fresh_lora(converted):
  assembled, _, out = converted
  assert os.path.isdir(out)
  expected = {"t5", "eva02"} | ({"sam", "prompt_encoder"} if HAS_SAM else set())
  assert set(assembled.params) == expected
  t5 = _flat(assembled.params["t5"])
  lora_b = [p for p in t5 if p.endswith("lora_b")]
  lora_a = [p for p in t5 if p.endswith("lora_a")]
  # q, v of encoder self (2 layers) and decoder self + cross (2 layers): 2*2 + 2*4 = 12 each.
  assert len(lora_a) == len(lora_b) == 12 == assembled.lora_leaves // 2
  assert all(np.all(t5[p] == 0) for p in lora_b)
  assert all(np.std(t5[p]) > 0 for p in lora_a)
  rows = {name: (leaves, written, in_model)
          for name, leaves, written, in_model in assembled.summary_rows()}
  assert rows["t5"][1] == rows["t5"][2]            # the whole T5, adapters included
  assert rows["eva02"][1] == rows["eva02"][2]
  assert rows["extractor"][1] == 0 and rows["loc_head"][1] == 0   # fresh at train time
  assert "fresh LoRA" in assemble.format_summary(assembled)


def test_train_loads_it_and_the_forward_pass_runs(converted, sources):
  assembled, model, out = converted
  batch = mf.random_batch(0, b=1, k=1, n=2, l=6, lc=4, p=2, image_size=IMAGE)
  # A stand-in for the fresh init `train` makes (random values of the model's abstract shapes;
  # compiling the real init would triple this test's time).
  r = np.random.RandomState(7)
  fresh = jax.tree.map(lambda x: jnp.asarray(0.02 * r.randn(*x.shape), x.dtype),
                       assemble.abstract_params(model))
  shardings = jax.tree.map(lambda x: x.sharding, fresh)
  loaded = ckpt.load_params(out, fresh, shardings)
  ours, written = _flat(loaded), _flat(assembled.params)
  for path, value in written.items():
    np.testing.assert_array_equal(np.asarray(ours[path]), value, err_msg=path)
  for path, value in _flat(fresh).items():
    if path not in written:  # not converted: the fresh init stays
      np.testing.assert_array_equal(np.asarray(ours[path]), np.asarray(value), err_msg=path)
  hf = sources["hf_t5"]
  np.testing.assert_array_equal(ours["t5/token_embedder/embedding"],
                                hf.shared.weight.detach().numpy())

  out_ = jax.jit(model.apply)(loaded, batch)
  assert out_.logits.shape == (1, 2, 6, 256) and out_.points.shape == (1, 2, 6, 2, 2)
  assert np.all(np.isfinite(np.asarray(out_.logits)))
  assert np.all(np.isfinite(np.asarray(out_.points)))

  # The T5 inside the composer (LoRA present, lora_b = 0) reproduces the HF model's logits.
  tokens = np.array([[5, 17, 42, 99, 1]], np.int32)
  dec = np.array([[0, 7, 13, 200]], np.int32)
  t5 = T5(model.config.t5)

  @jax.jit
  def t5_logits(params, tokens, dec):
    v = {"params": params}
    enc = t5.apply(v, t5.apply(v, tokens, method=T5.embed), tokens > 0, method=T5.encode)
    return t5.apply(v, enc, tokens > 0, dec, method=T5.decode)[0]

  logits = t5_logits(loaded["t5"], jnp.asarray(tokens), jnp.asarray(dec))
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(tokens).long(),
             decoder_input_ids=torch.from_numpy(dec).long()).logits.numpy()
  np.testing.assert_allclose(np.asarray(logits), ref, atol=2e-4, rtol=2e-4)


def test_wrong_d_model_errors_listing_keys(sources, tmp_path):
  out = tmp_path / "bad"
  with pytest.raises(common.ConversionError) as e:
    main(_args(sources, out, "--gin.T5Config.d_model=48", sam=False))
  msg = str(e.value)
  assert "shape mismatches" in msg
  for key in ("token_embedder/embedding", "encoder/layers_0/attention/query/kernel",
              "decoder/logits_dense/kernel"):
    assert key in msg
  assert not out.exists()


def test_wrong_eva02_depth_errors_listing_missing_keys(sources, tmp_path):
  out = tmp_path / "bad"
  with pytest.raises(common.ConversionError) as e:
    main(_args(sources, out, "--gin.EVA02Config.depth=3", sam=False))
  assert "blocks.2.attn.q_proj.weight" in str(e.value) and not out.exists()


def test_t5_config_disagreement_is_an_error(sources, tmp_path):
  # 8 heads x 8 gives the same shapes as 4 x 16: only config.json can tell.
  with pytest.raises(assemble.AssemblyError, match=r"T5Config.num_heads.*4.*8"):
    main(_args(sources, tmp_path / "bad", "--gin.T5Config.num_heads=8", "--gin.T5Config.d_kv=8",
               sam=False))


def test_shape_check_against_the_composer_names_keys():
  shapes = {"t5/a/kernel": (2, 3), "t5/b/lora_a": (2, 1), "eva02/x": (4,)}
  assemble.check_against_model({"t5": {"a": {"kernel": np.zeros((2, 3))}}}, shapes)
  with pytest.raises(assemble.AssemblyError) as e:
    assemble.check_against_model(
        {"t5": {"a": {"kernel": np.zeros((3, 2))}, "extra": np.zeros(1)}}, shapes)
  assert "t5/a/kernel: converted (3, 2), model (2, 3)" in str(e.value)
  assert "t5/extra" in str(e.value)
  with pytest.raises(assemble.AssemblyError, match="t5/b/lora_a"):
    assemble.check_against_model({"t5": {"a": {"kernel": np.zeros((2, 3))}}}, shapes,
                                 skip_lora=False)


@pytest.mark.slow
def test_module_entry_point_exits_with_the_error(sources, tmp_path):
  """`python -m pixelllm_jax.convert` itself: a bad conversion exits 1 naming the keys."""
  cmd = [sys.executable, "-m", "pixelllm_jax.convert",
         *_args(sources, tmp_path / "bad", "--gin.T5Config.d_model=48", sam=False)]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "token_embedder/embedding" in proc.stderr


def test_source_errors_name_the_file_or_key_before_any_work(sources, tmp_path, monkeypatch):
  # A missing --t5 path is named as such (it used to surface as a missing config.json), before
  # the model is even built.
  built = []
  monkeypatch.setattr(sys.modules["pixelllm_jax.convert.__main__"], "build_model",
                      lambda *a, **k: built.append(1))
  with pytest.raises(common.SourceError, match=r"--t5 .*/no_t5: no such file or directory"):
    main(_args(sources, tmp_path / "out", sam=False)[:1] + [
        f"--t5={tmp_path / 'no_t5'}", f"--out={tmp_path / 'out'}"])
  assert not built


def test_a_corrupt_weight_file_is_named(sources, tmp_path):
  broken = tmp_path / "eva02.safetensors"
  broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
  with pytest.raises(common.SourceError, match=r"eva02.safetensors: cannot read the weights"):
    main([f"--model_gin={sources['gin']}", f"--eva02={broken}", f"--out={tmp_path / 'out'}"])
  assert not (tmp_path / "out").exists()


def test_a_tensor_of_the_wrong_rank_is_named_with_its_key(sources, tmp_path):
  state = {k: v.clone() for k, v in torch.load(sources["eva02"], weights_only=True).items()}
  state["patch_embed.proj.weight"] = state["patch_embed.proj.weight"].flatten(1)  # rank 4 -> 2
  path = tmp_path / "eva02_bad.pth"
  torch.save(state, path)
  with pytest.raises(common.ConversionError, match=r"patch_embed.proj.weight \(64, 192\)"):
    main([f"--model_gin={sources['gin']}", f"--eva02={path}", f"--out={tmp_path / 'out'}"])


@pytest.mark.skipif(not HAS_SAM, reason="needs the SAM importer")
def test_a_model_with_a_mask_head_gets_sams_mask_decoder(sources, tmp_path):
  # Referring segmentation starts from SAM's mask decoder (frozen, official refseg): --sam
  # then converts it too, into the composer's `mask_decoder`, the same leaves as the SAM
  # importer's own conversion of that component.
  head = ["--gin.PixelLLMConfig.mask_head=@MaskHeadConfig()",
          "--gin.MaskHeadConfig.decoder=@MaskDecoderConfig()",
          "--gin.MaskHeadConfig.adapter_num_heads=4", "--gin.MaskHeadConfig.adapter_mlp_dim=64",
          "--gin.MaskDecoderConfig.transformer_dim=32",
          "--gin.MaskDecoderConfig.transformer_num_heads=4",
          "--gin.MaskDecoderConfig.transformer_mlp_dim=64",
          "--gin.MaskDecoderConfig.iou_head_hidden_dim=24"]
  gin.clear_config()
  try:
    assembled = main(_args(sources, tmp_path / "init", *head))
    model = build_model([sources["gin"]], [b[len("--gin."):] for b in head])
  finally:
    gin.clear_config()
  assert set(assembled.params) == {"t5", "eva02", "sam", "prompt_encoder", "mask_decoder"}
  from pixelllm_jax.convert import sam as convert_sam  # noqa: PLC0415 (optional importer)
  configs = convert_sam.SamConfigs(image_encoder=model.config.sam,
                                   prompt_encoder=model.config.prompt_encoder,
                                   mask_decoder=model.config.mask_head.decoder)
  alone = convert_sam.convert_hf_sam(common.load_state_dict(sources["sam"]), configs,
                                     components=("mask_decoder",)).mask_decoder
  got, want = _flat(assembled.params["mask_decoder"]), _flat(alone)
  assert got.keys() == want.keys() and len(got) > 20
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  rows = {name: written for name, _, written, _ in assembled.summary_rows()}
  assert rows["mask_decoder"] > 0 and rows["mask_adapter"] == 0   # the adapter starts fresh
