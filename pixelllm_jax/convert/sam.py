"""Segment Anything checkpoints -> this project's SAM parameter trees.

Two source layouts:
- the original SAM `.pth` state dict (segment-anything's `Sam`: keys
  `image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`), loaded with
  `torch.load(weights_only=True)` so a checkpoint cannot run code;
- a Hugging Face `SamModel` directory (`config.json` + `model.safetensors`,
  sharded safetensors, or `pytorch_model.bin`): keys `vision_encoder.*`,
  `prompt_encoder.*`, `mask_decoder.*`, `shared_image_embedding.*`.

Each yields three plain trees (numpy float32 leaves, no logical-axis boxes):
`SamParams.image_encoder` for `models.sam_vit.SamViT`, `.prompt_encoder` for
`models.prompt_encoder.PromptEncoder`, `.mask_decoder` for
`models.mask_decoder.MaskDecoder`; pass each as `{'params': tree}`.

Checking (through `convert/common.py`'s `Reader` / `ConversionReport`). The
target shapes come from an abstract init of each module for the given configs.
Every problem is collected and raised at once as a `common.ConversionError`
naming the offending keys: source keys a target needs but the checkpoint lacks,
shape mismatches, target parameters no rule fills, differing tied copies, and
(with `strict=True`, the default) source keys nothing reads. Keys skipped on
purpose are recorded in `report.ignored` with the reason: the mask-prompt convs
(`prompt_encoder.mask_downscaling.*` / `mask_embed.*`; mask prompts are not
implemented, PixelLLM never feeds them) and the towers not requested via
`components`. `SamParams.report` holds the accounting.

Transforms: torch Linear [out, in] -> kernel [in, out]; Conv2d OIHW -> HWIO;
ConvTranspose2d [in, out, kh, kw] -> [kh, kw, in, out]; LayerNorm weight ->
scale; `pos_embed` [1, G, G, D] -> [G*G, D]; nn.Embedding [1, D] -> [D]; the
four point embeddings are stacked into [4, D] (rows neg, pos, box TL, box BR).

Usage:
    params, configs = load_hf_sam("/ckpt/sam-vit-huge", image_size=384)
    configs = original_sam_configs("vit_h", image_size=384)
    params = load_original_sam("/ckpt/sam_vit_h_4b8939.pth", configs)
    emb = SamViT(configs.image_encoder).apply({"params": params.image_encoder}, uint8_images)

Conventions to keep in mind when comparing with the references (all checked in
tests/test_convert_sam.py): HF / SAM take prompt coordinates in pixels of the
resized input and add 0.5; `PromptEncoder` takes [0, 1] of the unpadded image
plus `valid_hw` (xy / input_size with valid_hw = 1 reproduces HF exactly); HF's
`pixel_values` are the ImageNet-normalized pixels `SamViT` computes itself from
uint8. The two-way LayerNorm eps is 1e-5 in original SAM and the HF config's
`layer_norm_eps` (1e-6) in HF, which `original_sam_configs` / `hf_sam_configs`
set (HF's final two-way norm stays 1e-5: see models/mask_decoder.py).
"""
import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from pixelllm_jax.convert import common
from pixelllm_jax.models import mask_decoder as mask_decoder_lib
from pixelllm_jax.models import prompt_encoder as prompt_encoder_lib
from pixelllm_jax.models import sam_vit

SamViTConfig = sam_vit.SamViTConfig
PromptEncoderConfig = prompt_encoder_lib.PromptEncoderConfig
MaskDecoderConfig = mask_decoder_lib.MaskDecoderConfig

COMPONENTS = ("image_encoder", "prompt_encoder", "mask_decoder")
ORIGINAL, HF = "original", "hf"


ConversionError = common.ConversionError


@dataclasses.dataclass(frozen=True)
class SamParams:
  """Converted trees (None for a component not asked for) and the key accounting."""
  image_encoder: dict | None
  prompt_encoder: dict | None
  mask_decoder: dict | None
  report: common.ConversionReport


@dataclasses.dataclass(frozen=True)
class SamConfigs:
  image_encoder: SamViTConfig
  prompt_encoder: PromptEncoderConfig
  mask_decoder: MaskDecoderConfig


# ---------------------------------------------------------------- configs

_ORIGINAL_VITS = {  # segment-anything build_sam_vit_{b,l,h}
    "vit_b": dict(width=768, depth=12, num_heads=12, global_blocks=(2, 5, 8, 11)),
    "vit_l": dict(width=1024, depth=24, num_heads=16, global_blocks=(5, 11, 17, 23)),
    "vit_h": dict(width=1280, depth=32, num_heads=16, global_blocks=(7, 15, 23, 31)),
}


