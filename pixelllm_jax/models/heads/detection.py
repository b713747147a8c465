"""Dense-captioning box decoder: ViTDet's simple feature pyramid + CenterNet2, one ROI stage.

As PixelLLM's `box_decoder.py` (GRiT's detector: a class-agnostic CenterNet2 with
one cascade stage) on the fused visual map float32[B, h, w, C] (stride s0 =
canvas_size / h canvas pixels; 27 x 27 x 1280 on a 384 canvas at paper scale):

- Pyramid (ViTDet SimpleFeaturePyramid): per scale in `scales`, 4: deconv2x2,
  LN, GELU, deconv2x2; 2: deconv2x2 (ViTDet puts no LN / GELU after a single
  deconv); 1: identity; 0.5: 2x2 max-pool stride 2; then conv1x1 -> LN ->
  conv3x3 -> LN to `width` (no conv biases). Then `extra_levels` 3x3 stride-2
  convs (padding 1), the second and later reading the ReLU of the previous one
  (CenterNet2's LastLevelP6P7). Level strides: s0 / scale, then x2 per extra level.
- Proposal head (CenterNet2 `only_proposal`, shared over levels): ONE tower of
  `head_convs` x (conv3x3, GroupNorm(min(32, width)), ReLU); the heatmap conv
  (1 logit, bias -log(99): prior 0.01) and the regression conv (4 ltrb
  distances in level strides, bias 8) both read it, the regression times a
  learned per-level scale (init 1), then ReLU. Conv weights normal(0.01).
- Proposals: sigmoid heatmap, 3x3 local maxima, top-k over all levels, boxes
  (cx - l s, cy - t s, cx + r s, cy + b s) around cell centres ((i + 0.5) s),
  clipped to the image, greedy NMS at 0.9, stop-gradient.
- ROI stage: ROIAlign roi_size^2, 2 x 2 bilinear samples per bin, aligned
  (-0.5 px), from the scale levels only (GRiT pools p3-p5, not p6 / p7), level
  by the FPN rule floor(k0 + log2(sqrt(area) / (14 s0))) with k0 the scale-1
  level; fc-ReLU-fc-ReLU; one objectness logit and 4 R-CNN deltas (weights
  10, 10, 5, 5; dw, dh clamped at log(1000 / 16) when decoding).
- Detections: score sqrt(sigmoid(roi logit) * proposal score) (CenterNet2's
  mult_proposal_score), >= score_threshold, class-agnostic NMS, top max_detections.

Choices a reader of the papers should know:
- Heatmap target: Gaussian over cell centres with sigma_x = max(w / 6, s / 2),
  sigma_y = max(h / 6, s / 2) (w, h in canvas px: CenterNet's size-adaptive
  spread, floored at half a stride so boxes small for their level still give a
  smooth target), max over boxes; each box's centre cell is exactly 1 and is
  the positive. (CenterNet2 uses exp(-d^2 / (delta^2 area)), a narrower peak.)
- Regression: a cell regresses the smallest-area box assigned to its level that
  contains its centre (or whose centre cell it is), weighted by that box's
  heatmap value there (1 at its centre cell); CenterNet2 also weights by the
  heatmap. GIoU loss, divided by the batch's weight sum.
- ROI sampling is DETERMINISTIC, a deliberate deviation from the official random
  sampler: up to `roi_positive_fraction` of `roi_samples` foreground (IoU >=
  fg_iou) highest IoU first, the rest background by proposal score (the hardest
  negatives), ground-truth boxes appended as score-1 proposals. With no RNG the
  step is a pure function of the batch, so runs reproduce and gradient
  accumulation over micro-batches equals the full-batch step exactly.
- The ROI normalizer is the nominal roi_samples per image with ground truth (a
  function of the ground truth alone, as `normalizers` must be); the official
  divides by the ROIs actually sampled, the same number whenever an image has
  roi_samples valid proposals + GT boxes (otherwise the missing ROIs count as
  zero-loss samples).
- Proposals are clipped to the image, not only the canvas (detectron2 clips to
  the unpadded image too); the 0.5 level max-pools with ceil ('SAME'), so a 27
  map gives 14 (every fused cell is pooled; stride exactly 2 s0).
- ROIAlign is computed as two interpolation matrices per level (the bilinear
  weights and the 2 x 2 sample grid both factor into y and x) contracted with
  einsum: plain jnp, exact, and its backward pass is a matmul, not a scatter.

Boxes at the API are xyxy normalized to the unpadded image (the image sits at the
canvas's top-left; `image_valid_hw` float32[B, 2] is its (h, w) fraction of the
canvas); inside they are canvas pixels. Parameter names: conv kernels
(conv_height, conv_width, channels [in], embed [out]); the few-number outputs (a
logit, 4 box numbers) use 'coords' (replicated).
"""
import dataclasses
import math
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from pixelllm_jax import layers
from pixelllm_jax.models.mask_decoder import ConvTranspose2x2

