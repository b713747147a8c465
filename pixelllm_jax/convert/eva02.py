"""timm EVA02 state dict -> `EVA02ViT` params.

`eva02_params_from_timm(state_dict, config)` maps a timm `Eva` (EVA02 settings) state dict onto
the parameter tree of `pixelllm_jax.models.eva02.EVA02ViT(config)`; `load_timm_eva02(path, config)`
reads the checkpoint first (.safetensors, or .pth/.pt/.bin through `torch.load(weights_only=True)`).

Accepted layouts (both occur in timm's EVA02 models):
- separate projections (`qkv_fused=False`: eva02 base/large, CLIP towers): `attn.q_proj.{weight,bias}`,
  `attn.k_proj.weight`, `attn.v_proj.{weight,bias}`;
- fused projection (`qkv_fused=True`, timm's default: eva02 tiny/small): `attn.qkv.weight` split in
  thirds (q, k, v rows), biases from `attn.q_bias` / `attn.v_bias` (timm's k bias is a zero buffer and
  never saved). A model built with `qkv_bias=False` has no biases at all; then q/v biases are zeros,
  which is exact, and the report says so. A raw `attn.qkv.bias` is split too if its k third is zero.
- SwiGLU with sub-LN (`swiglu_mlp=True, scale_mlp=True`): `mlp.fc1_g`, `mlp.fc1_x`, `mlp.norm`,
  `mlp.fc2`; a packed `mlp.fc1` (gate rows first, as timm's `GluMlp(gate_last=False)`) is split.
  Without `mlp.norm` (timm `scale_mlp=False`: eva02 tiny/small) give `EVA02Config(mlp_norm=False)`;
  a checkpoint whose sub-LN presence disagrees with the config is an error naming the keys.
- the original EVA names that timm's `checkpoint_filter_fn` renames (`mlp.w1/w2/w3/w12`,
  `mlp.ffn_ln`, `attn.q_bias`/`v_bias` next to `q_proj`) and the `visual.` / `visual.trunk.`
  prefixes of OpenCLIP checkpoints (keys outside the prefix are ignored, with the reason).
- the final norm: `norm` (timm's post-transformer norm, present with `global_pool='token'` and in
  the MIM checkpoints; PixelLLM's `ln_post`). When the checkpoint only has `fc_norm` (timm applies
  it after average pooling, `global_pool='avg'`), `fc_norm` becomes our per-token `norm`: our output
  then equals `model.fc_norm(model.forward_features(x))[:, 1:]`, and the report says so.

Ignored, and listed in the report's `ignored` with the reason: `head.*`, `fc_norm.*` when `norm`
is present, `rope.*` buffers, the MIM pretraining `mask_token` / `lm_head.*`, keys outside an
OpenCLIP `visual.` prefix. Any other key left over (layer scale `gamma_1/2`, `attn.norm`,
`q_norm`/`k_norm`, `norm_pre`, `reg_token`, blocks beyond `config.depth`, ...) would change the
math, so with missing keys and shape mismatches it raises one `common.ConversionError` (a
`ValueError`) naming them all. Accounting, file reading and shape checks are `convert/common.py`'s.

The config must describe the checkpoint: `width`, `depth`, `num_heads` (not in the weights: pick
timm's), `mlp_dim` (timm's `int(width * mlp_ratio)`), `patch_size`, `pretrain_grid` (timm's
`img_size // patch_size` the pos-embed was saved at), `layer_norm_eps=1e-6` (timm's EVA02).

RoPE reference grid: timm builds the rotary positions as `arange(n) / n * ref_feat_shape`
(`ref_feat_shape` is the pretraining grid, e.g. 16 for 224/14), or as plain `arange(n)` when
`ref_feat_shape=None`. `EVA02Config.rope_ref_grid` is the same number: set it to timm's
`ref_feat_shape` to reproduce timm at every resolution. PixelLLM's choice, "reference grid = current
grid", is `rope_ref_grid=None` (plain indices), which equals timm with `ref_feat_shape=None`; the
two agree with timm's pretrained setting only at the native grid (e.g. 16x16 at 224 px), and at
384 px (27x27) PixelLLM's positions run to 26 where timm's stay below 16.
"""
import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from pixelllm_jax.convert import common
from pixelllm_jax.models import eva02 as eva02_model

_IGNORED = ((re.compile(r"^head\."), "classifier head"),
            (re.compile(r"^(lm_head\.|mask_token$)"), "MIM pretraining only"),
            (re.compile(r"(^|\.)rope\."), "RoPE buffer (recomputed)"))