def original_sam_configs(variant: str = "vit_h", image_size: int = 1024) -> SamConfigs:
  """Configs of segment-anything's `sam_{variant}` run at `image_size` px.

  The ViT keeps its 1024-px pretrain grid (64) and resizes the pos-embed;
  the prompt encoder's canvas is `image_size`; the two-way transformer uses
  the original LayerNorm eps 1e-5.
  """
  vit = _ORIGINAL_VITS[variant]
  return SamConfigs(
      image_encoder=SamViTConfig(
          image_size=image_size, patch_size=16, mlp_dim=4 * vit["width"], window_size=14,
          out_channels=256, pretrain_grid=64, layer_norm_eps=1e-6, **vit),
      prompt_encoder=PromptEncoderConfig(embed_dim=256, input_image_size=(image_size, image_size)),
      mask_decoder=MaskDecoderConfig(layer_norm_eps=1e-5),
  )


def hf_sam_configs(config: Mapping[str, Any] | str, image_size: int | None = None) -> SamConfigs:
  """Configs matching a Hugging Face `SamConfig` (a dict, or a config.json / its directory).

  Missing fields take transformers' defaults. `image_size` (default: the HF
  vision image size) is the input size we will run at; the pos-embed and
  global rel-pos tables keep the HF grid `image_size // patch_size`.
  LayerNorm eps follows the HF config (see mask_decoder.py for the final
  two-way norm, which HF keeps at 1e-5).
  """
  if isinstance(config, str):
    path = os.path.join(config, "config.json") if os.path.isdir(config) else config
    with open(path) as f:
      config = json.load(f)
  vc = {**dict(hidden_size=768, output_channels=256, num_hidden_layers=12, num_attention_heads=12,
               image_size=1024, patch_size=16, layer_norm_eps=1e-6, qkv_bias=True, mlp_ratio=4.0,
               use_abs_pos=True, use_rel_pos=True, window_size=14,
               global_attn_indexes=(2, 5, 8, 11), mlp_dim=None, hidden_act="gelu"),
        **(config.get("vision_config") or {})}
  pc = {**dict(hidden_size=256, image_size=1024), **(config.get("prompt_encoder_config") or {})}
  mc = {**dict(hidden_size=256, hidden_act="relu", mlp_dim=2048, num_hidden_layers=2,
               num_attention_heads=8, attention_downsample_rate=2, num_multimask_outputs=3,
               iou_head_depth=3, iou_head_hidden_dim=256, layer_norm_eps=1e-6),
        **(config.get("mask_decoder_config") or {})}
  unsupported = [name for name, ok in [
      ("vision_config.qkv_bias=False", vc["qkv_bias"]),
      ("vision_config.use_abs_pos=False", vc["use_abs_pos"]),
      (f"vision_config.hidden_act={vc['hidden_act']}", vc["hidden_act"] == "gelu"),
      (f"mask_decoder_config.hidden_act={mc['hidden_act']}", mc["hidden_act"] == "relu"),
      ("non-square vision image_size/patch_size",
       isinstance(vc["image_size"], int) and isinstance(vc["patch_size"], int)),
  ] if not ok]
  if unsupported:
    raise ConversionError("unsupported Hugging Face SAM config: " + ", ".join(unsupported))
  width = vc["hidden_size"]
  grid = vc["image_size"] // vc["patch_size"]
  size = vc["image_size"] if image_size is None else image_size
  return SamConfigs(
      image_encoder=SamViTConfig(
          image_size=size, patch_size=vc["patch_size"], width=width,
          depth=vc["num_hidden_layers"], num_heads=vc["num_attention_heads"],
          mlp_dim=vc["mlp_dim"] or int(width * vc["mlp_ratio"]), window_size=vc["window_size"],
          global_blocks=tuple(vc["global_attn_indexes"]), out_channels=vc["output_channels"],
          pretrain_grid=grid, use_rel_pos=vc["use_rel_pos"], layer_norm_eps=vc["layer_norm_eps"]),
      prompt_encoder=PromptEncoderConfig(embed_dim=pc["hidden_size"],
                                         input_image_size=(size, size)),
      mask_decoder=MaskDecoderConfig(
          transformer_dim=mc["hidden_size"], num_multimask_outputs=mc["num_multimask_outputs"],
          iou_head_depth=mc["iou_head_depth"], iou_head_hidden_dim=mc["iou_head_hidden_dim"],
          transformer_depth=mc["num_hidden_layers"],
          transformer_num_heads=mc["num_attention_heads"], transformer_mlp_dim=mc["mlp_dim"],
          attention_downsample_rate=mc["attention_downsample_rate"],
          layer_norm_eps=mc["layer_norm_eps"]),
  )