Array = jax.Array

_SCALES = (4.0, 2.0, 1.0, 0.5)
_DELTA_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
_DELTA_CLAMP = math.log(1000.0 / 16)
_CANONICAL_CELLS = 14.0  # FPN's canonical 224 px box at stride 16
_FOCAL_ALPHA, _FOCAL_GAMMA, _FOCAL_BETA = 0.25, 2.0, 4.0
_PRIOR = 0.01
_REG_BIAS = 8.0  # CenterNet2's regression bias: ReLU'd outputs start alive
_EPS = 1e-7


@dataclasses.dataclass(frozen=True)
class BoxHeadConfig:
  """The box decoder (module docstring); paper sizes by default.

  canvas_size: square canvas side in pixels (the fused map covers it).
  scales: pyramid scales from the fused map, finest first, halving, from {4, 2, 1, 0.5}.
  num_proposals_train / _test: proposals after proposal NMS.
  size_range: (lo, hi) of the level ranges in level strides (first level from 0,
    last to infinity); a box goes to every level whose range holds max(w, h).
  dtype: compute dtype; parameters float32; outputs and losses float32.
  """
  canvas_size: int = 384
  width: int = 256
  scales: tuple[float, ...] = (2.0, 1.0, 0.5)
  extra_levels: int = 2
  head_convs: int = 4
  num_proposals_train: int = 1000
  num_proposals_test: int = 256
  proposal_nms_iou: float = 0.9
  roi_size: int = 7
  roi_fc: int = 1024
  roi_samples: int = 512
  roi_positive_fraction: float = 0.25
  fg_iou: float = 0.6
  nms_iou: float = 0.5
  max_detections: int = 100
  score_threshold: float = 0.05
  size_range: tuple[float, float] = (2.0, 5.0)
  hm_weight: float = 0.5
  reg_weight: float = 1.0
  dtype: Any = jnp.float32

  def __post_init__(self):
    object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
    object.__setattr__(self, "size_range", tuple(float(s) for s in self.size_range))
    if (any(s not in _SCALES for s in self.scales) or 1.0 not in self.scales
        or any(a != 2 * b for a, b in zip(self.scales, self.scales[1:]))):
      raise ValueError(f"BoxHeadConfig.scales {self.scales}: from {_SCALES}, finest first, "
                       "halving level to level, including 1.0 (the FPN rule's canonical level)")
    for name in ("canvas_size", "width", "num_proposals_train", "num_proposals_test",
                 "roi_size", "roi_fc", "roi_samples", "max_detections"):
      if getattr(self, name) < 1:
        raise ValueError(f"BoxHeadConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.extra_levels < 0 or self.head_convs < 0:
      raise ValueError("BoxHeadConfig.extra_levels and head_convs must be >= 0")
    if self.width % min(32, self.width):
      raise ValueError(f"BoxHeadConfig.width {self.width}: GroupNorm uses min(32, width) "
                       "groups, so a width above 32 must be a multiple of 32")
    for name in ("proposal_nms_iou", "fg_iou", "nms_iou", "roi_positive_fraction"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"BoxHeadConfig.{name} must be in [0, 1], got {getattr(self, name)}")
    lo, hi = self.size_range
    if not 0.0 <= lo < hi:
      raise ValueError(f"BoxHeadConfig.size_range {self.size_range}: need 0 <= lo < hi")


@flax.struct.dataclass
class Detections:
  boxes: Array   # float32[B, D, 4] image-normalized xyxy (zeros where not valid)
  scores: Array  # float32[B, D] (0 where not valid)
  valid: Array   # bool[B, D]


@flax.struct.dataclass
class LevelTargets:
  heat: Array      # float32[B, h, w] heatmap target
  positive: Array  # bool[B, h, w] centre cells of assigned boxes
  ltrb: Array      # float32[B, h, w, 4] distances to the regressed box, in level strides
  weight: Array    # float32[B, h, w] regression weight (0: no regression)
  assigned: Array  # float32[B] (box, level) assignments per image


@flax.struct.dataclass
class Targets:
  levels: tuple[LevelTargets, ...]
  image_mask: Array  # float32[B]: 1 for images with at least one valid box


def level_shapes(fused_hw: tuple[int, int], config: BoxHeadConfig) -> list[tuple[int, int, float]]:
  """(h, w, stride in canvas px) per level, finest first; halvings round up (ceil)."""
  h, w = fused_hw
  if h != w:
    raise ValueError(f"the fused map must be square (it covers the square canvas), got {fused_hw}")
  s0 = config.canvas_size / h
  shapes = [(math.ceil(h * s), math.ceil(w * s), s0 / s) for s in config.scales]
  for _ in range(config.extra_levels):
    lh, lw, ls = shapes[-1]
    shapes.append((math.ceil(lh / 2), math.ceil(lw / 2), 2 * ls))
  return shapes


# ---- boxes
def _area(b: Array) -> Array:
  return jnp.maximum(b[..., 2] - b[..., 0], 0) * jnp.maximum(b[..., 3] - b[..., 1], 0)


def pairwise_iou(a_N4: Array, b_M4: Array) -> Array:
  """float32[N, M] IoU of xyxy boxes (0 where the union is empty)."""
  lt = jnp.maximum(a_N4[:, None, :2], b_M4[None, :, :2])
  rb = jnp.minimum(a_N4[:, None, 2:], b_M4[None, :, 2:])
  inter = jnp.prod(jnp.maximum(rb - lt, 0), axis=-1)
  union = _area(a_N4)[:, None] + _area(b_M4)[None, :] - inter
  return jnp.where(union > 0, inter / jnp.maximum(union, _EPS), 0.0)


def giou_loss(a: Array, b: Array) -> Array:
  """float32[...]: 1 - GIoU of matching xyxy boxes float32[..., 4]."""
  inter = jnp.prod(jnp.maximum(jnp.minimum(a[..., 2:], b[..., 2:])
                               - jnp.maximum(a[..., :2], b[..., :2]), 0), axis=-1)
  union = _area(a) + _area(b) - inter
  hull = _area(jnp.concatenate([jnp.minimum(a[..., :2], b[..., :2]),
                                jnp.maximum(a[..., 2:], b[..., 2:])], axis=-1))
  iou = inter / (union + _EPS)
  return 1.0 - (iou - (hull - union) / (hull + _EPS))


def encode_deltas(boxes: Array, targets: Array) -> Array:
  """R-CNN deltas float32[..., 4] taking xyxy `boxes` to `targets` (weights 10, 10, 5, 5)."""
  wx, wy, ww, wh = _DELTA_WEIGHTS
  pw = jnp.maximum(boxes[..., 2] - boxes[..., 0], _EPS)
  ph = jnp.maximum(boxes[..., 3] - boxes[..., 1], _EPS)
  gw = jnp.maximum(targets[..., 2] - targets[..., 0], _EPS)
  gh = jnp.maximum(targets[..., 3] - targets[..., 1], _EPS)
  dx = wx * ((targets[..., 0] + 0.5 * gw) - (boxes[..., 0] + 0.5 * pw)) / pw
  dy = wy * ((targets[..., 1] + 0.5 * gh) - (boxes[..., 1] + 0.5 * ph)) / ph
  return jnp.stack([dx, dy, ww * jnp.log(gw / pw), wh * jnp.log(gh / ph)], axis=-1)


def decode_deltas(deltas: Array, boxes: Array) -> Array:
  """xyxy boxes from R-CNN deltas applied to `boxes` (dw, dh clamped at log(1000 / 16))."""
  wx, wy, ww, wh = _DELTA_WEIGHTS
  pw, ph = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
  cx = boxes[..., 0] + 0.5 * pw + deltas[..., 0] / wx * pw
  cy = boxes[..., 1] + 0.5 * ph + deltas[..., 1] / wy * ph
  w = pw * jnp.exp(jnp.minimum(deltas[..., 2] / ww, _DELTA_CLAMP))
  h = ph * jnp.exp(jnp.minimum(deltas[..., 3] / wh, _DELTA_CLAMP))
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def nms(boxes: Array, scores: Array, valid: Array, iou_threshold: float,
        max_out: int) -> tuple[Array, Array]:
  """Greedy NMS of one image: (indices int32[max_out], kept bool[max_out]).

  boxes float32[N, 4], scores float32[N], valid bool[N]. Kept boxes come first in
  decreasing score (ties: lower index first); a box is dropped when its IoU with a
  kept higher-scoring box exceeds `iou_threshold`. Padded slots have kept False.
  """
  n = boxes.shape[0]
  if n < max_out:
    boxes = jnp.concatenate([boxes, jnp.zeros((max_out - n, 4), boxes.dtype)])
    scores = jnp.concatenate([scores, jnp.zeros((max_out - n,), scores.dtype)])
    valid = jnp.concatenate([valid, jnp.zeros((max_out - n,), bool)])
    n = max_out
  order = jnp.argsort(-jnp.where(valid, scores, -jnp.inf), stable=True)
  iou = pairwise_iou(boxes[order], boxes[order])
  valid_sorted = valid[order]

  def step(i, keep):
    return keep.at[i].set(valid_sorted[i] & ~jnp.any(keep & (iou[i] > iou_threshold)))

  keep = jax.lax.fori_loop(0, n, step, jnp.zeros((n,), bool))
  slots = jnp.argsort(~keep, stable=True)[:max_out]
  return order[slots].astype(jnp.int32), keep[slots]


def _take(x: Array, idx: Array) -> Array:
  """x[b, idx[b]] for x [B, N, ...] and idx int[B, K]."""
  return jax.vmap(lambda a, i: a[i])(x, idx)


def _image_px(image_valid_hw: Array, canvas: int) -> Array:
  """float32[B, 1, 4]: the image's (w, h, w, h) in canvas px (image-normalized xyxy -> px)."""
  wh = image_valid_hw.astype(jnp.float32)[:, None, ::-1] * canvas
  return jnp.concatenate([wh, wh], axis=-1)


def _gt_canvas(gt_boxes, gt_valid, image_valid_hw, canvas) -> tuple[Array, Array]:
  """Ground truth clipped to the image, in canvas px; degenerate boxes are not valid."""
  boxes = jnp.clip(gt_boxes.astype(jnp.float32), 0.0, 1.0) * _image_px(image_valid_hw, canvas)
  ok = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
  return boxes, gt_valid.astype(bool) & ok


# ---- targets and normalizers (no parameters)
def targets(gt_boxes: Array, gt_valid: Array, image_valid_hw: Array, fused_hw: tuple[int, int],
            config: BoxHeadConfig) -> Targets:
  """Per-level heatmap and regression targets of the proposal head (module docstring).

  gt_boxes float32[B, G, 4] image-normalized xyxy, gt_valid bool[B, G],
  image_valid_hw float32[B, 2]. Pure: the caller may compute it without parameters.
  """
  boxes, valid = _gt_canvas(gt_boxes, gt_valid, image_valid_hw, config.canvas_size)
  x1, y1, x2, y2 = (boxes[..., k, None, None] for k in range(4))  # [B, G, 1, 1]
  bw, bh = x2 - x1, y2 - y1
  cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
  size = jnp.maximum(bw, bh)[..., 0, 0]
  lo, hi = config.size_range
  shapes = level_shapes(fused_hw, config)
  out = []
  for l, (h, w, s) in enumerate(shapes):
    low = 0.0 if l == 0 else lo * s
    high = jnp.inf if l == len(shapes) - 1 else hi * s
    assigned = valid & (size >= low) & (size <= high)  # [B, G]
    ys = ((jnp.arange(h) + 0.5) * s)[None, None, :, None]
    xs = ((jnp.arange(w) + 0.5) * s)[None, None, None, :]
    sx, sy = jnp.maximum(bw / 6, s / 2), jnp.maximum(bh / 6, s / 2)
    gauss = jnp.exp(-((xs - cx) ** 2 / (2 * sx**2) + (ys - cy) ** 2 / (2 * sy**2)))
    ci = jnp.clip(jnp.floor(cy / s), 0, h - 1)
    cj = jnp.clip(jnp.floor(cx / s), 0, w - 1)
    centre = (jnp.arange(h)[:, None] == ci) & (jnp.arange(w)[None, :] == cj)  # [B, G, h, w]
    a = assigned[..., None, None]
    box_heat = jnp.where(centre, 1.0, gauss) * a
    inside = (xs > x1) & (xs < x2) & (ys > y1) & (ys < y2)
    candidate = a & (inside | centre)
    area = jnp.where(candidate, (bw * bh), jnp.inf)
    pick = jnp.argmin(area, axis=1)  # [B, h, w] the smallest candidate box
    has = jnp.any(candidate, axis=1)
    picked = lambda x: jnp.take_along_axis(  # noqa: E731
        jnp.broadcast_to(x, box_heat.shape), pick[:, None], axis=1)[:, 0]
    ltrb = jnp.stack([picked(xs - x1), picked(ys - y1), picked(x2 - xs), picked(y2 - ys)],
                     axis=-1) / s  # [B, h, w, 4]
    out.append(LevelTargets(
        heat=box_heat.max(axis=1), positive=jnp.any(centre & a, axis=1),
        ltrb=jnp.where(has[..., None], ltrb, 1.0),  # finite dummy where not regressed
        weight=jnp.where(has, picked(box_heat), 0.0),
        assigned=assigned.sum(axis=1).astype(jnp.float32)))
  return Targets(levels=tuple(out), image_mask=jnp.any(valid, axis=1).astype(jnp.float32))


def _normalizers_of(t: Targets, config: BoxHeadConfig) -> dict[str, Array]:
  return {
      "heatmap": jnp.maximum(sum(lt.assigned.sum() for lt in t.levels), 1.0),
      "regression": jnp.maximum(sum(lt.weight.sum() for lt in t.levels), 1.0),
      "roi": jnp.maximum(config.roi_samples * t.image_mask.sum(), 1.0),
  }


def normalizers(gt_boxes: Array, gt_valid: Array, image_valid_hw: Array,
                fused_hw: tuple[int, int], config: BoxHeadConfig) -> dict[str, Array]:
  """Whole-batch loss denominators float32[] (each at least 1): heatmap (assigned
  (box, level) pairs), regression (weight sum), roi (roi_samples per image with GT)."""
  return _normalizers_of(targets(gt_boxes, gt_valid, image_valid_hw, fused_hw, config), config)


def focal_sum(logits: Array, heat: Array, positive: Array, mask: Array) -> Array:
  """CenterNet2's binary heatmap focal loss (alpha .25, gamma 2, beta 4), summed.

  positives: -alpha (1 - p)^gamma log p; others: -(1 - alpha) (1 - heat)^beta
  p^gamma log(1 - p); `mask` (broadcastable) weights the cells.
  """
  x = logits.astype(jnp.float32)
  p = jax.nn.sigmoid(x)
  pos = -_FOCAL_ALPHA * (1 - p) ** _FOCAL_GAMMA * jax.nn.log_sigmoid(x)
  neg = (-(1 - _FOCAL_ALPHA) * (1 - heat) ** _FOCAL_BETA * p ** _FOCAL_GAMMA
         * jax.nn.log_sigmoid(-x))
  return jnp.sum(jnp.where(positive, pos, neg) * mask)


# ---- ROIAlign
def _axis_weights(start: Array, length: Array, size: int, bins: int, sampling: int = 2) -> Array:
  """float32[..., bins, size]: one axis of ROIAlign, the mean bilinear weights of
  `sampling` points per bin (torchvision's edge rule: points beyond [-1, size] read 0,
  the rest clamp into the map)."""
  offsets = (jnp.arange(bins)[:, None] + (jnp.arange(sampling)[None, :] + 0.5) / sampling)
  coords = start[..., None] + offsets.reshape(-1) * (length / bins)[..., None]
  inside = (coords >= -1.0) & (coords <= size)
  c = jnp.clip(coords, 0.0, size - 1)
  low = jnp.floor(c)
  frac = c - low
  high = jnp.minimum(low + 1, size - 1)
  w = (jax.nn.one_hot(low.astype(jnp.int32), size) * (1 - frac)[..., None]
       + jax.nn.one_hot(high.astype(jnp.int32), size) * frac[..., None]) * inside[..., None]
  return w.reshape(*start.shape, bins, sampling, size).mean(axis=-2)


def roi_align(features: Sequence[Array], strides: Sequence[float], boxes_BN4: Array,
              level_BN: Array, size: int) -> Array:
  """float[B, N, size, size, C]: aligned ROIAlign of canvas-px boxes from their level.

  features: per level [B, h_l, w_l, C]; level_BN int index into them.
  """
  out = 0.0
  for l, (f, s) in enumerate(zip(features, strides)):
    b = boxes_BN4 / s - 0.5  # aligned: cell centres at integer coordinates
    on = (level_BN == l).astype(jnp.float32)[..., None, None]
    wy = _axis_weights(b[..., 1], b[..., 3] - b[..., 1], f.shape[1], size) * on
    wx = _axis_weights(b[..., 0], b[..., 2] - b[..., 0], f.shape[2], size)
    out = out + jnp.einsum("bnpy,bnqx,byxc->bnpqc", wy.astype(f.dtype), wx.astype(f.dtype), f)
  return out


def roi_levels(boxes_BN4: Array, config: BoxHeadConfig, s0: float) -> Array:
  """int32[B, N]: the scale level each box pools from (FPN rule, module docstring)."""
  k0 = config.scales.index(1.0)
  side = jnp.sqrt(_area(boxes_BN4))
  k = jnp.floor(jnp.log2(side / (_CANONICAL_CELLS * s0) + 1e-8))
  return jnp.clip(k0 + k, 0, len(config.scales) - 1).astype(jnp.int32)


# ---- modules
def _conv(features: int, size: int, name: str, dtype: Any, *, stride: int = 1,
          padding: Any = "SAME", use_bias: bool = True, out_axis: str = "embed",
          kernel_init=nn.initializers.lecun_normal(), bias_init=nn.initializers.zeros) -> nn.Conv:
  return nn.Conv(
      features, (size, size), strides=(stride, stride), padding=padding, use_bias=use_bias,
      dtype=dtype, name=name,
      kernel_init=layers.param_init(kernel_init, ("conv_height", "conv_width", "channels",
                                                  out_axis)),
      bias_init=layers.param_init(bias_init, (out_axis,)))


class SimpleFeaturePyramid(nn.Module):
  """float32[B, h, w, C] -> config.num_levels maps [B, h_l, w_l, width] (level_shapes)."""
  config: BoxHeadConfig

  @nn.compact
  def __call__(self, x_BHWC: Array) -> list[Array]:
    cfg, dt = self.config, self.config.dtype
    x = x_BHWC.astype(dt)
    c = x.shape[-1]
    levels = []
    for i, scale in enumerate(cfg.scales):
      y = x
      if scale == 4.0:
        y = ConvTranspose2x2(max(c // 2, 1), dtype=dt, name=f"level{i}_up1")(y)
        y = nn.gelu(layers.layer_norm(dtype=dt, name=f"level{i}_up_norm")(y), approximate=False)
        y = ConvTranspose2x2(max(c // 4, 1), dtype=dt, name=f"level{i}_up2")(y)
      elif scale == 2.0:
        y = ConvTranspose2x2(max(c // 2, 1), dtype=dt, name=f"level{i}_up1")(y)
      elif scale == 0.5:  # ceil: an odd last row / column is pooled with -inf padding
        y = nn.max_pool(y, (2, 2), strides=(2, 2),
                        padding=((0, y.shape[1] % 2), (0, y.shape[2] % 2)))
      y = _conv(cfg.width, 1, f"level{i}_conv1", dt, use_bias=False)(y)
      y = layers.layer_norm(dtype=dt, name=f"level{i}_norm1")(y)
      y = _conv(cfg.width, 3, f"level{i}_conv2", dt, use_bias=False)(y)
      levels.append(layers.layer_norm(dtype=dt, name=f"level{i}_norm2")(y))
    for k in range(cfg.extra_levels):
      y = levels[-1] if k == 0 else nn.relu(levels[-1])
      levels.append(_conv(cfg.width, 3, f"extra{k}", dt, stride=2,
                          padding=((1, 1), (1, 1)))(y))
    return levels


class CenterHead(nn.Module):
  """Per level: (heatmap logits float32[B, h, w], ltrb float32[B, h, w, 4] in strides)."""
  config: BoxHeadConfig

  @nn.compact
  def __call__(self, levels: Sequence[Array]) -> list[tuple[Array, Array]]:
    cfg, dt = self.config, self.config.dtype
    normal = nn.initializers.normal(0.01)
    tower = [(_conv(cfg.width, 3, f"tower{i}_conv", dt, kernel_init=normal),
              nn.GroupNorm(min(32, cfg.width), epsilon=1e-5, dtype=dt, name=f"tower{i}_norm",
                           scale_init=layers.param_init(nn.initializers.ones, ("embed",)),
                           bias_init=layers.param_init(nn.initializers.zeros, ("embed",))))
             for i in range(cfg.head_convs)]
    heat_conv = _conv(1, 3, "heatmap", dt, out_axis="coords", kernel_init=normal,
                      bias_init=nn.initializers.constant(-math.log((1 - _PRIOR) / _PRIOR)))
    reg_conv = _conv(4, 3, "regression", dt, out_axis="coords", kernel_init=normal,
                     bias_init=nn.initializers.constant(_REG_BIAS))
    outs = []
    for l, x in enumerate(levels):
      for conv, norm in tower:
        x = nn.relu(norm(conv(x)))
      scale = self.param(f"level{l}_scale", layers.param_init(nn.initializers.ones, ()), ())
      heat = heat_conv(x)[..., 0].astype(jnp.float32)
      outs.append((heat, nn.relu(reg_conv(x).astype(jnp.float32) * scale)))
    return outs


class RoiBoxHead(nn.Module):
  """float[B, N, R, R, C] pooled ROIs -> (logits float32[B, N], deltas float32[B, N, 4])."""
  config: BoxHeadConfig

  @nn.compact
  def __call__(self, pooled: Array) -> tuple[Array, Array]:
    cfg, dt = self.config, self.config.dtype
    x = pooled.reshape(*pooled.shape[:2], -1).astype(dt)
    x = nn.relu(layers.dense(cfg.roi_fc, ("embed", "mlp"), dtype=dt, name="fc1")(x))
    x = nn.relu(layers.dense(cfg.roi_fc, ("mlp", "embed"), dtype=dt, name="fc2")(x))
    logit = layers.dense(1, ("embed", "coords"), dtype=dt, name="cls_score",
                         kernel_init=nn.initializers.normal(0.01))(x)
    deltas = layers.dense(4, ("embed", "coords"), dtype=dt, name="bbox_pred",
                          kernel_init=nn.initializers.normal(0.001))(x)
    return logit[..., 0].astype(jnp.float32), deltas.astype(jnp.float32)


def _proposals(outs, strides, image_valid_hw, config, k):
  """Top-k local maxima over all levels -> NMS'd proposals: canvas-px boxes
  float32[B, k, 4], scores float32[B, k], valid bool[B, k] (no gradient)."""
  boxes, scores, peaks = [], [], []
  for (heat, ltrb), s in zip(outs, strides):
    prob = jax.nn.sigmoid(heat)
    pooled = jax.lax.reduce_window(prob, -jnp.inf, jax.lax.max, (1, 3, 3), (1, 1, 1), "SAME")
    b, h, w = heat.shape
    cy = ((jnp.arange(h) + 0.5) * s)[None, :, None]
    cx = ((jnp.arange(w) + 0.5) * s)[None, None, :]
    d = ltrb * s
    box = jnp.stack([cx - d[..., 0], cy - d[..., 1], cx + d[..., 2], cy + d[..., 3]], axis=-1)
    boxes.append(box.reshape(b, -1, 4))
    scores.append(prob.reshape(b, -1))
    peaks.append((prob >= pooled).reshape(b, -1))
  boxes, scores = jnp.concatenate(boxes, 1), jnp.concatenate(scores, 1)
  key = jnp.where(jnp.concatenate(peaks, 1), scores, -1.0)
  top, idx = jax.lax.top_k(key, min(k, key.shape[1]))
  boxes = jnp.clip(_take(boxes, idx), 0.0, _image_px(image_valid_hw, config.canvas_size))
  valid = (top >= 0) & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
  keep, kept = jax.vmap(lambda b, sc, v: nms(b, sc, v, config.proposal_nms_iou, k))(
      boxes, top, valid)
  boxes = jnp.where(kept[..., None], _take(boxes, keep), 0.0)
  scores = jnp.where(kept, _take(top, keep), 0.0)
  return jax.lax.stop_gradient(boxes), jax.lax.stop_gradient(scores), kept


def _sample_rois(boxes, scores, valid, gt, gt_valid, config):
  """One image's deterministic ROI sample (module docstring): (rois [S, 4], weight
  bool[S], foreground bool[S], matched GT [S, 4]); proposals + GT as score-1 proposals."""
  n_out = config.roi_samples
  boxes = jnp.concatenate([boxes, gt])
  scores = jnp.concatenate([scores, jnp.ones(gt.shape[:1], scores.dtype)])
  valid = jnp.concatenate([valid, gt_valid])
  if boxes.shape[0] < n_out:
    pad = n_out - boxes.shape[0]
    boxes = jnp.concatenate([boxes, jnp.zeros((pad, 4), boxes.dtype)])
    scores = jnp.concatenate([scores, jnp.zeros((pad,), scores.dtype)])
    valid = jnp.concatenate([valid, jnp.zeros((pad,), bool)])
  iou = jnp.where(gt_valid[None, :], pairwise_iou(boxes, gt), -1.0)
  best, match = iou.max(axis=1), iou.argmax(axis=1)
  fg = valid & (best >= config.fg_iou)
  bg = valid & ~fg
  rank = lambda key: jnp.argsort(jnp.argsort(key, stable=True), stable=True)  # noqa: E731
  n_fg = jnp.minimum(fg.sum(), int(config.roi_positive_fraction * n_out))
  chosen = ((fg & (rank(jnp.where(fg, -best, jnp.inf)) < n_fg))
            | (bg & (rank(jnp.where(bg, -scores, jnp.inf)) < n_out - n_fg)))
  idx = jnp.argsort(~chosen, stable=True)[:n_out]
  return boxes[idx], chosen[idx], (fg & chosen)[idx], gt[match[idx]]


class BoxHead(nn.Module):
  """Dense-captioning box decoder (module docstring).

  `__call__` with ground truth returns the loss terms; without it, `detect`'s output.
  Both paths use the same three submodules, so either can initialize the params.
  """
  config: BoxHeadConfig

  def setup(self):
    self.pyramid = SimpleFeaturePyramid(self.config)
    self.center_head = CenterHead(self.config)
    self.roi_head = RoiBoxHead(self.config)

  def _features(self, fused_BHWC: Array):
    h, w = fused_BHWC.shape[1:3]
    shapes = level_shapes((h, w), self.config)
    levels = self.pyramid(fused_BHWC)
    if [x.shape[1:3] for x in levels] != [(a, b) for a, b, _ in shapes]:
      raise AssertionError(f"pyramid {[x.shape for x in levels]} disagrees with {shapes}")
    return levels, [s for _, _, s in shapes], self.config.canvas_size / h

  def _roi(self, levels, strides, s0, rois):
    n = len(self.config.scales)
    pooled = roi_align(levels[:n], strides[:n], rois, roi_levels(rois, self.config, s0),
                       self.config.roi_size)
    return self.roi_head(pooled)

  def __call__(self, fused_BHWC: Array, image_valid_hw: Array, gt_boxes: Array | None = None,
               gt_valid: Array | None = None,
               normalizers: dict[str, Array] | None = None) -> dict[str, Array] | Detections:
    """Loss terms float32[] {det_heatmap, det_regression, det_roi_cls, det_roi_reg,
    det_loss}, each sum divided by `normalizers` (default: this batch's own).

    fused_BHWC float[B, h, w, C]; image_valid_hw float32[B, 2]; gt_boxes float32[B, G, 4]
    image-normalized xyxy; gt_valid bool[B, G].
    """
    if gt_boxes is None:
      return self.detect(fused_BHWC, image_valid_hw)
    cfg = self.config
    image_valid_hw = image_valid_hw.astype(jnp.float32)
    if gt_valid is None:
      gt_valid = jnp.ones(gt_boxes.shape[:2], bool)
    levels, strides, s0 = self._features(fused_BHWC)
    outs = self.center_head(levels)
    t = targets(gt_boxes, gt_valid, image_valid_hw, fused_BHWC.shape[1:3], cfg)
    norm = _normalizers_of(t, cfg) if normalizers is None else normalizers
    mask = t.image_mask[:, None, None]
    hm = sum(focal_sum(heat, lt.heat, lt.positive, mask) for (heat, _), lt in zip(outs, t.levels))
    # ltrb as boxes around the cell centre (any common frame serves GIoU)
    box = lambda d: jnp.concatenate([-d[..., :2], d[..., 2:]], axis=-1)  # noqa: E731
    reg = sum(jnp.sum(lt.weight * giou_loss(box(ltrb), box(lt.ltrb)))
              for (_, ltrb), lt in zip(outs, t.levels))

    props, scores, valid = _proposals(outs, strides, image_valid_hw, cfg, cfg.num_proposals_train)
    gt_px, gt_ok = _gt_canvas(gt_boxes, gt_valid, image_valid_hw, cfg.canvas_size)
    rois, weight, fg, matched = jax.vmap(lambda *a: _sample_rois(*a, cfg))(
        props, scores, valid, gt_px, gt_ok)
    weight = weight & (t.image_mask[:, None] > 0)
    fg = fg & weight
    logits, deltas = self._roi(levels, strides, s0, rois)
    bce = -jnp.where(fg, jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits))
    roi_cls = jnp.sum(jnp.where(weight, bce, 0.0))
    l1 = jnp.abs(deltas - encode_deltas(rois, matched)).sum(axis=-1)
    roi_reg = jnp.sum(jnp.where(fg, l1, 0.0))
    terms = {"det_heatmap": hm / norm["heatmap"], "det_regression": reg / norm["regression"],
             "det_roi_cls": roi_cls / norm["roi"], "det_roi_reg": roi_reg / norm["roi"]}
    terms = {k: v.astype(jnp.float32) for k, v in terms.items()}
    terms["det_loss"] = (cfg.hm_weight * terms["det_heatmap"]
                         + cfg.reg_weight * terms["det_regression"]
                         + terms["det_roi_cls"] + terms["det_roi_reg"])
    return terms

  def detect(self, fused_BHWC: Array, image_valid_hw: Array) -> Detections:
    """Inference: up to max_detections image-normalized boxes per image (class-agnostic)."""
    cfg = self.config
    image_valid_hw = image_valid_hw.astype(jnp.float32)
    levels, strides, s0 = self._features(fused_BHWC)
    outs = self.center_head(levels)
    props, pscores, pvalid = _proposals(outs, strides, image_valid_hw, cfg,
                                        cfg.num_proposals_test)
    logits, deltas = self._roi(levels, strides, s0, props)
    px = _image_px(image_valid_hw, cfg.canvas_size)
    boxes = jnp.clip(decode_deltas(deltas, props), 0.0, px)
    scores = jnp.sqrt(jax.nn.sigmoid(logits) * pscores)
    valid = (pvalid & (scores >= cfg.score_threshold)
             & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1]))
    keep, kept = jax.vmap(lambda b, s, v: nms(b, s, v, cfg.nms_iou, cfg.max_detections))(
        boxes, scores, valid)
    boxes = _take(boxes, keep) / px
    return Detections(boxes=jnp.where(kept[..., None], boxes, 0.0),
                      scores=jnp.where(kept, _take(scores, keep), 0.0), valid=kept)