_EVA_RENAMES = (("mlp.ffn_ln.", "mlp.norm."), ("mlp.w12.", "mlp.fc1."), ("mlp.w1.", "mlp.fc1_g."),
                ("mlp.w2.", "mlp.fc1_x."), ("mlp.w3.", "mlp.fc2."))


def _normalize_keys(state_dict: Mapping[str, Any]) -> tuple[dict, list[str], list[str]]:
  """Strips an OpenCLIP prefix and renames original EVA keys to timm's names.

  Returns (state dict in timm names, keys outside the prefix, notes).
  """
  prefix = next((p for p in ("visual.trunk.", "visual.") if p + "pos_embed" in state_dict), "")
  out, outside, notes = {}, [], []
  for key, value in state_dict.items():
    if not key.startswith(prefix):
      outside.append(key)
      continue
    name = key[len(prefix):]
    for old, new in _EVA_RENAMES:
      name = name.replace(old, new)
    out[name] = value
  for name in [n for n in out if n.endswith((".attn.q_bias", ".attn.v_bias"))]:
    proj = name[:-len("_bias")] + "_proj"  # original EVA: separate q_proj plus a q_bias parameter
    if proj + ".weight" in out:
      out[proj + ".bias"] = out.pop(name)
  if prefix:
    notes.append(f"read the keys under {prefix!r}")
  if any(old in key for key in state_dict for old, _ in _EVA_RENAMES):
    notes.append("renamed original EVA keys (mlp.w1/w2/w3/w12, ffn_ln) to timm's")
  return {**out, **{k: state_dict[k] for k in outside}}, outside, notes


def _transpose(w: np.ndarray) -> np.ndarray:
  return w.T


def _attention(r: common.Reader, src: str, dst: str, width: int, has_bias: bool) -> dict:
  out = {}
  if r.has(src + "qkv.weight"):
    qkv = r.get(src + "qkv.weight", target=dst + "q_proj/kernel")
    if qkv is not None and qkv.shape[0] % 3 == 0:
      for name, w in zip("qkv", np.split(qkv, 3, axis=0)):
        out[f"{dst}{name}_proj/kernel"] = w.T
    elif qkv is not None:
      r.report.mismatched.append(f"{src}qkv.weight {qkv.shape}: rows are not 3 * width")
    if r.has(src + "qkv.bias"):
      qb, kb, vb = np.split(r.get(src + "qkv.bias"), 3)
      if np.any(kb != 0):
        r.report.unexpected.append(f"{src}qkv.bias (non-zero k bias; EVA02ViT's k_proj has none)")
    elif has_bias:
      qb = r.get(src + "q_bias", target=dst + "q_proj/bias")
      vb = r.get(src + "v_bias", target=dst + "v_proj/bias")
    else:
      qb = vb = np.zeros((width,), np.float32)
  else:
    for name in "qkv":
      out[f"{dst}{name}_proj/kernel"] = r.get(f"{src}{name}_proj.weight", _transpose,
                                              target=f"{dst}{name}_proj/kernel")
    if has_bias:
      qb = r.get(src + "q_proj.bias", target=dst + "q_proj/bias")
      vb = r.get(src + "v_proj.bias", target=dst + "v_proj/bias")
    else:
      qb = vb = np.zeros((width,), np.float32)
  out[dst + "q_proj/bias"], out[dst + "v_proj/bias"] = qb, vb
  out[dst + "proj/kernel"] = r.get(src + "proj.weight", _transpose, target=dst + "proj/kernel")
  out[dst + "proj/bias"] = r.get(src + "proj.bias", target=dst + "proj/bias")
  return out


def _linear(r: common.Reader, src: str, dst: str) -> dict:
  return {dst + "/kernel": r.get(src + ".weight", _transpose, target=dst + "/kernel"),
          dst + "/bias": r.get(src + ".bias", target=dst + "/bias")}


def _norm(r: common.Reader, src: str, dst: str) -> dict:
  return {dst + "/scale": r.get(src + ".weight", target=dst + "/scale"),
          dst + "/bias": r.get(src + ".bias", target=dst + "/bias")}