# ---------------------------------------------------------------- expected shapes

def expected_shapes(configs: SamConfigs) -> dict[str, dict[str, tuple[int, ...]]]:
  """{component: {'a/b/c': shape}} from an abstract init of each module (nothing allocated)."""
  vit_cfg, pe_cfg, md_cfg = configs.image_encoder, configs.prompt_encoder, configs.mask_decoder
  s, c = vit_cfg.image_size, md_cfg.transformer_dim
  return {
      "image_encoder": common.expected_shapes(
          sam_vit.SamViT(vit_cfg), jnp.zeros((1, s, s, 3), jnp.uint8)),
      "prompt_encoder": common.expected_shapes(
          prompt_encoder_lib.PromptEncoder(pe_cfg), jnp.zeros((1, 1, 4)), jnp.ones((1, 2)),
          method=prompt_encoder_lib.PromptEncoder.embed_boxes),
      "mask_decoder": common.expected_shapes(
          mask_decoder_lib.MaskDecoder(md_cfg), jnp.zeros((1, 2, 2, c)), jnp.zeros((2, 2, c)),
          jnp.zeros((1, 1, 2, c)), jnp.zeros((c,))),
  }


# ---------------------------------------------------------------- the plan

@dataclasses.dataclass(frozen=True)
class _Rule:
  """One target leaf: read `sources` (each a tuple of alternative names) and apply `fn`."""
  component: str
  path: tuple[str, ...]
  sources: tuple[tuple[str, ...], ...]
  fn: Callable[..., np.ndarray]


def _linear_t(w):
  return w.T


def _same(x):
  return x


def _conv_hwio(w):
  return w.transpose(2, 3, 1, 0)


def _conv_transpose_hwio(w):
  return w.transpose(2, 3, 0, 1)


def _squeeze0(w):
  return w.reshape(w.shape[1:]) if w.ndim > 1 and w.shape[0] == 1 else w


def _pos_embed(w):
  return w.reshape(-1, w.shape[-1])


def _stack_rows(*ws):
  return np.concatenate([w.reshape(1, -1) for w in ws], axis=0)


def _plan(fmt: str, configs: SamConfigs, components: Sequence[str]) -> list[_Rule]:
  hf = fmt == HF
  rules: list[_Rule] = []

  def add(component, path, sources, fn=_same):
    srcs = tuple((s,) if isinstance(s, str) else tuple(s) for s in sources)
    rules.append(_Rule(component, tuple(path), srcs, fn))

  def linear(component, path, src):  # src without .weight / .bias
    add(component, path + ("kernel",), [src + ".weight"], _linear_t)
    add(component, path + ("bias",), [src + ".bias"])

  def norm(component, path, src):
    add(component, path + ("scale",), [src + ".weight"])
    add(component, path + ("bias",), [src + ".bias"])

  if "image_encoder" in components:
    cfg, ie = configs.image_encoder, "image_encoder"
    p = "vision_encoder." if hf else "image_encoder."
    add(ie, ("patch_embed", "kernel"),
        [p + ("patch_embed.projection.weight" if hf else "patch_embed.proj.weight")], _conv_hwio)
    add(ie, ("patch_embed", "bias"),
        [p + ("patch_embed.projection.bias" if hf else "patch_embed.proj.bias")])
    add(ie, ("pos_embed",), [p + "pos_embed"], _pos_embed)
    for i in range(cfg.depth):
      b = f"{p}layers.{i}." if hf else f"{p}blocks.{i}."
      t = (f"blocks_{i}",)
      norm(ie, t + ("norm1",), b + ("layer_norm1" if hf else "norm1"))
      norm(ie, t + ("norm2",), b + ("layer_norm2" if hf else "norm2"))
      linear(ie, t + ("attn", "qkv"), b + "attn.qkv")
      linear(ie, t + ("attn", "proj"), b + "attn.proj")
      if cfg.use_rel_pos:
        add(ie, t + ("attn", "rel_pos_h"), [b + "attn.rel_pos_h"])
        add(ie, t + ("attn", "rel_pos_w"), [b + "attn.rel_pos_w"])
      linear(ie, t + ("lin1",), b + "mlp.lin1")
      linear(ie, t + ("lin2",), b + "mlp.lin2")
    neck = [("conv1", "neck.conv1", "neck.0"), ("norm1", "neck.layer_norm1", "neck.1"),
            ("conv2", "neck.conv2", "neck.2"), ("norm2", "neck.layer_norm2", "neck.3")]
    for ours, hf_name, orig_name in neck:
      src = p + (hf_name if hf else orig_name)
      if ours.startswith("conv"):
        add(ie, ("neck", ours, "kernel"), [src + ".weight"], _conv_hwio)
      else:
        norm(ie, ("neck", ours), src)

  if "prompt_encoder" in components:
    pe = "prompt_encoder"
    if hf:
      add(pe, ("positional_encoding_gaussian_matrix",),
          [("shared_image_embedding.positional_embedding",
            "prompt_encoder.shared_embedding.positional_embedding")])
      add(pe, ("point_embeddings",),
          [f"prompt_encoder.point_embed.{i}.weight" for i in range(4)], _stack_rows)
    else:
      add(pe, ("positional_encoding_gaussian_matrix",),
          ["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"])
      add(pe, ("point_embeddings",),
          [f"prompt_encoder.point_embeddings.{i}.weight" for i in range(4)], _stack_rows)
    add(pe, ("not_a_point_embed",), ["prompt_encoder.not_a_point_embed.weight"], _squeeze0)
    add(pe, ("no_mask_embed",), ["prompt_encoder.no_mask_embed.weight"], _squeeze0)

  if "mask_decoder" in components:
    cfg, md, p = configs.mask_decoder, "mask_decoder", "mask_decoder."
    add(md, ("iou_token",), [p + "iou_token.weight"], _squeeze0)
    add(md, ("mask_tokens",), [p + "mask_tokens.weight"])
    tp = p + "transformer."
    attn_names = ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")

    def attention(path, src):
      for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        linear(md, path + (proj,), f"{src}.{proj}")

    for i in range(cfg.transformer_depth):
      b, t = f"{tp}layers.{i}.", ("transformer", f"layers_{i}")
      for name in attn_names:
        attention(t + (name,), b + name)
      for n in range(1, 5):
        norm(md, t + (f"norm{n}",), b + (f"layer_norm{n}" if hf else f"norm{n}"))
      linear(md, t + ("mlp", "lin1"), b + "mlp.lin1")
      linear(md, t + ("mlp", "lin2"), b + "mlp.lin2")
    attention(("transformer", "final_attn_token_to_image"), tp + "final_attn_token_to_image")
    norm(md, ("transformer", "norm_final_attn"),
         tp + ("layer_norm_final_attn" if hf else "norm_final_attn"))
    for ours, hf_name, orig_name in [("upscale_conv1", "upscale_conv1", "output_upscaling.0"),
                                     ("upscale_conv2", "upscale_conv2", "output_upscaling.3")]:
      src = p + (hf_name if hf else orig_name)
      add(md, (ours, "kernel"), [src + ".weight"], _conv_transpose_hwio)
      add(md, (ours, "bias"), [src + ".bias"])
    norm(md, ("upscale_norm",), p + ("upscale_layer_norm" if hf else "output_upscaling.1"))

    def mlp(path, src, num_layers):
      for j in range(num_layers):
        if hf:
          sub = "proj_in" if j == 0 else "proj_out" if j == num_layers - 1 else f"layers.{j - 1}"
        else:
          sub = f"layers.{j}"
        linear(md, path + (f"layers_{j}",), f"{src}.{sub}")

    for i in range(cfg.num_mask_tokens):
      mlp((f"output_hypernetworks_mlps_{i}",), f"{p}output_hypernetworks_mlps.{i}", 3)
    mlp(("iou_prediction_head",), p + "iou_prediction_head", cfg.iou_head_depth)
  return rules


# ---------------------------------------------------------------- conversion

_MASK_PROMPT_REASON = "mask prompts are not implemented (PixelLLM never feeds them)"


def _ignorable(key: str, components: Sequence[str]) -> str | None:
  """Why a source key may stay unread, or None when reading it is required."""
  if key.startswith(("prompt_encoder.mask_downscaling.", "prompt_encoder.mask_embed.")):
    return _MASK_PROMPT_REASON
  if key in ("pixel_mean", "pixel_std"):
    return "normalization constants (SamViT normalizes itself)"
  owner = {"image_encoder": "image_encoder", "vision_encoder": "image_encoder",
           "prompt_encoder": "prompt_encoder", "shared_image_embedding": "prompt_encoder",
           "mask_decoder": "mask_decoder"}.get(key.split(".", 1)[0])
  if owner is not None and owner not in components:
    return f"{owner} not requested"
  return None