def _mlp(r: common.Reader, src: str, dst: str, mlp_norm: bool) -> dict:
  out = {}
  if r.has(src + "fc1.weight"):  # packed GluMlp: first half gates (silu), second half values
    w, b = r.get(src + "fc1.weight"), r.get(src + "fc1.bias")
    if w is not None and w.shape[0] % 2 == 0:
      for name, wi in zip(("fc1_g", "fc1_x"), np.split(w, 2, axis=0)):
        out[f"{dst}{name}/kernel"] = wi.T
    if b is not None and b.shape[0] % 2 == 0:
      out[dst + "fc1_g/bias"], out[dst + "fc1_x/bias"] = np.split(b, 2)
  else:
    out.update(_linear(r, src + "fc1_g", dst + "fc1_g"))
    out.update(_linear(r, src + "fc1_x", dst + "fc1_x"))
  if mlp_norm and not r.has(src + "norm.weight"):
    r.report.missing.append(
        f"{src}norm.weight/bias (no SwiGLU sub-LN in the source, timm scale_mlp=False as eva02 "
        "tiny/small: give EVA02Config(mlp_norm=False))")
    out[dst + "norm/scale"] = out[dst + "norm/bias"] = None
  elif mlp_norm:
    out.update(_norm(r, src + "norm", dst + "norm"))
  # Without mlp_norm a source `norm` stays unread and is reported as a left-over key.
  out.update(_linear(r, src + "fc2", dst + "fc2"))
  return out


def eva02_params_from_timm(state_dict: Mapping[str, Any], config: eva02_model.EVA02Config, *,
                           return_report: bool = False):
  """timm EVA02 state dict (torch tensors or arrays) -> `EVA02ViT(config)` params.

  Returns the nested params dict of float32 numpy arrays (no logical-axis boxes), or
  `(params, report)` with `return_report=True` (a `common.ConversionReport`). Raises
  `common.ConversionError` (a ValueError) naming every missing, left-over and mismatched key.
  """
  sd, outside, notes = _normalize_keys(state_dict)
  report = common.ConversionReport(source="timm EVA02", notes=notes)
  r = common.Reader(sd, report)
  for key in outside:
    r.ignore(key, "outside the vision tower's prefix")
  for key in sd:
    for pattern, reason in _IGNORED:
      if pattern.search(key):
        r.ignore(key, reason)

  flat = {
      "patch_embed/kernel": r.get("patch_embed.proj.weight", lambda w: w.transpose(2, 3, 1, 0),
                                  target="patch_embed/kernel"),
      "patch_embed/bias": r.get("patch_embed.proj.bias", target="patch_embed/bias"),
      "cls_token": r.get("cls_token", lambda w: w.reshape(-1), target="cls_token"),
      "pos_embed": r.get("pos_embed", lambda w: w.reshape(-1, w.shape[-1]), target="pos_embed"),
  }
  has_bias = any(re.match(r"^blocks\.\d+\.attn\.(q_bias|q_proj\.bias|qkv\.bias)$", k) for k in sd)
  if not has_bias:
    notes.append("no q/v attention biases in the source (timm qkv_bias=False): zeros")
  for i in range(config.depth):  # blocks beyond config.depth stay unused, hence errors
    src, dst = f"blocks.{i}.", f"blocks_{i}/"
    flat.update(_norm(r, src + "norm1", dst + "norm1"))
    flat.update(_attention(r, src + "attn.", dst + "attn/", config.width, has_bias))
    flat.update(_norm(r, src + "norm2", dst + "norm2"))
    flat.update(_mlp(r, src + "mlp.", dst + "mlp/", config.mlp_norm))
  if not r.has("norm.weight") and r.has("fc_norm.weight"):
    flat.update(_norm(r, "fc_norm", "norm"))
    notes.append("no final `norm`: `fc_norm` (timm's post-pooling norm) applied per token")
  else:
    flat.update(_norm(r, "norm", "norm"))
    for key in ("fc_norm.weight", "fc_norm.bias"):
      r.ignore(key, "timm's post-pooling norm (the per-token `norm` is used)")

  image = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.uint8)
  report.finish(flat, common.expected_shapes(eva02_model.EVA02ViT(config), image))
  params = common.unflatten_params(flat)
  return (params, report) if return_report else params


def load_timm_eva02(path: str | os.PathLike, config: eva02_model.EVA02Config, *,
                    return_report: bool = False):
  """`eva02_params_from_timm` on a checkpoint: .safetensors, .pth/.pt/.bin/.ckpt (torch.load
  weights_only=True; {'model': ...}-style wrappers unpacked) or a directory (`common.load_state_dict`)."""
  return eva02_params_from_timm(common.load_state_dict(os.fspath(path)), config,
                                return_report=return_report)