def convert(state_dict: Mapping[str, Any], configs: SamConfigs, *, fmt: str,
            components: Iterable[str] = COMPONENTS, strict: bool = True) -> SamParams:
  """Converts a state dict in layout `fmt` ('original' or 'hf'); see the module docstring.

  Raises `common.ConversionError` naming every missing key, shape mismatch,
  target parameter no rule fills and (with `strict`) unknown source key.
  """
  if fmt not in (ORIGINAL, HF):
    raise ValueError(f"fmt must be {ORIGINAL!r} or {HF!r}, got {fmt!r}")
  components = tuple(components)
  bad = [c for c in components if c not in COMPONENTS]
  if bad:
    raise ValueError(f"unknown components {bad}; choose from {COMPONENTS}")
  report = common.ConversionReport(source=f"SAM ({fmt})")
  reader = common.Reader(state_dict, report)
  for key in state_dict:
    why = _ignorable(key, components)
    if why is not None:
      reader.ignore(key, why)
  flat: dict[str, np.ndarray | None] = {}
  for rule in _plan(fmt, configs, components):
    target = rule.component + "/" + "/".join(rule.path)
    arrays = []
    for alternatives in rule.sources:
      present = [name for name in alternatives if reader.has(name)]
      arrays.append(reader.get(present[0] if present else alternatives[0], target=target))
      for other in present[1:]:  # tied copies (HF saves one, state_dict() both): must agree
        if not np.array_equal(arrays[-1], reader.get(other, target=target)):
          report.mismatched.append(f"{present[0]} and {other} are tied copies but differ")
    flat[target] = None
    if all(a is not None for a in arrays):
      try:
        flat[target] = np.asarray(rule.fn(*arrays), dtype=np.float32)
      except (ValueError, IndexError, TypeError) as e:  # e.g. a tensor of the wrong rank
        keys = [next((n for n in alternatives if reader.has(n)), alternatives[0])
                for alternatives in rule.sources]
        shapes = ", ".join(f"{k} {tuple(a.shape)}" for k, a in zip(keys, arrays))
        report.mismatched.append(f"{shapes} (for {target}): cannot be converted "
                                 f"({type(e).__name__}: {e})")
  expected = {f"{component}/{path}": shape
              for component, shapes in expected_shapes(configs).items()
              if component in components for path, shape in shapes.items()}
  report.finish(flat, expected, strict=strict)
  trees = common.unflatten_params(flat)
  return SamParams(
      image_encoder=trees.get("image_encoder"),
      prompt_encoder=trees.get("prompt_encoder"),
      mask_decoder=trees.get("mask_decoder"),
      report=report,
  )


def convert_original_sam(state_dict: Mapping[str, Any], configs: SamConfigs, *,
                         components: Iterable[str] = COMPONENTS,
                         strict: bool = True) -> SamParams:
  """Original segment-anything `Sam.state_dict()` -> SamParams."""
  return convert(state_dict, configs, fmt=ORIGINAL, components=components, strict=strict)


def convert_hf_sam(state_dict: Mapping[str, Any], configs: SamConfigs, *,
                   components: Iterable[str] = COMPONENTS, strict: bool = True) -> SamParams:
  """Hugging Face `SamModel.state_dict()` -> SamParams."""
  return convert(state_dict, configs, fmt=HF, components=components, strict=strict)


# ---------------------------------------------------------------- loading files

load_state_dict = common.load_state_dict


def load_original_sam(path: str, configs: SamConfigs, *,
                      components: Iterable[str] = COMPONENTS, strict: bool = True) -> SamParams:
  """Converts an original SAM checkpoint file (e.g. sam_vit_h_4b8939.pth, torch weights_only)."""
  return convert_original_sam(load_state_dict(path), configs, components=components,
                              strict=strict)


def load_hf_sam(directory: str, *, image_size: int | None = None,
                components: Iterable[str] = COMPONENTS,
                strict: bool = True) -> tuple[SamParams, SamConfigs]:
  """Converts a Hugging Face SamModel directory; returns (params, matching configs)."""
  configs = hf_sam_configs(directory, image_size=image_size)
  params = convert_hf_sam(load_state_dict(directory), configs, components=components,
                          strict=strict)
  return params, configs
